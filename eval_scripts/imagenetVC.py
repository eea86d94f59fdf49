"""ImageNetVC (Xia et al., 2023): visual commonsense questions, 5 subsets x 5 prompt templates.

Protocol (docs/protocols.md, "ImageNetVC"):

* subsets color, shape, material, component, others (``others`` uses the candidate list of its
  answer's group: yes/no, number or other); ``--use-icl`` prepends the ``dev/`` demonstrations
  written in the same template;
* ``--scoring first_token`` (released): each candidate scores the mixed probability of its first
  token (with a leading space) at the next position, the better of its lower-case and capitalised
  spellings; ``--scoring full``: the summed log-likelihood of the whole candidate;
* accuracy per template, then mean and std (ddof 1) over the 5 templates, x100, per subset;
  ``overall`` averages the subsets per template (macro), then takes mean and std over templates.

Images: ``--image_prompt question`` (default) generates the k images from the question alone, so
all 5 templates share them; ``--image_prompt full`` reproduces the release (the templated prompt).

Data: the CSVs shipped under ``data/evaluation/imagenetvc`` by default; ``--data_dir`` (a folder of
``{subset}.csv`` with ``dev/``), ``--data_file`` (one subset's CSV) or ``--from_hub`` instead.

A masked LM (BERT, RoBERTa, ...) answers at a mask token after each templated prompt, "{prompt} [MASK].",
scored by fill-mask (``eval_scripts.masked_scoring``, ``docs/masked_lm.md``).

    python eval_scripts/imagenetVC.py --model_name meta-llama/Meta-Llama-3-8B --run_name llama3_imagenetvc \
        --pretrained_model output/llama3/ft_wiki_laion_220_2 --generate_images True --k 10
"""
from __future__ import annotations

from pathlib import Path

from data.benchmarks import (IMAGENETVC_DIR, IMAGENETVC_SUBSETS, IMAGENETVC_TEMPLATES, imagenetvc_prompt,
                             load_imagenetvc, load_imagenetvc_demos)
from data.prompts import derive_prompts
from eval_scripts.benchmark import Benchmark, records_by, template_means
from eval_scripts.cli import option_parser, parse_eval_args
from eval_scripts.core import EvalError, Evaluator, run_main
from eval_scripts.metrics import summarize_templates
from models.options import Option, eval_options

TASK = "imagenetvc"


OPTIONS = (
    *eval_options(image_prompt_choices=("question", "full"), default_image_prompt="question"),
    Option("subsets", kind="list", choices=IMAGENETVC_SUBSETS, results=True, group="ImageNetVC",
           help=f"comma-separated subsets (default: all of {','.join(IMAGENETVC_SUBSETS)}; with --data_file, the "
                "subset its name says, e.g. color.csv)"),
    Option("from_hub", kind="flag", default=False, data=True, group="ImageNetVC",
           help="read the CSVs from the hub (hemingkx/ImageNetVC) instead of the shipped copy"),
    Option("use_icl", kind="flag", default=False, spellings=("--use-icl",), results=True, group="ImageNetVC",
           help="prepend the dev/ in-context demonstrations"),
    Option("scoring", kind="choice", choices=("first_token", "full"), default="first_token", results=True,
           group="ImageNetVC", help="first_token: the released first-token probability; full: whole-candidate "
                                    "log-likelihood"),
)
DESCRIPTION = __doc__.split("\n")[0]


def make_parser():
    return option_parser(OPTIONS, DESCRIPTION)


def resolve(args):
    """The subsets and data folder the run reads: from ``--data_file``'s name, else all subsets of the
    shipped files (unless ``--data_dir`` or ``--from_hub``)."""
    if args.from_hub and (args.data_dir or args.data_file):
        raise EvalError("--from_hub reads the hub: leave out --data_dir and --data_file")
    subsets, data_dir = args.subsets, args.data_dir
    if args.data_file is not None:
        stem = Path(args.data_file).stem
        subsets = subsets or ([stem] if stem in IMAGENETVC_SUBSETS else None)
        if subsets is None or len(subsets) != 1:
            raise EvalError(f"--data_file {args.data_file}: name its one subset with --subsets "
                            f"({', '.join(IMAGENETVC_SUBSETS)})")
    elif data_dir is None and not args.from_hub:
        data_dir = str(IMAGENETVC_DIR)  # the files shipped with the project
    return args.replace(subsets=list(subsets or IMAGENETVC_SUBSETS), data_dir=data_dir)


