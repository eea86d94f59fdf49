"""Training checkpoints (``checkpoint-<step>/``) in formats that cannot run code, written atomically.

A checkpoint folder holds:

``model.safetensors``                 the trainable weights (``mm_proj`` + ``fusion_layer``), loadable as
                                      ``--pretrained_model`` like any saved weights
``optimizer.json`` (+ ``.safetensors``) the optimizer's ``state_dict``: tensors in safetensors, the rest in JSON
``scheduler.json``                    the learning-rate scheduler's ``state_dict``
``trainer_state.json``                progress (step, epoch, data position, accumulation counter, image counts),
                                      the GradScaler's state and the run's config (:func:`config_differences`)
``rng_state_<rank>.json`` (+ ``.safetensors``)  each process's RNG states: Python and NumPy in JSON,
                                      torch CPU and CUDA (one per device) as uint8 tensors
``checkpoint.json``                   the completion marker, written last: the size and SHA-256 of every file

Under FSDP2 the trainable part and its optimizer state are DTensors sharded over the processes: a save
gathers them whole (every process takes part), and a resume cuts each process's shards from the whole
tensors, so a checkpoint is the same files whatever the sharding (and resumes under one process, DDP or
FSDP2 alike, with the same number of processes for the RNG states).

Nothing is unpickled: JSON and safetensors hold data only, and a file whose size or hash differs from the
marker is refused before it is parsed. Every problem is one :class:`~models.checkpoints.weights.CheckpointError` line
naming the file. A checkpoint is written into ``checkpoint-<step>.tmp/`` and renamed into place once its
marker is written, so a killed save never leaves a folder that looks complete; older checkpoints are
pruned only after that. (Accelerate's ``save_state`` pickles its custom objects and RNG states; its
checkpoints are never read.)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from models.checkpoints.weights import CheckpointError, WEIGHTS_NAME, check_finite, read_safetensors
from models.write_behind import sha256_file

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
MARKER = "checkpoint.json"
FORMAT = "late-fusion-training-checkpoint"
VERSION = 1
PROGRESS_KEYS = ("completed_steps", "epoch", "batches_in_epoch", "accumulation_step", "images_seen", "bad_images")
# Files of Accelerate's save_state (pickles): named when met, never read.
_ACCELERATE_FILES = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                     "pytorch_model.bin", "scaler.pt")


# ----------------------------------------------------------------------------- finding checkpoints

def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name (None for any other name)."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a completion marker of this format (its files are verified when read)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == FORMAT


def scan_checkpoints(output_dir) -> tuple[list[Path], list[Path]]:
    """``(complete, incomplete)`` checkpoint folders of ``output_dir``, each oldest (lowest step) first.

    Incomplete: a ``checkpoint-<step>`` folder without a valid marker (a killed save of an older version, an
    Accelerate checkpoint, a folder damaged by hand) and any ``checkpoint-<step>.tmp`` left by a killed save."""
    root = Path(output_dir)
    if not root.is_dir():
        return [], []
    complete, incomplete = [], []
    for d in root.iterdir():
        if not d.is_dir():
            continue
        if checkpoint_step(d) is not None:
            (complete if is_complete(d) else incomplete).append(d)
        elif d.name.endswith(TMP_SUFFIX) and checkpoint_step(Path(d.name[:-len(TMP_SUFFIX)])) is not None:
            incomplete.append(d)

    def step(p: Path) -> int:
        return checkpoint_step(Path(p.name.removesuffix(TMP_SUFFIX)))

    return sorted(complete, key=step), sorted(incomplete, key=step)


def describe_incomplete(path: Path) -> str:
    """Why ``path`` is not a complete checkpoint, in a few words."""
    legacy = [n for n in _ACCELERATE_FILES if (path / n).exists()]
    if legacy:
        return f"an Accelerate checkpoint ({legacy[0]}: pickles are never loaded)"
    if path.name.endswith(TMP_SUFFIX):
        return "a save that was interrupted"
    return f"no valid {MARKER} (an interrupted or damaged save)"


def latest_checkpoint(output_dir) -> Path | None:
    """The newest complete checkpoint of ``output_dir``, warning about every incomplete one."""
    complete, incomplete = scan_checkpoints(output_dir)
    for path in incomplete:
        logger.warning("skipping %s: %s", path, describe_incomplete(path))
    return complete[-1] if complete else None


def check_resumable(path: Path) -> None:
    """One :class:`CheckpointError` line when ``path`` is not a complete checkpoint of this format."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint of train.py: {describe_incomplete(path)}")


# ----------------------------------------------------------------------------- a code-free tree codec

