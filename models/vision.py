"""Frozen CLIP vision encoders behind one small interface.

Two backends return the same things:

* ``encode_images(pixel_values)`` -> ``(patches, image_embeds)``: the hidden states of the
  **penultimate** transformer block with the CLS token dropped (``n_patches x width``; 49 x 768
  for ViT-B/32 at 224 px), and the L2-normalised CLIP image embedding, from ONE pass of the tower.
* ``encode_texts(texts)`` -> L2-normalised CLIP text embeddings. Texts longer than the 77-token
  context are truncated correctly: the start token is kept, the sequence ends with the end token,
  and the true attention mask is used.
* ``preprocess``: a picklable PIL -> tensor callable (safe in DataLoader workers).

Spec strings accepted by :func:`load_vision_encoder`:

* ``ViT-B-32-quickgelu/openai`` (the default) -- an open_clip built-in name and pretrained tag;
  ``ViT-B-32`` alone means random weights (useful for tests only);
* ``hf-hub:org/repo`` and ``local-dir:/path`` -- open_clip's own schemas;
* ``hf-clip:ID_OR_DIR`` -- a HuggingFace transformers CLIP (``openai/clip-vit-base-patch32``);
  a bare ``org/name`` that is not an open_clip name, or a local dir holding an HF ``config.json``,
  is treated the same way.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.options.catalog import DEFAULT_VISION_ENCODER  # noqa: E402  (declared with the options)
OFFLINE_HINT = ("offline, pass --vision_encoder local-dir:PATH (an open_clip folder) or an HF CLIP folder, "
                "or set up hub access")


class VisionEncoderError(ValueError):
    """A vision encoder spec that cannot be loaded (unknown, unreachable, or not a CLIP model)."""


class VisionEncoder(nn.Module):
    """Base class: frozen, eval-mode, no grads."""

    spec: str
    hidden_size: int  # width of the patch tokens
    n_patches: int | None = None  # patch tokens per image, when the config tells (else: run the tower once)
    preprocess: object

    def freeze(self) -> "VisionEncoder":
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True):  # frozen towers never leave eval mode
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, truncated to the CLIP context the right way."""
        raise NotImplementedError

    @torch.no_grad()
    def image_text_similarity(self, image_embeds: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image embedding with its own text (row-aligned)."""
        distinct = list(dict.fromkeys(texts))  # k images of one prompt: encode the prompt once
        embeds = self.encode_texts(distinct).to(image_embeds.dtype)
        index = torch.tensor([distinct.index(t) for t in texts], device=embeds.device)
        return (image_embeds * embeds[index]).sum(-1).float()

    def pixels(self, images) -> torch.Tensor:
        """Preprocess a list of PIL images into a batch on this encoder's device and dtype."""
        return torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)


class OpenClipEncoder(VisionEncoder):
    def __init__(self, name: str, pretrained: str | None):
        super().__init__()
        import open_clip

        self.spec = name if not pretrained else f"{name}/{pretrained}"
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        visual = model.visual
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or len(blocks) < 2:
            raise ValueError(f"vision encoder {self.spec!r}: only open_clip ViTs with >= 2 blocks are supported")
        self._batch_first = getattr(visual.transformer, "batch_first", True)
        self._captured: list[torch.Tensor] = []
        blocks[-2].register_forward_hook(lambda _m, _i, out: self._captured.append(out))
        self.hidden_size = visual.transformer.width
        grid = getattr(visual, "grid_size", None)
        self.n_patches = int(grid[0] * grid[1]) if grid else None
        self.freeze()

    @torch.no_grad()
    def encode_images(self, pixel_values):
        self._captured.clear()
        embeds = self.model.encode_image(pixel_values, normalize=True)
        hidden = self._captured.pop()
        self._captured.clear()
        if not self._batch_first:
            hidden = hidden.transpose(0, 1)
        return hidden[:, 1:], embeds  # drop the CLS token

    def tokenize(self, texts):
        # open_clip's tokenizer keeps <start>, truncates, and forces <end> as the last kept token.
        ids = self.tokenizer(list(texts))
        return ids, (ids != 0).long()

    @torch.no_grad()
    def encode_texts(self, texts):
        ids, _ = self.tokenize(texts)  # causal text tower: padding after <end> is never attended
        return self.model.encode_text(ids.to(self.device), normalize=True)


