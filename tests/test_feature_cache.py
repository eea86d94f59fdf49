"""The vision-feature cache and the write-behind image cache, through the ImageNetVC script on the tiny zoo.

A warm run decodes no PNG and runs no vision tower, with the cold run's metrics; corrupt or stale entries
are recomputed; one encoder never reads another's features; counters add up; a run killed with SIGKILL in
the middle of a cache write leaves nothing a later run trusts, and resuming it gives the uninterrupted
run's metrics.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from dataclasses import dataclass

import pytest
import torch

from eval_scripts.imagenetVC import main
from eval_scripts.runtime import clear_memos
from models import write_behind
from models.images.features import FORMAT, FeatureStore, VisionFeatures, encoder_identity
from models.images.cache import ImageCache
from models.tiny_models import build_tiny_clip
from models.vision import OpenClipEncoder, load_vision_encoder
from tests.paths import EVAL_DATA
from tests.zoo import boosted_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUESTIONS, K = 2, 2  # 10 scored prompts (5 templates), 4 distinct images, 20 image slots

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(one_thread, tmp_path_factory, lm_dirs, tiny_clip_spec, tiny_sdxl_dir):
    root = tmp_path_factory.mktemp("features")
    _, ckpt = boosted_checkpoint(root, lm_dirs["llama"], tiny_clip_spec, seed=2)
    other_clip = build_tiny_clip(root / "other-clip", seed=5)  # same shapes, other weights
    return {"root": root, "lm": lm_dirs["llama"], "clip": tiny_clip_spec, "other_clip": other_clip,
            "sdxl": str(tiny_sdxl_dir), "ckpt": str(ckpt)}


def args_for(zoo, cache, run_name, k=K, clip=None, batch_size=8, questions=QUESTIONS, out=None):
    return ["--model_name", zoo["lm"], "--pretrained_model", zoo["ckpt"], "--subsets", "color",
            "--data_dir", str(EVAL_DATA / "imagenetvc"), "--limit", str(questions), "--batch_size", str(batch_size),
            "--output_dir", str(out or zoo["root"] / "out"), "--run_name", run_name, "--device", "cpu",
            "--generate_images", "--k", str(k), "--vision_encoder", clip or zoo["clip"],
            "--image_generator", zoo["sdxl"], "--image_size", "64", "--image_cache", str(cache)]


def samples(zoo, run_name, out=None):
    path = Path(out or zoo["root"] / "out") / run_name / "imagenetvc_samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def feature_files(cache) -> list[Path]:
    """The image entries of the feature cache (not the prompts' text embeddings under text/, nor the visual
    prefixes under prefix/)."""
    root = Path(cache, "features")
    return sorted(f for f in root.rglob("*.safetensors")
                  if f.parent.parent.name != "text" and "prefix" not in f.relative_to(root).parts)


def text_files(cache) -> list[Path]:
    return sorted(f for f in Path(cache, "features").rglob("*.safetensors") if f.parent.parent.name == "text")


class Spy:
    """Counts PNG decodes (PIL.Image.open), vision-tower images and text-tower prompts during a run."""

    def __init__(self, monkeypatch):
        import PIL.Image

        self.opens, self.tower, self.texts = 0, 0, 0
        real_open, real_encode, real_texts = PIL.Image.open, OpenClipEncoder.encode_images, OpenClipEncoder.encode_texts

        def counting_open(*a, **kw):
            self.opens += 1
            return real_open(*a, **kw)

        def counting_encode(enc, pixels):
            self.tower += pixels.shape[0]
            return real_encode(enc, pixels)
        def counting_texts(enc, texts):
            self.texts += len(texts)
            return real_texts(enc, texts)
        monkeypatch.setattr(PIL.Image, "open", counting_open)
        monkeypatch.setattr(OpenClipEncoder, "encode_images", counting_encode)
        monkeypatch.setattr(OpenClipEncoder, "encode_texts", counting_texts)


def check_sums(c):
    assert c["image_slots"] == c["images_generated"] + c["images_from_cache"] + c["images_reused"]


# ---------------------------------------------------------------------------------------------- warm runs
def test_warm_run_decodes_no_png_runs_no_tower_and_gives_the_cold_metrics(zoo, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    clear_memos()
    cold = main(args_for(zoo, cache, "cold"))
    c = cold["counts"]
    assert (c["image_slots"], c["images_generated"], c["images_from_cache"], c["images_reused"]) == (20, 4, 0, 16)
    assert (c["vision_features_computed"], c["vision_features_read"], c["pngs_decoded"]) == (4, 0, 0)
    assert len(feature_files(cache)) == 4 and len(list(cache.rglob("*.png"))) == 4  # flushed before the results
    assert len(text_files(cache)) == QUESTIONS  # one text embedding per image prompt (the question)

    spy = Spy(monkeypatch)
    clear_memos()
    warm = main(args_for(zoo, cache, "warm"))
    assert spy.opens == 0 and spy.tower == 0 and spy.texts == 0
    c = warm["counts"]
    assert (c["image_slots"], c["images_generated"], c["images_from_cache"], c["images_reused"]) == (20, 0, 4, 16)
    assert (c["vision_features_computed"], c["vision_features_read"], c["pngs_decoded"]) == (0, 4, 0)
    assert c["pipeline_loads"] == 0
    assert warm["metrics"] == cold["metrics"]
    assert [r["scores"] for r in samples(zoo, "warm")] == [r["scores"] for r in samples(zoo, "cold")]
    assert [r["images"] for r in samples(zoo, "warm")] == [r["images"] for r in samples(zoo, "cold")]

    # a larger k in the same cache: the first two images of each question come from the cache
    more = main(args_for(zoo, cache, "k3", k=3))["counts"]
    assert (more["image_slots"], more["images_generated"], more["images_from_cache"]) == (30, 2, 4)
    assert (more["vision_features_computed"], more["vision_features_read"]) == (2, 4)
    check_sums(more)


def test_corrupt_truncated_or_stale_feature_files_are_recomputed(zoo, tmp_path, caplog):
    cache = tmp_path / "cache"
    cold = main(args_for(zoo, cache, "cold2"))
    files = feature_files(cache)
    good = {f: f.read_bytes() for f in files}
    flipped, truncated, foreign, stale = files
    data = bytearray(good[flipped])
    data[-3] ^= 0xFF  # a bit flip in the tensor bytes: parses fine, checksum says no
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(good[truncated][:40])
    foreign.write_bytes(good[stale])  # a valid entry, for another key
    png = next(cache.rglob(f"{stale.stem}.png"))
    os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))  # the PNG changed since
    with caplog.at_level("WARNING", logger="models.images.features"):
        again = main(args_for(zoo, cache, "after_corruption"))
    c = again["counts"]
    assert (c["vision_features_computed"], c["vision_features_read"], c["images_generated"]) == (4, 0, 0)
    assert c["pngs_decoded"] == 4 and again["metrics"] == cold["metrics"]
    assert [r["scores"] for r in samples(zoo, "after_corruption")] == [r["scores"] for r in samples(zoo, "cold2")]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(flipped) in warned and "checksum" in warned and str(truncated) in warned and str(foreign) in warned
    # rewritten, and trusted again
    assert main(args_for(zoo, cache, "after_rewrite"))["counts"]["vision_features_read"] == 4


def test_another_encoder_never_reads_these_features(zoo, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    main(args_for(zoo, cache, "enc_a"))
    mine = feature_files(cache)
    other = main(args_for(zoo, cache, "enc_b", clip=zoo["other_clip"]))["counts"]
    assert (other["vision_features_computed"], other["vision_features_read"], other["images_from_cache"]) == (4, 0, 4)
    folders = {f.parent.parent for f in feature_files(cache)}
    assert len(folders) == 2 and len(feature_files(cache)) == 8
    # even copied into the other encoder's folder, an entry says whose it is and is refused
    theirs = next(iter(folders - {mine[0].parent.parent}))
    for f in mine:
        shutil.copy(f, theirs / f.parent.name / f.name)
    again = main(args_for(zoo, cache, "enc_b2", clip=zoo["other_clip"]))["counts"]
    assert (again["vision_features_computed"], again["vision_features_read"]) == (4, 0)


def test_text_embeddings_are_stored_checked_and_never_shared(tmp_path, caplog):
    store = FeatureStore(tmp_path, {"format": FORMAT, "dtype": "fp32", "spec": "a"})
    other = FeatureStore(tmp_path, {"format": FORMAT, "dtype": "fp32", "spec": "b"})
    e = torch.randn(24)
    store.write_text("a red apple", e)
    assert torch.equal(store.read_text("a red apple"), e)
    assert store.read_text("a red pear") is None and other.read_text("a red apple") is None
    path = Path(store.text_path("a red apple")[0])
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="models.images.features"):
        assert store.read_text("a red apple") is None
    assert "checksum mismatch" in caplog.text
    store.write_text("a red apple", e.to(torch.float16))  # not this store's dtype: refused on reading
    assert store.read_text("a red apple") is None and "unexpected tensors" in caplog.text


def test_encoder_identity_hashes_local_weights_and_names_the_dtype(zoo, tmp_path):
    a = encoder_identity(zoo["clip"], "fp32", memo_path=tmp_path / "memo.json")
    assert a == encoder_identity(zoo["clip"], "fp32")  # the memo gives the same hash
    assert json.loads((tmp_path / "memo.json").read_text())  # and was written
    assert a != encoder_identity(zoo["other_clip"], "fp32") and a != encoder_identity(zoo["clip"], "bf16")
    assert encoder_identity("ViT-B-32-quickgelu/openai", "fp32") == {
        "format": FORMAT, "dtype": "fp32", "spec": "ViT-B-32-quickgelu/openai"}
    # same files elsewhere: same identity (moving a folder keeps its features)
    moved = tmp_path / "moved"
    shutil.copytree(zoo["clip"].split(":", 1)[1], moved)
    assert encoder_identity(f"local-dir:{moved}", "fp32") == a


# ---------------------------------------------------------------------------------------------- cosines
@dataclass(frozen=True)
class Given:
    """An image slot whose image the caller already has (as a retrieval provider would give)."""

    key: str
    prompt: str
    path: str
    image: object


def test_one_image_serving_several_prompts_gets_each_prompts_cosine(zoo, tmp_path):
    """The former memo was keyed by image path and returned the cosine of whichever prompt came first."""
    import torch.nn.functional as F
    from PIL import Image

    enc = load_vision_encoder(zoo["clip"])
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    image.save(tmp_path / "red.png")
    prompts = ["a red square", "a blue whale", "a red square"]
    refs = [Given("shared-image", p, str(tmp_path / "red.png"), image) for p in prompts]
    with torch.no_grad():
        img = F.normalize(enc.model.encode_image(enc.pixels([image])), dim=-1)
        txt = F.normalize(enc.model.encode_text(enc.tokenizer(prompts)), dim=-1)
    expected = (img * txt).sum(-1).tolist()
    store = FeatureStore(tmp_path / "features", encoder_identity(zoo["clip"], "fp32"))
    first = None
    for source in ("features_computed", "features_read"):  # the tower, then the store
        feats = VisionFeatures(enc, None, store)
        patches, cos = feats(refs)
        assert cos == pytest.approx(expected, abs=1e-5) and cos[0] != pytest.approx(cos[1], abs=1e-4)
        assert cos[0] == cos[2] and patches[0] is patches[1]
        assert feats(refs[::-1])[1] == cos[::-1]  # from the memo, each prompt its own cosine
        assert feats.counts[source] == 1 and feats.counts["slots"] == 6 and feats.counts["reused"] == 5
        assert first is None or (cos == first[1] and torch.equal(patches[0], first[0][0]))
        first = first or (patches, cos)
        write_behind.flush()


# ---------------------------------------------------------------------------------------------- kill -9
KILLER = """
import os, signal, sys, tempfile
from pathlib import Path
from models import write_behind
suffix, nth = sys.argv[1], int(sys.argv[2])
real, seen = write_behind.write_atomic, [0]

