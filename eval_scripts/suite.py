"""Several benchmarks in one process, summarised as the paper reports them.

    python -m eval_scripts.suite --model_name gpt2 --pretrained_model output/gpt2/ft_wiki_laion_220_2 \\
        --tasks imagenetvc,object_commonsense,piqa,siqa,arc_easy,obqa,boolq,squad,quac --k 6 --generate_images \\
        --data_root /path/to/benchmarks

The language model, CLIP and the image pipeline load once (one :class:`eval_scripts.runtime.Runtime`
serves every task) and the image cache is shared. Each task runs its own script's code
(``evaluate(args, runtime)``) and writes its usual result files under one run directory
``<output_dir>/<run_name>``, which also receives ``suite.json`` and ``suite.md``: one row per task
with the metric the paper reports, the group averages VC, CR and RC, and, for the paper's models
(GPT-2, Gemma-2B, Llama-3-8B; ``--paper_model`` names one explicitly), the published numbers
beside ours with the difference (see :mod:`eval_scripts.tasks` for the metrics, and
:mod:`eval_scripts.paper`).

Flags: every eval script's flag applies to each task whose script has it (``--k`` to all,
``--scoring`` to ImageNetVC and object commonsense, ``--protocol`` to the commonsense sets, ...); a
flag no selected task has is an error. ``--task_args 'TASK=FLAGS'`` adds flags for one task
(e.g. ``--task_args 'imagenetvc=--image_prompt full'``). Data: each task reads the first
``ROOT/<folder>`` of the ``--data_root`` folders that exists (``imagenetvc``, ``object_commonsense``,
``piqa``, ``siqa``, ``arc``, ``obqa``, ``commonsenseqa``, ``hellaswag``, ``winogrande``, ``boolq``,
``squad_v2``, ``quac``), else the files shipped with the project (ImageNetVC, object commonsense),
else its script's default (the hub).

A killed suite resumes task by task: a task whose result file exists with the same settings is
not run again, and an unfinished one resumes where it stopped, as each script does.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
from pathlib import Path

from eval_scripts import paper
from eval_scripts.cli import EvalError, build_parser, parse_choices, run_main
from eval_scripts.records import write_atomic
from eval_scripts.results import COSMETIC
from eval_scripts.tasks import DEFAULT_SUITE, GROUPS, TASKS, family, headline, subset_values

MARK_MD = "<!-- written by python -m eval_scripts.suite -->"
PER_TASK_ONLY = ("--data_dir", "--data_file")


def _suite_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("suite")
    g.add_argument("--tasks", default=",".join(DEFAULT_SUITE), help=f"comma-separated, from {', '.join(TASKS)}")
    g.add_argument("--data_root", action="append", default=[], metavar="DIR",
                   help="a folder holding benchmark folders in their original format (repeatable)")
    g.add_argument("--task_args", action="append", default=[], metavar="TASK=FLAGS",
                   help="extra flags for one task, e.g. 'imagenetvc=--image_prompt full' (repeatable)")
    g.add_argument("--paper_model", default="auto",
                   help="which paper model's numbers to show: auto (from --model_name), none, "
                   + ", ".join(paper.models()))
    return p


def help_parser() -> argparse.ArgumentParser:
    """The suite's own flags and the flags every script shares (``--help``)."""
    p = _suite_flags(build_parser(__doc__.split("\n")[0]))
    p.formatter_class, p.description = argparse.RawDescriptionHelpFormatter, __doc__
    return p


def _flag(token: str) -> str:
    return token.split("=", 1)[0]


def data_flags(spec, roots: list[str]) -> list[str]:
    for root in roots:
        for folder in spec.folders:
            if (Path(root) / folder).is_dir():
                return ["--data_dir", str(Path(root) / folder)]
    return []  # the script's default: the shipped files (ImageNetVC, object commonsense) or the hub


