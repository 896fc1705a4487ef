"""DoPr: double preconditioning for test-time performance.

The optimizer library is :mod:`dopr.optim` (torch only). Everything else in this package is the research
stack (tasks, runner, analysis), installed with the ``research`` extra: ``pip install "dopr[research]"``.
"""

# The package's one version: pyproject.toml reads it from here ([tool.setuptools.dynamic]).
__version__ = "0.1.0"
