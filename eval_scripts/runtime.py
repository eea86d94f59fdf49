"""What an evaluation loads once from its flags: device and dtype, tokenizer, the late-fusion model with
its trained weights, and, when images are requested, the vision encoder and the image source.

A :class:`Runtime` serves any number of tasks in one process (each :class:`eval_scripts.core.Evaluator`
takes one); nothing in it depends on a task. It also keeps the two memos that make repeated scoring
cheap: the frozen LM's hidden states per token sequence (process-wide, bounded in bytes) and the vision
features per image (:mod:`models.images.features`: in memory, and on disk beside the image cache).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from eval_scripts.cli import EvalError, NonFiniteScores, resolve_args
from models.fusion.memo import HiddenStateMemo
from models.fusion.prefix import VisualPrefixCache
from models.options import SHARED, keys
from models.options.dtypes import AUTO_LM, resolve as resolve_dtype, torch_dtype

# the settings a Runtime is built from (declared with runtime=True): tasks that share one must agree on them
RUNTIME_KEYS = keys(SHARED.values(), "runtime")

# image counters of a run, each with one meaning: image slots (k x prompts) = generated + from_cache + reused;
# PNGs decoded; distinct images run through the vision tower vs read from the feature cache; pipeline loads
IMAGE_COUNTERS = ("slots", "generated", "from_cache", "reused", "pngs_decoded", "features_computed",
                  "features_read", "pipeline_loads", "prefix_computed", "prefix_reused")

# The frozen LM's hidden states per token sequence, shared by every runtime in this process (e.g. the
# demo's text-only, k=1, k=3 and k=6 runs score the same prompts). Bounded in bytes.
_HIDDEN_MEMO = HiddenStateMemo()
# The fusion block's keys and values per image's visual prefix (models/fusion/prefix.py), process-wide too;
# each entry is keyed by the trained weights, dtype, device and vision encoder as well as the image
_PREFIX_CACHE = VisualPrefixCache()


# lm-evaluation-harness's fallbacks for the context window: a tokenizer's model_max_length when none
# is set (transformers' int(1e30)), and the window when neither config nor tokenizer names one
TOKENIZER_UNSET = int(1e30)
DEFAULT_WINDOW = 2048


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
    _HIDDEN_MEMO.clear()
    _PREFIX_CACHE.clear()


class Stopwatch:
    """Accumulates seconds per named phase; forward hooks time the LM and fusion passes."""

    def __init__(self, device):
        self.seconds: dict[str, float] = {"generation": 0.0, "clip": 0.0, "lm": 0.0, "fusion": 0.0}
        self.counts: dict[str, int] = {"lm": 0, "fusion": 0}
        self._cuda = torch.device(device).type == "cuda"
        self._start: dict[str, float] = {}

    def _now(self):
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def hook(self, module, name):
        module.register_forward_pre_hook(lambda *_: self._start.__setitem__(name, self._now()))

        def post(*_):
            self.seconds[name] += self._now() - self._start.pop(name)
            self.counts[name] += 1
        module.register_forward_hook(post)

    def phase(self, name):
        watch = self

        class _Ctx:
            def __enter__(self):
                self.t = watch._now()

            def __exit__(self, *exc):
                watch.seconds[name] += watch._now() - self.t
        return _Ctx()

    def snapshot(self) -> tuple[dict, dict]:
        return dict(self.seconds), dict(self.counts)


class Runtime:
    """Models and helpers built once from the flags (see the module docstring).

    ``use_images``: load the vision encoder and build the image source (``source``, a
    :class:`models.images.source.ImageSource`). ``before_load(runtime)`` runs after the trained weights
    have been read (and ``args.vision_encoder`` resolved from them) and the image source built (an index
    opened and checked), but before any model is loaded, so a caller can refuse a run cheaply.
    """

    def __init__(self, args: argparse.Namespace, use_images: bool, before_load=None):
        from accelerate import PartialState
        from transformers import AutoTokenizer

        from models.checkpoints.weights import load_state, load_trainable
        from models.fusion.factory import load_late_fusion_model

        if not sys.stderr.isatty():  # progress bars (model loading) only on a terminal
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        self.t0 = time.perf_counter()
        args = resolve_args(args)
        self.use_images = use_images
        self.spec = {k: getattr(args, k, None) for k in RUNTIME_KEYS}
        self.state = PartialState(cpu=args.device == "cpu")
        self.device = torch.device(args.device) if args.device else self.state.device
        self.dtype = torch_dtype(resolve_dtype(args.dtype, self.device, AUTO_LM))
        self.is_main = self.state.is_main_process
        self.watch = Stopwatch(self.device)

        # trained weights first: their shapes give the vision width and projector width
        ckpt_state, ckpt_cfg = (load_state(args.pretrained_model) if args.pretrained_model else ({}, {}))
        if args.pretrained_model and "mm_proj.linear1.weight" in ckpt_state:
            vision_dim = ckpt_state["mm_proj.linear1.weight"].shape[1]
            proj_hidden = ckpt_state["mm_proj.linear1.weight"].shape[0]
        else:
            vision_dim, proj_hidden = ckpt_cfg.get("vision_dim"), args.proj_hidden
        self.source = None  # built before any model loads: bad image flags or a bad index fail fast
        if use_images:
            from models.images.sources import build_image_source
            try:
                self.source = build_image_source(args, self.device, dtype=args.dtype)
            except ValueError as e:
                raise EvalError(str(e)) from None
        if before_load is not None:
            before_load(self)
        if getattr(args, "compile", False):  # refused in one line before any model loads where it cannot run
            from models.compiling import compile_problem
            problem = compile_problem(self.device.type)
            if problem:
                raise EvalError(f"--compile: torch.compile is unavailable here ({problem})")
        self.vision = None
        if use_images:
            from models.vision import load_vision_encoder
            self.vision = load_vision_encoder(args.vision_encoder, device=self.device, dtype=self.dtype)
            if vision_dim is not None and vision_dim != self.vision.hidden_size:
                raise EvalError(f"--pretrained_model {args.pretrained_model!r} expects vision width {vision_dim}, "
                                f"but {args.vision_encoder!r} gives {self.vision.hidden_size}")
            vision_dim = self.vision.hidden_size
            try:
                self.source.bind(self.vision)  # a retriever checks that this encoder built its index
            except ValueError as e:
                raise EvalError(str(e)) from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(args.model_name)
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot load the tokenizer of --model_name {args.model_name!r}: "
                            f"{str(e).splitlines()[0]}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_late_fusion_model(args.model_name, vision_dim=vision_dim or 768,
                                            proj_hidden=proj_hidden, torch_dtype=self.dtype)
        if args.pretrained_model:
            load_trainable(self.model, args.pretrained_model, loaded=(ckpt_state, ckpt_cfg))
            del ckpt_state
        self.model.to(self.device, self.dtype).eval()
        if getattr(args, "compile", False):
            self.model.fusion_layer.compile(dynamic=True)
        self.model_key = (args.model_name, str(self.dtype), str(self.device))
        self.watch.hook(self.model.lm.base_model, "lm")
        self.watch.hook(self.model.fusion_layer, "fusion")
        # every logit the LM head produces (text-only and fused, every decoding step) is checked
        self._non_finite = None
        self.model.lm.get_output_embeddings().register_forward_hook(self._watch_logits)
        self.features = None
        if use_images:  # the vision features of every image (generated or retrieved), cached on disk
            from pathlib import Path

            from models.images.features import FeatureStore, VisionFeatures, encoder_identity
            from models.images.generators import dtype_name
            features_root = Path(args.image_cache).expanduser() / "features"
            store = FeatureStore(features_root, encoder_identity(
                args.vision_encoder, dtype_name(self.dtype), memo_path=features_root / "file-hashes.json"))
            self.features = VisionFeatures(self.vision, self.source, store, watch=self.watch)
        # image slots whose visual prefix was run through the fusion block / taken from the prefix cache
        self.prefix_counts = {"prefix_computed": 0, "prefix_reused": 0}
        self.prefix_cache = (_PREFIX_CACHE if use_images and getattr(args, "prefix_cache", True)
                             and self.model.kind == "causal" and self.model.prefix_cacheable else None)
        self._max_text: dict[int, int | None] = {}
        self.setup_seconds = time.perf_counter() - self.t0

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

    def mismatches(self, args: argparse.Namespace, use_images: bool) -> list[str]:
        """The runtime flags on which ``args`` differs from what this runtime was built from."""
        args = resolve_args(args)
        diff = [k for k in RUNTIME_KEYS if getattr(args, k, None) != self.spec[k]]
        if use_images and not self.use_images:
            diff.append("generate_images")
        return diff

    # ------------------------------------------------------------------ images
    def image_features(self, images) -> tuple[list[torch.Tensor], list[float]]:
        """CLIP patch tokens of each image slot and the cosine of its image with its own prompt.

        Each distinct image (by key) is encoded at most once: from this runtime's memo, the feature
        cache on disk, or the vision tower (see :class:`models.images.features.VisionFeatures`)."""
        return self.features(images)

    def image_stats(self) -> dict:
        """Cumulative image counters of this runtime (see :data:`IMAGE_COUNTERS`)."""
        s = dict.fromkeys(IMAGE_COUNTERS, 0)
        if self.features is not None:
            s.update(self.features.counts, pipeline_loads=self.source.stats()["pipeline_loads"])
        s.update(self.prefix_counts)
        return s

    def visual_prefix(self, patches: torch.Tensor, keys: list[str]):
        """The fusion block's keys and values of the visual prefixes of ``patches`` ``[N, n_v, d]`` (image keys
        ``keys``) from the prefix cache, or None when it is off (``--prefix_cache False``, a masked LM)."""
        if self.prefix_cache is None:
            return None
        kv, computed, reused = self.prefix_cache(self.model, patches, keys, (self.features.store.slug,))
        self.prefix_counts["prefix_computed"] += computed
        self.prefix_counts["prefix_reused"] += reused
        return kv

    def flush(self) -> None:
        """Wait until every image and feature file handed to the background writer is on disk."""
        if self.source is not None:
            self.source.flush()

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
        return _HIDDEN_MEMO(self.model, ids, mask, key=self.model_key)
