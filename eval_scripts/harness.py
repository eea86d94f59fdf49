"""lm-evaluation-harness integration: any harness task, scored with late multi-image fusion.

Registers the model ``late_fusion`` with lm-eval (0.4.13) and runs lm-eval's own command line, so
``--tasks``, ``--include_path``, ``--limit``, ``--num_fewshot``, ``--log_samples``, ``--output_path``,
``--batch_size`` and the rest behave as upstream documents them::

    python -m eval_scripts.harness --model late_fusion --tasks arc_easy,piqa --batch_size 8 \\
        --model_args model_name=gpt2,pretrained_model=output/gpt2/ft_wiki_laion_220_2,k=6 \\
        --output_path output/harness --log_samples

(``--model late_fusion`` is the default here.) From Python::

    import lm_eval
    from eval_scripts.harness import LateFusionHarnessLM
    lm = LateFusionHarnessLM(model_name="gpt2", pretrained_model="...", k=6, device="cuda:0")
    with recorded_outputs():  # from eval_scripts.harness_outputs: the run's name and per-request images
        lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

``--model_args`` take the project's flag names (see ``MODEL_ARGS``); ``k`` switches images on
(without it the adapter is exactly the base LM). Under ``accelerate launch`` each process takes
its share of the requests, as lm-eval's ``hf`` model does (``rank``, ``world_size``).

What each request type means here (lm-eval's ``hf`` semantics, with the mixed prediction of
:meth:`models.fusion.causal.LateFusionLM.mixed_logprobs` in place of the LM's):

* ``loglikelihood``: lm-eval's own encoding (``TemplateLM``), scored by
  :meth:`eval_scripts.scoring.Scorer.pair_logprobs` (the project's harness protocol uses the same);
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows over the document;
* ``generate_until``: greedy, every step fused (:meth:`LateFusionLM.generate`), cut at ``until``,
  ``max_gen_toks`` or EOS.

Images: the k image prompts of a request come from its context (for ``loglikelihood_rolling``, the
document) under ``image_prompt``: ``question`` (default: the context without a trailing answer cue
such as ``Answer:``, k times), ``full`` (the context, k times) or ``sentences`` (the released
protocol: its sentences backwards from the last, then its last 70 words). Requests that share a
context share their images: all distinct prompt lists are generated up front, once, through the
disk cache; with ``image_source=retrieve`` (and ``image_index=INDEX_DIR``, ``retrieve_by``,
``dedup_threshold``) they are the best images of an image index instead, ranked up front. A context
with no text (an empty context) is scored text-only. With few-shot contexts the prompt is derived from
the whole context, demonstrations included.

Outputs (:mod:`eval_scripts.harness_outputs`): a run is named after the base LM and the checkpoint, as
lm-eval's ``hf`` model is after ``pretrained=`` (which is accepted here as another spelling of
``model_name=``): ``model_name`` in the results and the folder under ``--output_path``. With
``--log_samples`` each logged sample carries its requests' image prompts, image paths (relative to the
``image_root`` of the results' ``config.late_fusion``) and weights (``late_fusion_images``).

Not supported (one clear error before any model loads): sampling or beam search in generation
kwargs, tasks that feed images or audio, chat templates, ``batch_size=auto``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import sys

import lm_eval.models  # noqa: F401  (lm-eval registers its own models only while its registry is empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from eval_scripts.cli import EvalError, resolve_args, run_main
from models.distributed import check_in, step
from models.options import catalog

logger = logging.getLogger(__name__)

IGNORED_ARGS = ("max_batch_size",)  # lm-eval passes it for batch_size=auto, which is not supported
IMAGE_PROMPTS = ("question", "full", "sentences")
LAST_N_WORDS = 70
MAX_GEN_TOKS = 256  # lm-eval's hf default
# generation kwargs that greedy decoding honours or that have no effect on it
GREEDY_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "min_p")
# a trailing answer cue: "Answer:", "A:", "The answer is" (with or without a colon)
_ANSWER_CUE = re.compile(r"(?:^|\s)(?:(?:answer|a)\s*:|the answer is\s*:?)\s*$", re.IGNORECASE)


def strip_answer_cue(context: str) -> str:
    """The context without a trailing answer cue (``Answer:``, ``A:``, ``The answer is``), stripped."""
    match = _ANSWER_CUE.search(context)
    return (context[:match.start()] if match else context).strip()


def image_prompts(text: str | None, k: int, strategy: str) -> list[str]:
    """The k image prompts of a request's context under ``strategy``; [] when it has no text."""
    from data.prompts import derive_prompts

    if text is None or not text.strip():
        return []
    if strategy == "question":
        question = strip_answer_cue(text)
        return derive_prompts(text, k, "question", question=question) if question else []
    if strategy == "full":
        return derive_prompts(text.strip(), k, "full")
    return derive_prompts(text, k, "sentences", last_n_words=LAST_N_WORDS)


