"""Run records: where a task's results go, resuming a killed run, sharding over processes, and the
result files.

* ``<output_dir>/<run_name>/<task>.json``: metrics, config, counts, timing, versions, git commit, date (and
  for an image run ``image_root``, the image cache or indexed collection: :mod:`eval_scripts.image_paths`);
* ``<output_dir>/<run_name>/<task>_samples.jsonl``: one line per example (and template), exactly the
  examples the metrics were computed from; image paths are relative to ``image_root``;
* ``<task>.run.json``: the settings a re-run must share to resume; ``<task>_samples.part<rank>.jsonl``:
  what each process has scored so far, merged at the end into ``<task>_samples.cache.jsonl``: every
  row ever computed under this run name (also those of examples beyond a smaller ``--limit``, or of
  data that has changed since), so that nothing computed is lost.

Resume identity. A re-run with the same ``--run_name`` must share the settings of ``<task>.run.json``
(model, images, mixing...; refused otherwise, naming the flag). The data is part of the identity per
example: every row of the part and cache files carries ``item_hash``, a content hash of the example as
it was scored (prompt, candidates, answer, image prompts...), and a row is reused only for an example
whose hash matches. So another ``--data_dir``, ``--data_file`` or hub split with different content is
recomputed, while the same examples read from another copy are reused. The result JSON records
``data_fingerprint``, a hash of the ``(id, item_hash)`` list its metrics were computed from.

Failures. Scores are checked before they are written: a non-finite number stops the run with one line
naming the example; what was scored before it stays on disk for a resume, and no metrics are written.
A run that fails before scoring its first example leaves nothing behind (no settings file, no empty
part file, no folder it created), so a failed start never locks a run name.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from eval_scripts.cli import EvalError, NonFiniteScores
from models.distributed import barrier, check_in, step

ITEM_HASH = "item_hash"
# rows whose image paths are relative to the run's image root carry this (bookkeeping, not in the samples file);
# rows of earlier versions named their images as written (absolute, or relative to the working directory)
ROOT_PATHS = "image_paths_root_relative"


def read_jsonl_rows(path: Path) -> list[dict]:
    """The rows of a samples file; a line cut short by a killed run is skipped (and recomputed)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "id" in row:
                rows.append(row)
    return rows


def _has_a_row(path: Path) -> bool:
    """Whether a rows file holds a complete row (only the last line can be cut short by a kill)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        line = f.readline()
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot hash a {type(obj).__name__} in an item")


def item_hash(item: dict) -> str:
    """A content hash of an item as it is scored: the same text, candidates, answer and image prompts
    give the same hash wherever they were read from."""
    text = json.dumps(item, sort_keys=True, ensure_ascii=False, default=_jsonable)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _sample(row: dict) -> dict:
    """A row as the samples file shows it (without the resume bookkeeping)."""
    return {k: v for k, v in row.items() if k not in (ITEM_HASH, ROOT_PATHS)}


def _image_records(images):
    """The image records of a row's ``images`` (a list, or one list per answer option)."""
    for im in images if isinstance(images, list) else ():
        if isinstance(im, list):
            yield from (x for x in im if isinstance(x, dict))
        elif isinstance(im, dict):
            yield im


def root_relative_row(row: dict, root) -> dict:
    """A row with its image paths relative to ``root`` (a :class:`models.images.source.ImageRoot`). A row of
    an earlier version names its images as they were written (absolute, or relative to the working
    directory): those under the root are made relative to it; others are left as they are (the report
    counts them missing)."""
    if row.get(ROOT_PATHS) or not row.get("images"):
        return row
    import copy

    row = copy.deepcopy(row)
    for im in _image_records(row["images"]):
        try:
            im["path"] = root.relative(im["path"])
        except (ValueError, TypeError, KeyError):
            pass
    row[ROOT_PATHS] = True
    return row


