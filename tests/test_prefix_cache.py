"""The visual prefix cache (models/fusion/prefix.py): the fusion block's keys and values over an image's
visual prefix computed once and reused, with scores and generations equal to running [V ; H] whole."""
import json
from pathlib import Path

import pytest
import torch

from models.fusion.factory import load_late_fusion_model
from models.fusion.prefix import VisualPrefixCache, weights_fingerprint
from models.tiny_models import ARCHS
from tests.paths import EVAL_DATA
from tests.zoo import boost_fusion, boosted_checkpoint

N_V, D_CLIP = 5, 48
pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(lm_dir, seed=0):
    torch.manual_seed(seed)
    return boost_fusion(load_late_fusion_model(lm_dir, vision_dim=D_CLIP), seed=seed, scale=5.0).eval()


def mixed_batch(pad_left: bool, seed=0):
    """Three texts of lengths 9, 6 and 4, padded on one side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50000, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, n in ((1, 6), (2, 4)):
        if pad_left:
            mask[row, :9 - n] = 0
        else:
            mask[row, n:] = 0
    return ids, mask


def image_batch(seed=1, n_images=4, k=2):
    """Patches [3, k, n_v, d] drawn from ``n_images`` distinct images (so rows share images), and their keys."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(n_images, N_V, D_CLIP, generator=g)
    which = torch.tensor([[0, 1], [1, 2], [0, 3]])[:, :k]
    keys = [f"img{int(i)}" for i in which.flatten()]
    return pool[which], keys


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pad_left", [False, True])
def test_cached_scores_equal_the_uncached_computation(arch, pad_left, lm_dirs):
    model = make_model(lm_dirs[arch])
    assert model.prefix_cacheable
    ids, mask = mixed_batch(pad_left)
    patches, keys = image_batch()
    weights = torch.tensor([[1.0, 0.4], [0.3, 1.2], [0.8, 0.0]])
    cache = VisualPrefixCache()
    valid = mask.bool()
    for mode in ("logits", "probs"):
        ref = model.mixed_logprobs(ids, mask, patches, weights, mode)
        for _ in range(2):  # computed, then reused from the cache
            prefix, _, _ = cache(model, patches.flatten(0, 1), keys)
            got = model.mixed_logprobs(ids, mask, patches, weights, mode, prefix=prefix)
            assert (got[valid] - ref[valid]).abs().max() <= 1e-5
    # the visual path matters, so equality says something: a wrong prefix moves the scores
    wrong, _, _ = VisualPrefixCache()(model, torch.randn(6, N_V, D_CLIP), keys)
    assert (model.mixed_logprobs(ids, mask, patches, weights, prefix=wrong)[valid] - ref[valid]).abs().max() > 1e-2


def wanted_positions(mask: torch.Tensor, pad_left: bool, span: int) -> torch.Tensor:
    """Per row, the last ``span`` text positions (clamped to the row's last token as the scorer clamps them, so
    short rows repeat it): what next-token and continuation scoring ask for."""
    n = mask.sum(1)
    end = torch.full_like(n, mask.shape[1]) if pad_left else n   # one past each row's last token
    first = (end - span).clamp(min=(mask.shape[1] - n) if pad_left else 0)
    return torch.minimum(first[:, None] + torch.arange(span), (end - 1)[:, None])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pad_left", [False, True])
