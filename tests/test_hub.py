"""Checkpoints on the hub: a hub id loads through huggingface_hub from a local HF cache in the hub's layout
(HF_HUB_OFFLINE=1), a missing repo is one line naming it; ``python -m models.hub push`` and ``train.py
--push_to_hub`` check everything before the upload (the hub's two network calls are stood in for); the model
card's metadata parses and its usage example runs."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.paths import EVAL_DATA
from tests.zoo import boosted_checkpoint

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "acme/tiny-fusion"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(one_thread, tmp_path_factory, lm_dirs, tiny_clip_spec):
    root = tmp_path_factory.mktemp("hub")
    _, path = boosted_checkpoint(root, lm_dirs["llama"], tiny_clip_spec, seed=1)
    return {"root": root, "path": str(path), "lm": lm_dirs["llama"], "clip": tiny_clip_spec}


def fill_hub_cache(cache: Path, repo_id: str, folder: str) -> Path:
    """A local HF cache holding ``folder`` as repo ``repo_id`` at commit SHA (blobs, snapshot links, refs/main)."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in Path(folder).iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, ckpt):
    """HF_HUB_CACHE pointing at a cache that holds the checkpoint as REPO_ID (offline, as the suite runs)."""
    import huggingface_hub.constants as constants

    from models.checkpoints.locate import download_checkpoint

    cache = tmp_path / "hf-cache"
    snapshot = fill_hub_cache(cache, REPO_ID, ckpt["path"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read by huggingface_hub when it was imported
    download_checkpoint.cache_clear()
    yield snapshot
    download_checkpoint.cache_clear()


def test_hub_ids_and_local_paths_are_told_apart(tmp_path, monkeypatch):
    from models.checkpoints.locate import is_hub_id

    monkeypatch.chdir(tmp_path)
    assert is_hub_id("acme/tiny-fusion") and is_hub_id("Org.x/name_1")
    assert not is_hub_id("output/gpt2/ft_wiki_laion_220_2")  # three parts: a path
    assert not is_hub_id("/abs/path") and not is_hub_id("./acme/x") and not is_hub_id("acme/../x")
    assert not is_hub_id("gpt2") and not is_hub_id("acme/model.bin")
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "tiny-fusion.bin").write_bytes(b"")  # a released file, suffix left out: local wins
    assert not is_hub_id("acme/tiny-fusion")


def test_from_pretrained_loads_a_hub_id_from_the_local_cache(ckpt, hub_cache):
    from models import LateFusionPipeline

    kwargs = dict(image_generator="toyworld", image_size=64, image_cache=str(hub_cache.parents[3] / "images"),
                  device="cpu", k=1)
    by_id = LateFusionPipeline.from_pretrained(REPO_ID, **kwargs)
    by_path = LateFusionPipeline.from_pretrained(ckpt["path"], **kwargs)
    assert by_id.settings.model_name == ckpt["lm"] and by_id.settings.vision_encoder == ckpt["clip"]
    a = by_id.score("What color is a banana? Answer:", ["yellow", "blue"])
    b = by_path.score("What color is a banana? Answer:", ["yellow", "blue"])
    assert a.scores == pytest.approx(b.scores, abs=1e-6) and a.scores != a.text_only_scores
    with pytest.raises(ValueError, match=r"no such local path, and no hub repo 'acme/missing' in the local HF cache"):
        LateFusionPipeline.from_pretrained("acme/missing", **kwargs)


def test_pretrained_model_takes_a_hub_id(ckpt, hub_cache, tmp_path, capsys):
    from eval_scripts import imagenetVC
    from eval_scripts.cli import run_main

    def run(name, pretrained):
        run_main(imagenetVC.main, ["--model_name", ckpt["lm"], "--pretrained_model", pretrained, "--run_name", name,
                                   "--generate_images", "True", "--k", "1", "--image_generator", "toyworld",
                                   "--image_size", "64", "--image_cache", str(tmp_path / "images"),
                                   "--data_dir", str(EVAL_DATA / "imagenetvc"), "--subsets", "color", "--limit", "1",
                                   "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
        return [json.loads(x) for x in (tmp_path / "out" / name / "imagenetvc_samples.jsonl").read_text().splitlines()]

    by_id, by_path = run("by_id", REPO_ID), run("by_path", ckpt["path"])  # the vision encoder from its config.json
    assert [r["scores"] for r in by_id] == [r["scores"] for r in by_path]
    recorded = json.loads((tmp_path / "out" / "by_id" / "imagenetvc.json").read_text())["config"]
    assert recorded["pretrained_model"] == REPO_ID
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run("missing", "acme/missing")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'acme/missing'" in err[0], err
    assert not (tmp_path / "out" / "missing").exists()


# ----------------------------------------------------------------------------- push
class Recorder:
    def __init__(self):
        self.calls = []

    def method(self, name):
        def call(api, *args, **kwargs):
            self.calls.append((name, args, kwargs))
            return f"https://huggingface.co/{kwargs.get('repo_id', args[0] if args else '')}/commit/{SHA}"
        return call


@pytest.fixture
def stand_in(monkeypatch):
    """The hub's two network calls recorded instead of sent; everything before them is the real code."""
    from huggingface_hub import HfApi

    rec = Recorder()
    monkeypatch.setattr(HfApi, "create_repo", rec.method("create_repo"))
    monkeypatch.setattr(HfApi, "upload_folder", rec.method("upload_folder"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return rec


def test_push_offline_fails_in_one_line_before_reading_anything(tmp_path, monkeypatch, capsys):
    from models import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.main(["push", str(tmp_path / "no-such-folder"), "not a repo id"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: push: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push to the hub"]


@pytest.mark.parametrize("make,repo_id,message", [
    (lambda d: d, "acme/x", "holds no model.safetensors"),
    (lambda d: d / "missing", "acme/x", "is not a folder"),
    (None, "acme/x/y", "is not a hub id ORG/NAME"),
    (None, "../x", "is not a hub id ORG/NAME"),
])
def test_push_checks_the_folder_and_the_repo_id_first(ckpt, stand_in, tmp_path, capsys, make, repo_id, message):
    from models import hub

    folder = make(tmp_path) if make is not None else ckpt["path"]
    assert hub.main(["push", str(folder), repo_id]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert stand_in.calls == []


def test_push_uploads_the_folder_with_its_card(ckpt, stand_in, tmp_path, capsys):
    from models import hub

    folder = tmp_path / "weights"
    shutil.copytree(ckpt["path"], folder)
    (folder / "notes.txt").write_text("private notes beside the weights")
    assert hub.main(["push", str(folder), REPO_ID, "--private"]) == 0
    (n1, a1, k1), (n2, a2, k2) = stand_in.calls
    assert (n1, a1, k1) == ("create_repo", (REPO_ID,), {"private": True, "exist_ok": True, "repo_type": "model"})
    assert n2 == "upload_folder" and k2["repo_id"] == REPO_ID and k2["folder_path"] == str(folder)
    assert k2["repo_type"] == "model" and "notes.txt" not in k2["allow_patterns"]
    assert set(k2["allow_patterns"]) >= {"model.safetensors", "config.json", "README.md"}
    card = (folder / "README.md").read_text()
    assert f'from_pretrained("{REPO_ID}"' in card
    assert capsys.readouterr().out.startswith(f"pushed {folder} to {REPO_ID}: https://huggingface.co/")


def test_train_push_to_hub_is_refused_offline_before_training(tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tmp_path / "no-lm"),
            "--dataset_name", "cropped_vg", "--vg_dir", str(tmp_path / "no-vg")]
    for extra, message in ((["--push_to_hub", "--hub_model_id", REPO_ID], "HF_HUB_OFFLINE is set"),
                           (["--push_to_hub"], "--push_to_hub needs --hub_model_id ORG/NAME"),
                           (["--hub_model_id", "a/b/c"], "must be a hub id ORG/NAME")):
        with pytest.raises(SystemExit) as e:
            train.main(base + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_train_writes_its_card_and_pushes_the_final_weights(ckpt, stand_in, tmp_path):
    import train
    from tests.test_train import flags, make_vg_dir

    vg = make_vg_dir(tmp_path / "vg")
    result = train.main(flags(str(tmp_path / "out"), ckpt["lm"], ckpt["clip"], vg=str(vg), run_name="tiny",
                              max_train_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                              push_to_hub=True, hub_model_id=REPO_ID, hub_private_repo=True))
    folder = Path(result["saved"][-1])
    assert [c[0] for c in stand_in.calls] == ["create_repo", "upload_folder"]
    assert stand_in.calls[1][2]["folder_path"] == str(folder) and stand_in.calls[0][2]["private"] is True
    trained = json.loads((folder / "train_results.json").read_text())
    assert trained == {"train_loss": pytest.approx(result["losses"][-1]), "completed_steps": 2}
    meta, body = split_card((folder / "README.md").read_text())
    assert f"Final training loss: {result['losses'][-1]:.4f} (after 2 optimizer steps)" in body
    assert "| learning\\_rate | `0.001` |" in body and "| dataset\\_name | `cropped_vg` |" in body
    assert meta["datasets"] == ["ranjaykrishna/visual_genome"] and meta["pipeline_tag"] == "text-generation"
    for epoch_folder in Path(tmp_path / "out").glob("tiny_*"):  # every weights folder has a card
        assert (epoch_folder / "README.md").read_text().startswith("---\n")


# ----------------------------------------------------------------------------- the card
def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def python_block(text: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def hostile_results(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "imagenetvc.json").write_text(json.dumps({
        "task": "imagenetvc", "config": {"k": 6, "generate_images": True, "mix": "logits"},
        "metrics": {"overall": {"mean": 61.25, "std": 1.5}, "color": {"mean": 70.0}, "n": 3}}))
    (run_dir / "squad.json").write_text(json.dumps({
        "task": "<script>alert(1)</script> | x", "config": {"k": "<b>6</b>", "generate_images": True},
        "metrics": {"exact_match": 12.5, "f1": float("nan") if False else 20.0, "bad": "not a number",
                    "| injected | row |": 3.0}}))
    (run_dir / "squad.stats0.json").write_text("{}")
    (run_dir / "huge.json").write_bytes(b"{" + b" " * (2 << 20) + b"}")  # over the bound: never parsed
    (run_dir / "broken.json").write_text("{not json")
    return run_dir


def test_the_card_metadata_and_results(ckpt, tmp_path, capsys):
    from models import hub
    from models.checkpoints.weights import read_checkpoint_config

    folder = tmp_path / "weights"
    shutil.copytree(ckpt["path"], folder)
    config = read_checkpoint_config(folder)
    config.update(base_model="meta-llama/Meta-Llama-3-8B", vision_encoder="ViT-B-32-quickgelu/openai")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "train_config.yaml").write_text(yaml.safe_dump({
        "dataset_name": "wiki_laion_220", "wiki_file": "Salesforce/wikitext", "learning_rate": 5e-4,
        "per_device_train_batch_size": 64, "seed": 42, "laion_image_root": "data/coco`<img src=x>`"}))
    assert hub.main(["card", str(folder), "--results", str(hostile_results(tmp_path / "run")),
                     "--repo_id", REPO_ID]) == 0
    meta, body = split_card((folder / "README.md").read_text())
    assert meta["base_model"] == "meta-llama/Meta-Llama-3-8B" and meta["library_name"] == "late-fusion"
    assert meta["license"] == "mit" and meta["pipeline_tag"] == "text-generation" and "late-fusion" in meta["tags"]
    assert meta["datasets"] == ["Salesforce/wikitext", "laion/220k-GPT4Vision-captions-from-LIVIS"]
    assert "projector" in body and "`meta-llama/Meta-Llama-3-8B`" in body and "`ViT-B-32-quickgelu/openai`" in body
    assert "| learning\\_rate | `0.0005` |" in body and "Final training loss: not recorded." in body
    assert "| overall.mean | 61.25 |" in body and "| exact\\_match | 12.5 |" in body
    assert "<script>" not in body and "<b>" not in body and "<img" not in body
    assert "&lt;script&gt;alert\\(1\\)&lt;/script&gt; \\| x" in body
    assert "| \\| injected \\| row \\| | 3 |" in body  # a pipe in a value cannot open a table cell
    assert f'from_pretrained("{REPO_ID}"' in python_block(body)
    assert hub.main(["card", str(folder), "--results", str(tmp_path / "nowhere")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_the_card_usage_example_runs(ckpt, tmp_path, monkeypatch, capsys):
    """A weights folder's own card (written by save_trainable): its example, pointed at the folder, runs."""
    folder = Path(ckpt["path"])
    meta, body = split_card((folder / "README.md").read_text())
    assert meta["pipeline_tag"] == "text-generation" and "base_model" not in meta  # a local base LM is no hub id
    example = python_block(body)
    assert f'from_pretrained("{folder}"' in example
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example.replace('"stabilityai/sdxl-turbo"', '"toyworld"'), "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.prediction in ("yellow", "blue", "red") and len(out.images) == 6
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
