"""Several benchmarks in one process, summarised as the paper reports them.

    python -m eval_scripts.suite --model_name gpt2 --pretrained_model output/gpt2/ft_wiki_laion_220_2 \\
        --tasks imagenetvc,object_commonsense,piqa,siqa,arc_easy,obqa,boolq,squad,quac --k 6 --generate_images \\
        --data_root /path/to/benchmarks

The language model, CLIP and the image pipeline load once (one :class:`eval_scripts.runtime.Runtime`
serves every task) and the image cache is shared. Before the first task runs, every task's data is read and
checked (``load_data`` of its script) and every task's model kind (a masked LM runs only ImageNetVC and object
commonsense): a missing file or a wrong kind is one line, exit status 2, with nothing written. Each task runs
its own script's code (``evaluate(args, runtime, data)``) and writes its usual result files under one run
directory ``<output_dir>/<run_name>``, which also receives ``suite.json`` and ``suite.md``: one row per task
with the metric the paper reports, text-only, fused and the gain (fused minus text-only, from the image run's
own text-only predictions: no second run), each with its 95% interval (the gain's paired,
:mod:`eval_scripts.outcomes`), and what the row was measured on (split, limit, k, mix, image source and the
result's counts); the group averages VC, CR and RC and the object-commonsense sets the same way; and the
paper's published numbers with our difference, only where the row was measured as the paper measured it (the
paper's model by the checkpoint's recorded base model, the full official split, no ``--limit``, its k and
mixing: :func:`eval_scripts.paper.reasons`); elsewhere the cell says why (``limit=5``, ``split=dev``,
``partial group: 2 of 4 CR tasks``, ``model: not a paper model``, ``k=3 (paper: 6)``). ``--paper_model``
picks the row of published numbers shown (``auto``: the recorded model, else the one ``--model_name``
looks like). The tasks are the benchmarks the
eval scripts declare (their ``BENCHMARKS``).

Flags: every eval script's flag applies to each task whose script has it (``--k`` to all,
``--scoring`` to ImageNetVC and object commonsense, ``--protocol`` to the commonsense sets, ...); a
flag no selected task has is an error. ``--task_args 'TASK=FLAGS'`` adds flags for one task
(e.g. ``--task_args 'imagenetvc=--image_prompt full'``). Data: each task reads the first
``ROOT/<folder>`` of the ``--data_root`` folders that exists, of the folders its declaration names
(e.g. ``imagenetvc``, ``piqa``, ``arc``, ``commonsenseqa``, ``hellaswag``, ``boolq``, ``squad_v2``,
``quac``), else the files shipped with the project (ImageNetVC, object commonsense), else its
script's default (the hub).

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

from eval_scripts import paper, registry
from eval_scripts.benchmark import GROUPS
from eval_scripts.cli import EvalError, one_line, resolve_args, run_main, validate_args
from eval_scripts.records import read_jsonl_rows, write_atomic
from eval_scripts.results import COSMETIC
from models.options import Option, eval_options

TASKS = registry.benchmarks()  # {name: Benchmark}, as the eval scripts declare them
# the paper's suite (its Table 4 tasks and Table 1), in the order its summary lists them: a choice, not a registration
DEFAULT_SUITE = ("imagenetvc", "object_commonsense", "piqa", "siqa", "arc_easy", "obqa", "boolq", "squad", "quac")

MARK_MD = "<!-- written by python -m eval_scripts.suite -->"
PER_TASK_ONLY = ("--data_dir", "--data_file")


SUITE_OPTIONS = (
    Option("tasks", kind="list", choices=tuple(TASKS), default=list(DEFAULT_SUITE), results=True, group="suite",
           help="comma-separated tasks"),
    Option("data_root", kind="list", repeat=True, default=[], metavar="DIR", path=True, group="suite",
           help="a folder holding benchmark folders in their original format (repeatable)"),
    Option("task_args", kind="list", repeat=True, default=[], metavar="TASK=FLAGS", group="suite",
           help="extra flags for one task, e.g. 'imagenetvc=--image_prompt full' (repeatable)"),
    Option("paper_model", kind="choice", choices=("auto", "none", *paper.models()), default="auto", group="suite",
           help="which paper model's numbers to show: auto (from --model_name), none, or one of the paper's "
                "(compared only when the checkpoint's recorded base model is that model)"),
)


def task_options(spec) -> tuple:
    """The option declarations of a task's script."""
    return spec.module.OPTIONS


