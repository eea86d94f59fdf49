"""The one rule for run names, shared by every entry point that writes into a folder named after a run
(``train.py``'s ``<output_dir>/<run_name>_<epoch>``, the eval scripts' and the suite's
``<output_dir>/<run_name>``): a run name is one plain folder name, so what a run writes stays inside its
``--output_dir``.

Refused: an empty (or blank) name, ``.`` and ``..``, any path separator (``/``, ``\\``), an absolute name
or a drive (``C:``), NUL and other control characters (a newline would forge lines in logs and summaries).
The ``--run_name`` declarations (:data:`models.options.catalog.RUN_NAME`, which ``train.py`` uses with its
own default) check every value with :func:`run_name_problem`, from the command line, ``--config`` files and
the harness's ``model_args`` alike.
"""
from __future__ import annotations

import os
from pathlib import Path, PureWindowsPath

RULE = "a plain folder name (no path separator, no '..')"


def run_name_problem(name) -> str | None:
    """Why ``name`` is not a plain folder name (one line), or None when it is one."""
    if not isinstance(name, str):
        return f"must be {RULE}, got {name!r}"
    separators = {sep for sep in ("/", "\\", os.sep, os.altsep) if sep}
    if (not name.strip() or name in (".", "..") or any(sep in name for sep in separators)
            or any(ord(c) < 32 or ord(c) == 127 for c in name)
            or Path(name).is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).is_absolute()):
        return f"must be {RULE}, got {name!r}"
    return None
