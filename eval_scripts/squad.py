"""SQuAD 2.0 (or 1.1): one-shot extractive QA by fused greedy generation, scored by exact match and F1.

Protocol (docs/protocols.md, "SQuAD and QuAC"), shared with ``quac.py``:

* The released one-shot prompt (``data.benchmarks.qa_one_shot_prompt``): the instruction, the
  title, the background paragraph, the previous answered question of the same article with its
  answer, then the question and ``A:``.
* Which questions: by default those vLMIG scored, the answerable ones that have a previous
  answered question in their article (each article's first answered question only serves as the
  example). ``--all_questions`` adds the unanswerable ones; questions without an example in their
  article (before its first answered question) stay unscored either way (``skipped`` counts them).
* Greedy generation of up to ``--max_new_tokens`` (50) tokens, fused at every step; the answer is
  cut from the generated token ids at the first newline (the evaluation core does this).
* Exact match and F1 with the official SQuAD 2.0 normalisation, the maximum over the gold answers
  (``eval_scripts.metrics``); an unanswerable question's gold is the empty answer. The prompt's
  abstention answer "Not in background." is scored as the empty answer (as CANNOTANSWER for QuAC),
  so that abstaining is right exactly on unanswerable questions. Scores are percentages.
* SQuAD 1.1 (a ``dev-v1.1.json`` in ``--data_dir``, or any 1.1 file as ``--data_file``): every question
  is answerable, so there is no no-answer rule: the prediction is scored as generated (abstaining scores
  0). Results go to ``squad_v1.1.json`` so that they never mix with SQuAD 2.0's.

Images: k prompts derived by ``sentences`` from the whole prompt (its sentences backwards from the
last, then its last 70 words), as the released scripts derived them from their input prompt.

Data: the hub's SQuAD 2.0, or ``--data_dir`` (``{split}-v2.0.json``, else ``{split}-v1.1.json``), or
``--data_file`` (one official JSON file, either version).

Results: ``<output_dir>/<run_name>/squad.json``; each sample line holds ``id, prompt, prediction,
answers, is_impossible, exact_match, f1, correct`` (exact match) and ``images``; with images also
``text_only_generation``, ``text_only_exact_match`` and ``text_only_f1``: the LM's own greedy answer (a second,
unfused decode of the prompt, fitted as a text-only run fits it) and its scores.

    python eval_scripts/squad.py --model_name meta-llama/Meta-Llama-3-8B \\
        --pretrained_model output/llama3/ft_wiki_laion_220_2 --generate_images True --k 10
"""
from __future__ import annotations

from typing import Callable

from data.benchmarks import load_squad, qa_one_shot_prompt
from data.prompts import derive_prompts
from eval_scripts.benchmark import Benchmark
from eval_scripts.cli import option_parser, parse_eval_args
from eval_scripts.core import EvalError, Evaluator, require_causal_lm, run_main
from eval_scripts.metrics import exact_match, f1, normalize_answer
from models.options import Option, eval_options

LAST_N_WORDS = 70
ABSTENTION = "Not in background."


TASK = "squad"


OPTIONS = (
    *eval_options(image_prompt_choices=("sentences",)),
    Option("all_questions", kind="flag", default=False, results=True, data=True, group="generation",
           help="also score unanswerable questions (default: the released subset)"),
    Option("max_new_tokens", kind="int", low=1, default=50, results=True, group="generation",
           help="longest generated answer, in tokens"),
    Option("split", data=True, group="generation",
           help="local file of that split, or hub split (default: dev/validation)"),
)


def make_parser(description: str = __doc__.split("\n")[0]):
    return option_parser(OPTIONS, description)


def parse_args(argv=None, description: str = __doc__.split("\n")[0]):
    return parse_eval_args(OPTIONS, argv, description)


def select_questions(records: list[dict], all_questions: bool) -> tuple[list[dict], int]:
    """The questions to score (see the module docstring) and how many others have no example."""
    with_example = [r for r in records if r["prev_question"] is not None]
    skipped = sum(not r["is_impossible"] or all_questions for r in records if r["prev_question"] is None)
    if all_questions:
        return with_example, skipped
    return [r for r in with_example if not r["is_impossible"]], skipped


def run_generation(args, task: str, records: list[dict], score: Callable,
                   runtime=None) -> tuple[Evaluator, list[dict], int]:
    """Select the questions to score, then generate and score them (on a shared ``runtime``, if
    given): the evaluator, the sample records and the number of questions skipped for lack of a
    one-shot example."""
    records, skipped = select_questions(records, args.all_questions)
    records = records[:args.limit] if args.limit is not None else records
    if not records:
        raise EvalError(f"no {task} question to score (none has an earlier answered question in its article)")
    ev = Evaluator(args, task.lower(), OPTIONS, runtime=runtime)
    return ev, ev.run(build_items(ev, records), make_compute(ev, score)), skipped


