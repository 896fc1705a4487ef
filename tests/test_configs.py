"""The AP block of the configs and APConfig are one set of names and defaults."""

import dataclasses
from pathlib import Path

from omegaconf import OmegaConf

from dopr.optim import APConfig

ROOT = Path(__file__).resolve().parents[1]


def test_ap_config_file_has_apconfig_fields_and_defaults():
    block = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/ap/default.yaml"))
    defaults = APConfig()
    assert list(block) == [f.name for f in dataclasses.fields(APConfig)]
    for key, value in block.items():
        expected = getattr(defaults, key)
        assert (tuple(value) if isinstance(value, list) else value) == expected, key


def test_every_dopr_optimizer_includes_the_ap_block():
    for path in sorted((ROOT / "configs/opt").glob("dopr_*.yaml")):
        text = path.read_text()
        assert "/ap@ap: default" in text or "- dopr_adamw" in text, path.name
