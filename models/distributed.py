"""Ranks that stop together: an error on any process of a distributed run ends every process at once, with
one line (printed by rank 0) and one exit status.

Every agreement between processes is the same collective, :func:`check_in`: an all-reduce (MIN) of two
int64 numbers (the lowest failing rank, or the world size when none failed; and a value to agree on),
followed, only when some rank failed, by a broadcast of its message from that rank. Because every check-in
has that one shape, a rank that fails anywhere can join whichever check-in its peers wait in:

* a **step** (:func:`step`) is a unit of work that every rank runs the same number of times (a batch of an
  evaluation, a training micro-batch before its backward pass, a phase of a checkpoint save); an exception
  inside it on any rank makes every rank raise :class:`RankFailure` at its end, before any other collective
  could wait for the failed rank;
* a **barrier** (:func:`barrier`) is a check-in without work: it replaces ``wait_for_everyone``, so a rank
  that failed before reaching it is heard there;
* the **last word** (:func:`agree_on`): an exception that escaped a rank outside any step is offered at the
  next check-in of its peers (waiting at most :data:`LAST_WORD_TIMEOUT` seconds; when they never come, the
  rank speaks for itself and exits, and the launcher ends the others).

Bad input (``ValueError``, ``OSError`` and the entry point's own error classes) agrees on exit status 2; any
other exception on status 1. Rank 0 prints the agreed line, the other ranks stay silent (a rank that failed
with an unexpected exception also prints its traceback: that is a bug to report). With one process nothing
here communicates, and exceptions pass through unchanged.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from datetime import timedelta

BAD_INPUT = 2  # the exit status of bad input
FAILED = 1     # the exit status of any other error
MESSAGE_BYTES = 2048
LAST_WORD_TIMEOUT = 45.0  # seconds a rank that failed outside a step waits for its peers to hear it


class RankFailure(Exception):
    """A failure every rank of the run agreed on: ``message`` (one line), ``status`` (the exit status) and
    the ``rank`` it happened on. ``alone``: the peers could not be told (they never reached a check-in)."""

    def __init__(self, message: str, status: int = BAD_INPUT, rank: int = 0, alone: bool = False):
        super().__init__(message)
        self.message, self.status, self.rank, self.alone = message, status, rank, alone


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, ``(0, 1)`` without one."""
    dist = _dist()
    if dist is None:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _dist():
    """``torch.distributed`` when a default process group is initialised (torch is not imported for it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def _device(dist):
    import torch

    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def one_line(err: BaseException) -> str:
    """An exception's text on one line (its class name when it has none)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def describe(err: BaseException, bad_input: tuple = ()) -> tuple[str, int]:
    """``(message, status)`` of an exception: bad input (``ValueError``, ``OSError`` or one of
    ``bad_input``) is its one line with status 2; anything else names its class, with status 1."""
    if isinstance(err, RankFailure):
        return err.message, err.status
    if isinstance(err, (ValueError, OSError, *bad_input)):
        return one_line(err), BAD_INPUT
    return f"{type(err).__name__}: {one_line(err)}", FAILED


def check_in(failure: tuple[str, int] | None = None, value: int = 0, *, timeout: float | None = None) -> int:
    """Collective: every rank calls it at the same point. ``failure``: this rank's ``(message, status)``.

    When any rank failed, every rank raises the lowest failing rank's :class:`RankFailure`; otherwise returns
    the largest ``value`` of all ranks (e.g. how many steps the longest share needs). ``timeout`` (seconds)
    bounds the wait for the peers (a ``RuntimeError`` of the backend when it passes). With one process it
    raises this rank's failure, if any, or returns ``value``."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        if failure is not None:
            raise RankFailure(failure[0], failure[1], 0)
        return value
    import torch

    rank, size, device = dist.get_rank(), dist.get_world_size(), _device(dist)
    flag = torch.tensor([rank if failure is not None else size, -int(value)], dtype=torch.int64, device=device)
    _wait(dist.all_reduce(flag, op=dist.ReduceOp.MIN, async_op=True), timeout)
    source, largest = int(flag[0].item()), -int(flag[1].item())
    if source == size:
        return largest
    buffer = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=device)
    if rank == source:
        data = bytes([failure[1] & 0xFF]) + failure[0].encode("utf-8")[:MESSAGE_BYTES - 1]
        buffer[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    _wait(dist.broadcast(buffer, src=source, async_op=True), timeout)
    data = bytes(buffer.cpu().tolist()).rstrip(b"\0")
    raise RankFailure(data[1:].decode("utf-8", "replace"), data[0] if data else FAILED, source)


def _wait(work, timeout: float | None) -> None:
    if timeout is None:
        work.wait()
    else:
        work.wait(timedelta(seconds=timeout))


def barrier() -> None:
    """Collective: wait for every rank (a check-in without a failure); raises a peer's failure."""
    check_in()


@contextmanager
def step(bad_input: tuple = ()):
    """A unit of work every rank runs the same number of times: an exception inside it on any rank is
    every rank's :class:`RankFailure` at its end (see :func:`describe` for its status). A rank whose
    exception is unexpected (a bug) prints its traceback. With one process exceptions pass through."""
    if world()[1] == 1:
        yield
        return
    try:
        yield
    except RankFailure:
        raise
    except Exception as err:
        failure = describe(err, bad_input)
        if failure[1] != BAD_INPUT:
            import traceback

            traceback.print_exc()
        check_in(failure)
    check_in()


def agree_on(err: BaseException, bad_input: tuple = (), timeout: float = LAST_WORD_TIMEOUT) -> RankFailure:
    """The failure every rank ends with after ``err`` escaped this rank: offered at its peers' next check-in
    (at most ``timeout`` seconds; a peer's earlier failure wins, as the lowest failing rank's does)."""
    if isinstance(err, RankFailure):
        return err
    message, status = describe(err, bad_input)
    rank, size = world()
    if size == 1:
        return RankFailure(message, status, rank)
    try:
        check_in((message, status), timeout=timeout)
    except RankFailure as agreed:
        return agreed
    except Exception:  # the peers never came (a timeout, or a peer gone): speak for this rank alone
        return RankFailure(message, status, rank, alone=True)
    return RankFailure(message, status, rank, alone=True)  # not reached: check_in raises on a failure


def report(failure: RankFailure, prefix: str = "error: ") -> None:
    """Print the agreed failure's one line on stderr: rank 0 only (or the rank that could not tell its peers)."""
    rank = world()[0] if _dist() is not None else int(os.environ.get("RANK", "0") or 0)
    if rank == 0 or failure.alone:
        print(f"{prefix}{failure.message}", file=sys.stderr, flush=True)


def close() -> None:
    """Leave the process group (every rank has agreed to stop: exit cleanly, not in the backend's teardown)."""
    dist = _dist()
    if dist is not None:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group on the way out: nothing left to tidy
            pass
