"""Run an entry point under torchrun and record how each rank ended (used by tests/test_ranks.py).

    torchrun --nproc_per_node 2 -m tests.rank_exit_check OUT_DIR MODULE [ARGS...]    # from the repo root

Each rank runs ``python -m MODULE ARGS`` in-process and writes ``OUT_DIR/exit<RANK>.json``: its exit status
and the time it ended (an entry point that ends with ``os._exit`` after the ``atexit`` handlers is recorded
by one of them). ``RANK_FAIL_AT=<rank>:<module>.<attribute>[.<attribute>]``, when set, makes that function raise
``OSError(28, 'No space left on device')`` on that rank (a full disk on one rank only).
"""
import atexit
import errno
import importlib
import json
import os
import runpy
import sys
import time
from pathlib import Path


OUT = Path(sys.argv[1]) if __name__ == "__main__" else None


def record(status: int) -> None:
    path = OUT / f"exit{os.environ.get('RANK', '0')}.json"
    if not path.exists():
        path.write_text(json.dumps({"status": status, "time": time.time()}))


def fail_at(spec: str) -> None:
    rank, target = spec.split(":", 1)
    if rank != os.environ.get("RANK", "0"):
        return
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest prefix that is a module, then attributes
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        break
    for name in parts[cut:-1]:
        owner = getattr(owner, name)
    name = parts[-1]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/stand-in/for/a/full/disk")

    setattr(owner, name, full)


if __name__ == "__main__":
    module = sys.argv[2]
    atexit.register(record, 0)
    if os.environ.get("RANK_FAIL_AT"):
        fail_at(os.environ["RANK_FAIL_AT"])
    sys.argv = [module, *sys.argv[3:]]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        record(code)
        raise
    except BaseException:
        record(1)
        raise
