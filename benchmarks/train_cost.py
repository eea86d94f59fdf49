"""Training throughput of late fusion on a Visual Genome style batch stream.

A small training loop of its own (not ``train.py``): ``VGRegions`` + ``CaptionCollator`` in a
DataLoader, the frozen CLIP tower, the frozen LM and the trained projector + fusion block, AdamW. Each
configuration runs ``--warmup`` untimed steps, then ``--steps`` timed ones, and reports samples per
second, the mean step time split into

* ``data``: waiting for the next batch (decoding, cropping and preprocessing when ``workers = 0``);
* ``vision``: the CLIP tower on the batch's crops;
* ``lm``: the frozen LM's forward pass (timed by hooks);
* ``fusion``: everything else in the step: projector, fusion block, LM head, loss, backward, AdamW;

and the peak memory (see ``bench_utils.PeakMemory``). Configurations, each one change from ``base``:

* ``base``: DataLoader workers 0, LM and CLIP in fp32, CLIP features computed on the fly;
* ``workers``: ``--workers`` DataLoader worker processes;
* ``precomputed``: CLIP features computed once before the timed steps (as a feature cache would),
  so a step is only LM + fusion;
* ``bf16``: LM and CLIP in bf16; the trained modules stay fp32 under bf16 autocast.

Images: by default stand-in JPEGs (smooth noise) with the real region phrases and boxes of the
Visual Genome sample in ``tests/data/visual_genome``, else invented phrases and boxes; or a real
Visual Genome directory with ``--vg_dir``.

    python benchmarks/train_cost.py --tiny                      # CPU, the test zoo
    python benchmarks/train_cost.py --model_name google/gemma-2b --device cuda --batch_size 64 --steps 10
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import PeakMemory, finish, machine_info, repo_data, sync, use_tiny_zoo  # noqa: E402

CONFIGS = {  # bf16 last: the LM is cast once
    "base": {"workers": 0, "dtype": "fp32", "features": "on_the_fly"},
    "workers": {"workers": None, "dtype": "fp32", "features": "on_the_fly"},  # None: --workers
    "precomputed": {"workers": 0, "dtype": "fp32", "features": "precomputed"},
    "bf16": {"workers": 0, "dtype": "bf16", "features": "on_the_fly"},
}
_WORDS = {"adj": "red green small large wooden metal white black striped round".split(),
          "noun": "man dog car tree sign window table shirt clock cat bus plate".split(),
          "rel": ["on", "near", "behind", "under", "next to", "holding", "wearing"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="build and use the test zoo's tiny models (CPU, offline)")
    p.add_argument("--zoo_dir", default=None, help="where --tiny builds (and reuses) its models (default: a temp dir)")
    p.add_argument("--model_name", default=None, help="causal LM: hub id or local dir")
    p.add_argument("--vision_encoder", default=None, help="CLIP spec (see models/vision.py)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (worker start-up, first-call costs)")
    p.add_argument("--max_length", type=int, default=32, help="tokens per phrase (collator truncation)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the 'workers' configuration")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--vg_dir", default=None, help="a real Visual Genome directory (images included)")
    p.add_argument("--work_dir", default=None, help="stand-in images (default: a temp dir)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); 1 gives steadier numbers on a busy machine")
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad or not args.configs:
        p.error(f"--configs: unknown configuration {bad[0] if bad else ''!r}; choose from {', '.join(CONFIGS)}")
    if min(args.batch_size, args.steps) < 1 or args.warmup < 0 or args.workers < 0:
        p.error("--batch_size and --steps must be >= 1, --warmup and --workers >= 0")
    if not args.tiny and not args.model_name:
        p.error("give --model_name (and --vision_encoder), or --tiny")
    return args


# ---------------------------------------------------------------------------------------------- data
def _stand_in(path: Path, width: int, height: int, rng: random.Random):
    """A photo-sized JPEG of smooth colour noise (compresses and decodes like a photo, roughly)."""
    import numpy as np
    from PIL import Image

    gen = np.random.default_rng(rng.randrange(2**32))
    small = gen.integers(0, 256, size=(max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    noise = gen.integers(-12, 13, size=(height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def make_vg_dir(out: Path, n_regions: int, seed: int = 0) -> Path:
    """A Visual Genome directory with stand-in images: the real sample's regions when available and
    enough, else ``n_regions`` invented ones (8 per 640x480 image)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    sample = repo_data("visual_genome")
    regions = []
    if sample is not None and (sample / "v1.2" / "region_descriptions.json").is_file():
        images = json.loads((sample / "v1.2" / "image_data.json").read_text())
        regions = json.loads((sample / "v1.2" / "region_descriptions.json").read_text())
    if sum(len(r["regions"]) for r in regions) < n_regions:
        n_images = math.ceil(n_regions / 8)
        images = [{"image_id": i + 1, "width": 640, "height": 480, "url": f"https://x/VG_100K/{i + 1}.jpg"}
                  for i in range(n_images)]
        regions = []
        for im in images:
            rows = []
            for r in range(8):
                w, h = rng.randint(40, 400), rng.randint(40, 300)
                phrase = (f"{rng.choice(_WORDS['adj'])} {rng.choice(_WORDS['noun'])} {rng.choice(_WORDS['rel'])} "
                          f"the {rng.choice(_WORDS['noun'])}")
                rows.append({"region_id": im["image_id"] * 100 + r, "image_id": im["image_id"], "phrase": phrase,
                             "x": rng.randint(0, 640 - w), "y": rng.randint(0, 480 - h), "width": w, "height": h})
            regions.append({"id": im["image_id"], "regions": rows})
    (out / "image_data.json").write_text(json.dumps(images))
    (out / "region_descriptions.json").write_text(json.dumps(regions))
    for im in images:
        target = out / "VG_100K" / f"{im['image_id']}.jpg"
        if not target.is_file():
            _stand_in(target, im["width"], im["height"], rng)
    return out


