import hashlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import models.images.generators as generators
from data.prompts import derive_prompts
from models.images import pregenerate
from models.images.cache import ImageCache
from models.images.generators import DiffusersGenerator, ImageGenerator, build_generator
from models.images.provider import ImageProvider, occurrence_indices, seed_for
from models.images.source import check_k

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red apple", "a blue car", "a red apple", "a yellow banana"]


class FakeGenerator(ImageGenerator):
    """Paints each image in one colour derived from (prompt, seed); records every call."""

    generator_id = "fake"

    def __init__(self):
        self.calls = []

    def generate(self, prompts, seeds, *, image_size, num_inference_steps, guidance_scale):
        self.calls.append((list(prompts), list(seeds)))
        colours = [hashlib.sha256(f"{p}|{s}".encode()).digest()[:3] for p, s in zip(prompts, seeds)]
        return [Image.new("RGB", (image_size, image_size), tuple(c)) for c in colours]


def pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture
def sdxl(tiny_sdxl_dir):
    return DiffusersGenerator(tiny_sdxl_dir, device="cpu", dtype="fp32")


def sdxl_provider(generator, cache_dir, **kwargs):
    kwargs = {"image_size": 64, "num_inference_steps": 2, "gen_batch_size": 4, **kwargs}
    return ImageProvider(generator, ImageCache(cache_dir), **kwargs)


# ---------------------------------------------------------------- keys and seeds


def test_key_is_sha256_of_canonical_json_and_seed_is_its_first_63_bits():
    key = ImageCache.key("gen", "a cat", 2, 64, 1, 0, 7)
    canonical = (
        '{"generator":"gen","guidance_scale":0.0,"image_size":64,"index":2,'
        '"num_inference_steps":1,"prompt":"a cat","seed":7}'
    )
    assert key == hashlib.sha256(canonical.encode()).hexdigest()
    assert seed_for(key) == int(key[:16], 16) % 2**63
    assert seed_for("f" * 64) == 2**63 - 1
    others = [("gen2", "a cat", 2, 64, 1, 0, 7), ("gen", "a dog", 2, 64, 1, 0, 7), ("gen", "a cat", 3, 64, 1, 0, 7),
              ("gen", "a cat", 2, 32, 1, 0, 7), ("gen", "a cat", 2, 64, 2, 0, 7), ("gen", "a cat", 2, 64, 1, 1.5, 7),
              ("gen", "a cat", 2, 64, 1, 0, 8)]
    assert len({key, *(ImageCache.key(*o) for o in others)}) == 1 + len(others)


def test_generation_dtype_is_in_the_key_except_the_default_fp16(tmp_path):
    base = ("gen", "a cat", 2, 64, 1, 0, 7)
    assert ImageCache.key(*base, dtype="fp16") == ImageCache.key(*base) == ImageCache.key(*base, dtype=None)
    fp32, bf16 = ImageCache.key(*base, dtype="fp32"), ImageCache.key(*base, dtype="bf16")
    assert len({ImageCache.key(*base), fp32, bf16}) == 3
    canonical = ('{"dtype":"fp32","generator":"gen","guidance_scale":0.0,"image_size":64,"index":2,'
                 '"num_inference_steps":1,"prompt":"a cat","seed":7}')
    assert fp32 == hashlib.sha256(canonical.encode()).hexdigest()
    # the generator tells the provider its dtype; a generator without one (toyworld, fakes) leaves it out
    fp16_gen, fp32_gen = (DiffusersGenerator("stabilityai/sdxl-turbo", device="cpu", dtype=d) for d in ("fp16", "fp32"))
    assert (fp16_gen.key_dtype, fp32_gen.key_dtype) == ("fp16", "fp32")
    keys = {d: ImageProvider(g, ImageCache(tmp_path), image_size=64).key("a cat", 0)
            for d, g in (("fp16", fp16_gen), ("fp32", fp32_gen))}
    assert keys["fp16"] == ImageCache.key("stabilityai/sdxl-turbo", "a cat", 0, 64, 1, 0.0, 0)
    assert keys["fp32"] == ImageCache.key("stabilityai/sdxl-turbo", "a cat", 0, 64, 1, 0.0, 0, dtype="fp32")
    assert keys["fp16"] != keys["fp32"]


