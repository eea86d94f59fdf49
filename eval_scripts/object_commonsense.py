"""Object commonsense (the paper's Table 1): Memory Color, Color Terms, shape and relative size.

The sets are VaLM's files (Wang et al., 2022, "Visually-Augmented Language Modeling"), read by
``data.benchmarks.load_object_commonsense`` from the copy shipped under ``data/evaluation/object_commonsense``
(or ``--data_dir``, a folder of the same files, or ``--data_file``, one of them; the hub has no copy):
``memory_color`` (108 objects), ``color_terms`` (51), ``shape`` (140) and ``relative_size`` (486
pairs). The protocol follows VaLM's evaluation scripts (``verify_color_prediction.py`` and
``verify_size_reason.py``); our shape templates are an extension, since the release has no shape script.

Color and shape: closed-vocabulary candidate scoring
----------------------------------------------------
Every object is asked in each of VaLM's 9 color templates. ``{obj}`` is the object phrase: the
descriptor and the item ("a sunflower", "the ocean"), or the bare item ("grass") when there is no
descriptor, inserted as is::

    Q: What is the color of {obj}? A: It is
    What is the color of {obj}? It is
    What is the usual color of {obj}?
    What is the typical color of {obj}?
    The color of {obj} is
    The usual color of {obj} is
    The common color of {obj} is
    The typical color of {obj} is
    {obj} usually has the color of

VaLM released no shape script. The shape set uses the same 9 templates with "color" replaced by
"shape" ("The shape of {obj} is", ...). The candidates are the set's closed vocabulary, i.e. the distinct
answers of its file: 12 colors for Memory Color (both "gray" and "grey", as VaLM scored them), 9 for
Color Terms and 9 shapes. The prediction is the best-scoring candidate; ties go to the first listed
(the vocabulary is sorted alphabetically; for size, "yes" comes first).

Relative size: a yes/no comparison
----------------------------------
Every pair is asked in VaLM's size templates, and the model answers by the next-token choice
between "yes" and "no". The pairs come from ``size.csv``, which holds the 486 pairs of VaLM's
``sizePairsFull.txt`` ("aeroplane" there is spelled "airplane" here), with the descriptors split out
and a Label column. The label says that obj1 is larger than obj2 in every row.
``{a}`` and ``{b}`` are the two object phrases ("an airplane", "an apple")::

    Is {a} bigger than {b}?
    Is {a} larger than {b}?
    Is {a} taller than {b}?
    {a} is bigger than {b}, is it true?
    {a} is larger than {b}, is it true?
    {a} is taller than {b}, is it true?

The released script meant these six templates. Its last three strings lack separating commas, so
Python joined them into one prompt and the script actually ran four. We use the six intended ones.
VaLM asks only the direction whose answer is "yes", so a model that always says yes scores 100.
``--size_both_directions`` also asks each pair swapped (answer "no"). Each pair then yields two
questions per template, and the counts stay per pair.

Scoring (``--scoring``)
-----------------------
* ``first_token`` (the default, VaLM's): the mixed log-probability, at the position after the prompt,
  of the first token of ``" " + candidate``. It takes the better of the lower-case and capitalised
  spellings, because VaLM's CLIP tokenizer is case-blind (it lower-cased the whole query) and scored
  one single-token word per candidate. Prompts keep their case here.
* ``full``: the summed log-probability of all tokens of ``" " + candidate`` (as spelled in the
  file). It equals ``first_token`` without the capitalised variant whenever a candidate is a
  single token. With GPT-2's BPE, "polygon" and "rhombus" are not.

Metrics: accuracy per template, then the mean and std (ddof 1) over the templates, x100, per set.
``n`` counts the set's objects (or pairs). VaLM reported the accuracy pooled over templates and
objects, which equals our ``mean`` because every template sees the same examples.

Images: with ``--image_prompt object`` (the default), the k images come from the object phrase (for
size, "{a} and {b}"), so all templates share them. ``--image_prompt full`` uses the templated prompt instead.

A masked LM (BERT, RoBERTa, ...) answers at a mask token after each templated prompt, "{prompt} [MASK]."
(e.g. "Q: What is the color of a banana? A: It is [MASK]."), scored by fill-mask; images come from the
prompt without the mask (``eval_scripts.masked_scoring``, ``docs/masked_lm.md``).

    python eval_scripts/object_commonsense.py --model_name gpt2 --pretrained_model output/gpt2/ft_wiki_laion_220_2 \
        --generate_images True --k 10
"""
from __future__ import annotations