def encode_tree(obj, tensors: dict[str, torch.Tensor], prefix: str = "t"):
    """``obj`` (nested dicts, lists, tuples, numbers, strings, None, tensors) as JSON-able data; tensors go to
    ``tensors`` (for a safetensors file) and are referenced by key. Dict keys keep their type (int or str)."""
    if torch.is_tensor(obj):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (int, str)) or isinstance(k, bool):
                raise TypeError(f"cannot store a dict key of type {type(k).__name__} in a checkpoint")
        return {"__dict__": [[k, encode_tree(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, prefix) for v in obj]
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def decode_tree(data, tensors: dict[str, torch.Tensor], where: str):
    """The inverse of :func:`encode_tree`; anything else is a CheckpointError naming ``where``."""
    if isinstance(data, (bool, int, float, str)) or data is None:
        return data
    if isinstance(data, list):
        return [decode_tree(v, tensors, where) for v in data]
    if isinstance(data, dict) and len(data) == 1:
        (tag, value), = data.items()
        if tag == "__tensor__" and value in tensors:
            return tensors[value]
        if tag == "__float__" and value in ("inf", "-inf", "nan"):
            return float(value)
        if tag == "__tuple__" and isinstance(value, list):
            return tuple(decode_tree(v, tensors, where) for v in value)
        if tag == "__dict__" and isinstance(value, list) and all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], (int, str)) for p in value):
            return {k: decode_tree(v, tensors, where) for k, v in value}
    raise CheckpointError(f"{where}: unexpected content {str(data)[:60]!r}")


# ----------------------------------------------------------------------------- RNG states

def rng_state() -> dict:
    """This process's RNG states: Python, NumPy, torch CPU and every CUDA device."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def check_rng_state(state, where: str) -> None:
    """One CheckpointError naming ``where`` unless ``state`` has the shape of :func:`rng_state`'s output
    (checked on throwaway generators, so a resume fails before any model loads)."""
    try:
        random.Random().setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        tensors = [state["torch"], *state.get("cuda", [])]
        ok = all(torch.is_tensor(t) and t.dtype == torch.uint8 and t.dim() == 1 for t in tensors)
        ok = ok and state["torch"].numel() == torch.get_rng_state().numel()
    except (KeyError, TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise CheckpointError(f"{where}: not a valid RNG state")


def set_rng_state(state: dict, where: str) -> None:
    """Restore :func:`rng_state`'s output; a state of the wrong shape is one CheckpointError naming ``where``."""
    try:
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise CheckpointError(f"{where}: not a valid RNG state ({type(err).__name__})") from None
    saved, here = len(state.get("cuda", [])), torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved != here:
        raise CheckpointError(f"{where}: holds CUDA RNG states of {saved} devices, but this process sees {here}; "
                              "the resumed run would not be exact")
    if here:
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (TypeError, RuntimeError) as err:
            raise CheckpointError(f"{where}: not a valid CUDA RNG state ({type(err).__name__})") from None


# ----------------------------------------------------------------------------- files

