"""The image sources a run can take its images from (``--image_source``), and the one function that builds one.

Each module of this folder is one source: it defines ``SOURCE = SourceSpec(name, description, build)``,
where ``build(args, device, *, dtype, encoder)`` returns a :class:`models.images.source.ImageSource`.
Adding a source is adding a module here; nothing else lists the sources. The modules import nothing heavy
when imported (building a parser reads the names: ``--help`` imports no torch); their ``build`` imports
what it needs.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from models.images.source import ImageSource


@dataclass(frozen=True)
class SourceSpec:
    """One image source: its ``--image_source`` name, a one-line description, and how it is built from
    the flags: ``build(args, device, *, dtype, encoder)``."""

    name: str
    description: str
    build: Callable[..., "ImageSource"]


def discover(package: ModuleType) -> dict[str, SourceSpec]:
    """The ``SOURCE`` of every module of ``package``, by name, in module-name order."""
    found: dict[str, SourceSpec] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        spec = getattr(module, "SOURCE", None)
        if not isinstance(spec, SourceSpec):
            raise TypeError(f"{module.__name__} declares no SOURCE = SourceSpec(...)")
        if spec.name in found:
            raise ValueError(f"image source {spec.name!r} is declared twice ({module.__name__})")
        found[spec.name] = spec
    return found


@functools.cache
def image_sources() -> dict[str, SourceSpec]:
    """Every image source of this folder, by name."""
    return discover(sys.modules[__name__])


def image_source_names() -> tuple[str, ...]:
    """The ``--image_source`` choices (imports no torch)."""
    return tuple(image_sources())


def build_image_source(args, device=None, *, name: str | None = None, dtype=None, encoder=None) -> "ImageSource":
    """The image source the flags describe: ``name`` (default ``args.image_source``) built from ``args``.

    ``device``: where generation or ranking runs (None: the default device); ``dtype``: the generation
    dtype (``--dtype``; None or 'auto': fp16 on CUDA, fp32 elsewhere); ``encoder``: the vision encoder, if
    already loaded (else :meth:`~models.images.source.ImageSource.bind` it later). Nothing heavy is loaded
    here: no pipeline, no model. Bad flags or a missing or corrupt index are one-line ValueErrors.
    """
    name = args.image_source if name is None else name
    sources = image_sources()
    if name not in sources:
        raise ValueError(f"unknown image source {name!r}; choose from {', '.join(sources)}")
    return sources[name].build(args, device, dtype=dtype, encoder=encoder)
