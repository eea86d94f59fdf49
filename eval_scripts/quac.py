"""QuAC: one-shot dialog QA by fused greedy generation, scored by the official QuAC F1.

The same protocol as ``squad.py`` (prompt, question subset, ``--all_questions``, fused generation
cut at the first newline, image prompts from the whole prompt); the prompt adds the section
title as "Paragraph" and shows the page background. A question is unanswerable when its original
answer is CANNOTANSWER; the default subset skips those, as vLMIG did.

Scores (percent), as the official scorer computes them (``eval_scripts.metrics``): ``f1`` and
``heq`` over the questions whose human F1 reaches 0.4 (``count`` of them), taking every reference
answer (CANNOTANSWER when at least half of them say it, the leave-one-out maximum with several);
``exact_match`` is the SQuAD-normalised exact match against any of those references, over all
``n`` scored questions. The prompt's abstention answer "Not in background." is scored as
CANNOTANSWER.

Results: ``<output_dir>/<run_name>/quac.json``; each sample line holds ``id, prompt, prediction,
answers, is_impossible, exact_match, f1, correct`` (exact match) and ``images``; with images also the
LM's own answer and its scores (``text_only_generation``, ``text_only_exact_match``, ``text_only_f1``).

    python eval_scripts/quac.py --model_name meta-llama/Meta-Llama-3-8B \\
        --pretrained_model output/llama3/ft_wiki_laion_220_2 --generate_images True --k 10
"""
from __future__ import annotations

from data.benchmarks import QUAC_CANNOTANSWER, load_quac
from eval_scripts.benchmark import Benchmark
from eval_scripts.core import require_causal_lm, run_main
from eval_scripts.metrics import exact_match, quac_f1, quac_references, quac_scores
from eval_scripts.squad import OPTIONS, abstained, parse_args, run_generation  # noqa: F401 (OPTIONS: quac's are squad's)
from eval_scripts.squad import make_parser as _squad_parser

TASK = "quac"


def quac_answer(prediction: str) -> str:
    """The prediction as scored: the abstention answer becomes CANNOTANSWER."""
    return QUAC_CANNOTANSWER if abstained(prediction) else prediction


def quac_example_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """``(exact match, official F1)`` of one prediction against its references."""
    pred = quac_answer(prediction)
    return exact_match(pred, quac_references(answers)), quac_f1(pred, answers)


def make_parser():
    return _squad_parser(__doc__.split("\n")[0])


# a generation task: no metrics from samples (the text-only answer needs its own decode)
BENCHMARKS = (Benchmark(TASK, results=TASK, metric="f1", group="RC", folders=("quac",)),)


def load_data(args) -> list[dict]:
    """The questions of the file or split (what the suite reads and checks before its first task runs)."""
    return load_quac(args.data_dir, path=args.data_file, split=args.split)


def evaluate(args, runtime=None, data=None) -> dict:
    """Run the benchmark with parsed ``args`` (on a shared ``runtime`` and ``load_data(args)``'s ``data``, if
    given: the suite's)."""
    require_causal_lm(args, "quac.py")
    ev, results, skipped = run_generation(args, "QuAC", data if data is not None else load_data(args),
                                          quac_example_scores, runtime)
    official = quac_scores([quac_answer(r["prediction"]) for r in results], [r["answers"] for r in results])
    metrics = {**official, "exact_match": 100 * sum(r["exact_match"] for r in results) / len(results),
               "n": len(results), "skipped": skipped}
    return ev.finish(metrics, [("f1", f"{metrics['f1']:.2f}"), ("heq", f"{metrics['heq']:.2f}"),
                               ("exact_match", f"{metrics['exact_match']:.2f}")])


def main(argv=None) -> dict:
    return evaluate(parse_args(argv, __doc__.split("\n")[0]))


if __name__ == "__main__":
    run_main(main)
