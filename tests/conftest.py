"""Fixtures shared by several test files."""

import pytest


@pytest.fixture(scope="session")
def lift_file(tmp_path_factory):
    """Two scripted Lift demos (seed 0, half of them validation) in robomimic's hdf5 layout, made once
    per test session (per xdist worker) by the same generator the task uses on first use."""
    from dopr.envs.scripted import generate_demos

    path = tmp_path_factory.mktemp("demos") / "lift.hdf5"
    generate_demos("Lift", 2, str(path), seed=0, valid_fraction=0.5, log=None)
    return path
