"""Reading a file that may have been edited by someone else: only a regular file (never a device, a FIFO
or a socket), and never more than ``limit`` bytes (a file that grows while it is read is caught too)."""
from __future__ import annotations

import os
import stat


def read_bounded(path, limit: int, too_large) -> bytes:
    """The bytes of the regular file ``path`` (symlinks followed: check them first where that matters);
    ``ValueError("not a regular file")``, or ``ValueError(too_large(size))`` when it holds more than
    ``limit`` bytes (``size``: its size, None when it grew past ``limit`` while being read)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")
    if st.st_size > limit:
        raise ValueError(too_large(st.st_size))
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(too_large(None))
    return data