class _HFImageTransform:
    """Picklable PIL -> tensor wrapper around a transformers CLIPImageProcessor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class HFClipEncoder(VisionEncoder):
    def __init__(self, name_or_path: str):
        super().__init__()
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.spec = f"hf-clip:{name_or_path}"
        self.model, info = CLIPModel.from_pretrained(name_or_path, output_loading_info=True)
        missing = sorted(info.get("missing_keys") or ())
        if missing:  # e.g. a folder of another model: CLIPModel would fill it with random weights
            raise VisionEncoderError(f"vision encoder {self.spec!r} is not a CLIP model: {len(missing)} of its "
                                     f"weights are missing from the checkpoint (e.g. {', '.join(missing[:2])})")
        self.preprocess = _HFImageTransform(CLIPImageProcessor.from_pretrained(name_or_path))
        self.text_tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.context_length = self.model.config.text_config.max_position_embeddings
        vcfg = self.model.config.vision_config
        self.hidden_size = vcfg.hidden_size
        self.n_patches = (vcfg.image_size // vcfg.patch_size) ** 2
        self.freeze()

    @torch.no_grad()
    def encode_images(self, pixel_values):
        out = self.model.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        patches = out.hidden_states[-2][:, 1:]
        embeds = self.model.visual_projection(out.pooler_output)
        return patches, F.normalize(embeds, dim=-1)

    def tokenize(self, texts):
        # truncation happens before the special tokens are added: <start> ... <end> are kept.
        enc = self.text_tokenizer(list(texts), padding=True, truncation=True,
                                  max_length=self.context_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def encode_texts(self, texts):
        ids, mask = self.tokenize(texts)
        out = self.model.text_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return F.normalize(self.model.text_projection(out.pooler_output), dim=-1)


def _is_hf_clip_dir(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file() or (Path(path) / "open_clip_config.json").is_file():
        return False
    try:
        return "clip" in json.loads(cfg.read_text()).get("model_type", "")
    except (OSError, ValueError):
        return False


def _open_clip_names() -> set[str]:
    """The model names open_clip knows, read from its config files without importing it (importing
    open_clip pulls in timm and more; an HF CLIP spec must not pay for that)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return set()
    names = set()
    for folder in spec.submodule_search_locations:
        configs = Path(folder) / "model_configs"
        if configs.is_dir():
            names.update(p.stem for p in configs.glob("*.json"))
    return names


def load_vision_encoder(spec: str = DEFAULT_VISION_ENCODER, device=None, dtype=None) -> VisionEncoder:
    """Build a frozen encoder from a spec string (see the module docstring).

    Every failure is one line: a ``VisionEncoderError`` (a ``ValueError``) naming the spec, with what
    to pass offline when the spec needs the hub, or ``FileNotFoundError`` for a missing ``local-dir:``.
    """
    spec = spec.strip()
    try:
        enc = _build_encoder(spec)
    except (VisionEncoderError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - open_clip, transformers and the hub raise many kinds
        from safetensors import SafetensorError

        from models.errors import raised_while_unpickling
        unpickling = raised_while_unpickling(e)
        if not unpickling and not isinstance(e, (OSError, RuntimeError, ValueError, KeyError, SafetensorError)):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = lines[0] if lines else type(e).__name__
        if unpickling:  # never suggest weights_only=False
            why = "its weights file is not a PyTorch checkpoint"
        why = why if len(why) <= 160 else why[:157] + "..."
        local = os.path.isdir(spec.split(":", 1)[1] if spec.startswith(("local-dir:", "hf-clip:")) else spec)
        raise VisionEncoderError(f"cannot load vision encoder {spec!r}: {why}"
                                 + ("" if local else f"; {OFFLINE_HINT}")) from None
    if device is not None or dtype is not None:
        enc.to(device=device, dtype=dtype)
    return enc


def _build_encoder(spec: str) -> VisionEncoder:
    """The encoder a spec names; open_clip is imported only for open_clip specs."""
    if spec.startswith("hf-clip:"):
        return HFClipEncoder(spec[len("hf-clip:"):])
    if spec.startswith(("hf-hub:", "local-dir:")):
        if spec.startswith("local-dir:") and not os.path.isdir(spec[len("local-dir:"):]):
            raise FileNotFoundError(f"vision encoder {spec!r}: directory not found")
        return OpenClipEncoder(spec, None)
    if os.path.isdir(spec):
        if _is_hf_clip_dir(spec):
            return HFClipEncoder(spec)
        if (Path(spec) / "open_clip_config.json").is_file():
            return OpenClipEncoder(f"local-dir:{spec}", None)
        raise VisionEncoderError(f"vision encoder {spec!r}: directory holds neither an HF CLIP config.json "
                                 "nor an open_clip_config.json")
    name, _, tag = spec.partition("/")
    names = _open_clip_names()
    if name in names or not names:  # an open_clip model (or no config files where expected: ask open_clip)
        import open_clip

        if name in open_clip.list_models():
            tags = open_clip.list_pretrained_tags_by_model(name)
            if tag and tag not in tags and not os.path.isfile(tag):
                known = ", ".join(tags[:5]) + (f", ... ({len(tags)} in all)" if len(tags) > 5 else "")
                raise VisionEncoderError(f"unknown pretrained tag {tag!r} of open_clip model {name!r}; known "
                                         f"tags: {known or 'none'}")
            return OpenClipEncoder(name, tag or None)
    if tag and "/" not in tag:
        return HFClipEncoder(spec)  # a hub id such as openai/clip-vit-base-patch32
    raise VisionEncoderError(f"unknown vision encoder {spec!r}: use an open_clip name[/tag] (e.g. "
                             f"{DEFAULT_VISION_ENCODER}), hf-hub:ORG/REPO, local-dir:PATH or hf-clip:ID")
