"""What an evaluation loads once from its flags: device and dtype, tokenizer, the late-fusion model with
its trained weights, and, when images are requested, the vision encoder and the image source. The loading
itself is :class:`models.scoring.runtime.ModelRuntime`'s, the one the Python API uses too.

A :class:`Runtime` serves any number of tasks in one process (each :class:`eval_scripts.core.Evaluator`
takes one); nothing in it depends on a task. It also keeps the two memos that make repeated scoring
cheap: the frozen LM's hidden states per token sequence (process-wide, bounded in bytes) and the vision
features per image (:mod:`models.images.features`: in memory, and on disk beside the image cache).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from eval_scripts.cli import resolve_args
from models.options import SHARED, keys
from models.options.dtypes import AUTO_LM, resolve as resolve_dtype, torch_dtype
from models.scoring.runtime import (DEFAULT_WINDOW, TOKENIZER_UNSET, ModelRuntime, clear_memos,  # noqa: F401
                                    context_window)

# the settings a Runtime is built from (declared with runtime=True): tasks that share one must agree on them
RUNTIME_KEYS = keys(SHARED.values(), "runtime")

# image counters of a run, each with one meaning: image slots (k x prompts) = generated + from_cache + reused;
# PNGs decoded; distinct images run through the vision tower vs read from the feature cache; pipeline loads
IMAGE_COUNTERS = ("slots", "generated", "from_cache", "reused", "pngs_decoded", "features_computed",
                  "features_read", "pipeline_loads", "prefix_computed", "prefix_reused", "prefix_read")


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


class Runtime(ModelRuntime):
    """Models and helpers built once from the flags (see the module docstring): a
    :class:`models.scoring.runtime.ModelRuntime` (the one way a model is loaded) with the process state,
    the device and dtype the flags resolve to, a stopwatch and the image counters.

    ``use_images``: load the vision encoder and build the image source (``source``, a
    :class:`models.images.source.ImageSource`). ``before_load(runtime)`` runs after the trained weights
    have been read (and ``args.vision_encoder`` resolved from them) and the image source built (an index
    opened and checked), but before any model is loaded, so a caller can refuse a run cheaply.
    """

    def __init__(self, args: argparse.Namespace, use_images: bool, before_load=None):
        from accelerate import PartialState

        if not sys.stderr.isatty():  # progress bars (model loading) only on a terminal
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        self.t0 = time.perf_counter()
        args = resolve_args(args)
        self.spec = {k: getattr(args, k, None) for k in RUNTIME_KEYS}
        self.state = PartialState(cpu=args.device == "cpu")
        device = torch.device(args.device) if args.device else self.state.device
        self.is_main = self.state.is_main_process
        self.watch = Stopwatch(device)
        super().__init__(args, use_images, device=device, before_load=before_load, watch=self.watch,
                         dtype=torch_dtype(resolve_dtype(args.dtype, device, AUTO_LM)))
        self.watch.hook(self.model.lm.base_model, "lm")
        self.watch.hook(self.model.fusion_layer, "fusion")
        self.setup_seconds = time.perf_counter() - self.t0

    def mismatches(self, args: argparse.Namespace, use_images: bool) -> list[str]:
        """The runtime flags on which ``args`` differs from what this runtime was built from."""
        args = resolve_args(args)
        diff = [k for k in RUNTIME_KEYS if getattr(args, k, None) != self.spec[k]]
        if use_images and not self.use_images:
            diff.append("generate_images")
        return diff

    def image_stats(self) -> dict:
        """Cumulative image counters of this runtime (see :data:`IMAGE_COUNTERS`)."""
        s = dict.fromkeys(IMAGE_COUNTERS, 0)
        if self.features is not None:
            s.update(self.features.counts, pipeline_loads=self.source.stats()["pipeline_loads"])
        s.update(self.prefix_counts)
        return s

    def flush(self) -> None:
        """Wait until every image and feature file handed to the background writer is on disk."""
        if self.source is not None:
            self.source.flush()
