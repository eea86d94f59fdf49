"""BoolQ: a passage and a yes/no question, answered by a next-token choice between yes and no.

Protocol (docs/protocols.md, "BoolQ"):

* ``--prompt_format released`` (default): ``Context: {passage}. Question: {Question}? Answer:`` as
  released, except that the passage keeps its case (the release's ``str.capitalize()`` lower-cased
  whole passages); ``--prompt_format harness``: the lm-evaluation-harness prompt
  ``{passage}\\nQuestion: {question}?\\nAnswer:``.
* The mixed log-probability of the next token decides: "yes" scores the better of the first
  tokens of " yes" and " Yes", "no" the better of " no" and " No" (the release compared " Yes"
  with " No" only, the harness " yes" with " no"; taking both spellings favours neither
  convention). Ties go to "yes". Reports accuracy (percent).

Images: k prompts derived from the prompt text by ``sentences`` (its sentences backwards from the
last, then its last 60 words), as released.

Results: ``<output_dir>/<run_name>/boolq.json`` (``boolq_harness.json`` for the harness prompt);
each sample line holds ``id, prompt, candidates`` (["yes", "no"]), ``scores`` (their
log-probabilities), ``prediction``, ``answer``, ``correct`` and ``images``; with images also
``text_only_scores`` and ``text_only_prediction`` (the LM alone, from the same pass).

    python eval_scripts/boolq.py --model_name meta-llama/Meta-Llama-3-8B \\
        --pretrained_model output/llama3/ft_wiki_laion_220_2 --generate_images True --k 10
"""
from __future__ import annotations

from data.benchmarks import boolq_context, boolq_released_prompt, load_boolq
from data.prompts import derive_prompts
from eval_scripts.benchmark import Benchmark
from eval_scripts.cli import option_parser, parse_eval_args
from eval_scripts.core import Evaluator, first_token_ids, require_causal_lm, run_main
from models.options import Option, eval_options

CANDIDATES = ("yes", "no")
LAST_N_WORDS = 60
PROMPTS = {"released": boolq_released_prompt, "harness": boolq_context}


OPTIONS = (
    *eval_options(image_prompt_choices=("sentences",)),
    Option("prompt_format", kind="choice", choices=tuple(PROMPTS), default="released", results=True, group="BoolQ",
           help="released: the release's prompt (passage case kept); harness: lm-evaluation-harness's"),
    Option("split", data=True, group="BoolQ", help="local file {split}.jsonl or hub split (default: dev/validation)"),
)
DESCRIPTION = __doc__.split("\n")[0]


def make_parser():
    return option_parser(OPTIONS, DESCRIPTION)


def parse_args(argv=None):
    return parse_eval_args(OPTIONS, argv, DESCRIPTION)


def task_name(args) -> str:
    return "boolq" if args.prompt_format == "released" else f"boolq_{args.prompt_format}"


def build_items(ev: Evaluator, records: list[dict]) -> list[dict]:
    make_prompt = PROMPTS[ev.args.prompt_format]
    items = []
    for rec in records:
        prompt = make_prompt(rec)
        items.append({"id": rec["id"], "prompt": prompt, "answer": CANDIDATES[0] if rec["answer"] else CANDIDATES[1],
                      "image_prompts": derive_prompts(prompt, ev.args.k, "sentences", last_n_words=LAST_N_WORDS)
                      if ev.use_images else []})
    return items


def choose(logp_row, token_ids) -> tuple[list[float], str]:
    """The candidates' scores from one row of next-token log-probs, and the choice (ties: "yes")."""
    scores = [max(float(logp_row[t]) for t in ids) for ids in token_ids]
    return scores, CANDIDATES[0] if scores[0] >= scores[1] else CANDIDATES[1]


def make_compute(ev: Evaluator):
    token_ids = [first_token_ids(ev.tokenizer, c) for c in CANDIDATES]

    def compute(batch: list[dict]) -> list[dict]:
        out = ev.next_token_logprobs([it["prompt"] for it in batch], [it["image_prompts"] for it in batch],
                                     with_text=ev.use_images)
        records = []
        for n, (row, it, im) in enumerate(zip(out[0], batch, out[1])):
            scores, pred = choose(row, token_ids)
            rec = {"id": it["id"], "prompt": it["prompt"], "candidates": list(CANDIDATES),
                   "scores": [round(s, 6) for s in scores], "prediction": pred, "answer": it["answer"],
                   "correct": pred == it["answer"], "images": im}
            if ev.use_images:  # what the LM alone says, from the same pass
                text_scores, text_pred = choose(out[2][n], token_ids)
                rec.update(text_only_scores=[round(s, 6) for s in text_scores], text_only_prediction=text_pred)
            records.append(rec)
        return records
    return compute


def metrics_from(records: list[dict]) -> dict:
    return {"acc": 100 * sum(r["correct"] for r in records) / len(records), "n": len(records)}


BENCHMARKS = (Benchmark("boolq", results="boolq", metric="acc", group="RC", folders=("boolq",), task_name=task_name,
                        from_samples=lambda config, records: metrics_from(records)),)


def load_data(args) -> list[dict]:
    """The questions the run scores (what the suite reads and checks before its first task runs)."""
    return load_boolq(args.data_dir, limit=args.limit, split=args.split, data_file=args.data_file)


def evaluate(args, runtime=None, data=None) -> dict:
    """Run the benchmark with parsed ``args`` (on a shared ``runtime`` and ``load_data(args)``'s ``data``, if
    given: the suite's)."""
    require_causal_lm(args, "boolq.py")
    data = data if data is not None else load_data(args)
    ev = Evaluator(args, task_name(args), OPTIONS, runtime=runtime)
    metrics = metrics_from(ev.run(build_items(ev, data), make_compute(ev)))
    return ev.finish(metrics, [("acc", f"{metrics['acc']:.2f}")])


def main(argv=None) -> dict:
    return evaluate(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
