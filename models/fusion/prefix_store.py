"""Visual prefixes on disk: the fusion block's keys and values of each image, kept in the feature cache.

The in-memory :class:`models.fusion.prefix.VisualPrefixCache` computes an image's prefix once per process; this
store keeps it across runs, so a warm run (features read from the feature cache) runs no visual prefix through
the block at all. It pays on CPU, where the block over 49 prefix tokens per image costs as much as several
LM passes; on a GPU reading a file costs more than the block does, so ``--prefix_store auto`` uses it on CPU only.

Layout: ``<image cache>/features/<encoder slug>/prefix/<slug>/<key[:2]>/<key>.safetensors``. The slug hashes
what a prefix depends on besides its patches: the trained weights and the fusion block's config
(:func:`models.fusion.prefix.weights_fingerprint`), the fusion dtype and the device type (keys and values
computed on a GPU differ from CPU ones by rounding). The key is the sha256 of the patch tokens themselves
(dtype, shape and bytes), so an entry can never be stale: a regenerated image gives other patches, hence another
key. Entries are read and checked as feature entries are (:class:`models.images.features.FeatureStore`: bounded
reads, checksum, names, dtype, the exact shapes this model's block produces, finite values); a bad one is named
in one warning, deleted and recomputed. New entries are written behind the work.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

from models import write_behind
from models.fusion.prefix import weights_fingerprint

if TYPE_CHECKING:
    from models.fusion.causal import LateFusionLM
    from models.images.features import FeatureStore

FORMAT = "late-fusion-visual-prefix/1"
MODES = ("auto", "on", "off")


def use_store(mode: str, device) -> bool:
    """Whether ``--prefix_store MODE`` keeps prefixes on disk for a run on ``device`` (auto: on CPU only)."""
    return mode == "on" or (mode == "auto" and torch.device(device).type == "cpu")


def patch_key(patches: torch.Tensor) -> str:
    """sha256 of one image's patch tokens ``[n_v, d]``: dtype, shape and bytes."""
    t = patches.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class PrefixStore:
    """The prefixes of one encoder's images (its :class:`FeatureStore` ``features``), for any trained weights.

    ``reads`` and ``writes`` count entries read back and handed to the writer."""

    def __init__(self, features: "FeatureStore"):
        self.features = features
        self._stores: dict[tuple, tuple["FeatureStore", dict]] = {}
        self.reads = self.writes = 0

    def _store(self, model: "LateFusionLM", n_v: int) -> tuple["FeatureStore", dict]:
        from models.images.features import FeatureStore
        from models.images.generators import dtype_name

        ident = {"format": FORMAT, "encoder": self.features.slug, "weights": weights_fingerprint(model),
                 "dtype": dtype_name(model.fusion_dtype), "device": model.device.type}
        space = (tuple(sorted(ident.items())), n_v)
        if space not in self._stores:
            calls = model.calls["prefix"]  # the shape probe is not a prefix of any image
            probe, _ = model.visual_prefix(torch.zeros(1, 1, model.hidden_size, device=model.device))
            model.calls["prefix"] = calls
            heads, head_dim = probe.shape[1], probe.shape[3]
            shapes = {"keys": (heads, n_v, head_dim), "values": (heads, n_v, head_dim)}
            self._stores[space] = (FeatureStore(self.features.dir / "prefix", ident), shapes)
        return self._stores[space]

    def read(self, model: "LateFusionLM", patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored keys and values of the image whose patch tokens are ``patches`` ``[n_v, d]``, or None."""
        store, shapes = self._store(model, patches.shape[0])
        found = store.read_tensors(patch_key(patches), dict(shapes))
        if found is None:
            return None
        self.reads += 1
        return found["keys"].to(model.device), found["values"].to(model.device)

    def write_later(self, model: "LateFusionLM", patches: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor) -> None:
        """Store an image's prefix behind the work (a failed write is the writer's warning, never an error)."""
        store, _ = self._store(model, patches.shape[0])
        self.writes += 1
        write_behind.submit(store.write_tensors, patch_key(patches),
                            {"keys": keys.detach().cpu().contiguous(), "values": values.detach().cpu().contiguous()})
