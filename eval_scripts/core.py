"""The evaluation core every benchmark script shares.

A script parses its flags with :func:`build_parser`, builds an :class:`Evaluator`, turns its data into
items (dicts with an ``id`` and whatever its ``compute`` function needs, including the k image prompts of
each item), and calls :meth:`Evaluator.run` then :meth:`Evaluator.finish`.

The evaluator joins three parts, one concern each:

* :mod:`eval_scripts.runtime`: what is loaded once from the flags (model, tokenizer, vision encoder,
  image source, memos); several evaluators can share one runtime (the suite does);
* :mod:`eval_scripts.scoring`: the scoring primitives with this task's mixing settings
  (:mod:`eval_scripts.masked_scoring` for a masked LM: fill-mask candidate scoring only);
* :mod:`eval_scripts.records`: the run directory: resuming, sharding, samples and result files.

Flags and one-line errors live in :mod:`eval_scripts.cli`.

Importing this module imports no torch: ``--help`` stays instant. The runtime and the scorer (and torch
with them) load when an :class:`Evaluator` is built; their names are still importable from here.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import time
from typing import Callable

from eval_scripts.cli import EvalError, build_parser, parse_choices, run_main, true_or_false, validate_args  # noqa: F401
from eval_scripts.records import RunRecords

_LAZY = {"DTYPES": "eval_scripts.runtime", "Runtime": "eval_scripts.runtime", "clear_memos": "eval_scripts.runtime",
         "Scorer": "eval_scripts.scoring"}


def __getattr__(name: str):
    """``DTYPES``, ``Runtime``, ``clear_memos``, ``Scorer``: imported (with torch) when first asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection while torch and transformers import and models load: they create
    hundreds of thousands of long-lived objects, and each collection would walk them all."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def first_token_ids(tokenizer, word: str) -> tuple[int, ...]:
    """See :func:`eval_scripts.scoring.first_token_ids` (memoised there)."""
    from eval_scripts.scoring import first_token_ids as memoised

    return memoised(tokenizer, word)

_bool_word = true_or_false  # the former name
validate_common_args = validate_args  # the former name
# settings that must match for a re-run with the same --run_name to resume
RESUME_KEYS = ("model_name", "pretrained_model", "vision_encoder", "generate_images", "k", "image_prompt",
               "image_generator", "image_size", "num_inference_steps", "guidance_scale", "mix",
               "clip_temperature", "uniform_weights", "seed",
               "image_source", "image_index", "retrieve_by", "dedup_threshold")


def require_causal_lm(args: argparse.Namespace, script: str) -> None:
    """One clear error, before anything is loaded or written, when ``script`` (which scores next tokens or
    generates) is given a masked LM. A model whose config cannot be read is left to the runtime to report."""
    from transformers import AutoConfig

    from models.fusion.causal import model_kind

    try:
        config = AutoConfig.from_pretrained(args.model_name)
    except (OSError, ValueError):
        return
    if model_kind(config) == "masked":
        raise EvalError(f"{script} needs a causal LM (it scores next tokens or generates), but {args.model_name!r} "
                        "is a masked LM; masked LMs run object_commonsense.py and imagenetVC.py")


