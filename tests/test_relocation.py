"""Artefacts that survive a move: a run folder moved with its image cache, reported from a third folder,
shows every image; a checkpoint folder moved elsewhere loads from any working directory."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval_scripts.image_paths import SampleImages, root_record, safe_relative
from eval_scripts.imagenetVC import main as imagenetvc
from eval_scripts.runtime import clear_memos
from models.checkpoints.config_file import CheckpointError, portable_ref, read_checkpoint_config, resolve_ref
from models.images.source import ImageRoot
from tests.paths import EVAL_DATA
from tests.zoo import boosted_checkpoint

REPO = Path(__file__).resolve().parents[1]
VC = EVAL_DATA / "imagenetvc"
IMAGES = ["--generate_images", "--k", "2", "--image_size", "32", "--image_generator", "toyworld"]

pytestmark = pytest.mark.usefixtures("one_thread")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_python(args, cwd, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          **kw)


@pytest.fixture(scope="module")
def moved(one_thread, tmp_path_factory, lm_dirs, tiny_clip_spec):
    """An image run of imagenetVC.py under ``a/`` (results in a/out, images in a/cache), then ``a/`` moved
    to ``b/a``; the original place no longer exists."""
    top = tmp_path_factory.mktemp("relocate")
    a = top / "a"
    _, ckpt = boosted_checkpoint(a, lm_dirs["llama"], tiny_clip_spec, seed=3)
    clear_memos()
    imagenetvc(["--model_name", lm_dirs["llama"], "--data_dir", str(VC), "--subsets", "color", "--limit", "2",
                "--output_dir", str(a / "out"), "--device", "cpu", "--run_name", "k2", "--pretrained_model", str(ckpt),
                *IMAGES, "--image_cache", str(a / "cache")])
    (top / "b").mkdir()
    os.rename(a, top / "b" / "a")
    (top / "third").mkdir()
    return {"top": top, "run": top / "b" / "a" / "out" / "k2", "cache": top / "b" / "a" / "cache",
            "ckpt": top / "b" / "a" / "ckpt"}


def card_images(page: str) -> list[str]:
    return re.findall(r"<img src='(data:image/[^']+)' alt='image", page)


def distinct_images(run_dir) -> int:
    return sum(len({im["path"] for im in r["images"]}) for r in read_jsonl(Path(run_dir) / "imagenetvc_samples.jsonl"))


def test_samples_name_images_relative_to_the_recorded_cache(moved):
    result = json.loads((moved["run"] / "imagenetvc.json").read_text())
    assert result["image_root"]["kind"] == "cache" and result["image_root"]["path"] == "../../cache"
    assert not Path(result["image_root"]["absolute"]).exists()  # where the cache was before the move
    rows = read_jsonl(moved["run"] / "imagenetvc_samples.jsonl")
    paths = [im["path"] for r in rows for im in r["images"]]
    assert len(paths) == 2 * len(rows) == 20
    assert all(re.fullmatch(r"[0-9a-f]{2}/[0-9a-f]{64}\.png", p) for p in paths)
    assert all((moved["cache"] / p).is_file() for p in paths)
    cached = read_jsonl(moved["run"] / "imagenetvc_samples.cache.jsonl")  # the resume rows say so too
    assert all(r["image_paths_root_relative"] is True for r in cached)
    assert all("image_paths_root_relative" not in r for r in rows)


def test_report_of_a_moved_run_from_a_third_folder_shows_every_image(moved):
    out = moved["top"] / "third" / "report.html"
    done = run_python(["-m", "eval_scripts.report", str(moved["run"]), "--out", str(out)], cwd=moved["top"] / "third")
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert "image not found" not in page and "not found" not in done.stdout
    assert len(card_images(page)) == distinct_images(moved["run"]) >= 10


def test_run_folder_moved_alone_finds_the_cache_by_its_absolute_path(moved, tmp_path):
    run = tmp_path / "k2"
    shutil.copytree(moved["run"], run)
    result = json.loads((run / "imagenetvc.json").read_text())
    result["image_root"]["absolute"] = str(moved["cache"])  # as if the cache had stayed where it was
    result["image_root"]["path"] = "../nowhere"
    (run / "imagenetvc.json").write_text(json.dumps(result))
    done = run_python(["-m", "eval_scripts.report", str(run)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(card_images((run / "report.html").read_text())) == distinct_images(run)


def test_missing_images_are_one_line_saying_how_many_and_where(moved, tmp_path):
    run = tmp_path / "k2"
    shutil.copytree(moved["run"], run)  # the copy's image_root points at nothing that exists
    done = run_python(["-m", "eval_scripts.report", str(run)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    n = len({im["path"] for r in read_jsonl(run / "imagenetvc_samples.jsonl") for im in r["images"]})
    lines = [line for line in done.stderr.splitlines() if "not found" in line]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"warning: {n} images not found") and f"looked in {run / '../../cache'} and " in lines[0]
    page = (run / "report.html").read_text()
    assert "image not found" in page and not card_images(page)


def test_a_hostile_samples_path_never_leaves_its_root(tmp_path):
    (tmp_path / "root" / "ab").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    inside = tmp_path / "root" / "ab" / ("ab" + "0" * 62 + ".png")
    inside.write_bytes(b"x")
    files = SampleImages(tmp_path / "run", {"path": "../root", "absolute": str(tmp_path / "root"), "kind": "cache"})
    assert files.resolve(f"ab/{inside.name}") == inside.resolve()
    link = tmp_path / "root" / "ab" / ("ab" + "1" * 62 + ".png")  # the cache's layout, but a link leaving it
    link.symlink_to(tmp_path / "secret.png")
    assert files.find(f"ab/{link.name}") == (None, "outside")
    assert files.find(f"ab/ab{'2' * 62}.png") == (None, "missing")
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "ab/../../secret.png", "", None, 3, "ab\\x.png",
                "ab//x.png", "secret.png"):  # the last: not the cache's layout
        assert files.resolve(bad) is None, bad
    assert safe_relative("a/b.png", "index") is not None and safe_relative("a/../b.png", "index") is None
    index = SampleImages(tmp_path / "run", {"path": "../root", "absolute": "/nowhere", "kind": "index"})
    assert index.resolve(f"ab/{inside.name}") is not None and index.resolve("../secret.png") is None
    broken = SampleImages(tmp_path, {"kind": "cache", "path": 5})
    assert broken.resolve(f"ab/{inside.name}") is None and "malformed" in broken.missing_line()


def test_samples_without_an_image_root_resolve_as_before(tmp_path, monkeypatch):
    (tmp_path / "img.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    files = SampleImages(tmp_path / "run")
    assert files.resolve("img.png") == Path("img.png") and files.resolve(str(tmp_path / "img.png")) is not None
    assert files.resolve("gone.png") is None and "1 of 3 images not found" in files.missing_line()


def test_root_record_and_relative_paths(tmp_path):
    root = ImageRoot.of(tmp_path / "cache", "cache")
    assert root_record(root, tmp_path / "out" / "run") == {"path": "../../cache", "absolute": str(tmp_path / "cache"),
                                                            "kind": "cache"}
    assert root.relative(tmp_path / "cache" / "ab" / "x.png") == "ab/x.png"
    with pytest.raises(ValueError, match="not under"):
        root.relative(tmp_path / "cache-other" / "x.png")


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_config_names_local_models_absolutely_or_inside_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lm").mkdir()
    (tmp_path / "ckpt" / "clip").mkdir(parents=True)
    assert portable_ref("lm", tmp_path / "ckpt") == str(tmp_path / "lm")
    assert portable_ref("local-dir:lm", "ckpt") == f"local-dir:{tmp_path / 'lm'}"
    assert portable_ref("local-dir:ckpt/clip", "ckpt") == "local-dir:./clip"
    assert portable_ref("gpt2", "ckpt") == "gpt2" and portable_ref("ViT-L-14/openai", "ckpt") == "ViT-L-14/openai"
    monkeypatch.chdir("/")
    ckpt = tmp_path / "ckpt"
    assert resolve_ref("local-dir:./clip", ckpt) == resolve_ref("local-dir:clip", ckpt) == f"local-dir:{ckpt / 'clip'}"
    assert resolve_ref("gpt2", ckpt) == "gpt2" and resolve_ref("/abs/x", ckpt) == "/abs/x"
    for bad in ("local-dir:../lm", "../lm", "local-dir:clip/../../lm"):
        with pytest.raises(CheckpointError, match="leaves the checkpoint folder"):
            resolve_ref(bad, ckpt, "vision_encoder")
    (ckpt / "out").symlink_to(tmp_path / "lm")
    with pytest.raises(CheckpointError, match="links out of the checkpoint folder"):
        resolve_ref("local-dir:out", ckpt, "vision_encoder")


def test_moved_checkpoint_loads_from_any_working_directory(moved, lm_dirs, tiny_clip_spec, tmp_path):
    """The checkpoint names its vision encoder by absolute path (written so by save_trainable); a copy
    with the encoder folder inside it names it relative to itself; both load from another folder."""
    config = json.loads((moved["ckpt"] / "config.json").read_text())
    assert config["vision_encoder"] == tiny_clip_spec and os.path.isabs(tiny_clip_spec[len("local-dir:"):])
    assert config["base_model"] == lm_dirs["llama"]
    inside = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(moved["ckpt"], inside)
    shutil.copytree(tiny_clip_spec[len("local-dir:"):], inside / "clip")
    (inside / "config.json").write_text(json.dumps({**config, "vision_encoder": "local-dir:clip"}))
    moved_again = tmp_path / "moved" / "ckpt"
    os.renames(inside, moved_again)
    assert read_checkpoint_config(moved_again)["vision_encoder"] == f"local-dir:{moved_again / 'clip'}"
    (tmp_path / "cwd").mkdir()
    for ckpt in (moved["ckpt"], moved_again):
        done = run_python([str(REPO / "eval_scripts" / "imagenetVC.py"), "--model_name", lm_dirs["llama"],
                           "--pretrained_model", str(ckpt), "--data_dir", str(VC), "--subsets", "color",
                           "--limit", "1", "--output_dir", str(tmp_path / "out"), "--run_name", ckpt.parent.name,
                           "--device", "cpu", *IMAGES, "--image_cache", str(tmp_path / "cache")],
                          cwd=tmp_path / "cwd")
        assert done.returncode == 0, done.stderr
        result = json.loads((tmp_path / "out" / ckpt.parent.name / "imagenetvc.json").read_text())
        assert result["config"]["vision_encoder"] == read_checkpoint_config(ckpt)["vision_encoder"]


def test_old_checkpoint_with_a_working_directory_path_loads_from_that_directory(moved, tiny_clip_spec, tmp_path,
                                                                                  monkeypatch):
    old = tmp_path / "old"
    shutil.copytree(moved["ckpt"], old)
    shutil.copytree(tiny_clip_spec[len("local-dir:"):], tmp_path / "output" / "demo" / "clip")
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "vision_encoder": "local-dir:output/demo/clip"}))
    monkeypatch.chdir(tmp_path)
    assert read_checkpoint_config(old)["vision_encoder"] == "local-dir:output/demo/clip"
    from models.vision import load_vision_encoder

    assert load_vision_encoder(read_checkpoint_config(old)["vision_encoder"]).hidden_size == 48


def test_a_checkpoint_naming_a_folder_outside_itself_is_one_line(moved, lm_dirs, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(moved["ckpt"], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "vision_encoder": "local-dir:../clip"}))
    done = run_python([str(REPO / "eval_scripts" / "imagenetVC.py"), "--model_name", lm_dirs["llama"],
                       "--pretrained_model", str(bad), "--data_dir", str(VC), "--limit", "1",
                       "--output_dir", str(tmp_path / "out"), "--device", "cpu", *IMAGES,
                       "--image_cache", str(tmp_path / "cache")], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("vision_encoder 'local-dir:../clip' leaves the checkpoint "
                                                        "folder")
    assert not (tmp_path / "out").exists()


def test_rows_of_an_earlier_version_are_made_relative_when_a_resumed_run_finishes(tmp_path, monkeypatch):
    from eval_scripts.records import ROOT_PATHS, _sample, root_relative_row

    monkeypatch.chdir(tmp_path)
    root = ImageRoot.of("cache", "cache")
    old = {"id": "a", "images": [{"path": "cache/ab/x.png", "weight": 1.0}, {"path": str(tmp_path / "cache/cd/y.png")},
                                 {"path": "/elsewhere/z.png"}]}
    new = root_relative_row(old, root)
    assert [im["path"] for im in new["images"]] == ["ab/x.png", "cd/y.png", "/elsewhere/z.png"]  # the last: left
    assert old["images"][0]["path"] == "cache/ab/x.png" and new[ROOT_PATHS] is True
    assert root_relative_row(new, root) == new and ROOT_PATHS not in _sample(new)  # done once; bookkeeping only
    options = {"id": "b", "images": [[{"path": "cache/ab/x.png"}], [{"path": "cache/ab/x.png"}]]}  # per answer option
    assert [o[0]["path"] for o in root_relative_row(options, root)["images"]] == ["ab/x.png", "ab/x.png"]
