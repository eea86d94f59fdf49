"""The GPU path's knobs on the tiny SDXL pipeline: --vae (a swapped autoencoder), --channels_last, --compile."""
import json
from pathlib import Path

import pytest
import torch

from eval_scripts.core import run_main
from tests.paths import EVAL_DATA

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_taesd(path, latent_channels=4):
    """A tiny random AutoencoderTiny (TAESD's architecture, 8x down and up) built from a config."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny(encoder_block_out_channels=(4, 4, 4, 4), decoder_block_out_channels=(4, 4, 4, 4),
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                          latent_channels=latent_channels)
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def zoo(one_thread, tmp_path_factory, lm_dirs, tiny_clip_spec, tiny_sdxl_dir):
    root = tmp_path_factory.mktemp("knobs")
    return {"lm": lm_dirs["llama"], "clip": tiny_clip_spec, "sdxl": str(tiny_sdxl_dir),
            "cache": root / "cache", "out": root / "out", "vae": tiny_taesd(root / "taesd"),
            "vae8": tiny_taesd(root / "taesd8", latent_channels=8), "root": root}


def args(zoo, name, *extra, size=64):
    return ["--model_name", zoo["lm"], "--subsets", "color", "--data_dir", str(EVAL_DATA / "imagenetvc"),
            "--limit", "1", "--output_dir", str(zoo["out"]), "--run_name", name, "--device", "cpu",
            "--generate_images", "--k", "1", "--vision_encoder", zoo["clip"], "--image_generator", zoo["sdxl"],
            "--image_size", str(size), "--image_cache", str(zoo["cache"]), *extra]


def image_paths(zoo, name):
    rows = [json.loads(line) for line in (zoo["out"] / name / "imagenetvc_samples.jsonl").read_text().splitlines()]
    return sorted({im["path"] for row in rows for im in row["images"]})


def test_vae_swaps_the_autoencoder_and_caches_its_images_apart(zoo):
    from PIL import Image

    from eval_scripts.imagenetVC import main

    plain = main(args(zoo, "plain"))
    swapped = main(args(zoo, "taesd", "--vae", zoo["vae"], "--channels_last", size=48))
    assert swapped["config"]["vae"] == str(Path(zoo["vae"]).resolve()) or swapped["config"]["vae"] == zoo["vae"]
    assert swapped["config"]["channels_last"] is True and plain["config"]["vae"] is None
    assert plain["config"]["channels_last"] is False and plain["config"]["compile"] is False
    assert swapped["counts"]["images_generated"] == 1  # through the same cache, under another key
    paths = image_paths(zoo, "taesd")
    assert paths and set(paths).isdisjoint(image_paths(zoo, "plain"))
    assert all(Image.open(Path(zoo["cache"]) / p).size == (48, 48) for p in paths)  # relative to the cache
    # the same flags again: from the cache
    again = main(args(zoo, "taesd_again", "--vae", zoo["vae"], size=48))
    assert again["counts"]["images_generated"] == 0 and image_paths(zoo, "taesd_again") == paths


def test_the_swapped_vae_is_the_one_that_decodes(zoo):
    from models.images.generators import DiffusersGenerator

    gen = DiffusersGenerator(zoo["sdxl"], device="cpu", vae=zoo["vae"], channels_last=True)
    pipe = gen._pipeline()
    assert type(pipe.vae).__name__ == "AutoencoderTiny"
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert "+vae=AutoencoderTiny:" in gen.generator_id
    assert DiffusersGenerator(zoo["sdxl"], device="cpu").generator_id != gen.generator_id


@pytest.mark.parametrize("what", ["not_autoencoder", "channels", "missing", "no_weights"])
def test_a_bad_vae_is_one_line_before_any_image(zoo, what, capsys):
    from eval_scripts.imagenetVC import main

    root = zoo["root"] / f"bad-{what}"
    if what == "not_autoencoder":
        bad = Path(zoo["sdxl"]) / "unet"
    elif what == "channels":
        bad = Path(zoo["vae8"])
    elif what == "missing":
        bad = root / "nothing"
    else:
        root.mkdir()
        (root / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", "latent_channels": 4}))
        bad = root
    cache = zoo["root"] / f"cache-{what}"
    with pytest.raises(SystemExit) as e:
        run_main(main, args({**zoo, "cache": cache}, f"bad-{what}", "--vae", str(bad)))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error: ")]) == 1
    line = err[-1]
    assert line.startswith("error: --vae") and str(bad) in line, line
    assert {"not_autoencoder": "not a diffusers autoencoder", "channels": "8 latent channels",
            "missing": "no such directory", "no_weights": "no diffusion_pytorch_model"}[what] in line
    assert not list(cache.rglob("*.png")) and not (zoo["out"] / f"bad-{what}" / "imagenetvc.json").exists()


def test_compile_unavailable_is_one_line(zoo, capsys, monkeypatch):
    from eval_scripts.imagenetVC import main
    from models import compiling

    monkeypatch.setattr(compiling, "compile_problem", lambda device="cpu": "no C++ compiler")
    with pytest.raises(SystemExit) as e:
        run_main(main, args(zoo, "compile", "--compile"))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: --compile: torch.compile is unavailable here (no C++ compiler)"


@pytest.mark.slow
def test_compile_runs_on_cpu_where_available(zoo):
    """torch.compile's first CPU compile takes minutes on a busy 2-core machine: slow."""
    from eval_scripts.imagenetVC import main
    from models.compiling import compile_problem

    if compile_problem("cpu"):
        pytest.skip(f"torch.compile unavailable: {compile_problem('cpu')}")
    plain = main(args(zoo, "nocompile", "--prefix_cache", "False"))
    compiled = main(args(zoo, "compiled", "--compile", "--prefix_cache", "False"))
    assert compiled["config"]["compile"] is True
    assert compiled["metrics"] == plain["metrics"]
