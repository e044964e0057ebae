from __future__ import annotations

import numpy as np
import pytest
import torch

import harness
import tests.capabilities  # noqa: F401  (registers the contract-test methods for the shared battery)
from harness.cli import third_parties_offline_and_quiet

torch.set_num_threads(2)
third_parties_offline_and_quiet("pytest")  # as in every segprune command: ultralytics offline, out of ~/.config


@pytest.fixture(scope="session")
def tiny():
    return harness.load_model("random:tiny")


@pytest.fixture(scope="session")
def tiny_eager():
    return harness.load_model("random:tiny", attn_implementation="eager")


@pytest.fixture(scope="session")
def image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)
    img[40:100, 60:140] = (220, 30, 30)
    return img


QUERY = "the red square left of the blue circle"