def parse_args(argv=None) -> tuple[argparse.Namespace, dict[str, argparse.Namespace]]:
    """The suite's flags and each task's parsed (and checked) script flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        help_parser().print_help()
        raise SystemExit(0)
    own, rest = _suite_flags(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    tasks = parse_choices(own.tasks, tuple(TASKS), "task")
    if own.paper_model not in ("auto", "none", *paper.models()):
        raise EvalError(f"unknown --paper_model {own.paper_model!r}; choose auto, none or {', '.join(paper.models())}")
    for root in own.data_root:
        if not Path(root).is_dir():
            raise EvalError(f"--data_root {root} is not a directory")
    extra = {t: [] for t in tasks}
    for item in own.task_args:
        name, sep, flags = item.partition("=")
        if not sep or name.strip() not in extra:
            raise EvalError(f"--task_args {item!r}: expected TASK=FLAGS with TASK one of {', '.join(tasks)}")
        extra[name.strip()] += shlex.split(flags)
    for token in rest:
        if _flag(token) in PER_TASK_ONLY:
            raise EvalError(f"{_flag(token)} differs per task in a suite: use --data_root DIR, or "
                            f"--task_args 'TASK={_flag(token)} PATH'")
    run_name = ["--run_name", _dt.datetime.now().strftime("suite-%Y%m%d-%H%M%S")]
    parsed, unknown = {}, []
    for t in tasks:
        spec = TASKS[t]
        parser = spec.module.make_parser()
        parser.exit_on_error = False
        try:
            ns, extras = parser.parse_known_args([*spec.argv, *data_flags(spec, own.data_root), *run_name,
                                                  *rest, *extra[t]])
        except argparse.ArgumentError as e:
            raise EvalError(f"{t}: {e}") from None
        flags = {_flag(x) for x in extras if x.startswith("--")}
        own_unknown = flags & {_flag(x) for x in extra[t]}
        if own_unknown:
            raise EvalError(f"--task_args for {t}: its script has no flag {sorted(own_unknown)[0]}")
        unknown.append(flags)
        parsed[t] = spec.module.check_args(ns)
    nowhere = set.intersection(*unknown) if unknown else set()
    if nowhere:
        raise EvalError(f"no selected task has the flag {sorted(nowhere)[0]}")
    places = {(ns.output_dir, ns.run_name) for ns in parsed.values()}
    if len(places) > 1:
        raise EvalError("every task of a suite writes to one run directory: --output_dir and --run_name "
                        "cannot differ per task")
    return own, parsed


# ---------------------------------------------------------------------------------------------- running
def _plain(value):
    return json.loads(json.dumps(value, default=str))


def finished(out_dir: Path, name: str, args: argparse.Namespace) -> dict | None:
    """The result of a task already run in this directory with the same settings, else None."""
    path = out_dir / f"{name}.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        saved = result["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mine = _plain(vars(args))
    for key in set(mine) | set(saved):
        if key in COSMETIC or (key == "vision_encoder" and mine.get(key) is None):
            continue
        if mine.get(key) != saved.get(key):
            return None
    return result


def run_tasks(own, parsed: dict[str, argparse.Namespace]) -> dict:
    """Run every task on one runtime (built at the first task that needs running)."""
    from eval_scripts.cli import validate_args
    from eval_scripts.runtime import Runtime

    for ns in parsed.values():
        validate_args(ns)
    first = next(iter(parsed.values()))
    out_dir = Path(first.output_dir) / first.run_name
    use_images = any(ns.generate_images and ns.k > 0 for ns in parsed.values())
    runtime, results, state = None, {}, {"model_loads": 0, "reused": []}
    print(f"[suite] {', '.join(parsed)} -> {out_dir} (the same command with --run_name {first.run_name} resumes)",
          flush=True)
    for t, ns in parsed.items():
        spec = TASKS[t]
        name = spec.result_name(ns)
        done = finished(out_dir, name, ns)
        if done is not None:
            print(f"[suite] {t}: done earlier ({out_dir / name}.json)", flush=True)
            results[t] = done
            state["reused"].append(t)
            continue
        if runtime is None:
            runtime = Runtime(ns, use_images)
            state["model_loads"] += 1
        print(f"[suite] {t}", flush=True)
        results[t] = spec.module.evaluate(ns, runtime=runtime)
        if runtime.is_main:
            write_summary(own, parsed, results, state, out_dir, complete=False)
    if runtime is None or runtime.is_main:
        return write_summary(own, parsed, results, state, out_dir, complete=True)
    return {}


# ---------------------------------------------------------------------------------------------- summary
def summarize(own, parsed: dict[str, argparse.Namespace], results: dict, state: dict, out_dir: Path,
              complete: bool) -> dict:
    """What ``suite.json`` holds (see the module docstring)."""
    first = next(iter(parsed.values()))
    use_images = bool(first.generate_images) and first.k > 0
    setting = "late_fusion" if use_images else "text_only"
    model = paper.model_key(first.model_name, own.paper_model)
    rows, sets = [], []
    for t, result in results.items():
        if not result:
            continue
        metric, value = headline(result["task"], result["metrics"])
        rows.append({"task": t, "result": f"{result['task']}.json", "metric": metric, "value": value,
                     "n": result.get("counts", {}).get("examples"), "group": TASKS[t].group})
        if family(result["task"]) == "object_commonsense":
            for name, v in subset_values(result["task"], result["metrics"]).items():
                published = {s: paper.value("object_commonsense", model, s, name) for s in paper.SETTINGS}
                sets.append({"set": name, "value": v, "paper": published,
                             "diff": None if published[setting] is None else v - published[setting]})
    groups = {}
    for g in GROUPS:
        members = [r for r in rows if r["group"] == g and r["value"] is not None]
        if not members:
            continue
        v = sum(r["value"] for r in members) / len(members)
        published = {s: paper.value("groups", model, s, g) for s in paper.SETTINGS}
        groups[g] = {"value": v, "tasks": [r["task"] for r in members], "paper": published,
                     "diff": None if published[setting] is None else v - published[setting]}
    return {
        "run_dir": str(out_dir), "complete": complete, "tasks": list(parsed),
        "model_name": first.model_name, "pretrained_model": first.pretrained_model,
        "generate_images": use_images, "k": first.k if use_images else 0, "mix": first.mix if use_images else None,
        "setting": setting, "rows": rows, "groups": groups, "object_commonsense": sets,
        "paper": None if model is None else {"model": model, "name": paper.load()["models"][model]["name"],
                                             "source": paper.source()},
        "model_loads": state["model_loads"], "reused": state["reused"],
    }


def _num(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _diff(v) -> str:
    return "–" if v is None else f"{v:+.1f}"


def render_markdown(summary: dict) -> str:
    p = summary["paper"]
    images = (f"k = {summary['k']} generated images, --mix {summary['mix']}" if summary["generate_images"]
              else "text-only (no images)")
    lines = [MARK_MD, f"# Suite: {Path(summary['run_dir']).name}", "",
             f"Model `{summary['model_name']}`, checkpoint `{summary['pretrained_model'] or '-'}`; {images}."
             + ("" if summary["complete"] else " **Incomplete**: re-run the same command to resume."), "",
             "| task | metric | ours (%) | n | group |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {_num(r['value'])} | {r['n'] if r['n'] is not None else '–'} | "
              f"{r['group'] or '–'} |" for r in summary["rows"]]
    name = p["name"] if p else None
    ours = "ours with late fusion" if summary["setting"] == "late_fusion" else "ours text-only"
    if summary["groups"]:
        lines += ["", "## Groups (the paper's Table 4)", ""]
        if p:
            lines += [f"| group | tasks averaged | {ours} | paper {name} | paper {name} + late fusion | Δ vs paper |",
                      "|---|---|---|---|---|---|"]
        else:
            lines += [f"| group | tasks averaged | {ours} |", "|---|---|---|"]
        for g, v in summary["groups"].items():
            row = [f"{g} ({GROUPS[g]})", ", ".join(v["tasks"]), _num(v["value"])]
            if p:
                row += [_num(v["paper"]["text_only"]), _num(v["paper"]["late_fusion"]), _diff(v["diff"])]
            lines.append("| " + " | ".join(row) + " |")
    if summary["object_commonsense"]:
        lines += ["", "## Object commonsense (the paper's Table 1)", ""]
        has_paper = p and any(s["paper"]["late_fusion"] is not None for s in summary["object_commonsense"])
        if has_paper:
            lines += [f"| set | {ours} | paper {name} | paper {name} + late fusion | Δ vs paper |",
                      "|---|---|---|---|---|"]
        else:
            lines += [f"| set | {ours} |", "|---|---|"]
        for s in summary["object_commonsense"]:
            row = [s["set"], _num(s["value"])]
            if has_paper:
                row += [_num(s["paper"]["text_only"]), _num(s["paper"]["late_fusion"]), _diff(s["diff"])]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Metrics: ImageNetVC accuracy (mean over its 5 templates of the macro average over subsets); "
              "commonsense sets accuracy; BoolQ accuracy, SQuAD 2.0 exact match, QuAC F1. A group is the mean of "
              "the tasks listed beside it: compare with the paper only when the same tasks, full test sets and the "
              "released checkpoint were used. Δ compares ours with the paper's row of the same setting."]
    if p:
        src = p["source"]
        lines += ["", f"Published numbers: {src['paper']}: {src['groups']} (groups), {src['object_commonsense']} "
                  "(object commonsense, GPT-2 only); kept in data/paper_numbers.json."]
    return "\n".join(lines) + "\n"


def write_summary(own, parsed, results, state, out_dir: Path, complete: bool) -> dict:
    summary = summarize(own, parsed, results, state, out_dir, complete)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "suite.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(out_dir / "suite.md", render_markdown(summary))
    if complete:
        print(f"suite: {out_dir / 'suite.md'}")
    return summary


def main(argv=None) -> dict:
    own, parsed = parse_args(argv)
    return run_tasks(own, parsed)


if __name__ == "__main__":
    run_main(main)