# --model_args: the project's option declarations (the same names, types and ranges as the eval scripts'
# flags), and ``config=FILE.yaml`` for a file of them
HARNESS_OPTIONS = (*catalog.MODEL, catalog.K,
                   catalog.IMAGE_PROMPT.replace(choices=IMAGE_PROMPTS, default="question"),
                   *catalog.GENERATION, *catalog.RETRIEVAL, *catalog.MIXING, catalog.DEVICE, catalog.DTYPE,
                   catalog.SEED, catalog.BATCH_SIZE)
MODEL_ARGS = tuple(o.name for o in HARNESS_OPTIONS)
WHERE = "late_fusion model_args"


def parse_model_args(kwargs: dict):
    """The settings of ``--model_args`` (over a ``config=FILE.yaml`` among them, over the declared defaults),
    and whether images are used (``k`` given). Bad keys and values are one ``EvalError``."""
    from models.options import OptionError, Settings, checked_values, read_config
    from models.options.dtypes import canonical

    kwargs = {k: v for k, v in kwargs.items() if k not in IGNORED_ARGS}
    if "pretrained" in kwargs:  # lm-eval's hf spelling of the base LM
        if "model_name" in kwargs and str(kwargs["model_name"]) != str(kwargs["pretrained"]):
            raise EvalError(f"{WHERE}: pretrained={kwargs['pretrained']} and model_name={kwargs['model_name']} "
                            "name two base LMs; give one (pretrained is another spelling of model_name)")
        kwargs["model_name"] = kwargs.pop("pretrained")
    if str(kwargs.get("batch_size", "")).startswith("auto"):
        raise EvalError("late_fusion: batch_size auto is not supported; give a number (--batch_size 8)")
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = canonical(kwargs["dtype"])  # lm-eval's spellings: float16, bfloat16, ...
    config = kwargs.pop("config", None)
    try:
        values = read_config(config, HARNESS_OPTIONS) if config else {}
        values.update(checked_values(kwargs, HARNESS_OPTIONS, WHERE))
    except OptionError as err:
        raise EvalError(str(err)) from None
    use_images = values.get("k") is not None
    if use_images and values["k"] < 1:
        raise EvalError(f"{WHERE}: k must be >= 1, got {values['k']} (leave k out for no images)")
    settings = Settings(**{**{o.name: o.default for o in HARNESS_OPTIONS}, **values}, generate_images=use_images,
                        config=config)
    if use_images:
        from models.images.retrieval import check_retrieval_args

        try:
            check_retrieval_args(settings)  # e.g. image_source=retrieve without image_index
        except ValueError as e:
            raise EvalError(f"{WHERE}: {e}") from None
    return resolve_args(settings), use_images


def refuse_masked_lm(args) -> None:
    """One line (an ``EvalError``) when ``model_name`` is a masked LM: every harness request scores next
    tokens or generates, which a masked LM cannot (its config is read; no weights load)."""
    from eval_scripts.core import require_causal_lm

    if getattr(args, "model_name", None):
        require_causal_lm(args, "python -m eval_scripts.harness (late_fusion)")