def test_only_the_wanted_positions_run_and_equal_the_whole_pass(arch, pad_left, lm_dirs):
    """With a prefix and the positions asked for, the block runs those positions only (the text's keys and
    values once per text, the queries per image): the same log-probabilities as [V ; H] run whole."""
    model = make_model(lm_dirs[arch])
    assert model.one_layer
    ids, mask = mixed_batch(pad_left)
    patches, keys = image_batch()
    weights = torch.tensor([[1.0, 0.4], [0.3, 1.2], [0.8, 0.0]])
    prefix, _, _ = VisualPrefixCache()(model, patches.flatten(0, 1), keys)
    for span in (1, 3, 5):  # row 2 holds 4 tokens: span 5 repeats its last position
        pos = wanted_positions(mask, pad_left, span)
        if span == 5:
            pos[0] = torch.tensor([1, 3, 4, 6, 8])  # gaps in a row: its whole range runs, the asked ones are kept
        for mode in ("logits", "probs"):
            ref = model.mixed_logprobs(ids, mask, patches, weights, mode, positions=pos)
            got = model.mixed_logprobs(ids, mask, patches, weights, mode, positions=pos, prefix=prefix)
            assert got.shape == ref.shape == (3, span, ref.shape[-1])
            assert (got - ref).abs().max() <= 1e-5
    # the fused outputs come from the per-position path itself (not a whole pass picked afterwards) ...
    pos = wanted_positions(mask, pad_left, 1)
    whole, _, _ = model.fuse_after_prefix(prefix, model.text_hidden(ids, mask)[0].repeat_interleave(2, 0),
                                          mask.repeat_interleave(2, 0))
    hidden, _ = model.text_hidden(ids, mask)
    at = model.fuse_at(prefix, hidden, mask, pos)
    assert at.shape[1] == 1
    assert (at - whole.gather(1, pos.repeat_interleave(2, 0)[..., None].expand(-1, -1, at.shape[-1]))).abs().max() <= 1e-5
    # ... and the image matters there: another image's prefix moves them
    other, _, _ = VisualPrefixCache()(model, torch.randn(6, N_V, D_CLIP), keys)
    assert (model.fuse_at(other, hidden, mask, pos) - at).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_is_token_for_token_the_uncached_one(arch, lm_dirs):
    model = make_model(lm_dirs[arch])
    ids, mask = mixed_batch(pad_left=True)  # generation is left-padded in every family
    patches, keys = image_batch(seed=2)
    weights = torch.tensor([[1.0, 0.5], [0.9, 1.0], [0.7, 0.2]])
    cache = VisualPrefixCache()
    for mode in ("logits", "probs"):
        ref = model.generate(ids, mask, patches, weights, mode, max_new_tokens=8)
        prefix, _, _ = cache(model, patches.flatten(0, 1), keys)
        assert torch.equal(model.generate(ids, mask, patches, weights, mode, max_new_tokens=8, prefix=prefix), ref)
    text_only = model.generate(ids, mask, None, None, max_new_tokens=8)
    assert not torch.equal(ref, text_only)


def test_counters_each_distinct_image_computed_once_and_add_up(lm_dirs):
    model = make_model(lm_dirs["llama"])
    cache = VisualPrefixCache()
    image = torch.randn(1, N_V, D_CLIP)
    calls = model.calls["prefix"]
    # one image used by 5 templates, in one batch
    (k, v), computed, reused = cache(model, image.expand(5, -1, -1), ["a"] * 5)
    assert (computed, reused) == (1, 4) and model.calls["prefix"] == calls + 1
    assert k.shape[0] == v.shape[0] == 5 and torch.equal(k[0], k[4])
    # ... and in later batches: reused, nothing computed, alongside a new image computed once
    _, computed, reused = cache(model, torch.cat([image, torch.randn(2, N_V, D_CLIP)]), ["a", "b", "b"])
    assert (computed, reused) == (1, 2) and model.calls["prefix"] == calls + 2 and len(cache) == 2
    with pytest.raises(ValueError, match="2 image keys for 3"):
        cache(model, torch.randn(3, N_V, D_CLIP), ["a", "b"])


def test_changed_checkpoint_dtype_or_encoder_never_reuses(lm_dirs):
    model = make_model(lm_dirs["qwen2"])
    ids, mask = mixed_batch(pad_left=False)
    patches, keys = image_batch()
    weights = torch.ones(3, 2)
    cache = VisualPrefixCache()
    flat = patches.flatten(0, 1)
    assert cache(model, flat, keys)[1] == 4
    assert cache(model, flat, keys)[1:] == (0, 6)
    # other trained weights (a checkpoint loaded in place): recomputed, and the scores are the new weights'
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.fusion_layer.norm.weight.mul_(1.5)
    assert weights_fingerprint(model) != before
    prefix, computed, _ = cache(model, flat, keys)
    assert computed == 4
    valid = mask.bool()
    ref = model.mixed_logprobs(ids, mask, patches, weights)
    assert (model.mixed_logprobs(ids, mask, patches, weights, prefix=prefix)[valid] - ref[valid]).abs().max() <= 1e-5
    # another vision encoder (the caller's namespace)
    assert cache(model, flat, keys, ("another encoder",))[1] == 4
    # another dtype
    model.to(torch.float64)
    prefix, computed, _ = cache(model, flat, keys)
    assert computed == 4 and prefix[0].dtype == torch.float64
    # a different model of the same shapes, built with other weights
    other = make_model(lm_dirs["qwen2"], seed=5)
    assert cache(other, flat, keys)[1] == 4


