"""Retrieved images: a drop-in alternative to the image generator, over an index of ``models.images.index``.

:class:`ImageRetriever` is the ``retrieve`` :class:`models.images.source.ImageSource`: ``get(prompt
lists)`` returns, for each item, one image object per prompt with ``path``, ``prompt`` and ``image`` (so
CLIP weights, mixing, the samples file and the report work unchanged), plus ``row`` (the index row) and
``similarity`` (the ranking score), which the samples file records.

Ranking (``--retrieve_by``):

* ``clip`` (default): cosine between the CLIP text embedding of the image prompt and the index's image
  embeddings. Exact search by chunked matrix products on the device (the index is held there as float32);
  with ``faiss`` installed and more than ``--faiss_threshold`` images, a faiss exact inner-product index
  on the CPU instead. Ties are broken by the lower row, so the ranking is a pure function of the index.
* ``caption``: BM25 (``bm25s``) between the image prompt and each image's captions (all of an image's
  captions form one document), for captioned collections; ties by row.

Slot ``i`` of an item takes the ``j``-th ranked image of its prompt, ``j`` being the number of earlier
slots of that item with the same prompt: a prompt repeated k times gets its k best images.
Near-duplicates (``--dedup_threshold``, cosine between index image embeddings): walking down the ranking,
an image closer than the threshold to one already taken is passed over; when the whole index has been
walked without filling the slots, the passed-over images fill them in ranking order. A threshold of 1
turns this off.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models import write_behind
from models.options.catalog import DEFAULT_DEDUP, DEFAULT_FAISS_THRESHOLD, RETRIEVE_BY_CHOICES as RETRIEVE_BY
from models.images.index import ImageIndex, ImageIndexError, unreadable_reason
from models.images.source import ImageRef, ImageRoot, ServedImage, check_k, tally


class _Provenance:
    @property
    def provenance(self) -> dict:
        """The fields the samples file adds to the image's record: its index row, similarity and the sha256 of
        its bytes (from the index's digests: what a report checks before it shows the file)."""
        return {"row": self.row, "similarity": round(float(self.similarity), 6),
                **({"sha256": self.sha256} if self.sha256 else {})}


@dataclass
class RetrievedImage(_Provenance, ServedImage):
    row: int = -1
    similarity: float = 0.0
    sha256: str = ""


@dataclass(frozen=True)
class RetrievedRef(_Provenance, ImageRef):
    """One retrieved image slot before its file is read (the source interface's ``refs``): its key is the
    image's path, so the feature cache (which checks the file's size and time) serves it on a warm run."""
    row: int = -1
    similarity: float = 0.0
    sha256: str = ""


def check_retrieval_args(args) -> None:
    """Raise ImageIndexError on retrieval flags that cannot work (before anything loads)."""
    if getattr(args, "image_source", "generate") != "retrieve":
        return
    if not args.image_index:
        raise ImageIndexError("--image_source retrieve needs --image_index INDEX_DIR "
                              "(python -m models.images.index build)")
    if not -1.0 <= args.dedup_threshold <= 1.0:
        raise ImageIndexError(f"--dedup_threshold is a cosine in [-1, 1], got {args.dedup_threshold}")
    if args.faiss_threshold < 0:
        raise ImageIndexError(f"--faiss_threshold must be >= 0, got {args.faiss_threshold}")


# ---------------------------------------------------------------------------------------------- exact search
def _merge_best(running, q_ids, sims, rows, n: int, n_queries: int):
    """Keep the ``n`` best (highest score, then lowest row) entries of each query."""
    if running is not None:
        q_ids, sims, rows = (torch.cat([a, b]) for a, b in zip(running, (q_ids, sims, rows)))
    order = torch.sort(rows, stable=True).indices  # lexicographic (query, -score, row) by stable sorts
    order = order[torch.sort(-sims[order], stable=True).indices]
    order = order[torch.sort(q_ids[order], stable=True).indices]
    q_ids, sims, rows = q_ids[order], sims[order], rows[order]
    first = torch.searchsorted(q_ids, torch.arange(n_queries, device=q_ids.device))
    rank = torch.arange(len(q_ids), device=q_ids.device) - first[q_ids]
    keep = rank < n
    return q_ids[keep], sims[keep], rows[keep]


def exact_search(queries: torch.Tensor, matrix: torch.Tensor, n: int, chunk_rows: int = 65536):
    """Top ``n`` rows of ``matrix`` by inner product with each query: ``(rows, scores)``, each ``[Q, n]``
    (numpy), best first, ties broken by the lower row. Runs on the tensors' device, ``chunk_rows`` index
    rows at a time; every entry tied with a chunk's n-th best is kept, so ties are resolved exactly."""
    n_queries, total = len(queries), len(matrix)
    n = min(n, total)
    running = None
    for start in range(0, total, chunk_rows):
        scores = queries @ matrix[start:start + chunk_rows].T
        kth = scores.topk(min(n, scores.shape[1]), dim=1).values[:, -1:]
        q_ids, cols = (scores >= kth).nonzero(as_tuple=True)
        running = _merge_best(running, q_ids, scores[q_ids, cols], cols + start, n, n_queries)
    q_ids, sims, rows = running
    return rows.view(n_queries, n).cpu().numpy(), sims.view(n_queries, n).float().cpu().numpy()


def faiss_search(index, queries: np.ndarray, n: int):
    """Top ``n`` by inner product with a faiss index: ``(rows, scores)``, ties in faiss's order."""
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), n)
    return rows.astype(np.int64), scores


