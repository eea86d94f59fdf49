"""Tiny random models built from configs, in seconds and offline: the test zoo, ``--tiny`` of the
benchmark scripts, and the demo's vision tower.

* :func:`tiny_lm_config`: a 2-layer, 32-wide causal LM config of each family in :data:`ARCHS`, with the
  GPT-2 vocabulary (so the real GPT-2 BPE of :func:`models.offline.gpt2_tokenizer_dir` drives it);
* :func:`build_tiny_clip`: a small random open_clip ViT in open_clip's ``local-dir:`` layout;
* :func:`build_tiny_sdxl`: a random SDXL pipeline with the structure of SDXL-Turbo (two CLIP text
  encoders, a UNet with the "text_time" added conditioning, an 8x-downsampling VAE, an Euler ancestral
  scheduler with trailing timesteps) that renders a 64 px image in about ten milliseconds on CPU; its
  tokenizers are real CLIP BPE ones (:func:`models.offline.write_clip_tokenizer_files`).

Everything is seeded, so two builds give the same weights.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

PAD = 50256  # GPT-2's <|endoftext|>
TINY = dict(vocab_size=50257, bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
ARCHS = ("gpt2", "llama", "gemma", "opt", "qwen2")  # the causal families tiny_lm_config builds


def tiny_lm_config(arch: str):
    import transformers as tf

    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **TINY)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=512, **TINY)
    if arch == "gemma":
        return tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=8, max_position_embeddings=512, **TINY)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=512, **TINY)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=512, **TINY)
    raise KeyError(arch)


TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def build_tiny_clip(path: str | os.PathLike, seed: int = 0, cfg: dict | None = None) -> str:
    """Write a random (seeded) small open_clip ViT to ``path``; returns its ``local-dir:`` spec."""
    import open_clip
    import torch

    path = Path(path)
    if path.exists():  # open_clip would load (mismatched) weights already there
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg or TINY_CLIP_CFG,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{path}")
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return f"local-dir:{path}"


TEXT_WIDTH = 32  # hidden size of each tiny SDXL text encoder
TIME_EMBED_DIM = 8  # SDXL embeds 6 size/crop numbers with this width each


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


def build_tiny_sdxl(tokenizer_dir: str | os.PathLike):
    """Return a StableDiffusionXLPipeline with tiny random weights (seeded, so deterministic); its two
    tokenizers are read from ``tokenizer_dir`` (:func:`models.offline.write_clip_tokenizer_files`)."""
    import torch
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