def abstained(prediction: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ABSTENTION)


def squad_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """``(exact match, F1)`` of one prediction (SQuAD 2.0); "Not in background." counts as the empty answer."""
    pred = "" if abstained(prediction) else prediction
    return exact_match(pred, answers), f1(pred, answers)


def squad11_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """``(exact match, F1)`` of one prediction (SQuAD 1.1: no no-answer rule, the text as generated)."""
    return exact_match(prediction, answers), f1(prediction, answers)


def build_items(ev: Evaluator, records: list[dict]) -> list[dict]:
    items = []
    for rec in records:
        prompt = qa_one_shot_prompt(rec)
        items.append({"id": rec["id"], "prompt": prompt, "record": rec,
                      "image_prompts": derive_prompts(prompt, ev.args.k, "sentences", last_n_words=LAST_N_WORDS)
                      if ev.use_images else []})
    return items


def make_compute(ev: Evaluator, score: Callable[[str, list[str]], tuple[float, float]]):
    """Generate each batch's answers and score them with ``score(prediction, answers) -> (em, f1)``."""
    def compute(batch: list[dict]) -> list[dict]:
        got = ev.generate([it["prompt"] for it in batch], [it["image_prompts"] for it in batch],
                          max_new_tokens=ev.args.max_new_tokens, with_text=ev.use_images)
        out = []
        for n, (it, pred, im) in enumerate(zip(batch, got[0], got[1])):
            rec = it["record"]
            em, f = score(pred, rec["answers"])
            row = {"id": it["id"], "prompt": it["prompt"], "prediction": pred, "answers": rec["answers"],
                   "is_impossible": rec["is_impossible"], "exact_match": em, "f1": f,
                   "correct": em == 1.0, "images": im}
            if ev.use_images:  # what the LM alone answers (its own greedy decode of the same prompt)
                text = got[2][n]
                text_em, text_f1 = score(text, rec["answers"])
                row.update(text_only_generation=text, text_only_exact_match=text_em, text_only_f1=text_f1)
            out.append(row)
        return out
    return compute


def group_means(records: list[dict]) -> dict:
    """Mean exact match and F1 (percent) over all records, and per answerable/unanswerable group
    when both occur."""
    def means(rows):
        return {"exact_match": 100 * sum(r["exact_match"] for r in rows) / len(rows),
                "f1": 100 * sum(r["f1"] for r in rows) / len(rows), "n": len(rows)}
    metrics = means(records)
    groups = {"answerable": [r for r in records if not r["is_impossible"]],
              "unanswerable": [r for r in records if r["is_impossible"]]}
    if all(groups.values()):
        metrics.update({name: means(rows) for name, rows in groups.items()})
    return metrics


def answerable_split(metrics: dict) -> dict[str, float]:
    """Exact match on the answerable and on the unanswerable questions (when both were scored)."""
    return {k: metrics[k]["exact_match"] for k in ("answerable", "unanswerable") if isinstance(metrics.get(k), dict)}


# a generation task: no metrics from samples (the text-only answer needs its own decode); squad_v1.1 is its family
BENCHMARKS = (Benchmark(TASK, results=TASK, metric="exact_match", group="RC", folders=("squad_v2", "squad"),
                        subsets=answerable_split),)


def load_data(args) -> list[dict]:
    """The questions of the file or split (what the suite reads and checks before its first task runs)."""
    return load_squad(args.data_dir, path=args.data_file, split=args.split)


def evaluate(args, runtime=None, data=None) -> dict:
    """Run the benchmark with parsed ``args`` (on a shared ``runtime`` and ``load_data(args)``'s ``data``, if
    given: the suite's)."""
    require_causal_lm(args, "squad.py")
    records = data if data is not None else load_data(args)
    v11 = bool(records) and records[0]["squad_version"] == "1.1"
    ev, results, skipped = run_generation(args, "SQuAD_v1.1" if v11 else "SQuAD", records,
                                          squad11_scores if v11 else squad_scores, runtime)
    metrics = {**group_means(results), "skipped": skipped}
    return ev.finish(metrics, [("exact_match", f"{metrics['exact_match']:.2f}"), ("f1", f"{metrics['f1']:.2f}")])


def main(argv=None) -> dict:
    return evaluate(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