def all_task_options(tasks) -> dict[str, Option]:
    """Every option some selected task declares, by name (one declaration each: the shared ones are the
    same objects in every script)."""
    out = {}
    for t in tasks:
        for opt in task_options(TASKS[t]):
            out.setdefault(opt.name, opt)
    return out


def help_parser() -> argparse.ArgumentParser:
    """The suite's own flags and the flags every script shares (``--help``)."""
    from models.options import build_parser

    p = build_parser([*SUITE_OPTIONS, *eval_options()], __doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


def _flag(token: str) -> str:
    return token.split("=", 1)[0]


def data_flags(spec, roots: list[str]) -> list[str]:
    for root in roots:
        for folder in spec.folders:
            if (Path(root) / folder).is_dir():
                return ["--data_dir", str(Path(root) / folder)]
    return []  # the script's default: the shipped files (ImageNetVC, object commonsense) or the hub


def _split_config(path: str | None, tasks_given: list[str] | None) -> tuple[dict, dict]:
    """A suite config file's values: the suite's own, and the task settings (each key checked by the
    declaration of the selected tasks that have it; a key no selected task has is an error)."""
    if path is None:
        return {}, {}
    from models.options import checked_values
    from models.options.parsing import load_yaml_mapping

    where = f"--config {path}"
    suite_names = {n for o in SUITE_OPTIONS for n in o.names()}
    raw = load_yaml_mapping(path)
    own = checked_values({k: v for k, v in raw.items() if k in suite_names}, SUITE_OPTIONS, where)
    tasks = tasks_given or own.get("tasks") or list(DEFAULT_SUITE)
    rest = {k: v for k, v in raw.items() if k not in suite_names}
    return own, checked_values(rest, tuple(all_task_options(tasks).values()), where)


def parse_args(argv=None) -> tuple[argparse.Namespace, dict[str, argparse.Namespace]]:
    """The suite's flags and each task's parsed, resolved and checked settings (nothing runs before all of
    them are known to be good)."""
    from models.options import OptionError, parse

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        help_parser().print_help()
        raise SystemExit(0)
    try:
        own, rest = parse(SUITE_OPTIONS, argv, known=True, raise_errors=True, config=False)
        config_path = _config_arg(rest)
        own_file, task_file = _split_config(config_path, own.tasks if "--tasks" in map(_flag, argv) else None)
        if own_file:  # the command line wins over the file
            given = {o.name for o in SUITE_OPTIONS if any(_flag(t) in o.flags for t in argv)}
            own = own.replace(**{k: v for k, v in own_file.items() if k not in given})
    except OptionError as err:
        raise EvalError(str(err)) from None
    rest = _without_config(rest)
    tasks = own.tasks
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
        options = task_options(spec)
        mine = {o.name for o in options}
        defaults = {k: v for k, v in task_file.items() if k in mine}
        try:
            ns, extras = parse(options, [*spec.argv, *data_flags(spec, own.data_root), *run_name, *rest, *extra[t]],
                               known=True, raise_errors=True, defaults=defaults, config=False)
        except OptionError as e:
            raise EvalError(f"{t}: {e}") from None
        flags = {_flag(x) for x in extras if x.startswith("--")}
        own_unknown = flags & {_flag(x) for x in extra[t]}
        if own_unknown:
            raise EvalError(f"--task_args for {t}: its script has no flag {sorted(own_unknown)[0]}")
        unknown.append(flags)
        ns = resolve_args(ns)
        resolve = getattr(spec.module, "resolve", None)
        parsed[t] = resolve(ns) if resolve is not None else ns
        validate_args(parsed[t])
    nowhere = set.intersection(*unknown) if unknown else set()
    if nowhere:
        raise EvalError(f"no selected task has the flag {sorted(nowhere)[0]}")
    places = {(ns.output_dir, ns.run_name) for ns in parsed.values()}
    if len(places) > 1:
        raise EvalError("every task of a suite writes to one run directory: --output_dir and --run_name "
                        "cannot differ per task")
    return own, parsed


def _config_arg(tokens: list[str]) -> str | None:
    for i, tok in enumerate(tokens):
        if tok == "--config" and i + 1 < len(tokens):
            return tokens[i + 1]
        if tok.startswith("--config="):
            return tok.split("=", 1)[1]
    return None


def _without_config(tokens: list[str]) -> list[str]:
    out, skip = [], False
    for i, tok in enumerate(tokens):
        if skip:
            skip = False
            continue
        if tok == "--config":
            skip = True
            continue
        if tok.startswith("--config="):
            continue
        out.append(tok)
    return out


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
    mine = _plain({k: v for k, v in vars(args).items() if k != "config"})
    for key in set(mine) | set(saved):
        if key in COSMETIC:
            continue
        if mine.get(key) != saved.get(key):
            return None
    return result


def preflight(parsed: dict[str, argparse.Namespace]) -> dict[str, object]:
    """Every task's data, read and checked, and the model kind every task needs, before the first task runs
    (so a missing file or a masked LM given to a causal-only task is one line with nothing written). Returns
    the data of each task, which its run then scores."""
    from eval_scripts.core import require_causal_lm

    for t, ns in parsed.items():
        spec = TASKS[t]
        if not spec.masked_lm:
            require_causal_lm(ns, f"{t} ({spec.script.split('.')[-1]}.py)")
    data = {}
    for t, ns in parsed.items():
        load = getattr(TASKS[t].module, "load_data", None)
        if load is None:
            continue
        try:
            data[t] = load(ns)
        except (OSError, ValueError) as e:
            raise EvalError(f"{t}: {one_line(e)}") from None
    return data


def run_tasks(own, parsed: dict[str, argparse.Namespace]) -> dict:
    """Check every task's data and model kind, then run every task on one runtime (built at the first task
    that needs running)."""
    from eval_scripts.runtime import Runtime

    for ns in parsed.values():
        validate_args(ns)
    data = preflight(parsed)
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
        if t in data:
            results[t] = spec.module.evaluate(ns, runtime=runtime, data=data.pop(t))
        else:
            results[t] = spec.module.evaluate(ns, runtime=runtime)
        if runtime.is_main:
            write_summary(own, parsed, results, state, out_dir, complete=False)
    if runtime is None or runtime.is_main:
        return write_summary(own, parsed, results, state, out_dir, complete=True)
    return {}


# ---------------------------------------------------------------------------------------------- summary
def _value(outcomes: list[float] | None) -> dict | None:
    """A value (percent) and its 95% interval, from per-item outcomes."""
    from eval_scripts.intervals import interval_of  # numpy and scipy: not for --help

    if not outcomes:
        return None
    return {"value": 100 * sum(outcomes) / len(outcomes), **interval_of(outcomes)}


def _sides(pair, use_images: bool) -> dict:
    """``text_only``, ``fused`` (values with intervals) and ``gain`` (paired interval) of a row's outcomes;
    a text-only run has only ``text_only``; an image run without text-only predictions has no gain."""
    from eval_scripts.intervals import gain_of

    fused, text = pair if pair is not None else (None, None)
    if not use_images:
        return {"text_only": _value(fused), "fused": None, "gain": None}
    return {"text_only": _value(text), "fused": _value(fused),
            "gain": gain_of(fused, text) if fused and text else None}


def _paper_cells(published: dict, why: dict, sides: dict) -> tuple[dict, dict]:
    """The published number and our difference per setting, each only where the row is comparable."""
    shown, diff = {}, {}
    for setting, ours in (("text_only", sides["text_only"]), ("late_fusion", sides["fused"])):
        ok = not why[setting] and published.get(setting) is not None and ours is not None
        shown[setting] = published.get(setting) if ok else None
        diff[setting] = ours["value"] - published[setting] if ok else None
    return shown, diff


def summarize(own, parsed: dict[str, argparse.Namespace], results: dict, state: dict, out_dir: Path,
              complete: bool) -> dict:
    """What ``suite.json`` holds (see the module docstring)."""
    from eval_scripts.outcomes import headline_outcomes, item_outcomes, weighted

    first = next(iter(parsed.values()))
    use_images = bool(first.generate_images) and first.k > 0
    setting = "late_fusion" if use_images else "text_only"
    base_model = paper.recorded_base_model(first.model_name, first.pretrained_model)
    model = paper.recorded_model(first.model_name, first.pretrained_model)  # the paper model the run is
    # the paper row shown: --paper_model, else the recorded model, else the one --model_name looks like
    shown_model = (model or paper.model_key(first.model_name)) if own.paper_model == "auto" else \
        paper.model_key(first.model_name, own.paper_model)
    rows, sets, outcomes_of = [], [], {}
    for t, result in results.items():
        if not result:
            continue
        spec, ns = TASKS[t], parsed[t]
        name = spec.result_name(ns)  # never a name read from a file: the samples read are this run's own
        metric, value = spec.headline(result["metrics"])
        records = read_jsonl_rows(out_dir / f"{name}_samples.jsonl")
        pair = headline_outcomes(name, records) if records else None
        outcomes_of[t] = pair
        proto = paper.task_protocol(ns, t)
        counts = result.get("counts", {})
        rows.append({"task": t, "result": f"{name}.json", "metric": metric, "value": value,
                     "n": counts.get("examples"), "group": spec.group, **_sides(pair, use_images),
                     "protocol": {k: proto[k] for k in ("split", "limit", "k", "mix", "image_source",
                                                        "image_generator", "data_file", "settings")},
                     "counts": counts, "_proto": proto})
        if spec.paper_table is not None:
            per_set = item_outcomes(name, records) if records else {}
            for name, v in spec.subset_values(result["metrics"]).items():
                published = {s: paper.value(spec.paper_table, shown_model, s, name) for s in paper.SETTINGS}
                sides = _sides(per_set.get((name,)), use_images)
                why = {s: paper.reasons(proto, s, model, shown_model) for s in paper.SETTINGS}
                shown, diff = _paper_cells(published, why, sides)
                sets.append({"set": name, "value": v, **sides, "paper": shown, "diff": diff, "not_comparable": why})
    groups = {}
    for g in GROUPS:
        members = [r for r in rows if r["group"] == g and r["value"] is not None]
        if not members:
            continue
        v = sum(r["value"] for r in members) / len(members)
        pairs = [outcomes_of.get(r["task"]) for r in members]
        pair = None
        if all(p is not None for p in pairs):
            texts = [p[1] for p in pairs]
            pair = (weighted([p[0] for p in pairs]), None if any(x is None for x in texts) else weighted(texts))
        sides = _sides(pair, use_images)
        published = {s: paper.value("groups", shown_model, s, g) for s in paper.SETTINGS}
        why = {s: paper.group_reasons(g, [r["_proto"] for r in members], s, model, shown_model)
               for s in paper.SETTINGS}
        shown, diff = _paper_cells(published, why, sides)
        groups[g] = {"value": v, "tasks": [r["task"] for r in members], **sides, "paper": shown, "diff": diff,
                     "not_comparable": why}
    for r in rows:
        del r["_proto"]
    return {
        "run_dir": str(out_dir), "complete": complete, "tasks": list(parsed),
        "model_name": first.model_name, "pretrained_model": first.pretrained_model,
        "base_model": base_model, "recorded_paper_model": model,
        "generate_images": use_images, "k": first.k if use_images else 0, "mix": first.mix if use_images else None,
        "image_source": first.image_source if use_images else None,
        "setting": setting, "rows": rows, "groups": groups, "object_commonsense": sets,
        "paper": None if shown_model is None else {"model": shown_model, "name": paper.model_name_of(shown_model),
                                                   "source": paper.source(), "protocol": paper.protocol()},
        "model_loads": state["model_loads"], "reused": state["reused"],
    }


def _ci(side: dict | None) -> str:
    """``45.2 [40.1, 50.3]``: a value with its 95% interval."""
    return "–" if side is None else f"{side['value']:.1f} [{side['low']:.1f}, {side['high']:.1f}]"


def _gain(g: dict | None) -> str:
    return "–" if g is None else f"{g['value']:+.1f} [{g['low']:+.1f}, {g['high']:+.1f}]"


def _paper_cell(entry: dict, setting: str) -> str:
    """The paper's number and our Δ where the row is comparable, else why not (``–``: no such number)."""
    if entry["paper"][setting] is not None:
        return f"{entry['paper'][setting]:.1f} (Δ {entry['diff'][setting]:+.1f})"
    why = entry["not_comparable"][setting]
    return "not comparable: " + "; ".join(why) if why else "–"


def _items(r: dict) -> str:
    side = r["fused"] or r["text_only"]
    return str(side["n"]) if side else "–" if r["n"] is None else str(r["n"])


def _protocol_cells(r: dict) -> list[str]:
    p = r["protocol"]
    images = "–" if not p["k"] else f"{p['image_source']} ({p['image_generator']})" \
        if p["image_source"] == "generate" else str(p["image_source"])
    return [str(p["split"]), "–" if p["limit"] is None else str(p["limit"]), str(p["k"]), p["mix"] or "–", images]


def render_markdown(summary: dict) -> str:
    p = summary["paper"]
    images = (f"k = {summary['k']} images ({summary['image_source']}), --mix {summary['mix']}"
              if summary["generate_images"] else "text-only (no images)")
    base = summary["base_model"] or "none recorded"
    lines = [MARK_MD, f"# Suite: {Path(summary['run_dir']).name}", "",
             f"Model `{summary['model_name']}`, checkpoint `{summary['pretrained_model'] or '-'}` (recorded base "
             f"model: `{base}`); {images}."
             + ("" if summary["complete"] else " **Incomplete**: re-run the same command to resume."), "",
             "Values are percentages with their 95% interval in brackets; the gain is fused minus text-only "
             "over the same items, with its paired-bootstrap interval (docs/protocols.md).", "",
             "| task | metric | text-only | fused | gain | n | split | limit | k | mix | images | group |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append("| " + " | ".join([r["task"], r["metric"], _ci(r["text_only"]), _ci(r["fused"]), _gain(r["gain"]),
                                        _items(r), *_protocol_cells(r),
                                        r["group"] or "–"]) + " |")
    name = p["name"] if p else None
    if summary["groups"]:
        lines += ["", "## Groups (the paper's Table 4)", ""]
        head = ["group", "tasks averaged", "text-only", "fused", "gain"]
        if p:
            head += [f"paper {name} (text-only)", f"paper {name} + late fusion"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g, v in summary["groups"].items():
            row = [f"{g} ({GROUPS[g]})", ", ".join(v["tasks"]), _ci(v["text_only"]), _ci(v["fused"]), _gain(v["gain"])]
            if p:
                row += [_paper_cell(v, "text_only"), _paper_cell(v, "late_fusion")]
            lines.append("| " + " | ".join(row) + " |")
    if summary["object_commonsense"]:
        lines += ["", "## Object commonsense (the paper's Table 1)", ""]
        has_paper = p is not None and p["model"] in paper.load()["object_commonsense"]["rows"]
        head = ["set", "text-only", "fused", "gain"]
        if has_paper:
            head += [f"paper {name} (text-only)", f"paper {name} + late fusion"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in summary["object_commonsense"]:
            row = [s["set"], _ci(s["text_only"]), _ci(s["fused"]), _gain(s["gain"])]
            if has_paper:
                row += [_paper_cell(s, "text_only"), _paper_cell(s, "late_fusion")]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Metrics: ImageNetVC accuracy (mean over its 5 templates of the macro average over subsets); "
              "commonsense sets accuracy; BoolQ accuracy, SQuAD 2.0 exact match, QuAC F1. A group is the mean of "
              "the tasks listed beside it. Text-only is the LM alone, from the image run's own pass (SQuAD and "
              "QuAC: its own greedy decode in the same run). n counts the items the intervals resample "
              "(ImageNetVC and object commonsense: questions, each averaged over its templates). The paper's number and Δ are shown only where "
              "the row was measured as the paper measured it (its model by the recorded base model, the full "
              "official split, no --limit, its k and mixing); otherwise the cell says why."]
    if p:
        src, proto = p["source"], p["protocol"]
        lines += ["", f"Published numbers: {src['paper']}: {src['groups']} (groups), {src['object_commonsense']} "
                  f"(object commonsense, GPT-2 only); the paper's protocol: k = {proto['k']}, --mix {proto['mix']}, "
                  f"{proto['image_source']}d images; kept in data/paper_numbers.json."]
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
