"""Multiple-choice commonsense QA: PIQA, SIQA, ARC, OpenBookQA, CommonsenseQA, HellaSwag, WinoGrande.

``--testset``: piqa, siqa, arc (ARC-Easy then ARC-Challenge, as released), arc_easy, arc_challenge,
obqa, cqa (CommonsenseQA), hs (HellaSwag), winogrande. Data comes from the hub (parquet ids) or,
with ``--data_dir``, from the set's original files (``--split`` picks the file, e.g. ``dev`` for
``ARC-Easy-Dev.jsonl``; see ``data.benchmarks.load_commonsense``), or with ``--data_file`` from one
such file (PIQA/SIQA labels from ``{stem}-labels.lst`` beside it).

Protocols (docs/protocols.md, "Commonsense multiple choice"):

* ``--protocol released`` (default): each option's whole query (context plus option, as the
  released script built it) is scored by its perplexity ``exp(mean token NLL)`` under the mixed
  logits; the lowest wins. Every token after the first is scored (after the BOS token when the
  tokenizer adds one), as the released loss with ``labels = input_ids`` did. Reports ``acc``.
* ``--protocol harness``: lm-evaluation-harness continuation log-likelihood: the summed log-probs
  of each choice given its context; ``acc`` takes the largest sum, ``acc_norm`` the largest sum
  per character of the choice. Reports ``acc`` and ``acc_norm``. Encoding and truncation are
  lm-eval's ``hf`` model's (``Scorer.continuation_logprobs``, shared with
  ``eval_scripts/harness.py``): a context's trailing space moves into the continuation, an empty
  context is conditioned on BOS (else EOS), an over-long input keeps its last ``window + 1``
  tokens less the last one, and a choice longer than the window is an error naming the example.

Images: ``--image_prompt sentences`` (default, released) derives one image set per option from
that option's query (its sentences backwards from the last, then its last 70 words);
``--image_prompt context`` derives one set per question from the shared question text, used by
every option. Both protocols use the same image sets, so their images are shared in the cache.

Accuracies are percentages. Results go to ``<output_dir>/<run_name>/commonsense_<testset>.json``
(``..._harness`` for the harness protocol, plus ``_<split>`` when ``--split`` is given, so that
runs sharing a run name never mix). Each sample line holds ``id, protocol, prompt, candidates,
scores`` (perplexities for released, log-likelihood sums for harness), ``prediction`` and
``answer`` (option indices), ``correct``, for harness also ``prediction_norm`` and
``correct_norm``, and ``images``: one list of image records per option (the lists are equal
with ``--image_prompt context``). With images, also ``text_only_scores`` and
``text_only_prediction`` (harness: and ``text_only_prediction_norm``): the LM alone, from the same pass.

    python eval_scripts/commonsenseQA.py --model_name meta-llama/Meta-Llama-3-8B \\
        --pretrained_model output/llama3/ft_wiki_laion_220_2 --generate_images True --k 10 --testset piqa
"""
from __future__ import annotations

import math

from data.benchmarks import COMMONSENSE_TESTSETS, MCExample, load_commonsense
from data.prompts import derive_prompts
from eval_scripts.benchmark import Benchmark
from eval_scripts.cli import option_parser, parse_eval_args
from eval_scripts.core import EvalError, Evaluator, require_causal_lm, run_main
from eval_scripts.metrics import mc_predictions, ppl_prediction
from models.options import Option, eval_options

PROTOCOLS = ("released", "harness")
LAST_N_WORDS = 70


OPTIONS = (
    *eval_options(image_prompt_choices=("sentences", "context")),
    Option("testset", kind="choice", choices=COMMONSENSE_TESTSETS, required=True, results=True, group="commonsense",
           help="the benchmark"),
    Option("protocol", kind="choice", choices=PROTOCOLS, default="released", results=True, group="commonsense",
           help="released (perplexity) or harness (log-likelihood)"),
    Option("split", data=True, group="commonsense", help="file/split to read (default: the released one per set)"),
)
DESCRIPTION = __doc__.split("\n")[0]


