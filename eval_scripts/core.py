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
with them) load when an :class:`Evaluator` is built.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import time
from typing import TYPE_CHECKING, Callable

from eval_scripts.cli import EvalError, resolve_args, run_main, validate_args  # noqa: F401
from eval_scripts.records import RunRecords

if TYPE_CHECKING:
    from eval_scripts.runtime import Runtime


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

def require_causal_lm(args: argparse.Namespace, script: str) -> None:
    """One clear error, before anything is loaded or written, when ``script`` (which scores next tokens or
    generates) is given a masked LM. A model whose config cannot be read is left to the runtime to report."""
    from transformers import AutoConfig

    from models.fusion.kinds import model_kind

    try:
        config = AutoConfig.from_pretrained(args.model_name)
    except (OSError, ValueError):
        return
    if model_kind(config) == "masked":
        raise EvalError(f"{script} needs a causal LM (it scores next tokens or generates), but {args.model_name!r} "
                        "is a masked LM; masked LMs run object_commonsense.py and imagenetVC.py")


class Evaluator:
    """One task's evaluation: a runtime (built here unless given), a scorer and the run records."""

    def __init__(self, args: argparse.Namespace, task: str, options, runtime: "Runtime | None" = None):
        """``options``: the script's option declarations: those that change results must match for a re-run
        to resume, and the run records them all (``<task>.json`` and ``<task>.config.yaml``)."""
        from models.options import keys

        self.t0 = time.perf_counter()
        args = resolve_args(args)  # a namespace built without the parser is resolved and checked alike
        validate_args(args, options)
        self.args, self.task, self.options = args, task, tuple(options)
        self.resume_keys = keys(self.options, "results")
        self.use_images = bool(args.generate_images) and args.k > 0
        with _gc_paused():  # importing torch and transformers and loading models: about 20% faster
            from accelerate import PartialState

            from eval_scripts.masked_scoring import MaskedScorer
            from eval_scripts.runtime import Runtime
            from eval_scripts.scoring import Scorer

            # the run's settings are checked against the run being resumed before anything loads: a
            # mismatched re-run fails fast and writes nothing
            state = runtime.state if runtime is not None else PartialState(cpu=args.device == "cpu")
            self.records = RunRecords(self.args, self.task, state, self.resume_keys, self.options)
            self.records.check_resume()
            shared = runtime is not None
            if not shared:
                # the image index is opened (and its size checked against k) before any model loads
                runtime = Runtime(args, self.use_images, before_load=self._check_index)
        if shared:
            diff = runtime.mismatches(args, self.use_images)
            if diff:
                raise EvalError(f"task {task!r} needs another model setup than the loaded one (--{diff[0]})")
            self._check_index(runtime)
        self.runtime = runtime
        self.scorer = (MaskedScorer if runtime.model.kind == "masked" else Scorer)(runtime, args, self.use_images)
        self._stats0 = self._runtime_stats()

    def _check_index(self, runtime: "Runtime") -> None:
        if self.use_images:
            try:
                runtime.source.check_k(self.args.k)  # e.g. no more images per prompt than an index holds
            except ValueError as e:
                raise EvalError(str(e)) from None

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

    def generate(self, prompts, prompt_lists, max_new_tokens: int = 50, with_text: bool = False):
        return self.scorer.generate(prompts, prompt_lists, max_new_tokens, with_text)

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
        root = self.source.image_root() if self.use_images and self.source is not None else None
        return self.records.finish(metrics, stats, self.t0, table, show_images=self.use_images, image_root=root)
