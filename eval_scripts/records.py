"""Run records: where a task's results go, resuming a killed run, sharding over processes, and the
result files.

* ``<output_dir>/<run_name>/<task>.json``: metrics, config, counts, timing, versions, git commit, date;
* ``<output_dir>/<run_name>/<task>_samples.jsonl``: one line per example (and template);
* ``<task>.run.json``: the settings a re-run must share to resume; ``<task>_samples.part<rank>.jsonl``:
  what each process has scored so far (merged into the samples file at the end).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from eval_scripts.cli import EvalError


def read_jsonl_rows(path: Path) -> list[dict]:
    """The rows of a samples file; a line cut short by a killed run is skipped (and recomputed)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunRecords:
    """One task's files under ``<output_dir>/<run_name>`` (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, task: str, state, resume_keys: tuple[str, ...]):
        self.args, self.task, self.state = args, task, state
        self.resume_keys = resume_keys
        self.out_dir = Path(args.output_dir) / args.run_name
        self.is_main = state.is_main_process
        self.n_examples = 0

    # ------------------------------------------------------------------ files
    def samples_path(self) -> Path:
        return self.out_dir / f"{self.task}_samples.jsonl"

    def part_path(self, rank: int) -> Path:
        return self.out_dir / f"{self.task}_samples.part{rank}.jsonl"

    def done(self) -> dict[str, dict]:
        done = {}
        for path in [self.samples_path(), *sorted(self.out_dir.glob(f"{self.task}_samples.part*.jsonl"))]:
            for row in read_jsonl_rows(path):
                done[row["id"]] = row
        return done

    def check_resume(self, write: bool = False):
        """Check this run's settings against those of the run being resumed; with ``write``, record
        them if this is a new run (only once results are about to be written)."""
        run_file = self.out_dir / f"{self.task}.run.json"
        mine = json.loads(json.dumps({k: getattr(self.args, k, None) for k in self.resume_keys}))
        old = json.loads(run_file.read_text()) if run_file.is_file() else None
        self.state.wait_for_everyone()  # every rank has read the old file before the main one writes
        if write and old is None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(run_file, json.dumps(mine, indent=2))
        diff = [k for k in self.resume_keys if old is not None and old.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise EvalError(f"run {self.args.run_name!r} was started with --{k} {old.get(k)!r}, not "
                            f"{mine[k]!r}; use another --run_name")

    def shard(self, items: list[dict]) -> list[dict]:
        """This process's share: whole groups of items that share images (``shard_key``, e.g. the 5
        templates of one question) go to one process, so no image is generated twice."""
        n, rank = self.state.num_processes, self.state.process_index
        if n == 1:
            return items
        groups = list(OrderedDict.fromkeys(it.get("shard_key", it["id"]) for it in items))
        mine = set(groups[rank::n])
        return [it for it in items if it.get("shard_key", it["id"]) in mine]

    # ------------------------------------------------------------------ running
    def run(self, items: list[dict], compute: Callable[[list[dict]], list[dict]], desc: str = "",
            postfix: Callable[[], dict] | None = None) -> list[dict]:
        """Score ``items`` in batches of ``--batch_size`` (skipping those already in the samples files),
        sharded across processes; returns the records of all items in their order."""
        from tqdm.auto import tqdm

        self.check_resume(write=True)
        self.state.wait_for_everyone()
        done = self.done()
        fresh = [it for it in items if it["id"] not in done]
        todo = self.shard(fresh)
        bs = self.args.batch_size
        correct = total = 0
        part = self.part_path(self.state.process_index)
        if part.is_file() and part.stat().st_size:  # a line cut short by a kill: end it first
            with open(part, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        t0 = time.perf_counter()
        # progress bars only on a terminal (disable=None); a log file gets one summary line instead
        with open(part, "a", encoding="utf-8") as f, \
                tqdm(total=len(todo), desc=desc or self.task, unit="ex", disable=None if self.is_main else True) as bar:
            for start in range(0, len(todo), bs):
                recs = compute(todo[start:start + bs])
                for r in recs:
                    f.write(json.dumps(r) + "\n")
                    correct += bool(r.get("correct"))
                    total += 1
                f.flush()
                bar.update(len(recs))
                bar.set_postfix({"acc": f"{correct / max(total, 1):.3f}", **(postfix() if postfix else {})})
            if bar.disable and self.is_main:
                print(f"{desc or self.task}: {total} scored in {time.perf_counter() - t0:.1f} s"
                      + (f", accuracy {correct / total:.4f}" if total else "")
                      + (f" ({len(items) - len(fresh)} done before)" if len(fresh) < len(items) else ""), flush=True)
        self.state.wait_for_everyone()
        done = self.done()
        missing = [it["id"] for it in items if it["id"] not in done]
        if missing:
            raise RuntimeError(f"{len(missing)} examples have no result (e.g. {missing[0]})")
        self.n_examples += len(items)
        return [done[it["id"]] for it in items]

    def finish(self, metrics: dict, stats: dict, t0: float, table: list[tuple[str, str]] | None = None,
               show_images: bool = False) -> dict | None:
        """Merge the samples, write ``<task>.json`` (main process) and print a short table.

        ``stats``: this process's ``{"images": {counter: n}, "seconds": {...}, "passes": {...}}`` (image
        counters: :data:`eval_scripts.runtime.IMAGE_COUNTERS`).
        """
        stats_path = self.out_dir / f"{self.task}.stats{self.state.process_index}.json"
        stats_path.write_text(json.dumps(stats))
        self.state.wait_for_everyone()
        if not self.is_main:
            return None
        all_stats = [json.loads(p.read_text()) for p in sorted(self.out_dir.glob(f"{self.task}.stats*.json"))]
        seconds = {k: round(sum(s["seconds"][k] for s in all_stats), 3) for k in all_stats[0]["seconds"]}
        seconds["total"] = round(time.perf_counter() - t0, 3)
        result = {
            "task": self.task,
            "metrics": metrics,
            "config": {k: v for k, v in vars(self.args).items()},
            "counts": {"examples": self.n_examples,
                       **{name: sum(s["images"][counter] for s in all_stats) for name, counter in COUNT_NAMES.items()},
                       "lm_passes": sum(s["passes"]["lm"] for s in all_stats),
                       "fusion_passes": sum(s["passes"]["fusion"] for s in all_stats)},
            "timing": seconds,
            "versions": versions(),
            "git_commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "num_processes": self.state.num_processes,
        }
        merged = self.done()
        write_atomic(self.samples_path(), "".join(json.dumps(row) + "\n" for row in merged.values()))
        for p in [*self.out_dir.glob(f"{self.task}_samples.part*.jsonl"), *self.out_dir.glob(f"{self.task}.stats*.json")]:
            p.unlink()
        out = self.out_dir / f"{self.task}.json"
        write_atomic(out, json.dumps(result, indent=2, default=str) + "\n")
        width = max([len(k) for k, _ in (table or [])] + [8])
        for k, v in table or []:
            print(f"{k:<{width}}  {v}")
        if show_images:
            print(image_summary(result["counts"]))
        print(f"results: {out}")
        return result


# the results' image counters (``counts``), from the runtime's: image slots (k x prompts) add up as
# image_slots = images_generated + images_from_cache + images_reused (each slot counted once: generated now,
# read from the disk cache as a PNG or as stored vision features, or an image this run already had)
COUNT_NAMES = {"image_slots": "slots", "images_generated": "generated", "images_from_cache": "from_cache",
               "images_reused": "reused", "pngs_decoded": "pngs_decoded",
               "vision_features_computed": "features_computed", "vision_features_read": "features_read",
               "pipeline_loads": "pipeline_loads"}


def image_summary(c: dict) -> str:
    """The counts' image line: slots and where their images came from, vision features, pipeline loads."""
    return (f"images: {c['image_slots']} slots = {c['images_generated']} generated + {c['images_from_cache']} "
            f"from the cache + {c['images_reused']} reused; vision features: {c['vision_features_computed']} "
            f"computed, {c['vision_features_read']} read; {c['pngs_decoded']} PNGs decoded; "
            f"pipeline loaded {c['pipeline_loads']} time(s)")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "accelerate", "diffusers", "open_clip_torch", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
