"""A compact immutable list of strings: one UTF-8 blob plus offsets.

Millions of Python ``str`` objects (image paths, captions) cost far more memory than their text, and a
DataLoader worker that touches them copies every page they live on (reference counts). One ``bytes``
blob and one numpy array of offsets are two objects whatever the count.
"""
from __future__ import annotations

import numpy as np


class PackedStrings:
    """An immutable list of strings stored as one UTF-8 blob plus offsets."""

    def __init__(self, strings):
        encoded = [s.encode("utf-8") for s in strings]
        self._blob = b"".join(encoded)
        self._offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._blob[self._offsets[i]:self._offsets[i + 1]].decode("utf-8")