def parse_args(argv=None):
    return parse_eval_args(OPTIONS, argv, DESCRIPTION, resolve)


def load_examples(args) -> dict[str, list[dict]]:
    """The questions of every requested subset, each with its in-context demonstrations (``demos``,
    empty without ``--use-icl``); read before any model loads, so bad files fail fast. With
    ``--data_file``, demonstrations come from ``dev/`` beside the file."""
    demo_dir = Path(args.data_file).parent if args.data_file else args.data_dir
    if args.data_dir is not None:
        missing = [f"{s}.csv" for s in args.subsets if not (Path(args.data_dir) / f"{s}.csv").is_file()]
        if missing:
            raise FileNotFoundError(f"ImageNetVC: no {', '.join(missing)} in {args.data_dir}")
    demos_by_group: dict[str, list[dict]] = {}
    out = {}
    for subset in args.subsets:
        examples = load_imagenetvc(subset, args.data_dir, args.limit, data_file=args.data_file)
        for ex in examples:
            if args.use_icl and ex["group"] not in demos_by_group:
                demos_by_group[ex["group"]] = load_imagenetvc_demos(ex["group"], demo_dir)
            ex["demos"] = demos_by_group.get(ex["group"], ())
        out[subset] = examples
    return out


def build_items(ev: Evaluator, subset: str, examples: list[dict]) -> list[dict]:
    args = ev.args
    items = []
    for ex in examples:
        demos = ex["demos"]
        for t in range(len(IMAGENETVC_TEMPLATES)):
            image_prompts = []
            if ev.use_images:
                source = ex["question"] if args.image_prompt == "question" else imagenetvc_prompt(ex["question"], t)
                image_prompts = derive_prompts(source, args.k, "full")
            items.append({"id": f"{ex['id']}/t{t}", "shard_key": ex["id"], "subset": subset, "template": t,
                          "prompt": ev.answer_prompt(imagenetvc_prompt(ex["question"], t, demos)),
                          "answer": ex["answer"],
                          "candidates": ex["candidates"], "image_prompts": image_prompts})
    return items


def make_compute(ev: Evaluator):
    return lambda batch: ev.candidate_records(batch, keep=("subset", "template"))


def metrics_from(records_by_subset: dict[str, list[dict]]) -> dict:
    n_t = len(IMAGENETVC_TEMPLATES)
    metrics: dict = {}
    per_template_by_subset = {}
    for subset, recs in records_by_subset.items():
        accs = []
        for t in range(n_t):
            rows = [r for r in recs if r["template"] == t]
            accs.append(sum(r["correct"] for r in rows) / len(rows))
        per_template_by_subset[subset] = accs
        metrics[subset] = {"per_template": [round(100 * a, 4) for a in accs], **summarize_templates(accs),
                           "n": len(recs) // n_t}
    overall = [sum(accs[t] for accs in per_template_by_subset.values()) / len(per_template_by_subset)
               for t in range(n_t)]
    metrics["overall"] = {"per_template": [round(100 * a, 4) for a in overall], **summarize_templates(overall)}
    return metrics


# the paper reports the mean over templates of the macro average over subsets
BENCHMARKS = (Benchmark(TASK, results=TASK, metric="acc", group="VC", folders=("imagenetvc",), masked_lm=True,
                        headline_value=lambda metrics: metrics.get("overall", {}).get("mean"),
                        subsets=template_means,
                        from_samples=lambda config, records: metrics_from(records_by(records, "subset"))),)


load_data = load_examples  # what the suite reads and checks before its first task runs


def evaluate(args, runtime=None, data=None) -> dict:
    """Run the benchmark with parsed ``args`` (on a shared ``runtime`` and ``load_data(args)``'s ``data``, if
    given: the suite's)."""
    examples = data if data is not None else load_examples(args)
    ev = Evaluator(args, TASK, OPTIONS, runtime=runtime)
    compute = make_compute(ev)
    by_subset = {s: ev.run(build_items(ev, s, exs), compute, desc=f"imagenetvc/{s}") for s, exs in examples.items()}
    metrics = metrics_from(by_subset)
    table = [(name, f"{m['mean']:.2f} ± {m['std']:.2f}") for name, m in metrics.items()]
    return ev.finish(metrics, table)


def main(argv=None) -> dict:
    return evaluate(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
