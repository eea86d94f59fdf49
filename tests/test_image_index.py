"""models/images/index.py and models/images/retrieval.py on the tiny CLIP: building (resume, shards, bad input)
and ranking (exact top-k against a brute-force numpy reference, faiss, BM25 over captions, near-duplicates).

The COCO captions sample ships without images: stand-ins (coloured shapes) are drawn for its file names.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.images import index as image_index
from models.images.index import ImageIndex, ImageIndexError, list_collection, write_index
from models.images.retrieval import ImageRetriever, exact_search
from tests.paths import TEST_DATA

COCO = TEST_DATA / "coco_captions" / "captions_val2017.json"
REPO = Path(__file__).resolve().parents[1]
QUERIES = ["A plane floating on top of a lake surrounded by mountains.", "a red circle", "two dogs on a couch",
           "blue star on a grey background", "", "A man riding a wave on top of a surfboard."]

pytestmark = pytest.mark.usefixtures("one_thread")


def draw_stand_ins(root: Path, names, size: int = 32) -> Path:
    """One coloured shape per file name (deterministic in the name), saved in the format its suffix names."""
    from models.images.toyworld import COLORS, SHAPES, _rng, render

    for name in names:
        rng = _rng("stand-in", name)
        image = render(list(COLORS)[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))], rng, size)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    return root


def build(*argv, batch_size=16, callback=None, state=None, workers=0):
    return image_index.main(["build", *map(str, argv), "--batch_size", str(batch_size), "--num_workers", str(workers),
                             "--device", "cpu"], batch_callback=callback, state=state)


class OneOfTwo:
    """Process ``rank`` of two, run one after the other (the barriers are no-ops)."""

    def __init__(self, rank: int):
        self.process_index, self.num_processes = rank, 2
        self.is_main_process = self.is_local_main_process = rank == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self):
        pass


def coco_names():
    return [im["file_name"] for im in json.loads(COCO.read_text())["images"]]


@pytest.fixture(scope="module")
def coco_images(tmp_path_factory):
    return draw_stand_ins(tmp_path_factory.mktemp("coco-images"), coco_names())


@pytest.fixture(scope="module")
def coco_index(coco_images, tiny_clip_spec, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("coco-index") / "index"
    build("--images", COCO, "--image_root", coco_images, "--out", out, "--vision_encoder", tiny_clip_spec)
    return out


@pytest.fixture(scope="module")
def encoder(tiny_clip_spec):
    from models.vision import load_vision_encoder

    return load_vision_encoder(tiny_clip_spec)


def reference_top(embeddings: np.ndarray, query: np.ndarray, n: int, dedup: float = 1.0):
    """Brute force: score every row, sort by (score desc, row asc); then the greedy near-duplicate walk."""
    scores = embeddings @ query
    order = np.lexsort((np.arange(len(scores)), -scores))
    if dedup >= 1.0:
        return order[:n].tolist()
    taken, passed = [], []
    for row in order.tolist():
        if len(taken) == n:
            break
        if taken and float(np.max(embeddings[taken] @ embeddings[row])) > dedup:
            passed.append(row)
        else:
            taken.append(row)
    return (taken + passed)[:n]


# ---------------------------------------------------------------------------------------------- building
def test_coco_index_holds_every_image_with_its_captions(coco_index, coco_images, encoder):
    index = ImageIndex(coco_index)
    data = json.loads(COCO.read_text())
    names = sorted(coco_names())
    assert index.count == len(names) == 79 and index.dim == 32
    assert [index.paths[i] for i in range(index.count)] == names
    by_id = {im["id"]: im["file_name"] for im in data["images"]}
    first = names[0]
    expected = [a["caption"].strip() for a in data["annotations"] if by_id[a["image_id"]] == first]
    assert index.captions[0] == expected and len(expected) == 5
    m = index.manifest
    assert m["vision_encoder"] == encoder.spec and m["captioned"] and m["skipped"] == 0
    assert len(m["content_sha256"]) == 64 and len(m["embeddings_sha256"]) == 64
    emb = np.load(coco_index / "embeddings.npy")
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    from PIL import Image

    direct = encoder.encode_images(encoder.pixels([Image.open(coco_images / n).convert("RGB") for n in names[:5]]))[1]
    np.testing.assert_allclose(emb[:5], direct.numpy(), atol=1e-5)


def test_build_killed_and_resumed_gives_a_byte_identical_embedding_file(coco_images, tiny_clip_spec, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    build("--images", coco_images, "--out", whole, "--vision_encoder", tiny_clip_spec, batch_size=8)

    def kill_after_three(batch):
        if batch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build("--images", coco_images, "--out", resumed, "--vision_encoder", tiny_clip_spec, batch_size=8,
              callback=kill_after_three)
    assert not (resumed / "manifest.json").exists() and not (resumed / "embeddings.npy").exists()
    assert len(list((resumed / ".partial").glob("batch-*.npz"))) == 3
    (resumed / ".partial" / ".batch-00000005.npz-x.tmp").write_bytes(b"cut short")  # a kill mid-write
    with pytest.raises(ImageIndexError, match="unfinished build"):
        ImageIndex(resumed)
    done = []
    build("--images", coco_images, "--out", resumed, "--vision_encoder", tiny_clip_spec, batch_size=8,
          callback=done.append, workers=2)  # images decoded in DataLoader workers this time
    assert done == list(range(3, 10))  # only the missing batches were embedded
    assert (resumed / "embeddings.npy").read_bytes() == (whole / "embeddings.npy").read_bytes()
    assert (resumed / "paths.txt").read_bytes() == (whole / "paths.txt").read_bytes()
    assert not (resumed / ".partial").exists()
    a, b = ImageIndex(whole).manifest, ImageIndex(resumed).manifest
    assert a["content_sha256"] == b["content_sha256"] and a["embeddings_sha256"] == b["embeddings_sha256"]


def test_resume_with_other_settings_is_refused(coco_images, tiny_clip_spec, tmp_path, capsys):
    out = tmp_path / "index"

    def kill(batch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build("--images", coco_images, "--out", out, "--vision_encoder", tiny_clip_spec, batch_size=8, callback=kill)
    with pytest.raises(SystemExit) as e:
        build("--images", coco_images, "--out", out, "--vision_encoder", tiny_clip_spec, batch_size=16)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: an unfinished build") and "--batch_size (8)" in err[-1]
    build("--images", coco_images, "--out", out, "--vision_encoder", tiny_clip_spec, "--overwrite", batch_size=16)
    assert ImageIndex(out).manifest["batch_size"] == 16


def test_each_process_embeds_its_share_and_the_main_one_merges(coco_images, tiny_clip_spec, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    build("--images", coco_images, "--out", single, "--vision_encoder", tiny_clip_spec, batch_size=8)
    argv = ("--images", coco_images, "--out", sharded, "--vision_encoder", tiny_clip_spec)
    second, first = [], []
    assert build(*argv, batch_size=8, state=OneOfTwo(1), callback=second.append) is None
    assert second == [1, 3, 5, 7, 9] and not (sharded / "manifest.json").exists()
    assert build(*argv, batch_size=8, state=OneOfTwo(0), callback=first.append)["count"] == 79
    assert first == [0, 2, 4, 6, 8]
    assert (sharded / "embeddings.npy").read_bytes() == (single / "embeddings.npy").read_bytes()
    assert (sharded / "paths.txt").read_bytes() == (single / "paths.txt").read_bytes()


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: concurrent launches can meet on one port
def test_two_processes_shard_and_merge_to_the_same_index(coco_images, tiny_clip_spec, tmp_path):
    """Under torchrun (as under accelerate launch) each process embeds its share; the main one merges."""
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    build("--images", coco_images, "--out", single, "--vision_encoder", tiny_clip_spec, batch_size=8)
    runner = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(runner), "--standalone", "--nproc_per_node", "2", "-m", "models.images.index", "build",
                           "--images", str(coco_images), "--out", str(sharded), "--vision_encoder", tiny_clip_spec,
                           "--batch_size", "8", "--num_workers", "0", "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("indexed 79 images") == 1  # the merge ran once, on the main process
    assert (sharded / "embeddings.npy").read_bytes() == (single / "embeddings.npy").read_bytes()
    assert (sharded / "paths.txt").read_bytes() == (single / "paths.txt").read_bytes()


def test_folder_with_captions_jsonl_and_unreadable_images(tmp_path, tiny_clip_spec, capsys):
    root = draw_stand_ins(tmp_path / "photos", ["a.png", "sub/b.jpg", "sub/deeper/c.webp", "d.JPEG"])
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (root / "sub" / "cut.jpg").write_bytes((root / "sub" / "b.jpg").read_bytes()[:60])
    (root / "captions.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a toy"}) + "\n"
                                         + json.dumps({"image": "sub/b.jpg", "caption": ["one", "two"]}) + "\n")
    manifest = build("--images", root, "--out", tmp_path / "index", "--vision_encoder", tiny_clip_spec)
    index = ImageIndex(tmp_path / "index")
    assert [index.paths[i] for i in range(index.count)] == ["a.png", "d.JPEG", "sub/b.jpg", "sub/deeper/c.webp"]
    assert index.captions == [["a toy"], [], ["one", "two"], []]
    assert manifest["skipped"] == 2
    skipped = (tmp_path / "index" / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == ["broken.png", "sub/cut.jpg"]
    err = capsys.readouterr().err
    assert err.count("skipped 2 unreadable image(s)") == 1 and "skipped.txt" in err  # reported once


def test_a_caption_row_naming_no_image_is_one_line(tmp_path, tiny_clip_spec, capsys):
    root = draw_stand_ins(tmp_path / "photos", ["a.png"])
    (root / "captions.jsonl").write_text(json.dumps({"image": "missing.png", "caption": "x"}) + "\n")
    with pytest.raises(SystemExit) as e:
        build("--images", root, "--out", tmp_path / "index", "--vision_encoder", tiny_clip_spec)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {root / 'captions.jsonl'}:1: 'image' must name an image "
                                               f"under {root} (relative path), got 'missing.png'")
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("case", ["empty", "all_unreadable", "json_without_root", "missing", "existing", "foreign"])
def test_bad_build_input_is_one_line_and_writes_nothing(case, tmp_path, tiny_clip_spec, coco_index, capsys):
    images, out, extra = tmp_path / "images", tmp_path / "index", []
    images.mkdir()
    expect = {"empty": f"error: --images {images}: no JPEG, PNG or WebP images under it",
              "all_unreadable": "error: none of the 2 images of folder",
              "json_without_root": f"error: --images {COCO} is a captions JSON: give the folder of its images "
                                   "with --image_root",
              "missing": f"error: --images {tmp_path / 'nowhere'}: no such folder or file",
              "existing": f"error: --out {coco_index} already holds an image index; pass --overwrite to rebuild it",
              "foreign": f"error: --out {images} holds other files (a.png, ...); choose a new or empty folder"}[case]
    if case == "all_unreadable":
        (images / "x.png").write_bytes(b"nope")
        (images / "y.jpg").write_bytes(b"")
    elif case == "json_without_root":
        images = COCO
    elif case == "missing":
        images = tmp_path / "nowhere"
    elif case == "existing":
        draw_stand_ins(images, ["a.png"])
        out = coco_index
    elif case == "foreign":
        draw_stand_ins(images, ["a.png"])
        out = images
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        build("--images", images, "--out", out, "--vision_encoder", tiny_clip_spec, *extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(expect), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    if case == "existing":
        ImageIndex(coco_index)  # untouched


def corrupt(index_dir: Path, how: str) -> str:
    if how == "no_manifest":
        (index_dir / "manifest.json").unlink()
        return "no manifest.json"
    if how == "bad_manifest":
        (index_dir / "manifest.json").write_text("{not json")
        return "corrupt manifest.json"
    if how == "truncated":
        data = (index_dir / "embeddings.npy").read_bytes()
        (index_dir / "embeddings.npy").write_bytes(data[:len(data) // 2])
        return "cannot read embeddings.npy"
    if how == "flipped":
        data = bytearray((index_dir / "embeddings.npy").read_bytes())
        data[-3] ^= 0xFF
        (index_dir / "embeddings.npy").write_bytes(bytes(data))
        return "embeddings.npy does not match its manifest checksum"
    if how == "paths":
        lines = (index_dir / "paths.txt").read_text().splitlines()
        (index_dir / "paths.txt").write_text("\n".join(lines[:-1]) + "\n")
        return "paths.txt has 78 lines, the manifest says 79 images"
    raise KeyError(how)


@pytest.mark.parametrize("how", ["no_manifest", "bad_manifest", "truncated", "flipped", "paths"])
def test_missing_or_corrupt_index_is_refused_on_opening(how, coco_index, tmp_path):
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(coco_index, copy)
    expect = corrupt(copy, how)
    with pytest.raises(ImageIndexError) as e:
        ImageIndex(copy)
    assert str(e.value).startswith(f"image index {copy}: {expect}") and "\n" not in str(e.value)


def test_an_index_refuses_another_encoder_naming_its_own(coco_index, tmp_path):
    from models.tiny_models import build_tiny_clip
    from models.vision import load_vision_encoder

    other = load_vision_encoder(build_tiny_clip(tmp_path / "other-clip", seed=1))
    index = ImageIndex(coco_index)
    with pytest.raises(ImageIndexError) as e:
        ImageRetriever(index, other)
    assert str(e.value) == (f"image index {coco_index} was built with vision encoder {index.vision_encoder!r}, "
                            f"not {other.spec!r}: evaluate with that encoder or rebuild the index")


# ---------------------------------------------------------------------------------------------- ranking
@pytest.mark.parametrize("chunk_rows", [65536, 7])
def test_clip_top_k_equals_a_brute_force_reference_order_included(coco_index, encoder, chunk_rows):
    index = ImageIndex(coco_index)
    emb = np.load(coco_index / "embeddings.npy")
    retriever = ImageRetriever(index, encoder, dedup_threshold=1.0, chunk_rows=chunk_rows)
    queries = encoder.encode_texts(QUERIES).numpy()
    for n in (1, 6, 79):
        got = retriever.rank(QUERIES, n)
        for q, ranking in zip(queries, got):
            assert [row for row, _ in ranking] == reference_top(emb, q, n)
            np.testing.assert_allclose([s for _, s in ranking], (emb @ q)[[row for row, _ in ranking]], atol=1e-6)


def test_near_duplicates_are_passed_over_like_the_reference(coco_index, encoder):
    index = ImageIndex(coco_index)
    emb = np.load(coco_index / "embeddings.npy")
    queries = encoder.encode_texts(QUERIES).numpy()
    for threshold in (0.95, 0.8):
        got = ImageRetriever(index, encoder, dedup_threshold=threshold, chunk_rows=16).rank(QUERIES, 6)
        for q, ranking in zip(queries, got):
            assert [row for row, _ in ranking] == reference_top(emb, q, 6, threshold)
    plain = ImageRetriever(index, encoder, dedup_threshold=1.0).rank(QUERIES, 6)
    assert got != plain  # the random tiny CLIP finds its stand-ins alike: dedup changes the picks
    assert all(len({row for row, _ in r}) == 6 for r in got)


def test_exact_search_breaks_ties_by_row_across_chunks():
    matrix = torch.tensor([[0.0, 1.0]] * 3 + [[1.0, 0.0]] * 5 + [[0.6, 0.8]])
    rows, scores = exact_search(torch.tensor([[1.0, 0.0]]), matrix, 4, chunk_rows=2)
    assert rows.tolist() == [[3, 4, 5, 6]] and scores.tolist() == [[1.0] * 4]
    rows, _ = exact_search(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), matrix, 5, chunk_rows=4)
    assert rows.tolist() == [[0, 1, 2, 8, 3], [3, 4, 5, 6, 7]]


def test_faiss_path_returns_the_same_set(coco_index, encoder):
    pytest.importorskip("faiss")
    index = ImageIndex(coco_index)
    exact = ImageRetriever(index, encoder, dedup_threshold=1.0).rank(QUERIES, 6)
    fast = ImageRetriever(index, encoder, dedup_threshold=1.0, faiss_threshold=0)
    assert fast._use_faiss()
    for a, b in zip(exact, fast.rank(QUERIES, 6)):
        assert {row for row, _ in a} == {row for row, _ in b}
        np.testing.assert_allclose(sorted(s for _, s in a), sorted(s for _, s in b), atol=1e-5)


def test_caption_ranking_is_bm25_over_each_images_captions(coco_index, encoder):
    import bm25s

    index = ImageIndex(coco_index)
    retriever = ImageRetriever(index, encoder, retrieve_by="caption", dedup_threshold=1.0)
    queries = [index.captions[10][0], "surfboard wave", "zzzz qqqq"]
    got = retriever.rank(queries, 5)
    bm25 = bm25s.BM25()
    bm25.index(bm25s.tokenize([" ".join(c) for c in index.captions], stopwords="en", show_progress=False),
               show_progress=False)
    for query, ranking in zip(queries, got):
        tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        scores = bm25.get_scores(tokens)
        assert [row for row, _ in ranking] == np.lexsort((np.arange(index.count), -scores))[:5].tolist()
    assert got[0][0][0] == 10  # an image's own caption finds it first
    assert [row for row, _ in got[2]] == [0, 1, 2, 3, 4] and {s for _, s in got[2]} == {0.0}  # no match: row order


def test_get_serves_k_slots_like_the_generator(coco_index, coco_images, encoder):
    retriever = ImageRetriever(ImageIndex(coco_index), encoder, dedup_threshold=1.0)
    items = retriever.get([["a red circle"] * 3, ["two dogs on a couch", "a red circle"]])
    best = retriever.rank(["a red circle", "two dogs on a couch"], 3)
    assert [im.row for im in items[0]] == [row for row, _ in best[0]]  # a repeated prompt: its k best images
    assert [im.row for im in items[1]] == [best[1][0][0], best[0][0][0]]
    im = items[0][0]
    assert im.path == str(coco_images / ImageIndex(coco_index).paths[im.row]) and im.prompt == "a red circle"
    import hashlib
    assert im.image.size == (32, 32) and im.provenance == {
        "row": im.row, "similarity": round(best[0][0][1], 6),
        "sha256": hashlib.sha256(Path(im.path).read_bytes()).hexdigest()}  # the bytes of the file it names
    # three distinct images: the dogs' best is one of the red circle's three, and item 1 repeats the red
    # circle's best; each image counts once from the disk, its other slots as reused
    assert len({im.row for item in items for im in item}) == 3 and items[1][0].row in [im.row for im in items[0]]
    assert retriever.stats() == {"slots": 5, "generated": 0, "from_cache": 3, "reused": 2, "pipeline_loads": 0}
    retriever.get([["two dogs on a couch"]])  # served before: reused
    assert retriever.stats() == {"slots": 6, "generated": 0, "from_cache": 3, "reused": 3, "pipeline_loads": 0}
    with pytest.raises(ImageIndexError, match="--k 80 is larger than the image index"):
        retriever.get([["x"] * 80])


def test_a_pickled_retriever_serves_prefetched_prompts_only(coco_index, encoder):
    import pickle

    retriever = ImageRetriever(ImageIndex(coco_index), encoder)
    retriever.prefetch([["a red circle"]])
    copy = pickle.loads(pickle.dumps(retriever))
    assert copy.encoder is None and copy.index._embeddings is None
    assert copy.get([["a red circle"]])[0][0].row == retriever.get([["a red circle"]])[0][0].row
    with pytest.raises(RuntimeError, match="prefetch"):
        copy.get([["something else"]])


def test_write_index_then_open(tmp_path, encoder):
    from models.images.index import encoder_probe

    emb = np.eye(4, dtype=np.float32)
    meta = {"vision_encoder": encoder.spec, "probe": encoder_probe(encoder), "image_root": str(tmp_path)}
    write_index(tmp_path / "idx", [emb[:2], emb[2:]], 4, 4, ["a", "b", "c", "d"], None, meta,
                digests=np.zeros((4, 32), np.uint8))
    index = ImageIndex(tmp_path / "idx")
    assert index.count == 4 and index.captions is None and np.array_equal(index.embeddings, emb)
    with pytest.raises(ImageIndexError, match="has no captions"):
        ImageRetriever(index, retrieve_by="caption")


def test_list_collection_reads_coco_json_in_file_name_order(coco_images):
    c = list_collection(COCO, coco_images)
    assert c.paths == sorted(coco_names()) and c.root == coco_images and len(c.captions) == 79
    assert sum(len(x) for x in c.captions) == 395
