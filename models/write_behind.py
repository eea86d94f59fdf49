"""Cache files written behind the work: atomic files, background writer threads, stale temp files.

A cold evaluation hands each new image to CLIP at once; encoding its PNG and writing it (and its vision
features) happen here, in a few daemon threads, so the run never waits on zlib or the disk.

Threads, not processes: Pillow's PNG encoder releases the GIL while zlib compresses (measured with
Pillow 13: while a thread encodes 512 px PNGs, the main thread's longest stall is one switch interval,
5-10 ms, against 25-80 ms per image), and so do file writes; a thread also needs no copy of the image.

* :func:`submit` runs a task in a writer thread and returns its :class:`concurrent.futures.Future`. At
  most ``MAX_PENDING`` tasks wait: beyond that ``submit`` blocks, so memory stays bounded when the
  writers fall behind a fast generator.
* :func:`flush` waits for every task submitted so far. It runs at the end of each evaluation, at
  interpreter exit (``atexit``, which also runs after Ctrl-C has unwound the main thread) and can be
  called at any time. A task that fails is logged and counted, never raised: a cache entry that was not
  written is simply computed again by a later run.
* In a child of :mod:`multiprocessing` (e.g. a DataLoader worker) or after ``os.fork``, tasks run at
  once in the calling thread: such processes end with ``os._exit``, which skips ``atexit``.
* :func:`write_atomic` writes a temporary file beside the target and renames it over the target, so a
  reader (or a process killed at any point) only ever sees whole files. A kill can leave the temporary
  file behind; :func:`remove_stale_temps` deletes the old ones (never recent ones: another process may
  be writing them right now). :func:`sha256_file` hashes a file the same way everywhere.
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import re
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterable

logger = logging.getLogger(__name__)

MAX_PENDING = 64  # tasks waiting for a writer thread (each holds at most one image and its features)
STALE_TEMP_S = 600.0  # a temporary file older than this is left over from a killed writer
# the temporary files write_atomic makes: ".<8 chars of the target's name>-<mkstemp's 8 random chars>.tmp"
TEMP_NAME = re.compile(r"^\.[0-9A-Za-z_-]{1,8}-[0-9a-z_]{8}\.tmp$")


def write_atomic(path: str | os.PathLike, data: bytes | memoryview) -> os.stat_result:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename; returns the file's stat."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:8]}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:  # a full disk: the error names the file it was writing (write() names none)
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat()


def os_error_line(err: OSError) -> str:
    """One line for an OS error, naming its file: ``PATH: No space left on device``."""
    what = err.strerror or type(err).__name__
    if err.filename is None:
        return " ".join(str(err).split()) or what
    return f"{err.filename}: {what}"


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """The SHA-256 hex digest of a file, read in blocks (weights files can be large)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale_temps(dirs: Iterable[str | os.PathLike], older_than_s: float = STALE_TEMP_S,
                       pattern: re.Pattern = TEMP_NAME) -> int:
    """Delete the temporary files of :func:`write_atomic` (names matching ``pattern``) older than
    ``older_than_s`` in ``dirs`` (not recursive); returns how many were removed."""
    limit = time.time() - older_than_s
    removed = 0
    for d in dirs:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for entry in entries:
            if not pattern.match(entry.name):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < limit:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:  # gone already (another process cleaned it), or not ours to delete
                continue
    return removed


class Writer:
    """A small pool of daemon threads running file-writing tasks in submission order (see the module)."""

    def __init__(self, threads: int | None = None, max_pending: int = MAX_PENDING):
        # PNG encoding releases the GIL: one thread per core (up to 4) also finishes the last writes sooner
        self.n_threads = threads or max(1, min(4, os.cpu_count() or 1))
        self._tasks: queue.Queue = queue.Queue(maxsize=max_pending)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        import multiprocessing

        # a multiprocessing child ends with os._exit (no atexit): write at once there
        self.inline = multiprocessing.parent_process() is not None
        self.failed = 0
        self.first_failure: str | None = None  # the one line of the first failed task
        self._reported: set[str] = set()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        if self.inline:
            self._run(future, fn, args)
            return future
        with self._lock:
            while len(self._threads) < self.n_threads:
                t = threading.Thread(target=self._loop, name=f"cache-writer-{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)
        self._tasks.put((future, fn, args))
        return future

    def _run(self, future: Future, fn: Callable, args) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - a failed cache write must never stop the run
            self.failed += 1
            if isinstance(err, OSError):  # one line per kind of OS error (a full disk), naming its first file
                kind, what = f"{type(err).__name__} {err.errno}", os_error_line(err)
            else:
                kind = what = f"{type(err).__name__}: {err}".splitlines()[0]
            self.first_failure = self.first_failure or what
            if kind not in self._reported:
                self._reported.add(kind)
                logger.warning("cache write failed (%s); the entry will be computed again next time", what)
            future.set_exception(err)

    def _loop(self) -> None:
        while True:
            future, fn, args = self._tasks.get()
            try:
                self._run(future, fn, args)
            finally:
                self._tasks.task_done()

    def flush(self) -> None:
        """Wait until every task submitted so far has run."""
        if self._threads:
            self._tasks.join()


_WRITER: Writer | None = None
_WRITER_LOCK = threading.Lock()


def writer() -> Writer:
    """The process-wide writer (shared by the image cache and the vision-feature cache)."""
    global _WRITER
    if _WRITER is None:
        with _WRITER_LOCK:
            if _WRITER is None:
                _WRITER = Writer()
    return _WRITER


def submit(fn: Callable, *args) -> Future:
    return writer().submit(fn, *args)


def flush() -> None:
    if _WRITER is not None:
        _WRITER.flush()


def _reset_after_fork() -> None:
    """The parent's threads do not exist in a forked child: it writes at once."""
    global _WRITER, _WRITER_LOCK
    _WRITER, _WRITER_LOCK = Writer(), threading.Lock()
    _WRITER.inline = True


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(flush)