def test_least_recently_used_entries_go_beyond_the_limit(lm_dirs):
    model = make_model(lm_dirs["gpt2"])
    one = VisualPrefixCache()
    one(model, torch.randn(1, N_V, D_CLIP), ["x"])
    per_entry = one.bytes
    cache = VisualPrefixCache(limit_bytes=2 * per_entry)
    imgs = torch.randn(3, N_V, D_CLIP)
    cache(model, imgs[:2], ["a", "b"])
    cache(model, imgs[:1], ["a"])              # a is now the most recent
    cache(model, imgs[2:], ["c"])              # b goes
    assert [key for _, key in cache.entries] == ["a", "c"] and cache.bytes == 2 * per_entry
    assert cache(model, imgs[1:2], ["b"])[1] == 1
    # a batch wider than the limit keeps all of its own entries until it is served
    (k, _), computed, _ = cache(model, imgs, ["a", "b", "c"])
    assert k.shape[0] == 3 and len(cache) <= 3


def test_masked_lms_keep_the_one_pass_path(mlm_dirs):
    from models.fusion.factory import load_late_fusion_model as load
    model = load(mlm_dirs["bert"], vision_dim=D_CLIP)
    assert model.kind == "masked" and not model.prefix_cacheable


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def zoo(one_thread, tmp_path_factory, lm_dirs, tiny_clip_spec, tiny_sdxl_dir):
    root = tmp_path_factory.mktemp("prefix")
    _, ckpt = boosted_checkpoint(root, lm_dirs["llama"], tiny_clip_spec, seed=1)
    _, ckpt2 = boosted_checkpoint(root / "second", lm_dirs["llama"], tiny_clip_spec, seed=2)
    return {"lm": lm_dirs["llama"], "clip": tiny_clip_spec, "sdxl": str(tiny_sdxl_dir), "ckpt": str(ckpt),
            "ckpt2": str(ckpt2), "cache": str(root / "cache"), "out": root / "out"}


def run(zoo, name, *extra, ckpt="ckpt", k=1):
    from eval_scripts.imagenetVC import main
    result = main(["--model_name", zoo["lm"], "--pretrained_model", zoo[ckpt], "--subsets", "color",
                   "--data_dir", str(EVAL_DATA / "imagenetvc"), "--limit", "2", "--batch_size", "3",
                   "--output_dir", str(zoo["out"]), "--run_name", name, "--device", "cpu", "--generate_images",
                   "--k", str(k), "--vision_encoder", zoo["clip"], "--image_generator", zoo["sdxl"],
                   "--image_size", "64", "--image_cache", zoo["cache"], *extra])
    samples = [json.loads(line) for line in (Path(zoo["out"]) / name / "imagenetvc_samples.jsonl").read_text().splitlines()]
    return result, samples