from pathlib import Path

from data.benchmarks import OBJECT_SET_FILES, OBJECT_SETS, load_object_commonsense, object_phrase, object_set_of_file
from data.prompts import derive_prompts
from eval_scripts.benchmark import Benchmark, records_by, template_means
from eval_scripts.cli import option_parser, parse_eval_args
from eval_scripts.core import EvalError, Evaluator, run_main
from eval_scripts.metrics import summarize_templates
from models.options import Option, eval_options

TASK = "object_commonsense"

COLOR_TEMPLATES = (
    "Q: What is the color of {obj}? A: It is",
    "What is the color of {obj}? It is",
    "What is the usual color of {obj}?",
    "What is the typical color of {obj}?",
    "The color of {obj} is",
    "The usual color of {obj} is",
    "The common color of {obj} is",
    "The typical color of {obj} is",
    "{obj} usually has the color of",
)
SHAPE_TEMPLATES = tuple(t.replace("color", "shape") for t in COLOR_TEMPLATES)
SIZE_TEMPLATES = (
    "Is {a} bigger than {b}?",
    "Is {a} larger than {b}?",
    "Is {a} taller than {b}?",
    "{a} is bigger than {b}, is it true?",
    "{a} is larger than {b}, is it true?",
    "{a} is taller than {b}, is it true?",
)
TEMPLATES = {"memory_color": COLOR_TEMPLATES, "color_terms": COLOR_TEMPLATES, "shape": SHAPE_TEMPLATES,
             "relative_size": SIZE_TEMPLATES}
SIZE_CANDIDATES = ["yes", "no"]


OPTIONS = (
    *eval_options(image_prompt_choices=("object", "full"), default_image_prompt="object"),
    Option("sets", kind="list", choices=OBJECT_SETS, results=True, group="object commonsense",
           help=f"comma-separated sets (default: all of {','.join(OBJECT_SETS)}; with --data_file, the set its "
                "released file name says)"),
    Option("scoring", kind="choice", choices=("first_token", "full"), default="first_token", results=True,
           group="object commonsense", help="first_token: the released first-token probability; full: "
                                            "whole-candidate log-likelihood"),
    Option("size_both_directions", kind="flag", default=False, results=True, group="object commonsense",
           help="also ask every size pair swapped (answer 'no')"),
)
DESCRIPTION = __doc__.split("\n")[0]


def make_parser():
    return option_parser(OPTIONS, DESCRIPTION)


def resolve(args):
    """The sets the run reads: ``--sets``, else the one ``--data_file``'s name says, else all."""
    sets = args.sets
    if args.data_file is not None:
        sets = sets or ([s] if (s := object_set_of_file(args.data_file)) else None)
        if sets is None or len(sets) != 1:
            raise EvalError(f"--data_file {args.data_file}: name its one set with --sets ({', '.join(OBJECT_SETS)})")
    return args.replace(sets=list(sets or OBJECT_SETS))


def parse_args(argv=None):
    return parse_eval_args(OPTIONS, argv, DESCRIPTION, resolve)


def _questions(set_name: str, ex: dict, both_directions: bool) -> list[tuple[str, dict, str, list[str]]]:
    """``(id suffix, template fields, answer, candidates)`` of the questions one example asks."""
    if set_name != "relative_size":
        return [("", {"obj": object_phrase(ex["descriptor"], ex["object"])}, ex["answer"], ex["candidates"])]
    a, b = object_phrase(ex["descriptor1"], ex["obj1"]), object_phrase(ex["descriptor2"], ex["obj2"])
    yes = ex["answer"] == "larger"
    out = [("", {"a": a, "b": b}, "yes" if yes else "no", SIZE_CANDIDATES)]
    if both_directions:
        out.append(("/swap", {"a": b, "b": a}, "no" if yes else "yes", SIZE_CANDIDATES))
    return out


