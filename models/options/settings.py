"""A run's settings: the parsed and resolved options, read-only.

Parsing gives a :class:`Settings` whose values are final: nothing changes them afterwards, so what a run
records is what it used. A step that needs another value (a script resolving its default data folder, the
harness choosing its device) makes a new object with :meth:`Settings.replace`.
"""
from __future__ import annotations

import argparse


class Settings(argparse.Namespace):
    """Attribute access like an ``argparse.Namespace`` (``vars()`` works), but no assignment."""

    def __init__(self, **values):
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"settings are read-only (tried to set {name!r}); make a new object with "
                             ".replace(...)")

    def __delattr__(self, name):
        raise AttributeError(f"settings are read-only (tried to delete {name!r})")

    def replace(self, **changes) -> "Settings":
        unknown = sorted(set(changes) - set(vars(self)))
        if unknown:
            raise AttributeError(f"no setting {unknown[0]!r}")
        return Settings(**{**vars(self), **changes})

    def to_dict(self) -> dict:
        return dict(vars(self))

    def __reduce__(self):  # pickled into DataLoader workers (spawn)
        return (_rebuild, (self.to_dict(),))


def _rebuild(values: dict) -> Settings:
    return Settings(**values)


def as_settings(namespace) -> Settings:
    """A Settings from any namespace (tests and callers may build an ``argparse.Namespace`` by hand)."""
    return namespace if isinstance(namespace, Settings) else Settings(**vars(namespace))