def non_finite_field(value, where: str = "") -> str | None:
    """The path of the first NaN or infinite number in a record (``scores[1]``), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where or "value")
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, v in items:
        found = non_finite_field(v, f"{where}{key}" if str(key).startswith("[") else
                                 f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


class RunRecords:
    """One task's files under ``<output_dir>/<run_name>`` (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, task: str, state, resume_keys: tuple[str, ...], options=()):
        """``resume_keys``: the settings a re-run must share to resume; ``options``: the declarations of
        every setting, which the results record (``config`` in ``<task>.json``, and ``<task>.config.yaml``,
        which ``--config`` reads back)."""
        self.args, self.task, self.state = args, task, state
        self.resume_keys, self.options = resume_keys, tuple(options)
        self.out_dir = Path(args.output_dir) / args.run_name
        self.is_main = state.is_main_process
        self.n_examples = 0
        self.keys: list[tuple[str, str]] = []  # (id, item hash) of every item this run scored, in order
        self._made_dirs: list[Path] = []        # folders this process created, deepest first

    # ------------------------------------------------------------------ files
    def samples_path(self) -> Path:
        return self.out_dir / f"{self.task}_samples.jsonl"

    def part_path(self, rank: int) -> Path:
        return self.out_dir / f"{self.task}_samples.part{rank}.jsonl"

    def cache_path(self) -> Path:
        return self.out_dir / f"{self.task}_samples.cache.jsonl"

    def run_file(self) -> Path:
        return self.out_dir / f"{self.task}.run.json"

    def result_path(self) -> Path:
        return self.out_dir / f"{self.task}.json"

    def config_path(self) -> Path:
        return self.out_dir / f"{self.task}.config.yaml"

    def recorded_config(self) -> dict:
        """The settings this run used, as recorded (every declared option; all settings without declarations)."""
        from models.options import recorded

        if not self.options:
            return {k: v for k, v in vars(self.args).items() if k != "config"}
        return recorded(self.args, self.options)

    def resolved(self) -> dict:
        """What ``auto`` settings became on this machine: the device the models ran on and the LM's dtype (a
        table name: ``fp32``, ``bf16``, ...), as the runtime resolves them (``config`` keeps what was asked)."""
        import torch

        from models.options.dtypes import AUTO_LM, resolve

        device = torch.device(self.args.device) if getattr(self.args, "device", None) else self.state.device
        return {"device": str(device), "dtype": resolve(getattr(self.args, "dtype", None) or "auto", device, AUTO_LM)}

    def _row_files(self) -> list[Path]:
        parts = sorted(self.out_dir.glob(f"{self.task}_samples.part*.jsonl"))
        if not self.cache_path().is_file():  # a run directory of a version without the cache file
            return [self.samples_path(), *parts]
        return [self.cache_path(), *parts]

    def rows(self) -> dict[tuple[str, str | None], dict]:
        """Every row computed so far under this run name, by ``(id, item hash)`` (rows written before
        item hashes existed have None: they are kept, never reused)."""
        rows = {}
        for path in self._row_files():
            for row in read_jsonl_rows(path):
                rows[(row["id"], row.get(ITEM_HASH))] = row
        return rows

    def has_results(self) -> bool:
        """Whether anything was computed under this run name for this task."""
        return (self.result_path().is_file() or self.samples_path().is_file()
                or any(_has_a_row(p) for p in self._row_files()))

    def _make_dir(self) -> None:
        missing, p = [], self.out_dir
        while not os.path.lexists(p) and p != p.parent:
            missing.append(p)
            p = p.parent
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._made_dirs.extend(missing)

    def check_resume(self, write: bool = False):
        """Check this run's settings against those of the run being resumed; with ``write``, record
        them (only once results are about to be written). Settings of a run name under which nothing
        was computed lock nothing: a failed start never refuses a corrected re-run."""
        run_file = self.run_file()
        mine = json.loads(json.dumps({k: getattr(self.args, k, None) for k in self.resume_keys}))
        old = None
        if run_file.is_file():
            try:
                old = json.loads(run_file.read_text(encoding="utf-8"))
            except ValueError:
                raise EvalError(f"{run_file} is not valid JSON; use another --run_name") from None
        locked = old is not None and self.has_results()
        barrier()  # every rank has read the old file before the main one writes (and a peer's failure is heard)
        if write and not locked and old != mine and self.is_main:
            self._make_dir()
            write_atomic(run_file, json.dumps(mine, indent=2))
        diff = [k for k in self.resume_keys if locked and old.get(k) != mine[k]]
        if diff:
            k, others = diff[0], "".join(f", --{d} {old.get(d)!r} (now {mine[d]!r})" for d in diff[1:])
            raise EvalError(f"run {self.args.run_name!r} was started with --{k} {old.get(k)!r}, not "
                            f"{mine[k]!r}{others}; use another --run_name")

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
        """Score ``items`` in batches of ``--batch_size`` (skipping those already computed with the same
        content), sharded across processes; returns the records of all items in their order."""
        if not items:
            raise EvalError(f"{self.task}: no examples to score")
        keys = [(it["id"], item_hash(it)) for it in items]
        try:
            with step((EvalError,)):
                self.check_resume(write=True)
            done = self.rows()
            hashes = {it["id"]: key[1] for it, key in zip(items, keys)}
            todo = [it for it, key in zip(items, keys) if key not in done]
            self._score(self.shard(todo), hashes, compute, desc, postfix,
                        kept=self.n_examples + len(items) - len(todo))
        except BaseException:
            self._clean_up_if_nothing_scored()
            raise
        barrier()
        done = self.rows()
        missing = [key[0] for key in keys if key not in done]
        if missing:
            raise RuntimeError(f"{len(missing)} examples have no result (e.g. {missing[0]})")
        self.keys.extend(keys)
        self.n_examples += len(items)
        return [_sample(done[key]) for key in keys]

    def _score(self, todo: list[dict], hashes: dict[str, str], compute, desc: str, postfix, kept: int) -> None:
        """Score ``todo`` into this process's part file; ``kept``: examples of this run already on disk."""
        from tqdm.auto import tqdm

        bs = self.args.batch_size
        # every process takes part in as many batches as the longest share has (empty ones past its own end):
        # each batch ends with a check-in, so a failure on one process stops them all at that batch
        n_batches = check_in(value=-(-len(todo) // bs))
        if not todo and not n_batches:
            return
        self._tally = [0, 0]  # correct, total
        t0 = time.perf_counter()
        part = self.part_path(self.state.process_index)
        # progress bars only on a terminal (disable=None); a log file gets one summary line instead
        with (self._open_part(part) if todo else contextlib.nullcontext()) as f, \
                tqdm(total=len(todo), desc=desc or self.task, unit="ex", disable=None if self.is_main else True) as bar:
            for start in range(0, n_batches * bs, bs):
                with step((EvalError,)):
                    if start < len(todo):
                        kept = self._score_batch(f, todo[start:start + bs], hashes, compute, kept, bar, postfix)
            correct, total = self._tally
            if bar.disable and self.is_main:
                print(f"{desc or self.task}: {total} scored in {time.perf_counter() - t0:.1f} s"
                      + (f", accuracy {correct / total:.4f}" if total else ""), flush=True)

    @staticmethod
    def _open_part(part: Path):
        """This process's part file, for appending (a line cut short by a kill is ended first)."""
        if part.is_file() and part.stat().st_size:
            with open(part, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        return open(part, "a", encoding="utf-8")

    def _score_batch(self, f, batch, hashes, compute, kept: int, bar, postfix) -> int:
        """Score one batch into the part file ``f``; returns the examples of this run now on disk."""
        recs, failure = self._compute_checked(compute, batch)
        for r in recs:
            r[ITEM_HASH] = hashes[r["id"]]
            if r.get("images"):
                r[ROOT_PATHS] = True  # the scorer records image paths relative to the image root
            f.write(json.dumps(r, allow_nan=False) + "\n")
            self._tally[0] += bool(r.get("correct"))
            self._tally[1] += 1
        f.flush()
        kept += len(recs)
        if failure is not None:
            saved = (f"{kept} scored example{'s' if kept != 1 else ''} kept in {self.out_dir} for a resume"
                     if kept else "nothing was written")
            raise NonFiniteScores(f"{failure}; {saved}; no metrics were written")
        correct, total = self._tally
        bar.update(len(recs))
        bar.set_postfix({"acc": f"{correct / max(total, 1):.3f}", **(postfix() if postfix else {})})
        return kept

    def _compute_checked(self, compute, batch: list[dict]) -> tuple[list[dict], str | None]:
        """The records of a batch up to the first with a non-finite number, and what went wrong there
        (None if nothing). When the model itself reports NaN/inf for the batch, its items are scored one
        at a time to name the example."""
        try:
            recs = compute(batch)
        except NonFiniteScores:
            recs = None
        if recs is None:
            if len(batch) == 1:
                return [], f"{self.task} example {batch[0]['id']!r}: the model produced NaN or infinite scores"
            good = []
            for it in batch:
                recs, failure = self._compute_checked(compute, [it])
                good += recs
                if failure is not None:
                    return good, failure
            return good, None
        for i, r in enumerate(recs):
            field = non_finite_field(r)
            if field is not None:
                return recs[:i], f"{self.task} example {r['id']!r}: {field} is not a finite number"
        return recs, None

    def _clean_up_if_nothing_scored(self) -> None:
        """After a failure: when nothing at all was computed under this run name for this task, remove
        what this run made (an empty part file, the settings file, folders it created)."""
        part = self.part_path(self.state.process_index)
        try:
            if part.is_file() and not _has_a_row(part):
                part.unlink()
            if not self.is_main or self.has_results():
                return
            self.run_file().unlink(missing_ok=True)
            for d in self._made_dirs:
                d.rmdir()  # only if empty: OSError otherwise
        except OSError:
            pass

    def finish(self, metrics: dict, stats: dict, t0: float, table: list[tuple[str, str]] | None = None,
               show_images: bool = False, image_root=None) -> dict | None:
        """Merge what the processes scored into the cache file, write the samples of exactly the
        examples scored and ``<task>.json`` (main process), and print a short table.

        ``image_root``: the image source's root (:class:`models.images.source.ImageRoot`) when images
        were used: recorded once in ``<task>.json`` (:mod:`eval_scripts.image_paths`), and every image path
        of the samples file is relative to it.

        ``stats``: this process's ``{"images": {counter: n}, "seconds": {...}, "passes": {...}}`` (image
        counters: :data:`eval_scripts.runtime.IMAGE_COUNTERS`).
        """
        stats_path = self.out_dir / f"{self.task}.stats{self.state.process_index}.json"
        with step((EvalError,)):  # a full disk on any process stops them all here
            stats_path.write_text(json.dumps(stats))
        result = None
        with step((EvalError,)):  # the main process writes; the others hear how that went
            if self.is_main:
                result = self._write_results(metrics, t0, table, show_images, image_root)
        return result

    def _write_results(self, metrics: dict, t0: float, table, show_images: bool, image_root=None) -> dict:
        """The main process's part of :meth:`finish`: merge, write the result files, print the table."""
        all_stats = [json.loads(p.read_text()) for p in sorted(self.out_dir.glob(f"{self.task}.stats*.json"))]
        seconds = {k: round(sum(s["seconds"][k] for s in all_stats), 3) for k in all_stats[0]["seconds"]}
        seconds["total"] = round(time.perf_counter() - t0, 3)
        result = {
            "task": self.task,
            "metrics": metrics,
            "config": self.recorded_config(),
            "counts": {"examples": self.n_examples,
                       **{name: sum(s["images"][counter] for s in all_stats) for name, counter in COUNT_NAMES.items()},
                       "lm_passes": sum(s["passes"]["lm"] for s in all_stats),
                       "fusion_passes": sum(s["passes"]["fusion"] for s in all_stats)},
            "timing": seconds,
            "data_fingerprint": hashlib.sha1("".join(f"{i}\t{h}\n" for i, h in self.keys).encode()).hexdigest(),
            "versions": versions(),
            "git_commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "num_processes": self.state.num_processes,
            "resolved": self.resolved(),
        }
        if image_root is not None:
            from eval_scripts.image_paths import KEY, root_record

            result[KEY] = root_record(image_root, self.out_dir)
        rows = self.rows()
        if image_root is not None:
            rows = {key: root_relative_row(row, image_root) for key, row in rows.items()}
        samples = [_sample(rows[key]) for key in self.keys]
        result.update(outcome_summary(self.task, metrics, samples))
        write_atomic(self.cache_path(), "".join(json.dumps(row) + "\n" for row in rows.values()))
        write_atomic(self.samples_path(), "".join(json.dumps(s) + "\n" for s in samples))
        for p in [*self.out_dir.glob(f"{self.task}_samples.part*.jsonl"), *self.out_dir.glob(f"{self.task}.stats*.json")]:
            p.unlink()
        out = self.result_path()
        if self.options:
            from models.options import config_yaml

            header = (f"The settings of {self.task} in run {self.args.run_name!r}, as used; give this file back as "
                      "--config to reproduce the run\n(with the same --run_name it resumes; flags given beside it "
                      "win).")
            write_atomic(self.config_path(), config_yaml(self.args, self.options, header))
        write_atomic(out, json.dumps(result, indent=2, default=str, allow_nan=False) + "\n")
        width = max([len(k) for k, _ in (table or [])] + [8])
        for k, v in table or []:
            print(f"{k:<{width}}  {v}")
        if show_images:
            print(image_summary(result["counts"]))
        print(f"results: {out}")
        return result


def outcome_summary(task: str, metrics: dict, samples: list[dict]) -> dict:
    """The intervals, text-only metrics and gain ``<task>.json`` records beside ``metrics``, from the samples
    (:func:`eval_scripts.outcomes.summarize`)."""
    from eval_scripts.outcomes import summarize

    return summarize(task, metrics, samples)


# the results' image counters (``counts``), from the runtime's: image slots (k x prompts) add up as
# image_slots = images_generated + images_from_cache + images_reused (each slot counted once: generated now,
# read from the disk cache as a PNG or as stored vision features, or an image this run already had)
COUNT_NAMES = {"image_slots": "slots", "images_generated": "generated", "images_from_cache": "from_cache",
               "images_reused": "reused", "pngs_decoded": "pngs_decoded",
               "vision_features_computed": "features_computed", "vision_features_read": "features_read",
               "pipeline_loads": "pipeline_loads", "prefix_computed": "prefix_computed",
               "prefix_reused": "prefix_reused", "prefix_read": "prefix_read"}


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