def load_examples(args) -> dict[str, list[dict]]:
    """The examples of every requested set (read before any model is loaded, so bad files fail fast)."""
    if args.data_dir is not None:
        folders = (Path(args.data_dir), Path(args.data_dir) / "valm")
        missing = [OBJECT_SET_FILES[s] for s in args.sets
                   if not any((f / OBJECT_SET_FILES[s]).is_file() for f in folders)]
        if missing:
            raise FileNotFoundError(f"object commonsense: no {', '.join(missing)} in {args.data_dir} "
                                    f"(or its valm/ folder)")
    return {s: load_object_commonsense(s, args.data_dir, args.data_file)[:args.limit] for s in args.sets}


def build_items(ev: Evaluator, set_name: str, examples: list[dict]) -> list[dict]:
    """One item per example, question and template."""
    args = ev.args
    items = []
    for ex in examples:
        for suffix, fields, answer, candidates in _questions(set_name, ex, args.size_both_directions):
            subject = fields["obj"] if "obj" in fields else f"{fields['a']} and {fields['b']}"
            for t, template in enumerate(TEMPLATES[set_name]):
                prompt = template.format(**fields)
                image_prompts = []
                if ev.use_images:
                    image_prompts = derive_prompts(subject if args.image_prompt == "object" else prompt, args.k, "full")
                items.append({"id": f"{ex['id']}{suffix}/t{t}", "set": set_name, "template": t,
                              "prompt": ev.answer_prompt(prompt),
                              "answer": answer, "candidates": list(candidates), "image_prompts": image_prompts})
    return items


def make_compute(ev: Evaluator):
    return lambda batch: ev.candidate_records(batch, keep=("set", "template"))


def set_metrics(set_name: str, records: list[dict], n_examples: int) -> dict:
    """Accuracy per template (x100), their mean and std (ddof 1), and the number of examples."""
    accs = []
    for t in range(len(TEMPLATES[set_name])):
        rows = [r for r in records if r["template"] == t]
        accs.append(sum(r["correct"] for r in rows) / len(rows))
    return {"per_template": [round(100 * a, 4) for a in accs], **summarize_templates(accs), "n": n_examples}


def mean_over_sets(metrics: dict) -> float | None:
    sets = template_means(metrics)
    return sum(sets.values()) / len(sets) if sets else None


# the paper's Table 1 (no group): accuracy per set, compared with the published numbers per set
BENCHMARKS = (Benchmark(TASK, results=TASK, metric="acc", folders=("object_commonsense", "valm"), masked_lm=True,
                        headline_value=mean_over_sets, subsets=template_means, paper_table="object_commonsense",
                        from_samples=lambda config, records: {s: set_metrics(s, rows, None)
                                                              for s, rows in records_by(records, "set").items()}),)


load_data = load_examples  # what the suite reads and checks before its first task runs


def evaluate(args, runtime=None, data=None) -> dict:
    """Run the benchmark with parsed ``args`` (on a shared ``runtime`` and ``load_data(args)``'s ``data``, if
    given: the suite's)."""
    examples = data if data is not None else load_examples(args)
    ev = Evaluator(args, TASK, OPTIONS, runtime=runtime)
    compute = make_compute(ev)
    metrics = {}
    for set_name, exs in examples.items():
        records = ev.run(build_items(ev, set_name, exs), compute, desc=f"{TASK}/{set_name}")
        metrics[set_name] = set_metrics(set_name, records, len(exs))
    table = [(name, f"{m['mean']:.2f} ± {m['std']:.2f}  (n={m['n']})") for name, m in metrics.items()]
    return ev.finish(metrics, table)


def main(argv=None) -> dict:
    return evaluate(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