def make_parser():
    return option_parser(OPTIONS, DESCRIPTION)


def parse_args(argv=None):
    return parse_eval_args(OPTIONS, argv, DESCRIPTION)


def task_name(args) -> str:
    name = f"commonsense_{args.testset}"
    if args.protocol != "released":
        name += f"_{args.protocol}"
    return name + (f"_{args.split}" if args.split else "")


def option_prompts(ex: MCExample, k: int, mode: str) -> list[list[str]]:
    """The k image prompts of each option: from its own query, or from the shared question text."""
    if mode == "context":
        shared = derive_prompts(ex.image_context, k, "sentences", last_n_words=LAST_N_WORDS)
        return [shared] * len(ex.choices)
    return [derive_prompts(q, k, "sentences", last_n_words=LAST_N_WORDS) for q in ex.released_queries]


def build_items(ev: Evaluator, examples: list[MCExample]) -> list[dict]:
    args = ev.args
    return [{"id": ex.id, "example": ex,
             "image_prompts": option_prompts(ex, args.k, args.image_prompt) if ev.use_images
             else [[] for _ in ex.choices]}
            for ex in examples]


def _per_option(ev: Evaluator, batch: list[dict], score_chunk):
    """Per item: the scored tokens' log-probs of each option, each option's image records, and (with
    images) the text-only log-probs of each option.

    ``score_chunk(rows, prompt_lists, with_text)`` scores the options ``rows`` ((item, option) pairs),
    at most ``--batch_size`` of them per call, and returns the core's ``(results, records[, text])``.
    """
    flat = [(i, j) for i, it in enumerate(batch) for j in range(len(it["example"].choices))]
    logprobs, images, text = [[] for _ in batch], [[] for _ in batch], [[] for _ in batch]
    size = ev.args.batch_size
    for s in range(0, len(flat), size):
        rows = flat[s:s + size]
        out = score_chunk(rows, [batch[i]["image_prompts"][j] for i, j in rows], ev.use_images)
        for n, ((i, _), (lps, _greedy), im) in enumerate(zip(rows, out[0], out[1])):
            logprobs[i].append(lps)
            images[i].append(im)
            if ev.use_images:
                text[i].append(out[2][n])
    return logprobs, images, text


def released_logprobs(ev: Evaluator, batch: list[dict]):
    """Token log-probs of every option's whole query (every token after the first)."""
    def score_chunk(rows, prompt_lists, with_text):
        seqs = []
        for i, j in rows:
            ex = batch[i]["example"]
            ids = ev.encode(ex.released_queries[j])
            if len(ids) < 2:
                raise EvalError(f"{ex.id}: the query of option {j} ({ex.released_queries[j]!r}) "
                                "has no token to score")
            seqs.append(ids)
        return ev.token_logprobs(seqs, [1] * len(seqs), prompt_lists, with_text)
    return _per_option(ev, batch, score_chunk)


def harness_logprobs(ev: Evaluator, batch: list[dict]):
    """Token log-probs of every option's continuation given its context."""
    def score_chunk(rows, prompt_lists, with_text):
        requests = [batch[i]["example"].requests()[j] for i, j in rows]
        names = [f"{batch[i]['example'].id} (option {j})" for i, j in rows]
        return ev.continuation_logprobs([c for c, _ in requests], [x for _, x in requests], prompt_lists, with_text,
                                        names)
    return _per_option(ev, batch, score_chunk)


def option_scores(ex: MCExample, lps: list[list[float]], harness: bool) -> tuple[list[float], int, int | None]:
    """Each option's score, the prediction and (harness) the length-normalised prediction, from
    each option's token log-probs: log-likelihood sums (harness) or perplexities (released)."""
    if harness:
        scores = [sum(x) for x in lps]
        return (scores, *mc_predictions(scores, ex.norm_lengths()))
    mean_nll = [-sum(x) / len(x) for x in lps]
    return [math.exp(x) for x in mean_nll], ppl_prediction(mean_nll), None


