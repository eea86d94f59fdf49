"""The one way a late-fusion model is loaded for scoring: :class:`ModelRuntime`, built from settings.

From the settings (the eval scripts' parsed flags, or the Python API's keywords): the trained weights
(``pretrained_model``: a train.py folder, a released ``.bin`` or a hub id), then, when images are fused, the
image source (``build_image_source``), the vision encoder (its width checked against the weights), then the
tokenizer and the frozen LM in the wrapper of its kind with the trained weights loaded
(:func:`models.fusion.factory.load_late_fusion_model`), and the vision-feature cache beside the image cache.

It also holds what every scorer needs of the loaded model: tokenising, fitting a text into the LM's window,
padding, the frozen LM's hidden states (memoised process-wide, bounded in bytes), the image features, and a
check that no logit is NaN or infinite. The eval scripts' :class:`eval_scripts.runtime.Runtime` and the
Python API's :class:`models.pipeline.LateFusionPipeline` are both built on it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from models.errors import InputError, NonFiniteScores
from models.fusion.memo import HiddenStateMemo
from models.fusion.prefix import VisualPrefixCache

# lm-evaluation-harness's fallbacks for the context window: a tokenizer's model_max_length when none
# is set (transformers' int(1e30)), and the window when neither config nor tokenizer names one
TOKENIZER_UNSET = int(1e30)
DEFAULT_WINDOW = 2048

# The frozen LM's hidden states per token sequence, shared by every runtime in this process (e.g. the
# demo's text-only, k=1, k=3 and k=6 runs score the same prompts). Bounded in bytes.
HIDDEN_MEMO = HiddenStateMemo()
# The fusion block's keys and values per image's visual prefix (models/fusion/prefix.py), process-wide too;
# each entry is keyed by the trained weights, dtype, device and vision encoder as well as the image
PREFIX_CACHE = VisualPrefixCache()


def context_window(config, tokenizer=None) -> int:
    """The LM's context window in tokens, resolved as lm-evaluation-harness's ``hf`` model does: the
    first of ``n_positions``, ``max_position_embeddings``, ``n_ctx`` that the (text) config sets, else
    the tokenizer's ``model_max_length`` unless unset, else 2048."""
    cfg = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, name, None) is not None:
            return int(getattr(cfg, name))
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length is not None and length != TOKENIZER_UNSET else DEFAULT_WINDOW


def clear_memos() -> None:
    """Forget memoised LM hidden states and visual prefixes (benchmarks call this to start each way from a
    clean state)."""
    HIDDEN_MEMO.clear()
    PREFIX_CACHE.clear()


def trained_widths(state: dict, config: dict, proj_hidden: int | None) -> tuple[int | None, int | None]:
    """``(vision width, projector width)`` the trained weights were made for: from their projector's
    shape, else from their config (the vision width) and ``proj_hidden``."""
    w = state.get("mm_proj.linear1.weight")
    if w is not None:
        return int(w.shape[1]), int(w.shape[0])
    return config.get("vision_dim"), proj_hidden