@register_model("late_fusion")
class LateFusionHarnessLM(TemplateLM):
    """lm-eval model: a causal LM with late multi-image fusion (see the module docstring).

    Nothing heavy loads in the constructor: the models load on the first request, after the
    requests (and, through ``python -m eval_scripts.harness``, the tasks) have been checked.
    """

    MULTIMODAL = False

    def __init__(self, **model_args):
        super().__init__()
        from accelerate import PartialState

        args, self.use_images = parse_model_args(model_args)
        refuse_masked_lm(args)
        device = args.device
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            logger.info("late_fusion: CUDA is not available, using the accelerator's default device")
            device = None  # lm-eval's CLI asks for cuda:0 unless told otherwise (as hf does)
        state = PartialState(cpu=device == "cpu")
        if state.num_processes > 1:  # accelerate launch: one device per process, as lm-eval's hf model
            device = None
            self._rank, self._world_size = state.process_index, state.num_processes
        self._state = state
        self._device = torch.device(device) if device else state.device
        self.args = args.replace(device=str(self._device))  # what this adapter runs on
        self._runtime = None
        self._request_images: dict = {}  # context -> its image prompts and images (eval_scripts/harness_outputs.py)
        self.results_dir = None  # where lm-eval writes the results, once known (recorded_outputs)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """lm-eval's CLI always passes ``batch_size`` and ``device``; those in --model_args win."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------ the name lm-eval gives the run
    @property
    def config(self):
        """What lm-eval names a model object's results after (``config._name_or_path``): the base LM and the
        checkpoint (:func:`eval_scripts.harness_outputs.harness_model_name`); nothing loads."""
        from types import SimpleNamespace

        from eval_scripts.harness_outputs import harness_model_name

        return SimpleNamespace(_name_or_path=harness_model_name(self.args.model_name, self.args.pretrained_model,
                                                                self.use_images))

    def gathered_request_images(self) -> dict:
        """Every request's images scored so far, by context, from all processes (a collective call)."""
        merged: dict = {}
        for part in self.gather_object(self._request_images) or []:
            merged.update(part or {})
        return merged

    # ------------------------------------------------------------------ models, loaded on first use
    def _load(self) -> None:
        """Load the project's :class:`eval_scripts.runtime.Runtime` (models, tokenizer, images) once, with
        a scorer for fused requests and a text-only one (for contexts that give no image prompt)."""
        if self._runtime is None:
            from eval_scripts.runtime import Runtime
            from eval_scripts.scoring import Scorer

            self._runtime = Runtime(self.args, self.use_images)
            self._scorer = Scorer(self._runtime, self.args, self.use_images)
            self._text_scorer = Scorer(self._runtime, self.args, False)

    @property
    def runtime(self):
        self._load()
        return self._runtime

    @property
    def scorer(self):
        self._load()
        return self._scorer

    @property
    def text_scorer(self):
        self._load()
        return self._text_scorer

    @property
    def tokenizer(self):
        return self.runtime.tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.prefix_token_id

    @property
    def max_length(self) -> int:
        """Tokens one input may hold: the LM's window, less the visual prefix when images are fused."""
        return self.scorer.window()

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.scorer.harness_encode(string, add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ distributed (accelerate launch)
    def all_gather(self, tensor):
        if self.world_size <= 1:
            return tensor
        from accelerate.utils import gather

        return gather(tensor)

    def gather_object(self, obj, dst=0):
        if self.world_size <= 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=out, dst=dst)
        return out

    def barrier(self):
        if self.world_size > 1:
            from models.distributed import barrier

            barrier()  # a check-in: a peer's failure is heard here

    # ------------------------------------------------------------------ what this model cannot do
    def chat_template(self, chat_template=False):
        if chat_template:
            raise EvalError("late_fusion does not apply chat templates (--apply_chat_template)")
        return None

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        raise EvalError("late_fusion does not apply chat templates (--apply_chat_template)")

    @staticmethod
    def greedy_gen_kwargs(gen_kwargs: dict, where: str) -> tuple[list[str], int]:
        """``(until, max_gen_toks)`` of one generation request; sampling, beams or any other decoding
        setting is an error (this model decodes greedily)."""
        from lm_eval.models.utils import normalize_gen_kwargs

        if not isinstance(gen_kwargs, dict):
            raise EvalError(f"{where}: generation kwargs must be a dict, got {gen_kwargs!r}")
        kwargs = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
        if kwargs.get("do_sample"):
            raise EvalError(f"{where}: sampling (do_sample, temperature > 0) is not supported; late_fusion "
                            "decodes greedily")
        other = sorted(k for k in kwargs if k not in GREEDY_GEN_KWARGS
                       and not (k in ("num_beams", "repetition_penalty") and kwargs[k] == 1))
        if other:
            raise EvalError(f"{where}: generation kwarg {other[0]}={kwargs[other[0]]!r} is not supported; "
                            "late_fusion decodes greedily and honours only until and max_gen_toks")
        until = kwargs["until"]
        if any(not isinstance(u, str) for u in until):
            raise EvalError(f"{where}: until must be a string or a list of strings, got {until!r}")
        if kwargs["max_gen_toks"] < 1:
            raise EvalError(f"{where}: max_gen_toks must be >= 1, got {kwargs['max_gen_toks']}")
        return list(until), kwargs["max_gen_toks"]

    def check_tasks(self, tasks: dict) -> None:
        """One clear error for a task this model cannot run (called before any request is scored)."""
        for name, task in tasks.items():
            if getattr(task, "MULTIMODAL", False):
                raise EvalError(f"task {name!r} gives the model images or audio; late_fusion reads text "
                                "(it generates its own images)")
            if getattr(task, "OUTPUT_TYPE", None) == "generate_until":
                self.greedy_gen_kwargs(task.config.generation_kwargs or {}, f"task {name!r}")

    # ------------------------------------------------------------------ images
    def _prompts(self, texts: list[str | None]) -> list[list[str]]:
        """Image prompts of each request's context; the image source prefetches every distinct list now,
        once (lm-eval hands all requests at once: missing images are generated, prompts ranked), so
        scoring batches find them ready."""
        if not self.use_images:
            return [[] for _ in texts]
        by_text = {t: image_prompts(t, self.args.k, self.args.image_prompt) for t in dict.fromkeys(texts)}
        with self.runtime.watch.phase("generation"):
            self.runtime.source.prefetch([list(p) for p in dict.fromkeys(tuple(p) for p in by_text.values() if p)])
        return [by_text[t] for t in texts]

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._names = {req.args: f"task {req.task_name!r} doc {req.doc_id}" for req in requests}
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``[(log-likelihood, is greedy)]`` of ``((context, continuation), context ids,
        continuation ids)`` requests; images from each request's context string."""
        known = getattr(self, "_names", {})
        names = [known.get(tuple(r[0])) if r[0] else None for r in requests]
        out = self._score([(ctx, cont) for _, ctx, cont in requests], [r[0][0] if r[0] else None for r in requests],
                          names, disable_tqdm)
        for (request_str, _, _), answer in zip(requests, out):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return out

    def _score(self, pairs, texts, names, disable_tqdm=False) -> list[tuple[float, bool]]:
        """Score ``(context ids, continuation ids)`` pairs in batches; rows whose context gives no image
        prompt go through the text-only scorer. Requests are grouped by context, longest first."""
        prompts = self._prompts(texts)
        order = sorted(range(len(pairs)), key=lambda i: (not prompts[i], -len(pairs[i][0]), texts[i] or "",
                                                        -len(pairs[i][1])))
        batches, bs = [], self.batch_size
        for has_images in (True, False):
            rows = [i for i in order if bool(prompts[i]) == has_images]
            batches += [(has_images, rows[s:s + bs]) for s in range(0, len(rows), bs)]
        results: list = [None] * len(pairs)
        with tqdm(total=len(pairs), desc="late_fusion loglikelihood", disable=disable_tqdm or self.rank != 0) as bar:
            # every process runs as many batches as the longest share, each a step (models.distributed): a
            # failure on one process stops all of them there, before lm-eval's gathers could wait for it
            for n in range(check_in(value=len(batches))):
                with step((EvalError,)):
                    if n >= len(batches):
                        continue
                    has_images, rows = batches[n]
                    scorer = self.scorer if has_images else self.text_scorer
                    out, records = scorer.pair_logprobs([pairs[i] for i in rows], [prompts[i] for i in rows],
                                                        [names[i] or f"request {i}" for i in rows])
                    if has_images:
                        self._keep_images([texts[i] for i in rows], [prompts[i] for i in rows], records)
                    for i, (lps, greedy) in zip(rows, out):  # summed in float32, as lm-eval's hf model does
                        results[i] = (float(torch.tensor(lps, dtype=torch.float32).sum()), greedy)
                    bar.update(len(rows))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document over lm-eval's disjoint rolling windows (each token
        predicted once, the first from the prefix token); images from the document."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, texts, names, owner = [], [], [], []
        for n, req in enumerate(requests):
            (string,) = req.args
            windows = get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((ctx, cont))
                texts.append(string)
                names.append(f"task {req.task_name!r} doc {req.doc_id}")
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._score(pairs, texts, names, disable_tqdm)):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, every step fused, cut at the first ``until`` string, EOS or
        ``max_gen_toks`` new tokens (the context keeps its last ``max_length - max_gen_toks`` tokens)."""
        from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

        settings = [self.greedy_gen_kwargs(req.args[1], f"task {req.task_name!r} doc {req.doc_id}")
                    for req in requests]  # checked before the models load
        rt = self.runtime
        contexts = [req.args[0] for req in requests]
        prompts = self._prompts(contexts)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        eos_ids = {self.eot_token_id}
        config_eos = getattr(getattr(rt.model.lm, "generation_config", None), "eos_token_id", None)
        eos_ids |= set(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
        groups: dict = {}
        for i, (until, max_gen) in enumerate(settings):
            groups.setdefault((json.dumps(until), max_gen, bool(prompts[i])), []).append(i)
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="late_fusion generate_until", disable=disable_tqdm or self.rank != 0)
        jobs = []  # (until, max_gen, has_images, rows of one batch, their encoded contexts)
        with step((EvalError,)):
            for (until_json, max_gen, has_images), rows in groups.items():
                until = handle_stop_sequences(json.loads(until_json), eos=eos_text)
                max_ctx = self.max_length - max_gen if has_images else self.text_scorer.window() - max_gen
                if max_ctx < 1:
                    raise EvalError(f"max_gen_toks {max_gen} leaves no room for a context in the model's window "
                                    f"of {max_ctx + max_gen} tokens")
                encoded = {i: self.tok_encode(contexts[i])[-max_ctx:] for i in rows}
                rows = sorted(rows, key=lambda i: -len(encoded[i]))
                jobs += [(until, max_gen, has_images, rows[start:start + self.batch_size], encoded)
                         for start in range(0, len(rows), self.batch_size)]
        for n in range(check_in(value=len(jobs))):  # steps of every process, as in _score
            with step((EvalError,)):
                if n >= len(jobs):
                    continue
                until, max_gen, has_images, chunk, encoded = jobs[n]
                texts = self._generate([encoded[i] for i in chunk], [prompts[i] for i in chunk], until,
                                       max_gen, eos_ids, has_images, [contexts[i] for i in chunk])
                for i, text in zip(chunk, texts):
                    results[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(chunk))
        bar.close()
        return results

    @torch.no_grad()
    def _generate(self, seqs, prompt_lists, until, max_gen, eos_ids, has_images, contexts=None) -> list[str]:
        """Decoded new text of each left-padded context, up to its first EOS (stop strings are cut by
        the caller; a row stops decoding once one appears)."""
        rt, tok = self.runtime, self.tokenizer
        scorer = self.scorer if has_images else self.text_scorer
        ids, mask = rt.pad(seqs, left=True)
        patches, weights, records, prefix = scorer.images_and_prefix(prompt_lists)
        if has_images and contexts is not None:
            self._keep_images(contexts, prompt_lists, records)
        stops = [u for u in until if u]

        def stop(new_ids):
            return any(s in tok.decode(new_ids, skip_special_tokens=True) for s in stops)
        out = rt.model.generate(ids, mask, patches, weights, self.args.mix, max_new_tokens=max_gen,
                                eos_token_id=sorted(eos_ids), pad_token_id=tok.pad_token_id, stop=stop,
                                prefix=prefix)
        texts = []
        for row in out.tolist():
            cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
            texts.append(tok.decode(row[:cut], skip_special_tokens=True))
        return texts

    def _keep_images(self, contexts, prompt_lists, records) -> None:
        """Remember each request's image prompts and images, for the logged samples."""
        from eval_scripts.harness_outputs import request_records

        if self.use_images:
            self._request_images.update(request_records(contexts, prompt_lists, records))

    # ------------------------------------------------------------------ results
    def get_model_info(self) -> dict:
        """Written by lm-eval into the results' ``config``: the fusion settings and image counts."""
        info = {key: getattr(self.args, key) for key in ("model_name", "pretrained_model", "dtype")}
        info["k"] = self.args.k if self.use_images else 0
        if self.use_images:
            info.update({key: getattr(self.args, key) for key in (
                "vision_encoder", "mix", "clip_temperature", "uniform_weights", "image_prompt", "image_source")})
            info.update({key: getattr(self.args, key) for key in (
                ("image_index", "retrieve_by", "dedup_threshold") if self.args.image_source == "retrieve" else
                ("image_generator", "image_size", "num_inference_steps", "guidance_scale", "seed"))})
        if self._runtime is not None:
            stats = self._runtime.image_stats()
            # images are generated up front (_prompts), through the image source, and read back for scoring
            ahead = self._runtime.source.stats() if self._runtime.source is not None else {}
            info.update(images_generated=stats["generated"] + ahead.get("generated", 0),
                        vision_features_computed=stats["features_computed"],
                        vision_features_read=stats["features_read"])
            if self._runtime.source is not None:  # what the logged samples' image paths are relative to
                from eval_scripts.image_paths import root_record

                root = self._runtime.source.image_root()
                info["image_root"] = (root_record(root, self.results_dir) if self.results_dir is not None
                                      else {"path": root.path, "absolute": root.path, "kind": root.kind})
        return {"late_fusion": info}


