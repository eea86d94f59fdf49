"""One option: its name, spellings, type, default, range, help, and what it means for a run.

An :class:`Option` is the single source of a setting. Every entry point builds its command-line parser
from options (:mod:`models.options.parsing`), reads ``--config`` files and the harness's ``model_args``
through :meth:`Option.convert`, and derives from the flags below which settings a resume must share,
which a run records, and which a shared runtime is built from. So a range is enforced the same way
wherever a value comes from, and a new option is one declaration.

This module imports nothing heavy (no torch): ``--help`` of every script stays instant.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

KINDS = ("str", "int", "float", "flag", "switch", "choice", "list")
_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


class OptionError(ValueError):
    """A value an option does not accept: one line, naming what is allowed."""


@dataclass(frozen=True)
class Option:
    """A setting of one or more entry points.

    kind: ``str``, ``int``, ``float``, ``flag`` (``--x`` sets True), ``switch`` (``--x``, ``--x True``,
    ``--x False``), ``choice`` (one of ``choices``) or ``list`` (comma-separated; each item one of
    ``choices`` when given).
    results: the value changes what a run computes: a resume must share it, and comparisons of runs
    take it into account. data: it selects which examples are scored (a resume may still reuse the rows
    of the examples both runs share; comparisons of results need it equal). images_only: it matters only when images are fused. runtime: the eval
    :class:`eval_scripts.runtime.Runtime` is built from it (tasks sharing a runtime must agree on it).
    path: a local path (compared in absolute form). record: written into the run's recorded config (off
    for settings about one invocation, such as ``--overwrite_output_dir``). words: strings accepted
    besides numbers (``--checkpointing_steps epoch``).
    """

    name: str
    kind: str = "str"
    default: Any = None
    help: str = ""
    spellings: tuple[str, ...] = ()   # extra command-line spellings kept from the release
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple | Callable[[], tuple] | None = None  # a callable: looked up when first needed (a registry)
    words: tuple[str, ...] = ()
    results: bool = False
    data: bool = False                # which examples are scored (runs compare only on the same data)
    images_only: bool = False
    runtime: bool = False
    path: bool = False
    record: bool = True
    required: bool = False
    repeat: bool = False              # a list given as the flag repeated (``--data_root A --data_root B``)
    metavar: str | None = None
    group: str = "options"
    check: Callable[[Any], str | None] | None = None  # extra rule: None, or what is wrong

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TypeError(f"option {self.name}: unknown kind {self.kind!r}")

    # ------------------------------------------------------------------ spelling
    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag, *self.spellings)

    def names(self) -> tuple[str, ...]:
        """Every name a config file or ``model_args`` may use for it (flag spellings without dashes)."""
        return tuple(dict.fromkeys(s.lstrip("-").replace("-", "_") for s in self.flags))

    def replace(self, **changes) -> "Option":
        """The same option with another default, help or choice list for one entry point (the range stays)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ values
    @property
    def choice_values(self) -> tuple | None:
        """The accepted values of a ``choice`` or ``list`` option (a registry's names are read when asked)."""
        return tuple(self.choices()) if callable(self.choices) else self.choices

    def allowed(self) -> str:
        """What the option accepts, in words (for error messages and ``--help``)."""
        if self.kind in ("flag", "switch"):
            return "true or false"
        if self.kind == "choice" or (self.kind == "list" and self.choices):
            items = ", ".join(map(str, self.choice_values or ()))
            return f"one of {items}" if self.kind == "choice" else f"a comma-separated list of {items}"
        if self.kind == "list":
            return "a comma-separated list"
        if self.kind in ("int", "float"):
            what = "an integer" if self.kind == "int" else "a finite number"
            rule = []
            if self.low is not None:
                rule.append(f"{'>' if self.low_open else '>='} {self.low:g}")
            if self.high is not None:
                rule.append(f"<= {self.high:g}")
            text = what + (" " + " and ".join(rule) if rule else "")
            return text + "".join(f" or {w!r}" for w in self.words)
        return "a string"

    def convert(self, value: Any) -> Any:
        """``value`` (a command-line string, or a YAML/JSON value) as this option's type, checked; raises
        :class:`OptionError` saying what is allowed. None stays None (unset)."""
        if value is None:
            return None
        if isinstance(value, str) and value in self.words:
            return value
        try:
            out = self._typed(value)
        except OptionError:
            raise
        except (TypeError, ValueError):
            raise OptionError(f"must be {self.allowed()}, got {value!r}") from None
        problem = self._out_of_range(out, value)
        if problem is None and self.check is not None:
            problem = self.check(out)
        if problem:
            raise OptionError(problem)
        return out

    def _typed(self, value: Any) -> Any:
        k = self.kind
        if k in ("flag", "switch"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if k == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str):
                value = value.strip()
            return int(value)
        if k == "float":
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if k == "choice":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            choices = self.choice_values
            if value not in choices and str(value) in map(str, choices):
                value = next(c for c in choices if str(c) == str(value))
            if value not in choices:
                raise ValueError
            return value
        if k == "list":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ValueError
            items = [str(v).strip() for v in items if str(v).strip()]
            if not items:
                raise ValueError
            choices = self.choice_values
            bad = [v for v in items if choices and v not in choices]
            if bad:
                raise OptionError(f"{bad[0]!r} is not one of {', '.join(map(str, choices))}")
            return items
        if not isinstance(value, str):
            if isinstance(value, (dict, list, tuple, bool)) or value is None:
                raise ValueError
            value = str(value)
        return value

    def _out_of_range(self, value, given) -> str | None:
        if self.kind not in ("int", "float") or isinstance(value, str):
            return None
        low_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        high_bad = self.high is not None and value > self.high
        if low_bad or high_bad:
            return f"must be {self.allowed()}, got {given!r}"
        return None

    def parse_text(self, text: str) -> Any:
        """argparse's ``type=``: a command-line string converted, errors as argparse wants them."""
        import argparse

        try:
            return self.convert(text)
        except OptionError as err:
            raise argparse.ArgumentTypeError(str(err)) from None


def by_name(options) -> dict[str, Option]:
    """``{name: option}``; two options of one name in one list is a declaration error."""
    out: dict[str, Option] = {}
    for opt in options:
        if opt.name in out:
            raise TypeError(f"option {opt.name} declared twice")
        out[opt.name] = opt
    return out