def make_compute(ev: Evaluator):
    harness = ev.args.protocol == "harness"

    def compute(batch: list[dict]) -> list[dict]:
        logprobs, images, text = (harness_logprobs if harness else released_logprobs)(ev, batch)
        records = []
        for n, (it, lps, im) in enumerate(zip(batch, logprobs, images)):
            ex = it["example"]
            sc, pred, pred_norm = option_scores(ex, lps, harness)
            rec = {"id": it["id"], "protocol": ev.args.protocol}
            if harness:
                rec.update(prompt=ex.context, candidates=list(ex.choices))
                if ex.option_contexts:
                    rec["contexts"] = list(ex.option_contexts)
            else:
                rec.update(prompt=ex.image_context, candidates=list(ex.released_queries))
            rec.update(scores=[round(s, 6) for s in sc], prediction=pred, answer=ex.label,
                       correct=pred == ex.label)
            if harness:
                rec.update(prediction_norm=pred_norm, correct_norm=pred_norm == ex.label)
            rec["images"] = im
            if ev.use_images:  # what the LM alone says, from the same pass
                t_sc, t_pred, t_norm = option_scores(ex, text[n], harness)
                rec.update(text_only_scores=[round(s, 6) for s in t_sc], text_only_prediction=t_pred)
                if harness:
                    rec["text_only_prediction_norm"] = t_norm
            records.append(rec)
        return records
    return compute


def metrics_from(records: list[dict], protocol: str) -> dict:
    n = len(records)
    metrics = {"acc": 100 * sum(r["correct"] for r in records) / n}
    if protocol == "harness":
        metrics["acc_norm"] = 100 * sum(r["correct_norm"] for r in records) / n
    metrics["n"] = n
    return metrics


def metrics_from_samples(config: dict, records: list[dict]) -> dict:
    return metrics_from(records, records[0].get("protocol", config.get("protocol", "released")))


# folder names under a --data_root: the released name first, then the other spellings in use
FOLDERS = {"piqa": ("piqa",), "siqa": ("siqa", "socialiqa"), "arc": ("arc",), "arc_easy": ("arc",),
           "arc_challenge": ("arc",), "obqa": ("obqa", "openbookqa"), "cqa": ("commonsenseqa", "cqa"),
           "hs": ("hellaswag", "hs"), "winogrande": ("winogrande",)}
BENCHMARKS = tuple(Benchmark(name, results=f"commonsense_{name}", metric="acc", group="CR",
                             argv=("--testset", name), folders=FOLDERS[name], task_name=task_name,
                             from_samples=metrics_from_samples)
                   for name in COMMONSENSE_TESTSETS)


def load_data(args) -> list[MCExample]:
    """The questions the run scores (what the suite reads and checks before its first task runs)."""
    return load_commonsense(args.testset, args.data_dir, split=args.split, limit=args.limit, data_file=args.data_file)


def evaluate(args, runtime=None, data=None) -> dict:
    """Run the benchmark with parsed ``args`` (on a shared ``runtime`` and ``load_data(args)``'s ``data``, if
    given: the suite's)."""
    require_causal_lm(args, "commonsenseQA.py")
    examples = data if data is not None else load_data(args)
    ev = Evaluator(args, task_name(args), OPTIONS, runtime=runtime)
    records = ev.run(build_items(ev, examples), make_compute(ev), desc=ev.task)
    metrics = metrics_from(records, args.protocol)
    table = [(k, f"{v:.2f}") for k, v in metrics.items() if k != "n"]
    return ev.finish(metrics, table)


def main(argv=None) -> dict:
    return evaluate(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