def load_tokenizer(model_name: str, flag: str = "--model_name"):
    """The LM's tokenizer, with EOS as its pad token when it has none; one :class:`InputError` line."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer of {flag} {model_name!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class ModelRuntime:
    """A loaded late-fusion model and the helpers scoring needs (see the module docstring).

    ``args``: settings with the model options (``model_name``, ``pretrained_model``, ``vision_encoder``,
    ``proj_hidden``), the image options (``image_source`` and its settings, ``image_cache``) and ``dtype``;
    ``use_images``: load the vision encoder and build the image source; ``device``/``dtype``: where and in
    what the model runs. ``before_load(runtime)`` runs after the trained weights are read and the image
    source built, before any model loads (a caller can refuse a run cheaply). ``watch``: an object with
    ``phase(name)`` timing image work (or None). ``flag``: how errors name a setting (``--`` for flags).
    """

    def __init__(self, args, use_images: bool, *, device, dtype, before_load=None, watch=None, flag: str = "--"):
        from models.checkpoints.weights import load_state, load_trainable
        from models.fusion.factory import load_late_fusion_model

        self.use_images = use_images
        self.device, self.dtype = torch.device(device), dtype
        # trained weights first: their shapes give the vision width and projector width
        pretrained = args.pretrained_model
        ckpt_state, ckpt_cfg = load_state(pretrained) if pretrained else ({}, {})
        vision_dim, proj_hidden = trained_widths(ckpt_state, ckpt_cfg, args.proj_hidden)
        self.checkpoint_config = ckpt_cfg
        self.source = None  # built before any model loads: bad image flags or a bad index fail fast
        if use_images:
            from models.images.sources import build_image_source
            try:
                self.source = build_image_source(args, self.device, dtype=args.dtype)
            except ValueError as e:
                raise InputError(str(e)) from None
        if before_load is not None:
            before_load(self)
        if getattr(args, "compile", False):  # refused in one line before any model loads where it cannot run
            from models.compiling import compile_problem
            problem = compile_problem(self.device.type)
            if problem:
                raise InputError(f"{flag}compile: torch.compile is unavailable here ({problem})")
        self.vision = None
        if use_images:
            from models.vision import load_vision_encoder
            self.vision = load_vision_encoder(args.vision_encoder, device=self.device, dtype=self.dtype)
            if vision_dim is not None and vision_dim != self.vision.hidden_size:
                raise InputError(f"{flag}pretrained_model {pretrained!r} expects vision width {vision_dim}, "
                                 f"but {args.vision_encoder!r} gives {self.vision.hidden_size}")
            vision_dim = self.vision.hidden_size
            try:
                self.source.bind(self.vision)  # a retriever checks that this encoder built its index
            except ValueError as e:
                raise InputError(str(e)) from None
        self.tokenizer = load_tokenizer(args.model_name, f"{flag}model_name")
        self.model = load_late_fusion_model(args.model_name, vision_dim=vision_dim or 768,
                                            proj_hidden=proj_hidden, torch_dtype=self.dtype)
        if pretrained:
            load_trainable(self.model, pretrained, loaded=(ckpt_state, ckpt_cfg))
            del ckpt_state
        self.model.to(self.device, self.dtype).eval()
        if getattr(args, "compile", False):
            self.model.fusion_layer.compile(dynamic=True)
        self.model_key = (args.model_name, str(self.dtype), str(self.device))
        # every logit the LM head produces (text-only and fused, every decoding step) is checked
        self._non_finite = None
        self.model.lm.get_output_embeddings().register_forward_hook(self._watch_logits)
        self.features = None
        if use_images:  # the vision features of every image (generated or retrieved), cached on disk
            from models.images.features import FeatureStore, VisionFeatures, encoder_identity
            from models.images.generators import dtype_name
            features_root = Path(args.image_cache).expanduser() / "features"
            store = FeatureStore(features_root, encoder_identity(
                args.vision_encoder, dtype_name(self.dtype), memo_path=features_root / "file-hashes.json"))
            self.features = VisionFeatures(self.vision, self.source, store, watch=watch)
        # image slots whose visual prefix was run through the fusion block / taken from the prefix cache
        self.prefix_counts = {"prefix_computed": 0, "prefix_reused": 0, "prefix_read": 0}
        self.prefix_cache = (PREFIX_CACHE if use_images and getattr(args, "prefix_cache", True)
                             and self.model.kind == "causal" and self.model.prefix_cacheable else None)
        # ... and on disk beside the vision features (prefix_read: slots whose prefix an earlier run stored)
        from models.fusion.prefix_store import PrefixStore, use_store
        self.prefix_store = (PrefixStore(self.features.store) if self.prefix_cache is not None and self.features
                             is not None and use_store(getattr(args, "prefix_store", "auto"), self.device) else None)
        self._max_text: dict = {}

    def visual_prefix(self, patches: torch.Tensor, keys: list[str], features=None):
        """The fusion block's keys and values of the visual prefixes of ``patches`` ``[N, n_v, d]`` (image keys
        ``keys``) from the prefix cache, or None when it is off (``--prefix_cache False``, a masked LM).
        ``features``: the feature store the keys belong to (its encoder slug is part of the cache key)."""
        features = features if features is not None else self.features
        if self.prefix_cache is None or features is None or getattr(features, "store", None) is None:
            return None
        store = self.prefix_store if features is self.features else None
        reads = store.reads if store is not None else 0
        kv, computed, reused = self.prefix_cache(self.model, patches, keys, (features.store.slug,), store=store)
        self.prefix_counts["prefix_computed"] += computed
        self.prefix_counts["prefix_reused"] += reused
        self.prefix_counts["prefix_read"] += (store.reads - reads) if store is not None else 0
        return kv

    def _watch_logits(self, _module, _inputs, logits) -> None:
        bad = ~torch.isfinite(logits).all()  # no device sync here: read once per scoring call
        self._non_finite = bad if self._non_finite is None else self._non_finite | bad

    @contextlib.contextmanager
    def finite_guard(self):
        """Raise :class:`NonFiniteScores` after the block if the LM head produced NaN or inf in it."""
        self._non_finite = None
        yield
        flag, self._non_finite = self._non_finite, None
        if flag is not None and bool(flag):
            raise NonFiniteScores("the model produced NaN or infinite logits")

    # ------------------------------------------------------------------ images
    def image_features(self, images) -> tuple[list[torch.Tensor], list[float]]:
        """CLIP patch tokens of each image slot and the cosine of its image with its own prompt.

        Each distinct image (by key) is encoded at most once: from this runtime's memo, the feature
        cache on disk, or the vision tower (see :class:`models.images.features.VisionFeatures`)."""
        return self.features(images)

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def n_visual_tokens(self) -> int:
        if not self.use_images:
            return 0
        if not hasattr(self, "_n_visual"):
            self._n_visual = self.vision.n_patches  # from the config: a warm run runs no vision tower
        if self._n_visual is None:
            from PIL import Image
            self._n_visual = self.vision.encode_images(self.vision.pixels([Image.new("RGB", (64, 64))]))[0].shape[1]
        return self._n_visual

    def max_text_tokens(self, reserve: int = 0, with_images: bool | None = None) -> int:
        """Longest text the LM (and the fusion block, after its visual prefix) can take: the LM's
        :func:`context_window`, less the visual prefix when images are fused, less ``reserve``."""
        limit = context_window(self.model.lm.config, self.tokenizer)
        with_images = self.use_images if with_images is None else with_images
        return limit - (self.n_visual_tokens() if with_images else 0) - reserve

    def fit(self, seq: list[int], reserve: int = 0, with_images: bool | None = None) -> tuple[list[int], int]:
        """Keep the last tokens of an over-long sequence; returns it and how many were cut."""
        key = (reserve, self.use_images if with_images is None else with_images)
        if key not in self._max_text:
            self._max_text[key] = self.max_text_tokens(reserve, key[1])
        limit = self._max_text[key]
        if limit is None or len(seq) <= limit:
            return seq, 0
        return seq[len(seq) - limit:], len(seq) - limit

    def pad(self, seqs: list[list[int]], left: bool = False):
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def text_hidden(self, seqs: list[list[int]]) -> torch.Tensor:
        """The LM's final hidden states of right-padded ``seqs`` (memoised across runs)."""
        ids, mask = self.pad(seqs)
        return HIDDEN_MEMO(self.model, ids, mask, key=self.model_key)
