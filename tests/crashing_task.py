"""A task that dies mid-run, like a killed job: the resume and run-dir tests share it."""

from dopr.tasks.lds import LDSTask


class Crash(Exception):
    """What CrashingLDS raises: a test catches exactly this, never a real error."""


class CrashingLDS(LDSTask):
    """LDSTask whose loss raises Crash after ``crash_at`` calls (so after a checkpoint when later)."""

    def __init__(self, crash_at, **kw):
        super().__init__(**kw)
        self.crash_at, self.calls = crash_at, 0

    def loss(self, model, batch):
        self.calls += 1
        if self.calls > self.crash_at:
            raise Crash
        return super().loss(model, batch)