def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_component(folder: Path, name: str, obj) -> None:
    """``obj`` as ``<name>.json``, plus ``<name>.safetensors`` when it holds tensors."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    data = encode_tree(obj, tensors)
    if tensors:
        _write_bytes(folder / f"{name}.safetensors", save(tensors))
    _write_bytes(folder / f"{name}.json", (json.dumps(data, allow_nan=False) + "\n").encode("utf-8"))


def _write_weights(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    _write_bytes(folder / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))


class _Reader:
    """Reads the files of a checkpoint after checking each against the marker's size and SHA-256."""

    def __init__(self, path: Path):
        self.path = path
        marker_path = path / MARKER
        try:
            marker = json.loads(marker_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{marker_path}: unreadable completion marker ({type(err).__name__})") from None
        if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict):
            raise CheckpointError(f"{marker_path}: not a completion marker of train.py")
        if marker.get("version") != VERSION:
            raise CheckpointError(f"{marker_path}: checkpoint format version {marker.get('version')!r}; "
                                  f"this train.py reads version {VERSION}")
        self.files = marker["files"]

    def has(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> bytes:
        f = self.path / name
        entry = self.files.get(name)
        if not isinstance(entry, dict):
            raise CheckpointError(f"{f}: not listed in {self.path / MARKER}")
        try:
            data = f.read_bytes()
        except OSError as err:
            raise CheckpointError(f"{f}: cannot be read ({err.strerror or type(err).__name__})") from None
        if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise CheckpointError(f"{f}: damaged or replaced (its size or SHA-256 differs from {MARKER})")
        return data

    def json(self, name: str):
        data = self.read(name)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(f"{self.path / name}: not valid JSON ({type(err).__name__})") from None

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return read_safetensors(self.path / name, self.read(name))

    def component(self, name: str):
        tensors = self.tensors(f"{name}.safetensors") if self.has(f"{name}.safetensors") else {}
        return decode_tree(self.json(f"{name}.json"), tensors, str(self.path / f"{name}.json"))


# ----------------------------------------------------------------------------- save

def save_training_checkpoint(accelerator, output_dir: Path, step: int, *, model, optimizer, scheduler,
                             trainer_state: dict, total_limit: int | None) -> Path:
    """Write ``output_dir/checkpoint-<step>`` from every process (each adds its RNG state), atomically;
    then delete the oldest complete checkpoints beyond ``total_limit`` and any interrupted save.

    Under FSDP2 every process first gathers the shards of the trainable weights and of their optimizer
    state (:func:`gathered_state`), so the files are those of a one-process run. Each phase ends with a
    check-in of every process (:func:`models.distributed.step`): a full disk on any process stops them all."""
    from models.distributed import step as every_rank

    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_name(final.name + TMP_SUFFIX)
    main = accelerator.is_main_process
    with every_rank((CheckpointError,)):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    weights = gathered_state(accelerator.unwrap_model(model).trainable_state_dict(), keep=main)
    optimizer_state = gathered_state(optimizer.state_dict(), keep=main)
    with every_rank((CheckpointError,)):
        write_component(tmp, f"rng_state_{accelerator.process_index}", rng_state())
        if main:
            _write_weights(tmp, weights)
            write_component(tmp, "optimizer", optimizer_state)
            write_component(tmp, "scheduler", scheduler.state_dict())
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            write_component(tmp, "trainer_state", {**trainer_state, "format": FORMAT, "scaler": scaler})
    with every_rank((CheckpointError,)):
        if main:
            _complete(tmp, final, step, accelerator.num_processes)
            _prune(Path(output_dir), total_limit, keep=final)
    return final


def _complete(tmp: Path, final: Path, step: int, num_processes: int) -> None:
    """Write the marker (last) into ``tmp`` and rename it to ``final`` (a previous ``final`` stays whole until then)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
    marker = {"format": FORMAT, "version": VERSION, "step": step, "num_processes": num_processes, "files": files}
    _write_bytes(tmp / MARKER, (json.dumps(marker, indent=1) + "\n").encode("utf-8"))  # last
    old = final.with_name(f".{final.name}.replaced")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- sharded (FSDP2) tensors

def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor (a parameter or optimizer state that FSDP2 shards over the processes)."""
    return torch.is_tensor(t) and hasattr(t, "full_tensor") and hasattr(t, "placements")


def gathered_state(obj, keep: bool = True):
    """``obj`` (a state dict: nested dicts, lists, tuples) with every DTensor gathered whole and every tensor
    on the CPU. Collective under FSDP2: every process calls it, on states of the same structure (the shards
    are gathered in one order); ``keep=False`` takes part in the gathers and returns None."""
    def walk(value):
        if torch.is_tensor(value):
            whole = value.full_tensor() if is_sharded(value) else value
            return whole.detach().to("cpu").clone() if keep else None
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v) for v in value)
        return value

    result = walk(obj)
    return result if keep else None