def test_occurrence_indices():
    assert occurrence_indices(["a", "b", "a", "a", "b"]) == [0, 0, 1, 2, 1]
    assert occurrence_indices([]) == []


# ---------------------------------------------------------------- provider logic (fake generator)


def test_provider_dedups_across_items_and_batches_misses(tmp_path):
    gen = FakeGenerator()
    provider = ImageProvider(gen, ImageCache(tmp_path), image_size=8, gen_batch_size=2)
    out = provider.get([["a", "a", "b"], ["b", "a"], []])
    # keys: item 0 -> a#0, a#1, b#0; item 1 -> b#0, a#0: three distinct images, in two batches of <= 2
    assert provider.stats() == {"slots": 5, "generated": 3, "from_cache": 0, "reused": 2, "pipeline_loads": 0}
    provider.flush()  # PNGs are written behind the work

    def key(prompt, index):
        return ImageCache.key("fake", prompt, index, 8, 1, 0.0, 0)

    assert gen.calls == [(["a", "a"], [seed_for(key("a", 0)), seed_for(key("a", 1))]), (["b"], [seed_for(key("b", 0))])]
    assert [[g.prompt for g in item] for item in out] == [["a", "a", "b"], ["b", "a"], []]
    assert out[1][1].path == out[0][0].path == str(tmp_path / key("a", 0)[:2] / f"{key('a', 0)}.png")
    assert out[0][1].path != out[0][0].path
    assert pixels(out[0][1].image).tolist() != pixels(out[0][0].image).tolist()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        f"{key(p, i)}.png" for p, i in [("a", 0), ("a", 1), ("b", 0)]
    )  # three PNGs, no temporary or probe files left behind

    again = provider.get([["b", "a", "a"]])  # the same run: reused, though read back from the disk
    assert provider.stats() == {"slots": 8, "generated": 3, "from_cache": 0, "reused": 5, "pipeline_loads": 0}
    fresh = ImageProvider(gen, ImageCache(tmp_path), image_size=8, gen_batch_size=2)
    fresh.get([["b", "a", "a"], ["a"]])  # another run: from the cache
    assert fresh.stats() == {"slots": 4, "generated": 0, "from_cache": 3, "reused": 1, "pipeline_loads": 0}
    assert fresh.counts["pngs_decoded"] == 3 and len(gen.calls) == 2
    assert pixels(again[0][0].image).tolist() == pixels(out[0][2].image).tolist()


def test_full_k10_after_k6_generates_only_4(tmp_path):
    provider = ImageProvider(FakeGenerator(), ImageCache(tmp_path), image_size=8)
    text = "What color is a banana? Answer:"
    provider.get([derive_prompts(text, 6, "full")])
    assert provider.stats() == {"slots": 6, "generated": 6, "from_cache": 0, "reused": 0, "pipeline_loads": 0}
    provider.get([derive_prompts(text, 10, "full")])  # written or not yet: the first 6 are this run's
    assert provider.stats() == {"slots": 16, "generated": 10, "from_cache": 0, "reused": 6, "pipeline_loads": 0}


def test_empty_requests_and_k_check(tmp_path):
    gen = FakeGenerator()
    provider = ImageProvider(gen, ImageCache(tmp_path), image_size=8)
    assert provider.get([]) == []
    assert provider.get([[], []]) == [[], []]
    assert gen.calls == []
    assert check_k(1) == 1
    with pytest.raises(ValueError, match="k must be >= 1 when images are requested"):
        check_k(0)


def test_valid_but_wrong_cached_png_is_regenerated(tmp_path, caplog):
    """A PNG that decodes but is not what its key says (size, mode) is never used."""
    gen = FakeGenerator()
    provider = ImageProvider(gen, ImageCache(tmp_path), image_size=8)
    original = provider.get([["a", "b", "c"]])[0]
    provider.flush()
    tiny, grey, good = (Path(g.path) for g in original)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(tiny)  # the 1x1 PNG of the bug report
    Image.new("L", (8, 8), 128).save(grey)  # right size, wrong mode
    fresh = ImageProvider(gen, ImageCache(tmp_path), image_size=8)
    with caplog.at_level(logging.WARNING, logger="models.images.cache"):
        again = fresh.get([["a", "b", "c"]])[0]
    fresh.flush()
    assert fresh.stats() == {"slots": 3, "generated": 2, "from_cache": 1, "reused": 0, "pipeline_loads": 0}
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{tiny} is RGB 1x1, not RGB 8x8" in m for m in messages)
    assert any(f"{grey} is L 8x8, not RGB 8x8" in m for m in messages)
    for old, new, path in zip(original, again, (tiny, grey, good)):
        assert np.array_equal(pixels(old.image), pixels(new.image))
        with Image.open(path) as im:  # rewritten with the right image
            assert im.size == (8, 8) and im.mode == "RGB" and np.array_equal(pixels(im), pixels(old.image))