def greedy_dedup(rows: np.ndarray, embeddings, n: int, threshold: float) -> tuple[list[int], list[int]]:
    """Walk ``rows`` (best first) and take each whose cosine with every row taken so far is at most
    ``threshold``, until ``n`` are taken; returns (positions taken, positions passed over)."""
    taken, passed, vecs = [], [], []
    for pos, row in enumerate(rows.tolist()):
        if len(taken) == n:
            break
        v = np.asarray(embeddings[row], dtype=np.float32)
        if threshold < 1.0 and vecs and float(np.max(np.stack(vecs) @ v)) > threshold:
            passed.append(pos)
            continue
        taken.append(pos)
        vecs.append(v)
    return taken, passed


# ---------------------------------------------------------------------------------------------- the retriever
class ImageRetriever:
    """Top images of an :class:`ImageIndex` for each image prompt (see the module docstring).

    ``encoder``: the evaluation's vision encoder (its text tower embeds the prompts; it must be the encoder
    that built the index, which is checked); it may be bound later with :meth:`bind` (train.py loads it
    after the data). ``rankings`` memoises the (row, score) list of each prompt; :meth:`prefetch` ranks many
    prompts at once, so that copies of the retriever in DataLoader workers (which drop the encoder and the
    index matrix) serve them.

    Counters (:meth:`stats`, those of every :class:`models.images.source.ImageSource`): the slots :meth:`get`
    served, each ``from_cache`` (the first time this retriever served its image) or ``reused``;
    ``generated`` and ``pipeline_loads`` stay 0.
    """

    def __init__(self, index: ImageIndex, encoder=None, *, retrieve_by: str = "clip",
                 dedup_threshold: float = DEFAULT_DEDUP, faiss_threshold: int = DEFAULT_FAISS_THRESHOLD,
                 device=None, chunk_rows: int = 65536, text_batch: int = 256):
        if retrieve_by not in RETRIEVE_BY:
            raise ImageIndexError(f"unknown --retrieve_by {retrieve_by!r}; choose from {', '.join(RETRIEVE_BY)}")
        if retrieve_by == "caption" and index.captions is None:
            raise ImageIndexError(f"--retrieve_by caption: image index {index.dir} has no captions (build it from a "
                                  "COCO-style captions JSON, or a folder with a captions.jsonl)")
        self.index, self.retrieve_by = index, retrieve_by
        self.dedup_threshold, self.faiss_threshold = dedup_threshold, faiss_threshold
        self.chunk_rows, self.text_batch = chunk_rows, text_batch
        self.device = torch.device(device) if device is not None else None
        self.encoder = None
        self.rankings: dict[str, list[tuple[int, float]]] = {}
        self._matrix = self._faiss = self._bm25 = None
        self.counts = {"slots": 0, "generated": 0, "from_cache": 0, "reused": 0}
        self._seen: set[str] = set()  # keys (image paths) this retriever has served
        self._rows: dict[str, int] = {}  # path -> row of the refs served (a plain ImageRef carries no row)
        if encoder is not None:
            self.bind(encoder)

    def image_root(self) -> ImageRoot:
        """The collection the index was built from: every image path handed out lies under it."""
        return ImageRoot.of(self.index.root, "index")

    def bind(self, encoder) -> "ImageRetriever":
        """Use ``encoder`` for the prompts, after checking that it built the index."""
        self.index.check_encoder(encoder)
        self.encoder = encoder
        if self.device is None:
            self.device = encoder.device
        return self

    def __getstate__(self):
        return {**self.__dict__, "encoder": None, "_matrix": None, "_faiss": None, "_bm25": None}

    def __len__(self) -> int:
        return len(self.index)

    def stats(self) -> dict:
        return {**self.counts, "pipeline_loads": 0}

    def check_k(self, k: int) -> None:
        """k images per prompt list need k >= 1 and at most the index's images (one-line ValueError)."""
        check_k(k)
        self.index.check_k(k)

    # ------------------------------------------------------------------ ranking
    def _use_faiss(self) -> bool:
        if len(self.index) <= self.faiss_threshold:
            return False
        try:
            import faiss  # noqa: F401
        except ImportError:
            return False
        return True

    def _ranked_clip(self, prompts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.encoder is None:
            raise RuntimeError("image retrieval needs the vision encoder: it is not available here (a DataLoader "
                               "worker serves only prompts ranked beforehand with prefetch)")
        queries = torch.cat([self.encoder.encode_texts(prompts[i:i + self.text_batch]).float()
                             for i in range(0, len(prompts), self.text_batch)])
        if self._use_faiss():
            if self._faiss is None:
                import faiss

                self._faiss = faiss.IndexFlatIP(self.index.dim)
                for start in range(0, len(self.index), 1 << 20):
                    self._faiss.add(np.ascontiguousarray(self.index.embeddings[start:start + (1 << 20)]))
            return faiss_search(self._faiss, queries.cpu().numpy(), n)
        if self._matrix is None:
            self._matrix = torch.from_numpy(np.array(self.index.embeddings, dtype=np.float32)).to(self.device)
        return exact_search(queries.to(self.device), self._matrix, n, self.chunk_rows)

    def _ranked_caption(self, prompts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        import bm25s

        if self._bm25 is None:
            docs = [" ".join(c) for c in self.index.captions]
            self._bm25 = bm25s.BM25()
            self._bm25.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
        rows, scores = [], []
        ids = np.arange(len(self.index))
        for tokens in bm25s.tokenize(prompts, stopwords="en", return_ids=False, show_progress=False):
            s = (self._bm25.get_scores(tokens) if tokens else np.zeros(len(self.index))).astype(np.float32)
            order = np.lexsort((ids, -s))[:n]
            rows.append(order)
            scores.append(s[order])
        return np.stack(rows), np.stack(scores)

    def rank(self, prompts: list[str], n: int) -> list[list[tuple[int, float]]]:
        """The ``n`` best (row, score) of each prompt, near-duplicates passed over (module docstring)."""
        self.index.check_k(n)
        ranked = self._ranked_clip if self.retrieve_by == "clip" else self._ranked_caption
        dedup = self.dedup_threshold < 1.0
        pool = min(len(self.index), max(2 * n, n + 8) if dedup else n)
        out: dict[int, list[tuple[int, float]]] = {}
        todo = list(range(len(prompts)))
        while todo:
            rows, scores = ranked([prompts[i] for i in todo], pool)
            again = []
            for i, r, s in zip(todo, rows, scores):
                if not dedup:
                    out[i] = list(zip(r.tolist(), s.tolist()))
                    continue
                taken, passed = greedy_dedup(r, self.index.embeddings, n, self.dedup_threshold)
                if len(taken) < n and pool < len(self.index):
                    again.append(i)
                    continue
                picks = (taken + passed)[:n]  # passed-over images fill what distinct ones cannot
                out[i] = [(int(r[p]), float(s[p])) for p in picks]
            todo, pool = again, min(len(self.index), pool * 4)
        return [out[i] for i in range(len(prompts))]

    def prefetch(self, prompt_lists: list[list[str]]) -> None:
        """Rank every prompt of ``prompt_lists`` deeply enough for its slots (memoised)."""
        need: dict[str, int] = {}
        for prompts in prompt_lists:
            seen: dict[str, int] = {}
            for p in prompts:
                seen[p] = seen.get(p, 0) + 1
            for p, c in seen.items():
                need[p] = max(need.get(p, 0), c)
        todo = [p for p, c in need.items() if len(self.rankings.get(p, ())) < c]
        for depth in sorted({need[p] for p in todo}):
            group = [p for p in todo if need[p] == depth]
            for start in range(0, len(group), 4 * self.text_batch):
                chunk = group[start:start + 4 * self.text_batch]
                for p, ranking in zip(chunk, self.rank(chunk, depth)):
                    self.rankings[p] = ranking

    # ------------------------------------------------------------------ the source interface
    def _open(self, row: int, path=None):
        """Row ``row``'s image, its bytes checked against the index (:meth:`ImageIndex.read_image_bytes`)."""
        import io

        from PIL import Image

        path = self.index.path(row)  # inside the image root, or refused
        data = self.index.read_image_bytes(row)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except Exception as err:  # PIL reports broken files with many exception types
            raise ImageIndexError(f"image index {self.index.dir}: row {row} ({path}) cannot be read "
                                  f"({unreadable_reason(err)}); rebuild the index") from None

    def refs(self, prompt_lists: list[list[str]]) -> list[list[RetrievedRef]]:
        """For each item, one retrieved image slot per prompt (slot ``i`` takes its prompt's next best
        image), without reading any image file."""
        self.prefetch(prompt_lists)
        out = []
        for prompts in prompt_lists:
            seen: dict[str, int] = {}
            item = []
            for p in prompts:
                row, score = self.rankings[p][seen.get(p, 0)]
                seen[p] = seen.get(p, 0) + 1
                path = str(self.index.path(row))
                self._rows[path] = row
                item.append(RetrievedRef(path, p, path, row=row, similarity=score,
                                         sha256=bytes(self.index.digests[row]).hex()))
            out.append(item)
        return out

    def images(self, refs, write: bool = True) -> dict:
        """``{key: (image, "disk", file stat)}`` for the distinct keys of ``refs`` (nothing is generated,
        so nothing is written whatever ``write`` says)."""
        import os

        out = {}
        for ref in refs:
            if ref.key not in out:
                out[ref.key] = (self._open(self._row_of(ref), ref.path), "disk", os.stat(ref.path))
        return out

    def _row_of(self, ref) -> int:
        """The index row a ref's file belongs to (the feature cache asks with plain ``ImageRef``s)."""
        row = getattr(ref, "row", -1)
        if isinstance(row, int) and 0 <= row < len(self.index):
            return row
        if ref.path not in self._rows:
            self._rows.update({str(self.index.root / self.index.paths[r]): r for r in range(len(self.index))})
        if ref.path not in self._rows:
            raise ImageIndexError(f"image index {self.index.dir}: {ref.path} is no row of the index")
        return self._rows[ref.path]

    def write_later(self, key: str, image, then=None):
        """The image's file is the index's own, on disk already: only ``then(its stat)`` runs, in the
        background (never called by the feature cache, since :meth:`images` generates nothing)."""
        import os

        return write_behind.submit(then, os.stat(key)) if then is not None else None

    def flush(self) -> None:
        """Nothing is written behind the work."""

    def get(self, prompt_lists: list[list[str]]) -> list[list[RetrievedImage]]:
        """For each item, one retrieved image per prompt (:meth:`refs`), each file read once."""
        refs = self.refs(prompt_lists)
        flat = [r for item in refs for r in item]
        found = self.images(flat)
        tally(self.counts, (r.key for r in flat), dict.fromkeys(found, "from_cache"), self._seen)
        return [[RetrievedImage(r.path, r.prompt, found[r.key][0], r.key, row=r.row, similarity=r.similarity,
                                sha256=r.sha256)
                 for r in item] for item in refs]


def build_retriever(args, encoder=None, device=None) -> ImageRetriever:
    """The retriever the flags describe (``--image_index``, ``--retrieve_by``, ``--dedup_threshold``,
    ``--faiss_threshold``); raises ImageIndexError on a missing or corrupt index."""
    check_retrieval_args(args)
    return ImageRetriever(ImageIndex(args.image_index), encoder, retrieve_by=args.retrieve_by,
                          dedup_threshold=args.dedup_threshold, faiss_threshold=args.faiss_threshold, device=device)
