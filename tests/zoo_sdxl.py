"""Session fixtures: a tiny random SDXL pipeline saved to disk, and a tiny HF transformers CLIP.

The builders are :func:`models.tiny_models.build_tiny_sdxl` and the real CLIP BPE of
:func:`models.offline.write_clip_tokenizer_files` (no download needed).
"""
from pathlib import Path

import pytest
import torch

from models.offline import write_clip_tokenizer_files
from models.tiny_models import build_tiny_sdxl

__all__ = ["tiny_sdxl_dir", "hf_clip_dir"]


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """Directory holding a saved tiny SDXL pipeline that AutoPipelineForText2Image can load."""
    root = tmp_path_factory.mktemp("tiny_sdxl")
    pipe = build_tiny_sdxl(write_clip_tokenizer_files(root / "clip_bpe"))
    out = root / "pipeline"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory):
    """A tiny random HF transformers CLIP (48-wide 3-layer ViT at 32 px, patch 8) with the real CLIP BPE."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("hf-clip")
    tok_dir = write_clip_tokenizer_files(d / "tok")
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=77, vocab_size=49408),
                     vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                        image_size=32, patch_size=8), projection_dim=24)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d / "model")
    CLIPTokenizer.from_pretrained(tok_dir).save_pretrained(d / "model")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d / "model")
    return str(d / "model")
