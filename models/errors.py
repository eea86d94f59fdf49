"""The errors of loading and scoring a model that are the caller's to fix.

:class:`InputError` is bad input (a model that cannot load, a checkpoint that does not fit it, a text with
nothing to score): one line. The eval scripts report it as ``error: ...`` with exit status 2 (it is their
``EvalError``); the Python API (:mod:`models.pipeline`) raises it as a ``ValueError``.
"""
from __future__ import annotations


class InputError(Exception):
    """Bad input to loading or scoring: one line naming what is wrong."""


class NonFiniteScores(InputError):
    """The model produced NaN or infinite values while scoring (e.g. NaN weights): never recorded."""
