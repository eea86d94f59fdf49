"""What the harness adapter (:mod:`eval_scripts.harness`) adds to lm-eval's outputs: a model name, and
the images of each request.

**The name.** lm-eval names a run's output folder and its ``model_name`` after the model: from
``model_args`` (``pretrained=`` for its ``hf`` model) when it builds the model from a name, and from
``model.config._name_or_path`` in the results of a model object it is given. The adapter's name is
:func:`harness_model_name`: the base LM as given (as ``hf`` names ``pretrained=``), joined by ``+`` to the
checkpoint (its folder or file name, or its hub id), when images are fused; the base LM alone without
images (then the adapter is exactly the base LM). The adapter answers ``config._name_or_path`` with it,
and :func:`recorded_outputs` gives lm-eval's tracker the same name in place of a random one, so
``--output_path out`` writes ``out/<name, sanitised by lm-eval>/results_<date>.json``.

**The images of each request.** With ``--log_samples``, each logged sample gains ``late_fusion_images``:
one entry per request of the sample (in the order of its ``arguments``), ``{"image_prompts": [...],
"images": [{"path", "prompt", "weight"}, ...]}`` (a retrieved image also gives its index ``row`` and
``similarity``); ``path`` is relative to the image root that the results' ``config.late_fusion.image_root``
names (the image cache, or the collection of the image index: see :mod:`eval_scripts.image_paths`). A
request whose context gives no image prompt is scored text-only and lists none. Requests are keyed by
their context (images come from it alone), so every request of one context shares its entry.

lm-eval calls neither hook itself: :func:`recorded_outputs` wraps its ``evaluate`` and its tracker while
a run lasts (``python -m eval_scripts.harness`` does; from Python, run ``lm_eval.simple_evaluate`` inside
``with recorded_outputs():``).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

SAMPLE_KEY = "late_fusion_images"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def checkpoint_label(pretrained_model: str | None) -> str | None:
    """How a run's name shows its checkpoint: a local folder or file by its name (a ``.bin`` without the
    suffix), a hub id as it is."""
    if not pretrained_model:
        return None
    value = str(pretrained_model).rstrip("/\\")
    path = Path(value)
    if path.suffix in (".bin", ".safetensors"):
        return path.stem
    if os.path.exists(value) or not _HUB_ID.fullmatch(value):
        return path.name or value
    return value


def harness_model_name(model_name: str, pretrained_model: str | None, use_images: bool) -> str:
    """The name lm-eval gives the run (see the module docstring)."""
    if not use_images:
        return str(model_name)
    return f"{model_name}+{checkpoint_label(pretrained_model) or 'untrained-fusion'}"


def request_records(contexts, prompt_lists, image_records) -> dict:
    """``{context: {"image_prompts", "images"}}`` for the requests of one scoring batch (``image_records``:
    the scorer's records, one list per request)."""
    return {ctx: {"image_prompts": list(prompts), "images": list(records)}
            for ctx, prompts, records in zip(contexts, prompt_lists, image_records) if ctx is not None}


def _context(args) -> str | None:
    """The context of a logged request's arguments (loglikelihood, generate_until: the first; rolling: the
    document)."""
    if isinstance(args, (list, tuple)) and args and isinstance(args[0], str):
        return args[0]
    return None


def attach_image_records(samples: dict, records: dict) -> None:
    """Add :data:`SAMPLE_KEY` to every logged sample of ``samples`` (``{task: [sample]}``, lm-eval's)."""
    empty = {"image_prompts": [], "images": []}
    for rows in (samples or {}).values():
        for sample in rows:
            sample[SAMPLE_KEY] = [records.get(_context(args), empty) for args in sample.get("arguments", [])]


def results_folder(tracker) -> Path | None:
    """Where lm-eval's tracker writes this run's results (None when it writes none)."""
    out = getattr(tracker, "output_path", None)
    if not out:
        return None
    out = Path(out)
    if out.suffix == ".json":
        return out.parent
    return out / str(tracker.general_config_tracker.model_name_sanitized)


@contextlib.contextmanager
def recorded_outputs():
    """While it lasts, runs of the adapter are named after the model (lm-eval's tracker gets
    :func:`harness_model_name`) and their logged samples carry each request's images."""
    import lm_eval.evaluator as evaluator
    from lm_eval.api.model import CachingLM
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lm_eval.utils import sanitize_model_name

    logged: list = []
    original_log, original_evaluate = GeneralConfigTracker.log_experiment_args, evaluator.evaluate

    def log_experiment_args(self, *args, **kwargs):
        original_log(self, *args, **kwargs)
        logged.append(self)

    def evaluate(*args, **kwargs):
        lm = kwargs["lm"] if "lm" in kwargs else args[0]
        model = lm.lm if isinstance(lm, CachingLM) else lm
        if not callable(getattr(model, "gathered_request_images", None)):  # not the adapter
            return original_evaluate(*args, **kwargs)
        name = model.config._name_or_path
        while logged:  # the tracker of this run (logged just before lm-eval evaluates)
            tracker = logged.pop()
            tracker.model_name, tracker.model_name_sanitized = name, sanitize_model_name(name)
            model.results_dir = results_folder(tracker)
        results = original_evaluate(*args, **kwargs)
        if model.use_images:  # every process takes part in the gathering (use_images is the same on all)
            records = model.gathered_request_images()
            if isinstance(results, dict) and results.get("samples"):
                attach_image_records(results["samples"], records)
        return results

    GeneralConfigTracker.log_experiment_args, evaluator.evaluate = log_experiment_args, evaluate
    try:
        yield
    finally:
        GeneralConfigTracker.log_experiment_args, evaluator.evaluate = original_log, original_evaluate
