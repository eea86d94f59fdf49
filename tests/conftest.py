import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when transformers is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

pytest_plugins = ["tests.zoo", "tests.zoo_sdxl", "tests.zoo_tokenizers", "tests.zoo_masked"]


import pytest  # noqa: E402 - after the environment above, which transformers reads when imported


@pytest.fixture(autouse=True)
def _same_random_state_every_run():
    """Every test starts from one random state, so a test that draws inputs without its own generator gives the
    same numbers on every run and every xdist worker (a rare draw can never make CI flaky)."""
    import random

    import numpy
    import torch

    random.seed(0)
    numpy.random.seed(0)
    torch.manual_seed(0)