# ---------------------------------------------------------------------------------------------- timing
class _LMClock:
    """Seconds inside the frozen LM's forward passes (forward hooks; synchronised on CUDA)."""

    def __init__(self, module, device):
        self.seconds, self._t, self.device = 0.0, 0.0, device
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_):
        sync(self.device)
        self._t = time.perf_counter()

    def _post(self, *_):
        sync(self.device)
        self.seconds += time.perf_counter() - self._t


def run_config(name: str, cfg: dict, args, model, vision, tokenizer, dataset, device, lm_clock) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from data.captions import CaptionCollator

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["dtype"]]
    model.lm.to(dtype)
    vision.to(dtype)
    workers = args.workers if cfg["workers"] is None else cfg["workers"]
    cuda = torch.device(device).type == "cuda"
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        collate_fn=CaptionCollator(tokenizer, vision.preprocess, max_length=args.max_length),
                        generator=torch.Generator().manual_seed(args.seed), pin_memory=cuda)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if cfg["dtype"] == "bf16"
                else contextlib.nullcontext())
    memory = PeakMemory(device)
    memory.reset()
    batches = iter(loader)

    def features(batch):
        pixels = batch["pixel_values"].to(device, dtype, non_blocking=True)
        with torch.no_grad():
            return vision.encode_images(pixels)[0]

    cached = []
    if cfg["features"] == "precomputed":  # a feature cache, filled before the clock starts
        for _ in range(args.warmup + args.steps):
            b = next(batches)
            cached.append({**{k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels")},
                           "patches": features(b)})
    totals = {"data": 0.0, "vision": 0.0, "lm": 0.0, "fusion": 0.0}
    losses = []
    model.train()
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        if cached:
            b = cached[step]
            t1 = t2 = time.perf_counter()
        else:
            b = next(batches)
            t1 = time.perf_counter()
            b = {**{k: b[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels")},
                 "patches": features(b)}
            sync(device)
            t2 = time.perf_counter()
        lm0 = lm_clock.seconds
        with autocast:
            loss = model(b["input_ids"], b["attention_mask"], b["patches"], labels=b["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        losses.append(round(float(loss.detach()), 4))
        if step >= args.warmup:
            lm = lm_clock.seconds - lm0
            for key, value in (("data", t1 - t0), ("vision", t2 - t1), ("lm", lm), ("fusion", t3 - t2 - lm)):
                totals[key] += value
    peak = memory.peak_mib()
    del batches, loader
    step_s = sum(totals.values()) / args.steps
    return {"config": name, "workers": workers, "lm_dtype": cfg["dtype"], "features": cfg["features"],
            "samples_per_s": round(args.batch_size / step_s, 2), "step_ms": round(1000 * step_s, 2),
            "split_ms": {k: round(1000 * v / args.steps, 2) for k, v in totals.items()},
            "peak_memory_mib": peak, "peak_memory_kind": memory.kind, "losses": losses}


def report(rows: list[dict]) -> str:
    head = f"{'config':<12}{'workers':>8}{'LM':>6}{'features':>12}{'samples/s':>11}{'step ms':>10}" \
           f"{'data':>9}{'vision':>9}{'lm':>9}{'fusion':>9}{'peak MiB':>10}"
    lines = [head]
    for r in rows:
        s = r["split_ms"]
        lines.append(f"{r['config']:<12}{r['workers']:>8}{r['lm_dtype']:>6}{r['features']:>12}"
                     f"{r['samples_per_s']:>11}{r['step_ms']:>10}{s['data']:>9}{s['vision']:>9}{s['lm']:>9}"
                     f"{s['fusion']:>9}{r['peak_memory_mib']:>10}")
    lines.append(f"(step split in ms per step; fusion = projector + fusion block + LM head + loss + backward + "
                 f"AdamW; peak memory: {rows[0]['peak_memory_kind']})")
    base = next((r for r in rows if r["config"] == "base"), None)
    if base:
        for r in rows:
            if r is not base:
                lines.append(f"{r['config']} vs base: {r['samples_per_s'] / base['samples_per_s']:.2f}x samples/s")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.tiny:
            use_tiny_zoo(args, stack, ("model_name", "vision_encoder"))
        import torch
        from transformers import AutoTokenizer

        from data.captions import VGRegions
        from models.fusion.factory import load_late_fusion_model
        from models.vision import DEFAULT_VISION_ENCODER, load_vision_encoder

        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(args.seed)
        needed = args.batch_size * (args.warmup + args.steps)
        vg_dir = Path(args.vg_dir) if args.vg_dir else make_vg_dir(
            Path(args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="vg-"))) / "vg", needed)
        dataset = VGRegions(vg_dir)
        if len(dataset) < needed:
            raise ValueError(f"{vg_dir} has {len(dataset)} regions; {needed} needed (batch_size x (warmup + steps))")
        vision = load_vision_encoder(args.vision_encoder or DEFAULT_VISION_ENCODER, device=device)
        tokenizer = AutoTokenizer.from_pretrained(args.model_name)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = load_late_fusion_model(args.model_name, vision_dim=vision.hidden_size,
                                       torch_dtype=torch.float32).to(device)
        lm_clock = _LMClock(model.lm.base_model, device)
        rows = [run_config(name, CONFIGS[name], args, model, vision, tokenizer, dataset, device, lm_clock)
                for name in args.configs]
    print(f"training: batch {args.batch_size}, {args.steps} timed steps after {args.warmup}, LM {args.model_name}, "
          f"device {device}")
    print(report(rows))
    result = {"benchmark": "train_cost", "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
              "max_length": args.max_length, "model_name": args.model_name, "vision_encoder": args.vision_encoder,
              "machine": machine_info(device), "configs": rows}
    return finish(result, args.out)


if __name__ == "__main__":
    from eval_scripts.core import run_main

    run_main(main)
