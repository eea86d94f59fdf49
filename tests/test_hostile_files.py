"""Hostile files, round two: every file a run reads may have been made or edited by someone else.

Tables of cases for the image index (edited rows, paths leaving the collection, a COCO JSON naming files
outside ``--image_root``), a resumed index build (a replaced image, a truncated batch), the vision-feature
cache (wrong shape, NaN, truncated, a symlink to ``/dev/zero``), a full disk, and the harness given a masked
LM. Each bad case is one line (or one warning where the file is only a cache), and nothing is left behind.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import write_behind
from models.images import index as image_index
from models.images.index import ImageIndex, ImageIndexError
from models.images.retrieval import ImageRetriever
from tests.paths import REPO
from tests.test_image_index import draw_stand_ins

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = [f"img{i:02d}.png" for i in range(10)]


def build(*argv, batch_size=4, callback=None):
    return image_index.main(["build", *map(str, argv), "--batch_size", str(batch_size), "--num_workers", "0",
                             "--device", "cpu"], batch_callback=callback)


def stderr_lines(capsys) -> list[str]:
    """What a command printed on stderr, less the progress bar (tqdm's ``index: ...`` lines)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("index:")]


def error_of(capsys) -> str:
    """The one line a refused command printed (stderr holds nothing else)."""
    err = stderr_lines(capsys)
    assert len(err) == 1, err
    return err[0]


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return draw_stand_ins(tmp_path_factory.mktemp("hostile-photos"), NAMES)


@pytest.fixture(scope="module")
def built(photos, tiny_clip_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile-index") / "index"
    build("--images", photos, "--out", out, "--vision_encoder", tiny_clip_spec)
    return out


@pytest.fixture(scope="module")
def encoder(tiny_clip_spec):
    from models.vision import load_vision_encoder

    return load_vision_encoder(tiny_clip_spec)


def embed(encoder, path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        _, e = encoder.encode_images(encoder.pixels([image.convert("RGB")]))
    return torch.nn.functional.normalize(e.float(), dim=-1)[0].numpy()


# ---------------------------------------------------------------------------------------------- an edited index
def _edit_lines(index: Path, name: str, edit) -> None:
    lines = (index / name).read_text().splitlines()
    (index / name).write_text("".join(x + "\n" for x in edit(lines)))


EDITS = {  # how the index folder is edited -> what the one line says
    "absolute": (lambda d, outside: _edit_lines(d, "paths.txt", lambda ls: [str(outside)] + ls[1:]),
                 "paths.txt line 1 ('{outside}') is absolute"),
    "dotdot": (lambda d, outside: _edit_lines(d, "paths.txt", lambda ls: ["../secret.png"] + ls[1:]),
               "paths.txt line 1 ('../secret.png') holds '..'"),
    "nested_dotdot": (lambda d, outside: _edit_lines(d, "paths.txt", lambda ls: ls[:2] + ["a/../../x.png"] + ls[3:]),
                      "paths.txt line 3 ('a/../../x.png') holds '..'"),
    "swapped": (lambda d, outside: _edit_lines(d, "paths.txt", lambda ls: [ls[1], ls[0]] + ls[2:]),
                "paths.txt does not match the manifest's content hash"),
    "renamed": (lambda d, outside: _edit_lines(d, "paths.txt", lambda ls: ls[:-1] + ["img00.png"]),
                "paths.txt does not match the manifest's content hash"),
    "digests": (lambda d, outside: np.save(d / "digests.npy", np.zeros((10, 32), np.uint8)),
                "paths.txt does not match the manifest's content hash"),
    "digests_shape": (lambda d, outside: np.save(d / "digests.npy", np.zeros((10, 16), np.uint8)),
                      "digests.npy holds uint8 (10, 16), expected uint8 (10, 32)"),
    "digests_missing": (lambda d, outside: (d / "digests.npy").unlink(), "cannot read digests.npy"),
    "paths_device": (lambda d, outside: ((d / "paths.txt").unlink(), (d / "paths.txt").symlink_to("/dev/zero")),
                     "cannot read paths.txt (not a regular file)"),
    "manifest_huge": (lambda d, outside: (d / "manifest.json").write_text(" " * (1 << 20) + "{}"),
                      "corrupt manifest.json (larger than 1 MiB)"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_an_edited_index_is_refused_on_opening_in_one_line(case, built, tmp_path):
    copy, outside = tmp_path / "index", tmp_path / "private.png"
    shutil.copytree(built, copy)
    shutil.copy(Path(ImageIndex(built).path(0)), outside)
    edit, expect = EDITS[case]
    edit(copy, outside)
    with pytest.raises(ImageIndexError) as e:
        ImageIndex(copy)
    assert str(e.value).startswith(f"image index {copy}: {expect.format(outside=outside)}"), str(e.value)
    assert "\n" not in str(e.value)


def test_edited_captions_are_refused(tmp_path, tiny_clip_spec):
    photos = draw_stand_ins(tmp_path / "photos", NAMES[:3])
    (photos / "captions.jsonl").write_text("".join(json.dumps({"image": n, "caption": f"photo {n}"}) + "\n"
                                                   for n in NAMES[:3]))
    build("--images", photos, "--out", tmp_path / "index", "--vision_encoder", tiny_clip_spec)
    assert ImageIndex(tmp_path / "index").captions[0] == ["photo img00.png"]
    _edit_lines(tmp_path / "index", "captions.jsonl", lambda ls: [ls[1], ls[0], ls[2]])
    with pytest.raises(ImageIndexError, match="captions.jsonl does not match its manifest checksum"):
        ImageIndex(tmp_path / "index")


def test_the_eval_refuses_an_edited_index_with_exit_2_before_any_model_loads(built, tmp_path, capsys, lm_dirs,
                                                                             tiny_clip_spec):
    from eval_scripts.cli import run_main
    from eval_scripts.imagenetVC import main
    from tests.paths import EVAL_DATA

    copy = tmp_path / "index"
    shutil.copytree(built, copy)
    _edit_lines(copy, "paths.txt", lambda ls: ["../../etc/passwd"] + ls[1:])
    argv = ["--model_name", lm_dirs["llama"], "--subsets", "color", "--data_dir", str(EVAL_DATA / "imagenetvc"),
            "--limit", "1", "--output_dir", str(tmp_path / "out"), "--run_name", "r", "--device", "cpu",
            "--vision_encoder", tiny_clip_spec, "--k", "2", "--image_source", "retrieve", "--image_index", str(copy)]
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    assert e.value.code == 2
    line = error_of(capsys)
    assert line.startswith(f"error: image index {copy}: paths.txt line 1 ('../../etc/passwd') holds '..'"), line
    assert not (tmp_path / "out" / "r").exists()


def test_a_symlink_leaving_the_root_is_never_read_when_serving(photos, tiny_clip_spec, encoder, tmp_path):
    """A file of the collection replaced by a link to a private file after the build: refused, not served."""
    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    build("--images", root, "--out", tmp_path / "index", "--vision_encoder", tiny_clip_spec)
    private = tmp_path / "private.png"
    shutil.copy(root / "img03.png", private)
    (root / "img03.png").unlink()
    (root / "img03.png").symlink_to(private)  # the same bytes even: the path still leaves the root
    index = ImageIndex(tmp_path / "index")
    with pytest.raises(ImageIndexError, match=r"row 3 \(img03.png\) resolves outside the image root .* refusing"):
        index.path(3)
    retriever = ImageRetriever(index, encoder, dedup_threshold=1.0)
    rows = [row for row, _ in retriever.rank(["a red circle"], 10)[0]]
    with pytest.raises(ImageIndexError, match="resolves outside the image root"):
        retriever.get([["a red circle"] * 10])  # every row ranked, row 3 among them
    assert 3 in rows


def test_a_replaced_image_is_refused_when_retrieved(photos, tiny_clip_spec, encoder, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    build("--images", root, "--out", tmp_path / "index", "--vision_encoder", tiny_clip_spec)
    shutil.copy(root / "img05.png", root / "img04.png")  # other bytes under the same name
    retriever = ImageRetriever(ImageIndex(tmp_path / "index"), encoder, dedup_threshold=1.0)
    with pytest.raises(ImageIndexError, match=r"row 4 .* is not the image the index was built from"):
        retriever.get([["a red circle"] * 10])


# ---------------------------------------------------------------------------------------------- build-time paths
def _coco(tmp_path: Path, file_name: str) -> Path:
    data = {"images": [{"id": 1, "file_name": "img00.png"}, {"id": 2, "file_name": file_name}],
            "annotations": [{"image_id": 1, "caption": "a shape"}, {"image_id": 2, "caption": "a secret"}]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    return tmp_path / "captions.json"


BUILD_CASES = {  # case -> (the collection, what the line says)
    "coco_dotdot": (lambda t, photos: ("--images", _coco(t, "../private.png"), "--image_root", photos),
                    "image 2 has file_name '../private.png', which holds '..'; file names must be relative paths"),
    "coco_absolute": (lambda t, photos: ("--images", _coco(t, str(t / "private.png")), "--image_root", photos),
                      "image 2 has file_name '{t}/private.png', which is absolute"),
    "coco_backslash": (lambda t, photos: ("--images", _coco(t, "..\\private.png"), "--image_root", photos),
                       "image 2 has file_name '..\\\\private.png', which holds '..'"),
    "coco_symlink": (lambda t, photos: ("--images", _coco(t, "link.png"), "--image_root", photos),
                     "link.png resolves outside the collection root"),
    "folder_symlink": (lambda t, photos: ("--images", photos), "link.png resolves outside the collection root"),
}


@pytest.mark.parametrize("case", sorted(BUILD_CASES))
def test_a_collection_naming_files_outside_its_root_is_refused_at_build(case, photos, tiny_clip_spec, tmp_path,
                                                                        capsys):
    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    draw_stand_ins(tmp_path, ["private.png"])
    if case.endswith("symlink"):
        (root / "link.png").symlink_to(tmp_path / "private.png")
    make, expect = BUILD_CASES[case]
    argv = make(tmp_path, root)
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as e:
        build(*argv, "--out", tmp_path / "index", "--vision_encoder", tiny_clip_spec)
    assert e.value.code == 2
    line = error_of(capsys)
    assert line.startswith("error: --images ") and expect.format(t=tmp_path) in line, line
    assert tree(tmp_path) == before  # nothing written


# ---------------------------------------------------------------------------------------------- resumed builds
def _killed_build(root: Path, out: Path, clip: str, after: int) -> None:
    def kill(batch):
        if batch == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build("--images", root, "--out", out, "--vision_encoder", clip, callback=kill)


RESUME_CASES = {  # what happens between the kill and the resume -> the batches the resume embeds again
    "replaced_image": ({0, 2}, "made from another version of img01.png (the image changed since)"),
    "truncated_batch": ({1, 2}, "cannot be read (BadZipFile"),
    "garbage_batch": ({1, 2}, "cannot be read"),
    "nan_batch": ({1, 2}, "malformed"),
    "redrawn_image": ({1, 2}, "made from another version of img05.png"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_a_resumed_build_checks_its_finished_batches(case, photos, tiny_clip_spec, encoder, tmp_path, capsys):
    root, out = tmp_path / "photos", tmp_path / "index"
    shutil.copytree(photos, root)
    _killed_build(root, out, tiny_clip_spec, after=1)  # batches 0, 1 of 3 (4, 4, 2 images) done; 2 missing
    partial = out / ".partial"
    assert sorted(p.name for p in partial.glob("batch-*.npz")) == [f"batch-0000000{b}.npz" for b in range(2)]
    redone, warning_about = RESUME_CASES[case]
    if case == "replaced_image":
        draw_stand_ins(tmp_path / "other", ["img01.png"], size=40)
        shutil.copy(tmp_path / "other" / "img01.png", root / "img01.png")
    elif case == "truncated_batch":
        data = (partial / "batch-00000001.npz").read_bytes()
        (partial / "batch-00000001.npz").write_bytes(data[:len(data) // 2])
    elif case == "garbage_batch":
        (partial / "batch-00000001.npz").write_bytes(b"PK\x03\x04 not a zip at all")
    elif case == "nan_batch":
        with np.load(partial / "batch-00000001.npz") as z:
            arrays = {k: z[k] for k in z.files}
        arrays["embeddings"][1, 0] = np.nan
        np.savez(partial / "batch-00000001.npz", **arrays)
    elif case == "redrawn_image":
        (root / "img05.png").unlink()  # batch 1 holds img04 to img07: one of its images is drawn anew
        draw_stand_ins(root, ["img05.png"], size=40)
    capsys.readouterr()
    done = []
    build("--images", root, "--out", out, "--vision_encoder", tiny_clip_spec, callback=done.append)
    assert set(done) == redone
    err = stderr_lines(capsys)
    bad = sorted(redone - {2})[0]
    assert err == [f"warning: index build: {partial / f'batch-{bad:08d}.npz'} {warning_about}"
                   + err[0].split(warning_about, 1)[1]], err
    assert err[0].endswith("; dropping it and embedding its images again")
    # the resumed index is the index a fresh build of the collection as it is now gives
    fresh = tmp_path / "fresh"
    build("--images", root, "--out", fresh, "--vision_encoder", tiny_clip_spec)
    assert (out / "embeddings.npy").read_bytes() == (fresh / "embeddings.npy").read_bytes()
    assert ImageIndex(out).manifest["content_sha256"] == ImageIndex(fresh).manifest["content_sha256"]
    if case in ("replaced_image", "redrawn_image"):
        row = NAMES.index("img01.png" if case == "replaced_image" else "img05.png")
        got = np.load(out / "embeddings.npy")[row]
        np.testing.assert_allclose(got, embed(encoder, root / NAMES[row]), atol=1e-5)
        assert not np.allclose(got, embed(encoder, photos / NAMES[row]), atol=1e-3)  # not the old image's
        digest = np.load(out / "digests.npy")[row].tobytes()
        assert digest == hashlib.sha256((root / NAMES[row]).read_bytes()).digest()


# ---------------------------------------------------------------------------------------------- a full disk
def _fdopen_failing_for(monkeypatch, name_part: str):
    """``os.fdopen`` whose files raise ENOSPC on write when the file's name contains ``name_part`` (the
    temporary file write_atomic writes), as a full disk does."""
    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            return Full(f)
        return f

    monkeypatch.setattr(write_behind.os, "fdopen", fdopen)


@pytest.mark.parametrize("where", ["batch", "plan", "paths", "manifest", "embeddings"])
def test_a_full_disk_during_a_build_is_one_line_naming_the_file_and_leaves_no_temp_file(
        where, photos, tiny_clip_spec, tmp_path, capsys, monkeypatch):
    out = tmp_path / "index"
    if where == "embeddings":  # the memory-mapped embeddings file: the disk fills while it is created
        real = np.lib.format.open_memmap

        def full(path, *args, **kwargs):
            Path(path).write_bytes(b"\x93NUMPY")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(np.lib.format, "open_memmap", full)
        target = out / ".embeddings.npy.tmp"
    else:
        part = {"batch": ".batch-00", "plan": ".plan-", "paths": ".paths-", "manifest": ".manifest-"}[where]
        _fdopen_failing_for(monkeypatch, part)
        target = {"batch": out / ".partial" / "batch-00000000.npz", "plan": out / ".partial" / "plan.json",
                  "paths": out / "paths.txt", "manifest": out / "manifest.json"}[where]
    with pytest.raises(SystemExit) as e:
        build("--images", photos, "--out", out, "--vision_encoder", tiny_clip_spec)
    assert e.value.code == 2
    assert error_of(capsys) == f"error: {target}: No space left on device"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "manifest.json").exists()
    monkeypatch.undo()
    if where in ("paths", "manifest", "embeddings"):  # what was embedded is kept: the rerun embeds nothing
        done = []
        build("--images", photos, "--out", out, "--vision_encoder", tiny_clip_spec, callback=done.append)
        assert done == [] and ImageIndex(out).count == len(NAMES)


def test_write_atomic_names_the_file_of_any_os_error(tmp_path, monkeypatch):
    _fdopen_failing_for(monkeypatch, ".target-")
    with pytest.raises(OSError) as e:
        write_behind.write_atomic(tmp_path / "target.bin", b"data")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "target.bin")
    assert write_behind.os_error_line(e.value) == f"{tmp_path / 'target.bin'}: No space left on device"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- the feature cache
class Slot:
    """An image slot given with its image (as the eval core gives generated ones)."""

    def __init__(self, key, prompt, path, image):
        self.key, self.prompt, self.path, self.image = key, prompt, path, image


KEY = "ab" * 32


def _rewrite(store, fresh, **change):
    """Store a well-formed entry (valid checksum, this key and encoder) holding other tensors."""
    patches, embed, png = fresh["patches"].clone(), fresh["embed"].clone(), fresh["png"]
    if "patches" in change:
        patches = change["patches"](patches)
    if "embed" in change:
        embed = change["embed"](embed)
    store.write(KEY, patches, embed, os.stat(png))


def _replace(path: str, make) -> None:
    os.unlink(path)
    make(path)


def _nan_at(t, v):
    t = t.clone()
    t.view(-1)[3] = v
    return t


ENTRY_CASES = {  # how the image's entry is spoilt -> what its one warning says
    "more_patches": (lambda s, f: _rewrite(s, f, patches=lambda p: torch.cat([p, p[:1]])),
                     "patches has shape ({n1}, {w}), this encoder's are ({n}, {w})"),
    "narrower_patches": (lambda s, f: _rewrite(s, f, patches=lambda p: p[:, :-1].contiguous()),
                         "patches has shape ({n}, {w_1}), this encoder's are ({n}, {w})"),
    "embed_dim": (lambda s, f: _rewrite(s, f, embed=lambda e: torch.cat([e, e[:1]])),
                  "embed has shape ({d1},), this encoder's are ({d},)"),
    "nan_patches": (lambda s, f: _rewrite(s, f, patches=lambda p: _nan_at(p, float("nan"))),
                    "patches holds NaN or infinite values"),
    "inf_embed": (lambda s, f: _rewrite(s, f, embed=lambda e: _nan_at(e, float("inf"))),
                  "embed holds NaN or infinite values"),
    "truncated": (lambda s, f: Path(s.path(KEY)).write_bytes(Path(s.path(KEY)).read_bytes()[:40]),
                  "truncated header"),
    "dev_zero": (lambda s, f: _replace(s.path(KEY), lambda p: os.symlink("/dev/zero", p)),
                 "a symlink leaving the feature cache (to /dev/zero)"),
    "fifo": (lambda s, f: _replace(s.path(KEY), os.mkfifo), "not a regular file"),
    "huge": (lambda s, f: os.truncate(s.path(KEY), 1 << 30),
             "1073741824 bytes, more than an entry of this encoder can hold"),
}


@pytest.fixture(scope="module")
def fresh_features(encoder, tiny_clip_spec, tmp_path_factory):
    """An image, its file, and what the tower makes of it (no store involved)."""
    from PIL import Image

    from models.images.features import VisionFeatures

    root = tmp_path_factory.mktemp("hostile-features")
    image = Image.new("RGB", (64, 64), (30, 160, 40))
    image.save(root / "green.png")
    patches, cos = VisionFeatures(encoder, None, None)([Slot(KEY, "a green square", str(root / "green.png"), image)])
    _, embed = encoder.encode_images(encoder.pixels([image]))
    return {"image": image, "png": str(root / "green.png"), "patches": patches[0], "cos": cos, "embed": embed[0]}


@pytest.mark.parametrize("case", sorted(ENTRY_CASES))
def test_a_bad_feature_entry_is_named_once_deleted_and_recomputed(case, encoder, tiny_clip_spec, fresh_features,
                                                                  tmp_path, caplog):
    from models.images.features import FeatureStore, VisionFeatures, encoder_identity, feature_shapes

    fresh = fresh_features
    store = FeatureStore(tmp_path / "features", encoder_identity(tiny_clip_spec, "fp32"))
    slot = [Slot(KEY, "a green square", fresh["png"], fresh["image"])]
    VisionFeatures(encoder, None, store)(slot)
    write_behind.flush()
    assert store.read(KEY, fresh["png"], feature_shapes(encoder)) is not None  # a valid entry to spoil
    spoil, expect = ENTRY_CASES[case]
    spoil(store, fresh)
    write_behind.flush()
    n, w = fresh["patches"].shape
    d = fresh["embed"].shape[0]
    expect = expect.format(n=n, n1=n + 1, w=w, w_1=w - 1, d=d, d1=d + 1)
    caplog.clear()
    feats = VisionFeatures(encoder, None, store)
    with caplog.at_level("WARNING", logger="models.images.features"):
        patches, cos = feats(slot)
    warnings = [r.getMessage() for r in caplog.records if r.name == "models.images.features"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"feature cache: cannot use {store.path(KEY)} (") and expect in warnings[0], warnings
    assert "deleted it, recomputing it" in warnings[0]
    assert feats.counts["features_computed"] == 1 and feats.counts["features_read"] == 0
    assert torch.equal(patches[0], fresh["patches"]) and cos == fresh["cos"]
    write_behind.flush()  # rewritten as a valid entry, read by the next run
    assert Path(store.path(KEY)).is_file() and not Path(store.path(KEY)).is_symlink()
    again = VisionFeatures(encoder, None, store)
    assert torch.equal(again(slot)[0][0], fresh["patches"]) and again.counts["features_read"] == 1


def test_a_wrong_dim_text_embedding_is_recomputed(encoder, tiny_clip_spec, fresh_features, tmp_path, caplog):
    from models.images.features import FeatureStore, VisionFeatures, encoder_identity

    store = FeatureStore(tmp_path / "features", encoder_identity(tiny_clip_spec, "fp32"))
    store.write_text("a green square", torch.ones(7))
    write_behind.flush()
    slot = [Slot(KEY, "a green square", fresh_features["png"], fresh_features["image"])]
    with caplog.at_level("WARNING", logger="models.images.features"):
        _, cos = VisionFeatures(encoder, None, store)(slot)
    assert cos == fresh_features["cos"]
    assert "embed has shape (7,)" in caplog.text and store.text_path("a green square")[0] in caplog.text


@pytest.mark.parametrize("kind", ["features", "png"])
def test_a_full_disk_in_a_cache_write_is_one_warning_naming_the_file_and_leaves_no_temp_file(
        kind, encoder, tiny_clip_spec, fresh_features, tmp_path, caplog, monkeypatch):
    """A cache entry that cannot be written is computed again next time: the run goes on, with one warning
    for all the files the full disk refused, naming the first."""
    from models.images.cache import ImageCache
    from models.images.features import FeatureStore, VisionFeatures, encoder_identity

    monkeypatch.setattr(write_behind, "_WRITER", write_behind.Writer(threads=1))  # nothing reported yet
    with caplog.at_level("WARNING", logger="models.write_behind"):
        if kind == "features":
            store = FeatureStore(tmp_path / "cache", encoder_identity(tiny_clip_spec, "fp32"))
            write_behind.flush()
            _fdopen_failing_for(monkeypatch, "/.")  # every temporary file write_atomic makes
            slots = [Slot(KEY, "a green square", fresh_features["png"], fresh_features["image"]),
                     Slot("cd" * 32, "a green square", fresh_features["png"], fresh_features["image"])]
            patches, cos = VisionFeatures(encoder, None, store)(slots)
            torch.testing.assert_close(patches[0], fresh_features["patches"], atol=1e-5, rtol=1e-5)
            assert cos[0] == pytest.approx(fresh_features["cos"][0], abs=1e-5)
            first = store.path(KEY)
        else:
            cache = ImageCache(tmp_path / "cache")
            write_behind.flush()
            _fdopen_failing_for(monkeypatch, "/.")
            for key in (KEY, "cd" * 32):
                write_behind.submit(cache.write, key, fresh_features["image"])
            first = cache.path_str(KEY)
        write_behind.flush()
    warnings = [r.getMessage() for r in caplog.records if r.name == "models.write_behind"]
    assert warnings == [f"cache write failed ({first}: No space left on device); the entry will be computed again "
                        "next time"], warnings
    assert write_behind.writer().failed >= 2
    left = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert left == [] and not Path(first).exists()


def _png_claiming(path: str, width: int, height: int) -> None:
    """A small PNG whose header claims ``width`` x ``height`` (a decompression bomb as far as the header goes)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    Path(path).write_bytes(bytes(data))


PNG_CASES = {  # how the cached PNG is spoilt -> what its one warning says
    "fifo": (lambda p: (os.unlink(p), os.mkfifo(p)), "(not a regular file)"),
    "dev_zero": (lambda p: (os.unlink(p), os.symlink("/dev/zero", p)), "(not a regular file)"),
    "huge": (lambda p: os.truncate(p, 1 << 30), "(1073741824 bytes, too large)"),
    "bomb_header": (lambda p: _png_claiming(p, 9000, 9000), "is RGB 9000x9000, not RGB 64x64"),
    "huge_bomb_header": (lambda p: _png_claiming(p, 20000, 20000), "could be decompression bomb"),
}


@pytest.mark.parametrize("case", sorted(PNG_CASES))
def test_a_cached_png_that_is_no_png_of_its_key_is_never_read_whole(case, tmp_path, caplog):
    from PIL import Image

    from models.images.cache import ImageCache

    cache = ImageCache(tmp_path / "cache")
    cache.put(KEY, Image.new("RGB", (64, 64), (9, 9, 9)))
    assert cache.get(KEY, 64) is not None
    spoil, expect = PNG_CASES[case]
    spoil(cache.path_str(KEY))
    with caplog.at_level("WARNING", logger="models.images.cache"):
        assert cache.read(KEY, 64) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "models.images.cache"]
    assert len(warnings) == 1 and cache.path_str(KEY) in warnings[0] and expect in warnings[0], warnings


# ---------------------------------------------------------------------------------------------- Visual Genome
VG_CASES = {  # how entry 0 of image_data.json is edited -> the path the one line names
    "url_dotdot": (lambda e: {**e, "url": "https://cs.stanford.edu/../secret.jpg"}, "'../secret.jpg'"),
    "id_dotdot": (lambda e: {k: v for k, v in {**e, "image_id": "../../secret"}.items() if k != "url"},
                  "'VG_100K/../../secret.jpg'"),
    "id_absolute": (lambda e: {k: v for k, v in {**e, "image_id": "/etc/secret"}.items() if k != "url"},
                    "'/etc/secret.jpg'"),
}


@pytest.mark.parametrize("case", sorted(VG_CASES))
def test_a_visual_genome_file_naming_images_outside_its_folder_is_refused(case, tmp_path):
    from data.captions import VGRegions
    from tests.test_captions import make_vg_dir

    vg = make_vg_dir(tmp_path / "vg")
    draw_stand_ins(tmp_path, ["secret.jpg"])
    entries = json.loads((vg / "image_data.json").read_text())
    edit, named = VG_CASES[case]
    entries[0] = edit(entries[0])
    (vg / "image_data.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError) as e:
        VGRegions(vg)
    assert str(e.value) == (f"{vg / 'image_data.json'}: entry 0: its image_id or url names {named}, a path outside "
                            f"{vg}; image files must lie in its VG_100K folders")


# ---------------------------------------------------------------------------------------------- the harness
HARNESS_REFUSAL = ("python -m eval_scripts.harness (late_fusion) needs a causal LM (it scores next tokens or "
                   "generates), but {model!r} is a masked LM; masked LMs run object_commonsense.py and imagenetVC.py")


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_the_harness_refuses_a_masked_lm_in_one_line_before_any_model_loads(arch, mlm_dirs, tmp_path):
    """Through lm-eval's own entry point (``simple_evaluate`` with the local task YAMLs) and the command line."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from eval_scripts.cli import EvalError
    from eval_scripts.harness import LateFusionHarnessLM  # noqa: F401  (registers late_fusion)

    tasks = REPO / "tests" / "harness_tasks"
    expect = HARNESS_REFUSAL.format(model=mlm_dirs[arch])
    with pytest.raises(EvalError) as e:
        lm_eval.simple_evaluate(model="late_fusion", model_args={"model_name": mlm_dirs[arch], "k": 2},
                                tasks=["arc_easy"], limit=1, device="cpu", bootstrap_iters=0,
                                task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    assert str(e.value) == expect
    if arch != "bert":
        return
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "eval_scripts.harness", "--tasks", "arc_easy", "--include_path",
                           str(tasks), "--model_args", f"model_name={mlm_dirs[arch]},k=2", "--device", "cpu",
                           "--output_path", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {expect}" and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_index_of_the_first_format_is_checked_by_hashing_its_images(built, tmp_path):
    """Format 1 had no digests.npy: its rows are checked against the content hash from the images' bytes."""
    copy = tmp_path / "index"
    shutil.copytree(built, copy)
    (copy / "digests.npy").unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format"] = 1
    del manifest["captions_sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    index = ImageIndex(copy)
    assert np.array_equal(index.digests, np.load(built / "digests.npy"))
    _edit_lines(copy, "paths.txt", lambda ls: [ls[1], ls[0]] + ls[2:])
    with pytest.raises(ImageIndexError, match="paths.txt does not match the manifest's content hash"):
        ImageIndex(copy)


def test_a_full_disk_while_pregenerating_is_an_error_naming_the_file(tmp_path, capsys, monkeypatch):
    """Filling the cache is what pregenerate is for: PNGs the disk refused make it fail (exit 2, one line)."""
    from models.images import pregenerate

    monkeypatch.setattr(write_behind, "_WRITER", write_behind.Writer(threads=1))
    (tmp_path / "texts.txt").write_text("A red apple sits on a table.\n")
    cache = tmp_path / "cache"
    argv = ["--prompts_file", str(tmp_path / "texts.txt"), "--image_generator", "toyworld", "--k", "2",
            "--image_cache", str(cache), "--image_size", "32", "--device", "cpu"]
    _fdopen_failing_for(monkeypatch, f"{cache}/")
    with pytest.raises(SystemExit) as e:
        pregenerate.main(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"error: 2 image(s) could not be written to the cache {cache} (first: {cache}/")
    assert err[-1].endswith(".png: No space left on device); those written are kept")
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")] and not list(cache.rglob("*.png"))