@contextlib.contextmanager
def tasks_checked_before_run():
    """lm-eval builds the model before it loads the tasks; this checks the loaded tasks against what
    :class:`LateFusionHarnessLM` can do just before lm-eval's ``evaluate`` scores anything (so a mixed
    run fails before any model loads, not at its first generation task)."""
    import lm_eval.evaluator as evaluator
    from lm_eval.api.model import CachingLM

    original = evaluator.evaluate

    def evaluate(*args, **kwargs):
        lm = kwargs["lm"] if "lm" in kwargs else args[0]
        task_dict = kwargs["task_dict"] if "task_dict" in kwargs else args[1]
        model = lm.lm if isinstance(lm, CachingLM) else lm
        if isinstance(model, LateFusionHarnessLM):
            model.check_tasks(task_dict.get("tasks", {}) if isinstance(task_dict, dict) else {})
        return original(*args, **kwargs)

    evaluator.evaluate = evaluate
    try:
        yield
    finally:
        evaluator.evaluate = original


def cli_argv(argv: list[str]) -> list[str]:
    """lm-eval's command line with ``run`` and ``--model late_fusion`` filled in when absent."""
    argv = list(argv)
    if argv[:1] and argv[0] in ("ls", "validate", "-h", "--help"):
        return argv
    if argv[:1] != ["run"]:
        argv.insert(0, "run")
    given = {a.split("=")[0] for a in argv}
    if not given & {"--model", "-M", "--config", "-C"}:
        argv[1:1] = ["--model", "late_fusion"]
    return argv


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI with ``late_fusion`` registered (``argv``: lm-eval's arguments)."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = cli_argv(sys.argv[1:] if argv is None else argv)
    setup_logging()
    saved = sys.argv
    sys.argv = ["eval_scripts.harness", *argv]
    try:
        cli = HarnessCLI()
        args = cli.parse_args()
    finally:
        sys.argv = saved
    if getattr(args, "command", None) == "run" and getattr(args, "model", None) == "late_fusion":
        settings, _ = parse_model_args(dict(getattr(args, "model_args", None) or {}))  # fail fast, before
        refuse_masked_lm(settings)  # lm-eval's task index is built
    from eval_scripts.harness_outputs import recorded_outputs

    with tasks_checked_before_run(), recorded_outputs():
        cli.execute(args)


if __name__ == "__main__":
    run_main(main)
