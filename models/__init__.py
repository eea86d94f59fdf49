"""The late-fusion models and everything they need (see ``docs/architecture.md``).

The Python API is :class:`models.pipeline.LateFusionPipeline`, importable as ``from models import
LateFusionPipeline``; it loads on first use, so importing ``models`` (every script's ``--help``) imports no torch.
"""

__all__ = ["LateFusionPipeline", "ScoreResult"]


def __getattr__(name: str):
    if name in __all__:
        from models import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
