"""The GPU path's generation knobs, each against the default, at a pipeline's real shapes.

Two measurements:

* ``knobs`` (``--pipeline DIR``): seconds per image of the pipeline through the project's own generator
  (:class:`models.images.generators.DiffusersGenerator`), one process, for the default and each knob alone:
  ``--vae`` (a tiny autoencoder, TAESD's architecture with random weights unless ``--vae DIR`` names one),
  ``--channels_last`` (UNet in channels-last memory format), ``--compile`` (``torch.compile`` of the UNet; its
  compile time is reported apart, on a warm-up call). Each is warmed up once, then timed over ``--images``.
* ``decode``: VAE decode time alone at real shapes, random weights: SDXL's ``AutoencoderKL`` against the tiny
  ``AutoencoderTiny`` (TAESD's architecture), side by side on the same latents (``--size`` px: latents of
  side size / 8). This one runs on CPU in a couple of minutes.

    python benchmarks/generation_knobs.py decode --device cpu --size 512 --repeats 1
    python benchmarks/generation_knobs.py knobs --pipeline /tmp/models/sdxl-turbo --device cuda --images 8
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import finish, machine_info, sync  # noqa: E402

# SDXL-Turbo's VAE (stabilityai/sdxl-turbo vae/config.json) and TAESD-XL's (madebyollin/taesdxl: the
# AutoencoderTiny defaults)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.13025,
                force_upcast=True)
TAESD = dict(in_channels=3, out_channels=3, latent_channels=4)


def tiny_vae_dir(root: Path, seed: int = 0) -> str:
    """A random AutoencoderTiny with TAESD's shapes, saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderTiny

    out = root / "taesd-random"
    if not (out / "config.json").is_file():
        torch.manual_seed(seed)
        AutoencoderTiny(**TAESD).save_pretrained(out)
    return str(out)


def _seconds(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(round(time.perf_counter() - t, 4))
    return out


def decode(args) -> dict:
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    vaes = {"sdxl_vae": AutoencoderKL(**SDXL_VAE), "tiny_vae": AutoencoderTiny(**TAESD)}
    side = args.size // 8
    latents = torch.randn(1, 4, side, side, dtype=dtype, device=args.device)
    out = {"size": args.size, "dtype": args.dtype, "latents": list(latents.shape)}
    for name, vae in vaes.items():
        vae = vae.to(args.device, dtype).eval()
        with torch.no_grad():
            image = vae.decode(latents).sample  # warm-up, and the output shape
            out[name] = {"params": sum(p.numel() for p in vae.parameters()), "image": list(image.shape),
                         "decode_s": _seconds(lambda: vae.decode(latents), args.device, args.repeats)}
        out[name]["decode_s_best"] = min(out[name]["decode_s"])
    out["sdxl_over_tiny"] = round(out["sdxl_vae"]["decode_s_best"] / out["tiny_vae"]["decode_s_best"], 2)
    print(f"VAE decode at {args.size} px ({args.dtype}, {args.device}), best of {args.repeats}:")
    for name in vaes:
        print(f"  {name:<9} {out[name]['params'] / 1e6:8.2f} M params  {out[name]['decode_s_best']:8.3f} s")
    print(f"  SDXL VAE / tiny VAE: {out['sdxl_over_tiny']}x")
    return out


def knobs(args, work: Path) -> dict:
    from models.compiling import compile_problem
    from models.images import generators

    vae = args.vae or tiny_vae_dir(work)
    settings = {"default": {}, "vae": {"vae": vae}, "channels_last": {"channels_last": True},
                "compile": {"compile": True}}
    out = {"pipeline": args.pipeline, "size": args.size, "images": args.images, "vae_dir": vae}
    prompts = [f"a photo of object number {i}" for i in range(args.images)]
    settings = {n: k for n, k in settings.items() if n == "default" or n in args.knobs}
    for name, knob in settings.items():
        if name == "compile" and compile_problem(args.device):
            out[name] = {"skipped": f"torch.compile unavailable: {compile_problem(args.device)}"}
            print(f"{name:<14} skipped ({out[name]['skipped']})")
            continue
        generators._PIPELINES.clear()
        gen = generators.DiffusersGenerator(args.pipeline, device=args.device, dtype=args.dtype_name, **knob)
        call = dict(image_size=args.size, num_inference_steps=1, guidance_scale=0.0)
        t = time.perf_counter()
        gen.generate(prompts[:1], [0], **call)  # load, and (compile) compile
        first = time.perf_counter() - t
        runs = _seconds(lambda: gen.generate(prompts, list(range(len(prompts))), **call), args.device, args.repeats)
        out[name] = {"first_call_s": round(first, 3), "batch_s": runs,
                     "s_per_image": round(min(runs) / len(prompts), 4)}
        print(f"{name:<14} {out[name]['s_per_image']:8.4f} s/image  (first call {first:.1f} s)")
    base = out["default"]["s_per_image"]
    out["over_default"] = {n: round(out[n]["s_per_image"] / base, 3) for n in settings if "s_per_image" in out[n]}
    print("over default:", out["over_default"])
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("decode", "knobs"))
    p.add_argument("--pipeline", default=None, help="knobs: a diffusers SDXL(-Turbo) pipeline folder")
    p.add_argument("--vae", default=None, help="knobs: the autoencoder folder to swap in (default: random TAESD)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (CUDA default)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--images", type=int, default=8, help="knobs: images per timed call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--knobs", default="vae,channels_last,compile", help="knobs: which to measure against the default")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work_dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    args.dtype_name = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[args.dtype]
    if args.what == "knobs" and not args.pipeline:
        p.error("knobs needs --pipeline DIR")
    result = {"benchmark": f"generation_knobs {args.what}", "machine": machine_info(args.device)}
    with tempfile.TemporaryDirectory(prefix="knobs-") as tmp:
        work = Path(args.work_dir or tmp)
        result[args.what] = decode(args) if args.what == "decode" else knobs(args, work)
    return finish(result, args.out)


if __name__ == "__main__":
    main()