def dying(path, data):
    if str(path).endswith(suffix):
        seen[0] += 1
        if seen[0] == nth:  # die half-way through this file, as a kill -9 would leave it
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix="." + Path(path).stem[:8] + "-", suffix=".tmp")
            os.write(fd, bytes(data)[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data)

write_behind.write_atomic = dying
from eval_scripts.imagenetVC import main
main(sys.argv[3:])
"""


@pytest.mark.parametrize("suffix", [pytest.param(".png", marks=pytest.mark.slow), ".safetensors"])
def test_kill_during_a_cache_write_leaves_nothing_trusted_and_resumes_exactly(zoo, tmp_path, suffix):
    cache, out = tmp_path / "cache", tmp_path / "out"
    # one question per batch; no visual prefixes on disk, whose writes would move the count below
    argv = args_for(zoo, cache, "killed", batch_size=5, questions=3, out=out) + ["--prefix_store", "off"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # the first question writes 2 PNGs and 3 feature files (2 images, 1 prompt): die on the second question's first
    nth = {".png": 3, ".safetensors": 4}[suffix]
    proc = subprocess.run([sys.executable, "-c", KILLER, suffix, str(nth), *argv], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    done = [json.loads(line) for line in (out / "killed" / "imagenetvc_samples.part0.jsonl").read_text().splitlines()]
    assert len(done) >= 5  # the first question was scored before the kill
    assert list(cache.rglob(".*.tmp"))  # the half-written file is a temporary one

    # every file under a final name is whole and valid
    rt_cache = ImageCache(cache)
    for png in cache.rglob("*.png"):
        assert rt_cache.read(png.stem, 64) is not None
    store = FeatureStore(cache / "features", encoder_identity(zoo["clip"], "fp32"))
    for f in feature_files(cache):
        png = next(cache.glob(f"*/{f.stem}.png"))
        assert store.read(f.stem, str(png)) is not None

    resumed = main(argv)
    reference = main(args_for(zoo, tmp_path / "fresh-cache", "uninterrupted", batch_size=5, questions=3, out=out))
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["counts"]["examples"] == reference["counts"]["examples"] == 15


# ---------------------------------------------------------------------------------------------- writer
def test_writer_flushes_counts_failures_and_runs_inline_in_children(tmp_path, caplog):
    w = write_behind.Writer(threads=2)
    (tmp_path / "a_file").write_text("in the way")
    with caplog.at_level("WARNING", logger="models.write_behind"):
        futures = [w.submit(write_behind.write_atomic, tmp_path / f"f{i}.bin", bytes([i]) * 1000) for i in range(20)]
        bad = [w.submit(write_behind.write_atomic, tmp_path / "a_file" / "x.bin", b"x") for _ in range(2)]
        w.flush()
    assert all(f.done() for f in futures + bad) and sorted(p.name for p in tmp_path.glob("f*.bin")) == sorted(
        f"f{i}.bin" for i in range(20))
    assert (tmp_path / "f7.bin").read_bytes() == bytes([7]) * 1000
    assert all(f.exception() is not None for f in bad) and w.failed == 2  # logged and counted, not raised
    assert sum("cache write failed" in r.getMessage() for r in caplog.records) == 1  # once per kind
    assert not list(tmp_path.glob(".*.tmp"))

    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_writes, args=(str(tmp_path / "child.bin"),))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and (tmp_path / "child.bin").read_bytes() == b"from a child"


CTRL_C = """
import sys, time
from models import write_behind

def slow(i):
    time.sleep(0.3)
    write_behind.write_atomic(f"{sys.argv[1]}/f{i}.bin", b"whole")
for i in range(6):
    write_behind.submit(slow, i)
print("queued", flush=True)
time.sleep(60)
"""


def test_ctrl_c_flushes_the_queued_writes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "queued"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"f{i}.bin" for i in range(6)]  # all, whole
    assert all(p.read_bytes() == b"whole" for p in tmp_path.iterdir())


def _child_writes(path):
    write_behind.submit(write_behind.write_atomic, path, b"from a child")  # no atexit in a child: inline


def test_stale_temp_files_are_removed_on_start_recent_and_foreign_ones_kept(tmp_path):
    shard = tmp_path / "ab"
    shard.mkdir()
    old, recent = shard / ".abcdef12-x1y2z3w4.tmp", shard / ".abcdef12-q1w2e3r4.tmp"
    foreign, probe = shard / "notes.tmp", tmp_path / ".probe-k2j3h4g5"
    for f in (old, recent, foreign, probe):
        f.write_bytes(b"")
    hour_ago = os.path.getmtime(recent) - 3600
    for f in (old, foreign, probe):
        os.utime(f, (hour_ago, hour_ago))
    identity = {"format": FORMAT, "dtype": "fp32", "spec": "x"}
    slug = FeatureStore(tmp_path / "features", identity).slug
    write_behind.flush()  # its first sweep is done
    old_feats = [tmp_path / "features" / d / "cd" / ".cdcdcdcd-a1b2c3d4.tmp" for d in (slug, "another-encoder")]
    for f in old_feats:
        f.parent.mkdir(parents=True)
        f.write_bytes(b"half")
        os.utime(f, (hour_ago, hour_ago))
    write_behind.flush()
    assert all(f.exists() for f in old_feats)
    ImageCache(tmp_path)
    FeatureStore(tmp_path / "features", identity)
    write_behind.flush()
    assert not old.exists() and not probe.exists() and recent.exists() and foreign.exists()
    assert not old_feats[0].exists() and old_feats[1].exists()  # another encoder's folder is its own store's
