"""The visual prefix cache: the fusion block's keys and values over each image's visual prefix, computed once.

In a causal fusion block the visual prefix ``V`` comes first in ``[V ; H]``, so its keys and values at the
block do not depend on the text that follows: they are a function of the image's CLIP patches and the trained
weights alone (:meth:`models.fusion.causal.LateFusionLM.visual_prefix`). An evaluation scores the same image
under several templates and candidates and in several batches; this cache computes each image's prefix once
and reuses it for every text (scoring and fused generation), so the block runs over the text positions only.

An entry is keyed by the image's key AND a namespace that holds everything the prefix depends on besides the
image: a fingerprint of the trained weights and the fusion block's config (:func:`weights_fingerprint`), the
fusion dtype and device, and what the caller adds (the vision encoder's identity, which also fixes the
features' dtype). A changed checkpoint, dtype or vision encoder therefore never finds another's entry.
Entries are evicted least recently used beyond ``limit_bytes``. Masked LMs (whose block attends both ways)
and sliding-window blocks never use it (:attr:`models.fusion.causal.LateFusionLM.prefix_cacheable`).
"""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from models.fusion.causal import LateFusionLM

DEFAULT_LIMIT_BYTES = 256 * 2**20

# model -> (stamp of its trainable tensors, fingerprint): hashed again only when a tensor was replaced or
# written in place (load_state_dict, copy_, .to(...) all change the stamp)
_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _stamp(model: "LateFusionLM") -> tuple:
    return tuple((name, p.data_ptr(), p._version, p.dtype, str(p.device))
                 for name, p in model.trainable_state_dict().items())


def weights_fingerprint(model: "LateFusionLM") -> str:
    """sha256 of the fusion block's config and of every trainable tensor (names, dtypes, shapes, bytes)."""
    stamp = _stamp(model)
    known = _FINGERPRINTS.get(model)
    if known is not None and known[0] == stamp:
        return known[1]
    h = hashlib.sha256(model.fusion_layer.config.to_json_string(use_diff=False).encode())
    h.update(repr(model.fusion_input_scale).encode())
    for name, t in sorted(model.trainable_state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    _FINGERPRINTS[model] = (stamp, digest)
    return digest


class VisualPrefixCache:
    """Keys and values of visual prefixes per (namespace, image key), least recently used out beyond a byte limit.

    ``cache(model, patches, keys, namespace, store)`` returns ``((keys, values), computed, reused)`` for the
    ``N`` image slots of ``patches`` ``[N, n_v, d_clip]`` (their image keys in ``keys``): the prefixes missing
    from the cache are read from ``store`` (a :class:`models.fusion.prefix_store.PrefixStore`, if given) or
    computed as one batch (each distinct key once; then written to the store), the others reused.
    ``computed`` is how many distinct images were run through the block now, ``reused`` how many slots took
    a prefix already there, read from the store or computed for another slot of this call, so
    ``computed + reused == N`` (the store counts its own reads).
    """

    def __init__(self, limit_bytes: int = DEFAULT_LIMIT_BYTES):
        self.limit_bytes = int(limit_bytes)
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def namespace(self, model: "LateFusionLM", extra: tuple = ()) -> tuple:
        """What an entry depends on besides its image: trained weights, fusion dtype and device, ``extra``."""
        return (weights_fingerprint(model), str(model.fusion_dtype), str(model.device), *extra)

    @torch.no_grad()
    def __call__(self, model: "LateFusionLM", patches: torch.Tensor, keys: list, namespace: tuple = (),
                 store=None):
        if len(keys) != patches.shape[0]:
            raise ValueError(f"{len(keys)} image keys for {patches.shape[0]} image slots")
        space = self.namespace(model, tuple(namespace))
        full = [(space, key) for key in keys]
        missing: dict[tuple, int] = {}
        for i, key in enumerate(full):
            if key not in self.entries and key not in missing:
                missing[key] = i
        if missing and store is not None:  # kept on disk by an earlier run (models.fusion.prefix_store)
            for key, row in list(missing.items()):
                entry = store.read(model, patches[row])
                if entry is not None:
                    self._add(key, entry)
                    del missing[key]
        if missing:
            rows = list(missing.values())
            k, v = model.visual_prefix(model.project(patches[rows]))
            for j, key in enumerate(missing):
                entry = (k[j].clone(), v[j].clone())
                self._add(key, entry)
                if store is not None:
                    store.write_later(model, patches[rows[j]], *entry)
        for key in full:
            self.entries.move_to_end(key)
        out_k = torch.stack([self.entries[key][0] for key in full])
        out_v = torch.stack([self.entries[key][1] for key in full])
        keep = len(set(full))
        while self.bytes > self.limit_bytes and len(self.entries) > keep:
            _, old = self.entries.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old)
        return (out_k, out_v), len(missing), len(keys) - len(missing)

    def _add(self, key: tuple, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.entries[key] = entry
        self.bytes += sum(t.numel() * t.element_size() for t in entry)
