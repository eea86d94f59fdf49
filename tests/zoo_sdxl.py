"""A tiny, randomly initialised SDXL pipeline saved to disk, for tests.

It has the structure of SDXL-Turbo (two CLIP text encoders, a UNet with the
"text_time" added conditioning, an 8x-downsampling VAE, an Euler ancestral
scheduler with trailing timesteps) at a size that renders a 64 px image in about ten
milliseconds on CPU. The tokenizers are real CLIP BPE tokenizers, built from the
BPE merges file that open_clip ships, so no download is needed.
"""

import gzip
import json
from pathlib import Path

import pytest
import torch

__all__ = ["tiny_sdxl_dir", "hf_clip_dir", "build_tiny_sdxl", "write_clip_tokenizer_files"]

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
TEXT_WIDTH = 32  # hidden size of each tiny text encoder
TIME_EMBED_DIM = 8  # SDXL embeds 6 size/crop numbers with this width each


def _byte_symbols() -> list[str]:
    """CLIP's byte-level alphabet, in CLIP's vocabulary order.

    The 188 printable bytes come first and stand for themselves; the other 68 bytes
    follow, in byte order, as the code points 256, 257, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_clip_tokenizer_files(out_dir: Path) -> Path:
    """Write CLIP's vocab.json, merges.txt and tokenizer_config.json (49408 tokens, 77 positions) into out_dir from open_clip's BPE file.

    The vocabulary is: the 256 byte symbols, the same with the end-of-word marker
    "</w>", one token per merge (48894 merges, in rank order), then the start and
    end tokens. This is the order OpenAI's CLIP uses, so token ids match open_clip's.
    """
    import open_clip.tokenizer

    with gzip.open(open_clip.tokenizer.default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is the "#version" header
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [CLIP_BOS, CLIP_EOS]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir


def _tiny_text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def build_tiny_sdxl(tokenizer_dir: Path):
    """Return a StableDiffusionXLPipeline with tiny random weights (seeded, so deterministic)."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_config = _tiny_text_config(len(tokenizer))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_WIDTH,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_WIDTH,  # time ids + pooled text
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(4, 4, 8, 8),  # four blocks: 8x downsampling, as in SDXL
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64,
        scaling_factor=0.13025,
    )
    scheduler = EulerAncestralDiscreteScheduler(  # SDXL-Turbo's scheduler settings
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet,
        scheduler=scheduler,
    )


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