def shard_like(whole: torch.Tensor, like) -> torch.Tensor:
    """``whole`` as ``like`` holds it: for a DTensor, this process's shard of it (cut locally: every process
    read the whole checkpoint), in ``like``'s dtype and device; otherwise ``whole`` itself."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    local = like.to_local()
    return distribute_tensor(whole.to(device=local.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def _prune(output_dir: Path, total_limit: int | None, keep: Path) -> None:
    complete, incomplete = scan_checkpoints(output_dir)
    for path in incomplete:
        if path.name.endswith(TMP_SUFFIX):
            logger.info("deleting %s (an interrupted save)", path)
            shutil.rmtree(path, ignore_errors=True)
    if total_limit is None:
        return
    for path in [p for p in complete if p != keep][:max(0, len(complete) - total_limit)]:
        logger.info("deleting old checkpoint %s (--checkpoints_total_limit %d)", path, total_limit)
        shutil.rmtree(path)


# ----------------------------------------------------------------------------- load

def read_training_checkpoint(path: Path, process_index: int) -> dict:
    """Everything a resume needs, verified and parsed: ``weights``, ``optimizer``, ``scheduler``,
    ``trainer_state`` and this process's ``rng`` state. Raises CheckpointError (one line naming the file)."""
    path = Path(path)
    check_resumable(path)
    reader = _Reader(path)
    weights = reader.tensors(WEIGHTS_NAME)
    check_finite(weights, path / WEIGHTS_NAME)
    trainer_state = reader.component("trainer_state")
    where = str(path / "trainer_state.json")
    if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("config"), dict):
        raise CheckpointError(f"{where}: no run config")
    for key in PROGRESS_KEYS:
        value = trainer_state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{where}: {key} must be a non-negative integer, got {value!r}")
    optimizer = reader.component("optimizer")
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise CheckpointError(f"{path / 'optimizer.json'}: not an optimizer state")
    check_finite({f"state {k}.{n}": v for k, s in optimizer["state"].items() for n, v in s.items()},
                 path / "optimizer.safetensors")
    rng_name = f"rng_state_{process_index}"
    if not reader.has(f"{rng_name}.json"):
        raise CheckpointError(f"{path / (rng_name + '.json')}: missing (the checkpoint was saved by "
                              f"{trainer_state['config'].get('num_processes')} processes)")
    rng, rng_where = reader.component(rng_name), str(path / f"{rng_name}.json")
    check_rng_state(rng, rng_where)
    return {"path": path, "weights": weights, "optimizer": optimizer, "scheduler": reader.component("scheduler"),
            "trainer_state": trainer_state, "rng": rng, "rng_where": rng_where}


def _kind(value) -> str:
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, (int, float)):
        return "number"
    return "sequence" if isinstance(value, (list, tuple)) else type(value).__name__


def _fits(saved, current: dict) -> bool:
    """Whether a saved settings dict has the keys of ``current`` and values of the same kinds (a state dict
    loaded into torch objects sets these as attributes: nothing unexpected may get in)."""
    return isinstance(saved, dict) and set(saved) == set(current) and all(
        _kind(saved[k]) == _kind(current[k]) for k in current)


def restore_training_checkpoint(ckpt: dict, accelerator, model, optimizer, scheduler) -> None:
    """Load what :func:`read_training_checkpoint` returned into the prepared objects and set the RNGs last."""
    from models.checkpoints.weights import load_trainable

    path = ckpt["path"]
    current = accelerator.unwrap_model(model).trainable_state_dict()
    weights = {k: shard_like(v, current[k]) if k in current and tuple(v.shape) == tuple(current[k].shape) else v
               for k, v in ckpt["weights"].items()}  # FSDP2: each process's shards of the whole tensors
    load_trainable(accelerator.unwrap_model(model), path, loaded=(weights, {}))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = ckpt["optimizer"]
    for index, values in saved["state"].items():
        shapes = {tuple(v.shape) for v in values.values() if torch.is_tensor(v) and v.dim() > 0}
        if not isinstance(index, int) or not 0 <= index < len(params) or shapes - {tuple(params[index].shape)}:
            raise CheckpointError(f"{path / 'optimizer.json'}: does not fit this model's trainable parameters")
    groups = optimizer.state_dict()["param_groups"]
    if not isinstance(saved["param_groups"], list) or len(saved["param_groups"]) != len(groups) or not all(
            _fits(s, c) for s, c in zip(saved["param_groups"], groups)):
        raise CheckpointError(f"{path / 'optimizer.json'}: its parameter groups do not fit this optimizer")
    saved = {**saved, "state": {i: {n: shard_like(v, params[i]) if torch.is_tensor(v) and v.dim() > 0 else v
                                    for n, v in values.items()} for i, values in saved["state"].items()}}
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path / 'optimizer.json'}: does not fit this optimizer "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not _fits(ckpt["scheduler"], scheduler.state_dict()):
        raise CheckpointError(f"{path / 'scheduler.json'}: does not fit this learning-rate scheduler")
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler = ckpt["trainer_state"].get("scaler")
    if (scaler is None) != (accelerator.scaler is None):
        raise CheckpointError(f"{path / 'trainer_state.json'}: saved with{'out' if scaler is None else ''} a "
                              "gradient scaler (fp16), this run is the other way round")
    if scaler is not None:
        accelerator.scaler.load_state_dict(scaler)
    accelerator.step = ckpt["trainer_state"]["accumulation_step"]
    set_rng_state(ckpt["rng"], ckpt["rng_where"])


# ----------------------------------------------------------------------------- state against the schedule

def expected_learning_rate(step: int, *, learning_rate: float, lr_scheduler_type: str, num_warmup_steps: int,
                           max_train_steps: int, num_processes: int) -> float:
    """The learning rate train.py's schedule gives after ``step`` optimizer steps (the prepared scheduler steps
    ``num_processes`` times per optimizer step), from the schedule's own formula, without stepping through it."""
    from transformers import get_scheduler

    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    schedule = get_scheduler(lr_scheduler_type, optimizer=probe, num_warmup_steps=num_warmup_steps * num_processes,
                             num_training_steps=max_train_steps * num_processes)
    return learning_rate * schedule.lr_lambdas[0](step * num_processes)