def test_an_evaluation_computes_each_image_prefix_once(zoo):
    from eval_scripts.runtime import clear_memos
    clear_memos()
    off, off_samples = run(zoo, "off", "--prefix_cache", "False")
    assert off["counts"]["prefix_computed"] == off["counts"]["prefix_reused"] == 0
    assert off["config"]["prefix_cache"] is False
    clear_memos()
    on, on_samples = run(zoo, "on")
    c = on["counts"]
    # 2 questions x 5 templates, one image each: each question's image is computed once, for its 5 templates
    assert c["image_slots"] == 10 and c["prefix_computed"] == 2 and c["prefix_reused"] == 8
    assert c["prefix_computed"] + c["prefix_reused"] == c["image_slots"]
    assert on["config"]["prefix_cache"] is True
    for a, b in zip(on_samples, off_samples):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    # a second run in the same process computes no prefix; another checkpoint computes its own
    again, _ = run(zoo, "again")
    assert (again["counts"]["prefix_computed"], again["counts"]["prefix_reused"]) == (0, 10)
    other, other_samples = run(zoo, "other", ckpt="ckpt2")
    assert other["counts"]["prefix_computed"] == 2
    clear_memos()
    other_off, other_off_samples = run(zoo, "other_off", "--prefix_cache", "False", ckpt="ckpt2")
    for a, b in zip(other_samples, other_off_samples):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    assert any(a["scores"] != pytest.approx(b["scores"], abs=1e-4) for a, b in zip(other_samples, on_samples))


def stored_prefixes(zoo) -> list[Path]:
    return sorted(Path(zoo["cache"]).glob("features/*/prefix/*/*/*.safetensors"))


def test_a_warm_run_reads_every_prefix_from_disk_and_scores_the_same(zoo, tmp_path, caplog):
    """--prefix_store: a new process state (memos cleared) over the same image cache computes no prefix; the
    stored entries are checked where they are used (a forged shape or NaN is named, deleted and recomputed);
    another checkpoint never reads them; 'off' stores nothing."""
    from eval_scripts.runtime import clear_memos
    from models.fusion.prefix_store import use_store

    zoo = {**zoo, "cache": str(tmp_path / "cache"), "out": tmp_path / "out"}
    clear_memos()
    off, off_samples = run(zoo, "store-off", "--prefix_store", "off")
    assert stored_prefixes(zoo) == [] and off["counts"]["prefix_computed"] == 2
    clear_memos()
    first, first_samples = run(zoo, "store-first", "--prefix_store", "on")
    from models import write_behind
    write_behind.flush()
    files = stored_prefixes(zoo)
    assert len(files) == 2 and first["counts"]["prefix_read"] == 0
    clear_memos()
    warm, warm_samples = run(zoo, "store-warm")  # auto: on, since the device is the CPU
    c = warm["counts"]
    assert (c["prefix_computed"], c["prefix_read"], c["prefix_reused"]) == (0, 2, 10)
    assert [s["scores"] for s in warm_samples] == [s["scores"] for s in first_samples]  # bit for bit
    for a, b in zip(warm_samples, off_samples):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    # another checkpoint: its own folder, nothing read
    clear_memos()
    other, _ = run(zoo, "store-other", ckpt="ckpt2")
    assert (other["counts"]["prefix_computed"], other["counts"]["prefix_read"]) == (2, 0)
    # forged entries: a wrong shape and a NaN, each with a valid checksum (written through the store itself)
    from models.images.features import FeatureStore
    from safetensors.torch import load_file
    store_dir = files[0].parent.parent
    ident = json.loads((store_dir / "encoder.json").read_text())
    forger = FeatureStore(store_dir.parent, ident)
    assert forger.dir == store_dir
    good = load_file(str(files[0]))
    forger.write_tensors(files[0].stem, {"keys": good["keys"][:, :-1], "values": good["values"][:, :-1]})
    nan = good["values"].clone()
    nan[0, 0, 0] = float("nan")
    forger.write_tensors(files[1].stem, {"keys": good["keys"], "values": nan})
    clear_memos()
    caplog.clear()
    forged, forged_samples = run(zoo, "store-forged")
    assert (forged["counts"]["prefix_computed"], forged["counts"]["prefix_read"]) == (2, 0)
    warned = [r.getMessage() for r in caplog.records if "feature cache: cannot use" in r.getMessage()]
    assert len(warned) == 2 and any("has shape" in w for w in warned) and any("NaN" in w for w in warned)
    assert [s["scores"] for s in forged_samples] == [s["scores"] for s in first_samples]
    assert use_store("auto", "cpu") and not use_store("auto", "cuda") and use_store("on", "cuda")
    assert not use_store("off", "cpu")