class Evaluator:
    """One task's evaluation: a runtime (built here unless given), a scorer and the run records."""

    def __init__(self, args: argparse.Namespace, task: str, resume_keys: tuple[str, ...] = (),
                 runtime: "Runtime | None" = None):
        """``resume_keys``: the script's own flags that must match for a re-run to resume."""
        self.t0 = time.perf_counter()
        self.args, self.task = args, task
        self.resume_keys = RESUME_KEYS + tuple(resume_keys)
        validate_args(args)  # again: callers may build the namespace without the parser
        self.use_images = bool(args.generate_images) and args.k > 0
        args.run_name = args.run_name or _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
        with _gc_paused():  # importing torch and transformers and loading models: about 20% faster
            from eval_scripts.masked_scoring import MaskedScorer
            from eval_scripts.runtime import Runtime
            from eval_scripts.scoring import Scorer

            shared = runtime is not None
            if not shared:
                # the run's settings are checked after the trained weights are read but before any model
                # loads: a mismatched re-run fails fast and writes nothing
                runtime = Runtime(args, self.use_images, before_load=self._open_records)
        if shared:
            diff = runtime.mismatches(args, self.use_images)
            if diff:
                raise EvalError(f"task {task!r} needs another model setup than the loaded one (--{diff[0]})")
            args.vision_encoder = runtime.spec["vision_encoder"]
            self._open_records(runtime)
        self.runtime = runtime
        self.scorer = (MaskedScorer if runtime.model.kind == "masked" else Scorer)(runtime, args, self.use_images)
        self._stats0 = self._runtime_stats()

    def _open_records(self, runtime: "Runtime") -> None:
        if self.use_images:
            try:
                runtime.source.check_k(self.args.k)  # e.g. no more images per prompt than an index holds
            except ValueError as e:
                raise EvalError(str(e)) from None
        self.records = RunRecords(self.args, self.task, runtime.state, self.resume_keys)
        self.records.check_resume()

    # ------------------------------------------------------------------ views of the parts
    model = property(lambda self: self.runtime.model)
    tokenizer = property(lambda self: self.runtime.tokenizer)
    vision = property(lambda self: self.runtime.vision)
    source = property(lambda self: self.runtime.source)
    device = property(lambda self: self.runtime.device)
    dtype = property(lambda self: self.runtime.dtype)
    state = property(lambda self: self.runtime.state)
    is_main = property(lambda self: self.runtime.is_main)
    watch = property(lambda self: self.runtime.watch)
    out_dir = property(lambda self: self.records.out_dir)

    def answer_prompt(self, prompt: str) -> str:
        """The prompt whose answer candidates are scored: as is for a causal LM, followed by the mask
        token for a masked LM (:func:`eval_scripts.masked_scoring.masked_prompt`)."""
        return self.scorer.answer_prompt(prompt)

    def images_for(self, prompt_lists):
        return self.scorer.images_for(prompt_lists)

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.scorer.encode(text, special)

    def next_token_logprobs(self, texts, prompt_lists, with_text: bool = False):
        return self.scorer.next_token_logprobs(texts, prompt_lists, with_text)

    def token_logprobs(self, seqs, starts, prompt_lists, with_text: bool = False):
        return self.scorer.token_logprobs(seqs, starts, prompt_lists, with_text)

    def continuation_logprobs(self, contexts, continuations, prompt_lists, with_text: bool = False, names=None):
        return self.scorer.continuation_logprobs(contexts, continuations, prompt_lists, with_text, names)

    def score_candidates(self, prompts, candidate_lists, prompt_lists, scoring: str = "first_token",
                         with_text: bool = False):
        return self.scorer.score_candidates(prompts, candidate_lists, prompt_lists, scoring, with_text)

    def candidate_records(self, batch: list[dict], keep: tuple[str, ...] = ()) -> list[dict]:
        return self.scorer.candidate_records(batch, keep)

    def generate(self, prompts, prompt_lists, max_new_tokens: int = 50):
        return self.scorer.generate(prompts, prompt_lists, max_new_tokens)

    # ------------------------------------------------------------------ running
    def run(self, items: list[dict], compute: Callable[[list[dict]], list[dict]], desc: str = "") -> list[dict]:
        """Score ``items`` (see :meth:`eval_scripts.records.RunRecords.run`)."""
        postfix = (lambda: {"img": self.runtime.image_stats()["generated"]}) if self.source is not None else None
        return self.records.run(items, compute, desc, postfix)

    def _runtime_stats(self) -> dict:
        seconds, passes = self.runtime.watch.snapshot()
        return {"images": self.runtime.image_stats(), "seconds": seconds, "passes": passes}

    def finish(self, metrics: dict, table: list[tuple[str, str]] | None = None) -> dict | None:
        """Wait for the cache writes, merge samples, write ``<task>.json`` (main process), print a short table.

        The results name image files: they are all on disk before the results are written."""
        self.runtime.flush()
        now, before = self._runtime_stats(), self._stats0
        stats = {}
        for part in ("images", "seconds", "passes"):
            stats[part] = {k: now[part][k] - before[part][k] for k in now[part]}
        return self.records.finish(metrics, stats, self.t0, table, show_images=self.use_images)