def _close(a, b) -> bool:
    return (isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
            and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15))


def check_training_state(ckpt: dict, *, learning_rate: float, lr_scheduler_type: str, num_warmup_steps: int,
                         max_train_steps: int, num_processes: int, steps_per_epoch: int | None = None,
                         gradient_accumulation_steps: int = 1) -> None:
    """A CheckpointError (one line naming the file) unless the JSON state of a checkpoint read by
    :func:`read_training_checkpoint` is what a run of these settings holds at its step: ``completed_steps``
    within ``[0, max_train_steps]``; with ``steps_per_epoch``, the epoch and the position in it agree with the
    step; the scheduler counted ``completed_steps * num_processes`` steps from ``learning_rate``; and the
    learning rate in the scheduler and the optimizer is the one the schedule gives at that step. Hashes in
    the marker prove a file is the one written with it, not that what was written is plausible: this does."""
    path = Path(ckpt["path"])
    state, scheduler, optimizer = ckpt["trainer_state"], ckpt["scheduler"], ckpt["optimizer"]
    where = path / "trainer_state.json"
    step = state["completed_steps"]
    if step > max_train_steps:
        raise CheckpointError(f"{where}: completed_steps {step} is past this run's {max_train_steps} optimizer steps")
    if state["bad_images"] > state["images_seen"]:
        raise CheckpointError(f"{where}: bad_images {state['bad_images']} exceeds images_seen {state['images_seen']}")
    if steps_per_epoch is not None:  # a step ends after every accumulation's last batch, an epoch after its last
        batches, epoch, ga = state["batches_in_epoch"], state["epoch"], gradient_accumulation_steps
        if batches % ga or batches // ga >= steps_per_epoch or epoch * steps_per_epoch + batches // ga != step:
            raise CheckpointError(f"{where}: epoch {epoch} and batches_in_epoch {batches} do not match "
                                  f"completed_steps {step} at {steps_per_epoch} optimizer steps an epoch")
        if state["accumulation_step"] != batches:  # Accelerate counts the epoch's batches too
            raise CheckpointError(f"{where}: accumulation_step {state['accumulation_step']} is not "
                                  f"batches_in_epoch {batches}")
    expected = expected_learning_rate(step, learning_rate=learning_rate, lr_scheduler_type=lr_scheduler_type,
                                      num_warmup_steps=num_warmup_steps, max_train_steps=max_train_steps,
                                      num_processes=num_processes)
    where = path / "scheduler.json"
    counted = scheduler.get("last_epoch") if isinstance(scheduler, dict) else None
    if counted != step * num_processes:
        raise CheckpointError(f"{where}: the scheduler counted {counted!r} steps, but completed_steps {step} on "
                              f"{num_processes} process(es) make {step * num_processes}")
    for name, want in (("base_lrs", learning_rate), ("_last_lr", expected)):
        values = scheduler.get(name)
        if not isinstance(values, list) or not values or not all(_close(v, want) for v in values):
            raise CheckpointError(f"{where}: {name} {str(values)[:60]} is not {want:.6g}, the learning rate this "
                                  f"run's schedule ({lr_scheduler_type}, --learning_rate {learning_rate:g}, "
                                  f"{num_warmup_steps} warmup, {max_train_steps} steps) gives at step {step}")
    where = path / "optimizer.json"
    if not isinstance(optimizer["param_groups"], list):
        raise CheckpointError(f"{where}: its parameter groups are not a list")
    for group in optimizer["param_groups"]:
        if not isinstance(group, dict) or not _close(group.get("lr"), expected) or \
                not _close(group.get("initial_lr"), learning_rate):
            lr = group.get("lr") if isinstance(group, dict) else group
            raise CheckpointError(f"{where}: its parameter groups hold learning rate {str(lr)[:30]!r}, not "
                                  f"{expected:.6g}, the one this run's schedule gives at step {step}")


# ----------------------------------------------------------------------------- run config

def config_differences(saved: dict, current: dict) -> list[str]:
    """``name (checkpoint X, now Y)`` for each entry of the two run configs that differs."""
    missing = object()
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if a != b:
            show = lambda v: "unset" if v is missing else repr(v)  # noqa: E731
            diffs.append(f"{key} (checkpoint {show(a)}, now {show(b)})")
    return diffs
