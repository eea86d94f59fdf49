"""``--compile``: whether ``torch.compile`` works on this machine, asked once before anything is compiled.

``torch.compile``'s default backend (inductor) needs a working C++ compiler on CPU and Triton on CUDA; where
either is missing the first compiled call fails deep inside a model. :func:`compile_problem` compiles and runs
one tiny function on the device first, so a run refuses ``--compile`` in one line instead.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def compile_problem(device: str = "cpu") -> str | None:
    """None when ``torch.compile`` compiles and runs a tiny function on ``device``; else why not (one line)."""
    try:
        import torch

        if not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile"

        def probe(x):
            return torch.nn.functional.gelu(x) * 2 + 1

        x = torch.arange(8.0, device=device)
        got = torch.compile(probe)(x)
        if not torch.allclose(got, probe(x)):
            return "a compiled test function gave another result"
    except Exception as err:  # any failure of the compiler stack means: unavailable
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
    return None
