import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when transformers is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

pytest_plugins = ["tests.zoo", "tests.zoo_sdxl", "tests.zoo_tokenizers", "tests.zoo_masked"]