# ---------------------------------------------------------------- the tiny SDXL pipeline


def test_same_key_byte_identical_png_across_processes(sdxl, tmp_path):
    provider = sdxl_provider(sdxl, tmp_path / "here")
    out = provider.get([PROMPTS])
    provider.flush()
    script = (
        "import sys\n"
        "from models.images.cache import ImageCache\n"
        "from models.images.generators import DiffusersGenerator\n"
        "from models.images.provider import ImageProvider\n"
        "gen = DiffusersGenerator(sys.argv[1], device='cpu', dtype='fp32')\n"
        "p = ImageProvider(gen, ImageCache(sys.argv[2]), image_size=64, num_inference_steps=2, gen_batch_size=4)\n"
        f"p.get([{PROMPTS!r}])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script, str(sdxl.model_id), str(tmp_path / "there")], env=env, check=True)
    for image in out[0]:
        there = tmp_path / "there" / Path(image.path).relative_to(tmp_path / "here")
        assert there.read_bytes() == Path(image.path).read_bytes()
    # different keys (other prompt, or the same prompt's second occurrence) give different images
    arrays = [pixels(g.image) for g in out[0]]
    for i in range(len(arrays)):
        for j in range(i):
            assert np.abs(arrays[i] - arrays[j]).mean() > 5
    assert len({g.path for g in out[0]}) == 4


def test_batch_equals_one_by_one(sdxl):
    seeds = [11, 12, 13]
    kwargs = dict(image_size=64, num_inference_steps=2, guidance_scale=0.0)
    batched = sdxl.generate(PROMPTS[:3], seeds, **kwargs)
    single = [sdxl.generate([p], [s], **kwargs)[0] for p, s in zip(PROMPTS[:3], seeds)]
    assert [im.size for im in batched] == [(64, 64)] * 3 and {im.mode for im in batched} == {"RGB"}
    for b, s in zip(batched, single):
        # same per-image noise; batched float kernels may round the last bit differently, hence <= 1 level
        assert np.abs(pixels(b) - pixels(s)).max() <= 1
    assert np.abs(pixels(batched[0]) - pixels(batched[2])).mean() > 5  # same prompt, other seed: other image


def test_warm_cache_never_loads_the_pipeline(tiny_sdxl_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(generators, "_PIPELINES", {})  # as in a fresh process
    cold = sdxl_provider(DiffusersGenerator(tiny_sdxl_dir, device="cpu", dtype="fp32"), tmp_path)
    first = cold.get([PROMPTS, PROMPTS[:2]])
    assert cold.stats() == {"slots": 6, "generated": 4, "from_cache": 0, "reused": 2, "pipeline_loads": 1}
    cold.flush()

    monkeypatch.setattr(generators, "_PIPELINES", {})  # again a fresh process
    gen = DiffusersGenerator(tiny_sdxl_dir, device="cpu", dtype="fp32")
    warm = sdxl_provider(gen, tmp_path)
    second = warm.get([PROMPTS, PROMPTS[:2]])
    assert warm.stats() == {"slots": 6, "generated": 0, "from_cache": 4, "reused": 2, "pipeline_loads": 0}
    assert gen.pipeline_loads == 0 and gen._pipe is None
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert a.path == b.path and np.array_equal(pixels(a.image), pixels(b.image))


def test_corrupt_or_truncated_png_is_regenerated(sdxl, tmp_path, caplog):
    provider = sdxl_provider(sdxl, tmp_path)
    original = provider.get([PROMPTS[:2]])[0]
    provider.flush()
    truncated, garbage = (Path(g.path) for g in original)
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage.write_bytes(b"not a png at all")
    with caplog.at_level(logging.WARNING, logger="models.images.cache"):
        again = provider.get([PROMPTS[:2]])[0]
    provider.flush()
    assert provider.stats() == {"slots": 4, "generated": 4, "from_cache": 0, "reused": 0,
                                "pipeline_loads": sdxl.pipeline_loads}  # 0 if this process had loaded it
    assert sum("cannot read" in r.message for r in caplog.records) == 2
    for old, new in zip(original, again):
        assert np.array_equal(pixels(old.image), pixels(new.image))
        with Image.open(new.path) as im:
            assert np.array_equal(pixels(im.convert("RGB")), pixels(old.image))


def test_main_fills_the_cache(tiny_sdxl_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(generators, "_PIPELINES", {})  # as in a fresh process
    texts = ["The sky is blue. Grass is green.", "A red apple sits on a table."]
    prompts_file = tmp_path / "texts.txt"
    prompts_file.write_text(f"{texts[0]}\n\n{texts[1]}\n")
    cache = tmp_path / "cache"
    argv = ["--prompts_file", str(prompts_file), "--image_prompt", "sentences", "--k", "3",
            "--image_generator", str(tiny_sdxl_dir), "--image_cache", str(cache), "--image_size", "64",
            "--num_inference_steps", "1", "--gen_batch_size", "2", "--device", "cpu", "--dtype", "fp32"]
    # text 0 -> [Grass is green., The sky is blue., <whole text>]; text 1 -> [its sentence]*2 + [whole text]
    # which is the same string three times: indices 0, 1, 2. Six distinct keys.
    assert pregenerate.main(argv) == {"slots": 6, "generated": 6, "from_cache": 0, "reused": 0, "pipeline_loads": 1}
    gen_id = str(Path(tiny_sdxl_dir).resolve())
    expected = {
        ImageCache.key(gen_id, p, i, 64, 1, 0.0, 0, dtype="fp32")
        for t in texts
        for p, i in zip(derive_prompts(t, 3, "sentences"), occurrence_indices(derive_prompts(t, 3, "sentences")))
    }
    assert {p.stem for p in cache.rglob("*.png")} == expected
    assert pregenerate.main(argv) == {"slots": 6, "generated": 0, "from_cache": 6, "reused": 0, "pipeline_loads": 0}


# ---------------------------------------------------------------- construction and bad input


def test_build_generator_loads_nothing(tiny_sdxl_dir, monkeypatch):
    monkeypatch.setattr(generators, "_PIPELINES", {})
    gen = build_generator(str(tiny_sdxl_dir), device="cpu")
    assert isinstance(gen, DiffusersGenerator) and gen._pipe is None and gen.pipeline_loads == 0
    assert gen.generator_id == str(Path(tiny_sdxl_dir).resolve()) and str(gen.dtype) == "torch.float32"
    assert build_generator("stabilityai/sdxl-turbo", device="cpu").generator_id == "stabilityai/sdxl-turbo"
    toy = build_generator("toyworld", noise=0.0)
    assert type(toy).__name__ == "ToyWorldGenerator" and "toyworld" in toy.generator_id
    assert generators._PIPELINES == {}


def test_unknown_or_missing_pipeline(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        DiffusersGenerator(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no model_index.json"):
        DiffusersGenerator(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "NoSuchPipeline", "_diffusers_version": "0.30.0"}')
    gen = DiffusersGenerator(str(tmp_path), device="cpu")  # construction loads nothing, so cannot fail yet
    with pytest.raises(ValueError, match=f"cannot load text-to-image pipeline '{tmp_path}'"):
        gen.generate(["a"], [0], image_size=64, num_inference_steps=1, guidance_scale=0.0)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        DiffusersGenerator("stabilityai/sdxl-turbo", dtype="fp8")


def test_unwritable_cache_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=f"image cache directory {blocker / 'cache'} is not writable"):
        ImageCache(blocker / "cache")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_cache_dir(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            ImageCache(tmp_path)
    finally:
        tmp_path.chmod(0o755)


def test_main_bad_input(tmp_path, capsys):
    """One ``error:`` line and exit status 2 (tests/test_hostile_train.py has every case)."""
    for argv, message in ((["--prompts_file", str(tmp_path / "nope.txt"), "--image_generator", "toyworld"],
                           "prompts file .*nope.txt not found"),
                          (["--prompts_file", str(tmp_path / "nope.txt"), "--k", "0"], "k must be >= 1")):
        with pytest.raises(SystemExit) as exc:
            pregenerate.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and re.match(f"error: {message}", err[0]), err
