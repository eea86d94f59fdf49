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


def raised_while_unpickling(e: BaseException) -> bool:
    """Whether ``e`` came out of reading a legacy (pickle) ``.bin`` file: random bytes after a pickle
    opcode surface from torch's ``weights_only`` unpickler as ``UnpicklingError`` but also as
    ``KeyError``, ``IndexError`` or ``UnicodeDecodeError``. Such a file is not a checkpoint, whatever
    the exception's type; its message (a memo index, a byte offset) says nothing to the user."""
    from pickle import UnpicklingError

    if isinstance(e, (UnpicklingError, EOFError)):
        return True
    tb = e.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if name.endswith(("/torch/_weights_only_unpickler.py", "/pickle.py")):
            return True
        tb = tb.tb_next
    return False
