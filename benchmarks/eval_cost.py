"""Where evaluation time goes: ImageNetVC run three ways in one process, and the start-up cost.

Each way starts from a clean state (a new Evaluator and run name, no pipeline held by the process):

* ``text``: text-only (``--generate_images False``);
* ``cold``: k images per input, from an empty image cache (a fresh temporary directory);
* ``warm``: the same again, on the cache the cold run filled (images and vision features).

For each way it prints questions per second, the image counters (slots, generated, from the cache,
reused, PNGs decoded, vision features computed / read), pipeline constructions, LM and fusion passes,
seconds in generation / CLIP / LM / fusion, and peak memory; then the ratios: images generated per
question against the released protocol's 5 x k, warm-cache time over text-only time, cold over warm,
and cold-cache time over (generation time + text-only time), i.e. how close a cold run is to its floor.

"Time" is the evaluation loop: the run's wall time minus the Evaluator's construction (model and
CLIP loading). The pipeline is built lazily on the first cache miss, so a cold run's loop time
includes its construction. It also includes waiting, at the end, for the background writer to put
the last PNGs and feature files on disk ("flush wait"). A question is one ImageNetVC question scored
under all 5 templates.

``--generator fast512`` replaces the text-to-image model by one that returns ready-made 512 px
photo-like images at no cost (a stand-in for a fast GPU): the cold run's extra cost is then what the
cache itself costs (PNG encoding and writing, feature files, CLIP on new images).

``--real_shapes`` runs the real-shape CPU setting (:func:`bench_utils.build_real_shapes`): the real
SmolLM2-135M, an open_clip ViT-B-32-quickgelu with random weights at its real shapes (224 px, 49 patches of
width 768), trained weights of that pair's shapes. ``--prefix_compare`` runs the image ways three times, side
by side in one process: ``before`` with ``--prefix_cache False`` (the fusion block runs over ``[V ; H]`` for
every text), ``memory`` with the visual prefix cache in memory only (``--prefix_store off``: each image's
prefix computed once per process) and ``after`` with the defaults (prefixes also kept on disk, so a warm run
computes none). It prints for each warm loop / text-only loop (the text-only run just before the warm one: an
LM pass gets slower as the process ages, so the ratio compares neighbours), cold loop / (generation +
text-only loop + vision time), cold loop / (warm loop + generation + vision time) and the prefix hit rate.

``--startup N`` times, in fresh processes, ``imagenetVC.py --help`` and a one-question text-only run,
N times each; with ``--baseline_tree DIR`` the same commands of another checkout run interleaved with
this one's (back to back), and the ratios are printed.

    python benchmarks/eval_cost.py --tiny --questions 20 --k 6            # CPU, the test zoo
    python benchmarks/eval_cost.py --tiny --questions 20 --k 6 --generator fast512 --ways cold,warm
    python benchmarks/eval_cost.py --tiny --ways none --startup 5 --baseline_tree /tmp/old-checkout
    python benchmarks/eval_cost.py --real_shapes --prefix_compare --generator fast512 --k 6 --questions 20 --threads 2
    python benchmarks/eval_cost.py --model_name google/gemma-2b --image_generator stabilityai/sdxl-turbo \\
        --k 6 --questions 100 --device cuda --out benchmarks/results/gemma.json

Flags it does not know are passed to ``eval_scripts/imagenetVC.py`` unchanged (e.g. ``--mix probs``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (REPO, PeakMemory, build_real_shapes, finish, machine_info, repo_data,  # noqa: E402
                         use_tiny_zoo)

WAYS = ("text", "cold", "warm")
N_TEMPLATES = 5
# flags forwarded to imagenetVC.py when given
PASS_THROUGH = ("model_name", "vision_encoder", "image_generator", "device", "dtype", "batch_size", "gen_batch_size",
                "image_size", "num_inference_steps", "image_prompt", "pretrained_model")
GENERATORS = ("model", "fast512")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=20, help="questions per subset (--limit)")
    p.add_argument("--k", type=int, default=6, help="images per input")
    p.add_argument("--subsets", default="color", help="comma-separated ImageNetVC subsets")
    p.add_argument("--data_dir", default=None,
                   help="ImageNetVC CSVs (default: the shipped data/evaluation/imagenetvc)")
    p.add_argument("--tiny", action="store_true", help="build and use the test zoo's tiny models (CPU, offline)")
    p.add_argument("--real_shapes", action="store_true",
                   help="the real SmolLM2-135M, a random ViT-B-32-quickgelu at real shapes, trained-shape weights (CPU)")
    p.add_argument("--prefix_compare", action="store_true",
                   help="run the image ways without the visual prefix cache (before), with it in memory only (memory) "
                        "and with the defaults (after: memory and disk), side by side")
    p.add_argument("--zoo_dir", default=None,
                   help="where --tiny / --real_shapes build (and reuse) their models (default: a temp dir)")
    p.add_argument("--work_dir", default=None, help="image caches and result files (default: a temp dir)")
    p.add_argument("--no_warmup", action="store_true",
                   help="skip the untimed one-question text-only run that pays one-off start-up costs")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the ways this many times (each cold run on a new cache) and keep each way's fastest")
    p.add_argument("--ways", default=",".join(WAYS),
                   help="subset of text,cold,warm to run (ratios need them), or 'none' (e.g. with --startup)")
    p.add_argument("--generator", choices=GENERATORS, default="model",
                   help="model: --image_generator; fast512: ready-made 512 px images at no cost (a fast GPU)")
    p.add_argument("--startup", type=int, default=0, metavar="N",
                   help="also time --help and a one-question text-only run in fresh processes, N times each")
    p.add_argument("--baseline_tree", default=None,
                   help="another checkout whose start-up is timed interleaved with this one's (with --startup)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); 1 gives steadier numbers on a busy machine")
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    p.add_argument("--progress", action="store_true", help="show the evaluation's progress bars and tables")
    for name in PASS_THROUGH:
        p.add_argument(f"--{name}", default=None)
    args, extra = p.parse_known_args(argv)
    args.extra = extra
    args.ways = [] if args.ways.strip() == "none" else [w.strip() for w in args.ways.split(",") if w.strip()]
    bad = [w for w in args.ways if w not in WAYS]
    if bad or not (args.ways or args.startup):
        p.error(f"--ways: unknown way {bad[0] if bad else ''!r}; choose from {', '.join(WAYS)}")
    if args.tiny and args.real_shapes:
        p.error("--tiny and --real_shapes are two settings: give one")
    if min(args.questions, args.k, args.repeats) < 1 or args.startup < 0:
        p.error("--questions, --k and --repeats must be >= 1, --startup >= 0")
    if args.generator == "fast512":
        if args.image_size not in (None, "512"):
            p.error("--generator fast512 makes 512 px images: leave --image_size out")
        args.image_size = "512"
    return args


# ---------------------------------------------------------------------------------------------- fast512
class Fast512:
    """A text-to-image "model" that costs nothing: it returns ready-made 512 px images (a pool made before
    the clock starts; image i of a call is pool[seed % size]), so a cold run measures the cache's own cost.

    The pool is photo-like (smooth colour fields plus sensor-like noise): its PNGs cost what real ones
    do to encode (about 600 KB and 15-30 ms each at level 1), unlike flat synthetic images."""

    generator_id = "fast512-v1"
    key_dtype = None

    def __init__(self, size: int = 512, pool: int = 16):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:size, 0:size] / size
        self.pool = []
        for _ in range(pool):
            a = rng.uniform(0, 2 * np.pi, (3, 3))
            channels = [127 + 90 * np.sin(a[c, 0] + 5 * x * np.cos(a[c, 1]) + 5 * y * np.sin(a[c, 2]))
                        for c in range(3)]
            pixels = np.stack(channels, -1) + rng.normal(0, 8, (size, size, 3))
            self.pool.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"))

    def generate(self, prompts, seeds, *, image_size, num_inference_steps, guidance_scale):
        if image_size != 512:
            raise ValueError("fast512 makes 512 px images only")
        return [self.pool[seed % len(self.pool)] for seed in seeds]


@contextlib.contextmanager
def _generator(fast: Fast512 | None):
    """With a :class:`Fast512`, every generator the evaluation builds is that one."""
    if fast is None:
        yield
        return
    from models.images import generators

    original = generators.build_generator
    generators.build_generator = lambda spec, **kw: fast
    try:
        yield
    finally:
        generators.build_generator = original


def distinct_image_prompts(args) -> int:
    """Distinct image prompts of the selected questions: what a protocol that generates each once needs."""
    from data.benchmarks import IMAGENETVC_TEMPLATES, imagenetvc_prompt, load_imagenetvc

    prompts = set()
    for subset in args.subsets.split(","):
        for ex in load_imagenetvc(subset.strip(), args.data_dir, args.questions):
            if (args.image_prompt or "question") == "question":
                prompts.add(ex["question"])
            else:
                prompts.update(imagenetvc_prompt(ex["question"], t) for t in range(len(IMAGENETVC_TEMPLATES)))
    return len(prompts)


def _argv(args, *, images: bool, cache: Path, out_dir: Path, run_name: str, limit: int) -> list[str]:
    argv = ["--k", str(args.k), "--limit", str(limit), "--subsets", args.subsets,
            "--generate_images", str(images), "--image_cache", str(cache), "--output_dir", str(out_dir),
            "--run_name", run_name]
    if args.data_dir:
        argv += ["--data_dir", str(args.data_dir)]
    for name in PASS_THROUGH:
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    return argv + list(args.extra)


# (module, class or None, attribute, record key): calls timed inside one run, to split the phases further.
# Cache and feature writes run in the background writer's threads: their seconds are busy time there,
# not time on the critical path (which "flush_wait_s", the wait at the end, shows).
_TIMED = (("eval_scripts.core", "Evaluator", "__init__", "setup_s"),
          ("models.images.generators", None, "_load_pipeline", "pipeline_s"),
          ("models.images.generators", "DiffusersGenerator", "generate", "generator_s"),
          ("models.images.toyworld", "ToyWorldGenerator", "generate", "generator_s"),
          ("models.images.cache", "ImageCache", "write", "cache_write_s"),
          ("models.images.cache", "ImageCache", "read", "cache_read_s"),
          ("models.images.features", "FeatureStore", "write", "feature_write_s"),
          ("models.images.features", "FeatureStore", "read", "feature_read_s"),
          ("eval_scripts.runtime", "Runtime", "flush", "flush_wait_s"),
          ("models.vision", "VisionEncoder", "pixels", "clip_preprocess_s"),
          ("models.vision", "VisionEncoder", "encode_texts", "clip_text_s"),
          ("models.vision", "OpenClipEncoder", "encode_texts", "clip_text_s"),
          ("models.vision", "HFClipEncoder", "encode_texts", "clip_text_s"))


@contextlib.contextmanager
def _instrumented(record: dict, device: str):
    """Time the calls in ``_TIMED`` (synchronising CUDA): model loading, pipeline construction, generator
    calls, cache writes and reads, feature-cache writes and reads, the final wait for the writer, CLIP
    preprocessing and CLIP text encoding."""
    import importlib

    import torch

    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    patched = []
    record.update({key: 0.0 for *_, key in _TIMED})

    def timed(key, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                record[key] += time.perf_counter() - t
        wrapper.__wrapped__ = fn
        return wrapper

    for module_name, cls_name, attr, key in _TIMED:
        try:
            owner = importlib.import_module(module_name)
        except ImportError:  # an older checkout (measured as a baseline) may not have it
            continue
        owner = getattr(owner, cls_name, None) if cls_name else owner
        if owner is None or attr not in vars(owner):  # inherited: the base class's wrapper times it
            continue
        patched.append((owner, attr, vars(owner)[attr]))
        setattr(owner, attr, timed(key, vars(owner)[attr]))
    try:
        yield
    finally:
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Swallow the evaluation's tables and progress bars; show what was swallowed if it fails."""
    if not enabled:
        yield
        return
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except BaseException:
        sys.stderr.write(err.getvalue()[-4000:])
        raise


def _clean_state(device):
    """Forget the pipelines and memoised LM states this process holds and free memory, so each way
    pays its own costs."""
    import torch

    from eval_scripts.runtime import clear_memos
    from models import write_behind
    from models.images import generators

    write_behind.flush()
    generators._PIPELINES.clear()
    clear_memos()
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


COUNTERS = ("image_slots", "images_generated", "images_from_cache", "images_reused", "pngs_decoded",
            "vision_features_computed", "vision_features_read", "prefix_computed", "prefix_reused",
            "prefix_read")


def run_way(args, way: str, cache: Path, out_dir: Path, device: str, limit: int | None = None,
            extra: tuple[str, ...] = ()) -> dict:
    from eval_scripts import imagenetVC

    _clean_state(device)
    memory = PeakMemory(device)
    record: dict = {}
    argv = _argv(args, images=not way.startswith("text"), cache=cache, out_dir=out_dir,
                 run_name=f"{way}-{uuid.uuid4().hex[:8]}", limit=limit or args.questions) + list(extra)
    memory.reset()
    t = time.perf_counter()
    with _generator(args.fast512), _instrumented(record, device), _quiet(not args.progress):
        result = imagenetVC.main(argv)
    wall = time.perf_counter() - t
    peak = memory.peak_mib()
    counts, timing = result["counts"], result["timing"]
    questions = counts["examples"] // N_TEMPLATES
    loop = wall - record["setup_s"]
    return {
        "way": way,
        "generator": args.generator,
        "questions": questions,
        "scored_prompts": counts["examples"],
        "wall_s": round(wall, 4),
        "setup_s": round(record["setup_s"], 4),
        "loop_s": round(loop, 4),
        "questions_per_s": round(questions / loop, 3),
        "ms_per_question": round(1000 * loop / questions, 2),
        "ms_per_scored_prompt": round(1000 * loop / counts["examples"], 2),
        # what a long run amortises to: the one-off pipeline construction left out
        "ms_per_question_no_construction": round(1000 * (loop - record["pipeline_s"]) / questions, 2),
        **{name: counts.get(name) for name in COUNTERS},  # None: not counted by the checkout measured
        "pipeline_constructions": counts["pipeline_loads"],
        "pipeline_construction_s": round(record["pipeline_s"], 4),
        "lm_passes": counts["lm_passes"],
        "fusion_passes": counts["fusion_passes"],
        "seconds": {k: timing[k] for k in ("generation", "clip", "lm", "fusion")},
        # inside generation: construction, generator calls (construction excluded), PNG reads; inside clip:
        # PIL preprocessing, the text tower and feature-file reads (the image tower is the rest); in the
        # background writer: PNG and feature writes; on the critical path at the end: the flush wait
        "split_s": {"pipeline_construction": round(record["pipeline_s"], 4),
                    "generator_calls": round(record["generator_s"] - record["pipeline_s"], 4),
                    "cache_read": round(record["cache_read_s"], 4),
                    "feature_read": round(record["feature_read_s"], 4),
                    "clip_preprocess": round(record["clip_preprocess_s"], 4),
                    "clip_text": round(record["clip_text_s"], 4),
                    "writer_png": round(record["cache_write_s"], 4),
                    "writer_features": round(record["feature_write_s"], 4),
                    "flush_wait": round(record["flush_wait_s"], 4)},
        "peak_memory_mib": peak,
        "peak_memory_kind": memory.kind,
        "accuracy": result["metrics"]["overall"]["mean"],
    }


def ratios(ways: dict, k: int, distinct: int) -> dict:
    out = {}
    cold, text, warm = ways.get("cold"), ways.get("text"), ways.get("warm")
    if cold:
        out["images_per_question"] = cold["images_generated"] / cold["questions"]
        out["released_images_per_question"] = N_TEMPLATES * k
        out["images_over_floor"] = cold["images_generated"] / (k * distinct)
    if warm and text:
        out["warm_over_text"] = round(warm["loop_s"] / text["loop_s"], 3)
    if cold and warm:
        out["cold_over_warm"] = round(cold["loop_s"] / warm["loop_s"], 3)
    if cold and text:
        out["cold_over_floor"] = round(cold["loop_s"] / (cold["seconds"]["generation"] + text["loop_s"]), 3)
    return out


# --prefix_compare: no prefix cache; the in-memory cache alone; the cache and its store on disk (the default)
PREFIX_VARIANTS = (("before", ("--prefix_cache", "False")), ("memory", ("--prefix_store", "off")), ("after", ()))


def prefix_ratios(ways: dict, variant: str) -> dict:
    """One prefix variant's ratios (:data:`PREFIX_VARIANTS`): warm / text-only, cold /
    (generation + text-only + vision), cold / (warm + generation + vision; the issue's cold target), the
    warm run's prefix-cache hit rate, and the warm loop split into LM, fusion block and the rest."""
    text, cold, warm = ways.get("text"), ways.get(f"cold_{variant}"), ways.get(f"warm_{variant}")
    pair = ways.get(f"text_{variant}") or text  # the text-only run next to the warm one
    out = {}
    if warm and pair:
        out["warm_over_text"] = round(warm["loop_s"] / pair["loop_s"], 3)
        out["text_loop_s"] = pair["loop_s"]
        sec = warm["seconds"]
        out["warm_split_s"] = {"lm": sec["lm"], "fusion": sec["fusion"],
                               "rest": round(warm["loop_s"] - sec["lm"] - sec["fusion"], 3)}
    if cold and text:
        vision = cold["seconds"]["clip"]
        out["cold_over_generation_text_vision"] = round(
            cold["loop_s"] / (cold["seconds"]["generation"] + text["loop_s"] + vision), 3)
    if cold and warm:
        out["cold_over_warm_generation_vision"] = round(
            cold["loop_s"] / (warm["loop_s"] + cold["seconds"]["generation"] + cold["seconds"]["clip"]), 3)
    for way in ("cold", "warm"):
        r = ways.get(f"{way}_{variant}")
        if r and r.get("prefix_computed") is not None:
            slots = r["prefix_computed"] + r["prefix_reused"]
            out[f"{way}_prefix_hit_rate"] = round(r["prefix_reused"] / slots, 4) if slots else None
    return out


def prefix_report(ways: dict, pr: dict) -> str:
    names = [v for v, _ in PREFIX_VARIANTS if v in pr]
    lines = ["visual prefix cache, side by side: before (--prefix_cache False), memory (--prefix_store off), "
             "after (the default: memory and disk)", f"{'':<48}" + "".join(f"{v:>10}" for v in names)]
    rows = (("text-only loop s (run next to the warm one)", "text_loop_s"),
            ("warm loop / text-only loop", "warm_over_text"),
            ("cold loop / (generation + text-only + vision)", "cold_over_generation_text_vision"),
            ("cold loop / (warm + generation + vision)", "cold_over_warm_generation_vision"),
            ("prefix hit rate, cold run", "cold_prefix_hit_rate"),
            ("prefix hit rate, warm run", "warm_prefix_hit_rate"))
    for label, key in rows:
        lines.append(f"{label:<48}" + "".join(f"{str(pr[v].get(key)):>10}" for v in names))
    for part in ("lm", "fusion", "rest"):
        lines.append(f"{'  warm loop: ' + part + ' s':<48}" + "".join(
            f"{str(pr[v].get('warm_split_s', {}).get(part)):>10}" for v in names))
    return "\n".join(lines)


def report(ways: dict, r: dict, k: int, distinct: int, memory_kind: str) -> str:
    rows = [("questions/s", "questions_per_s"), ("ms/question", "ms_per_question"),
            ("ms/question w/o constr.", "ms_per_question_no_construction"),
            ("ms/scored prompt", "ms_per_scored_prompt"), ("loop s", "loop_s"), ("setup s", "setup_s"),
            ("image slots", "image_slots"), ("images generated", "images_generated"),
            ("images from cache", "images_from_cache"), ("images reused", "images_reused"),
            ("PNGs decoded", "pngs_decoded"), ("features computed", "vision_features_computed"),
            ("features read", "vision_features_read"),
            ("pipeline constructions", "pipeline_constructions"),
            ("pipeline construction s", "pipeline_construction_s"), ("LM passes", "lm_passes"),
            ("fusion passes", "fusion_passes"), ("prefixes computed", "prefix_computed"),
            ("prefixes reused", "prefix_reused"), ("prefixes read from disk", "prefix_read")]
    names = list(ways)
    lines = [f"{'':<24}" + "".join(f"{n:>12}" for n in names)]
    for label, key in rows:
        lines.append(f"{label:<24}" + "".join(f"{str(ways[n][key]):>12}" for n in names))
    for phase in ("generation", "clip", "lm", "fusion"):
        lines.append(f"{phase + ' s':<24}" + "".join(f"{ways[n]['seconds'][phase]:>12.3f}" for n in names))
    for part in ("generator_calls", "cache_read", "feature_read", "clip_preprocess", "clip_text", "writer_png",
                 "writer_features", "flush_wait"):
        lines.append(f"{'  ' + part.replace('_', ' ') + ' s':<24}" + "".join(f"{ways[n]['split_s'][part]:>12.3f}"
                                                                          for n in names))
    lines.append(f"{'peak memory MiB':<24}" + "".join(f"{ways[n]['peak_memory_mib']:>12}" for n in names))
    lines.append(f"(peak memory: {memory_kind}" + (", process-wide and monotone: each way reports at least "
                                                    "the peak of the ways before it)"
                                                    if memory_kind == "maxrss_process_monotone" else ")"))
    lines.append("(writer png / writer features: seconds busy in the background writer's threads; flush wait: "
                 "seconds the run waited for them at its end)")
    if "images_per_question" in r:
        lines.append(f"images per question: {r['images_per_question']:g} "
                     f"(released protocol: 5 x k = {r['released_images_per_question']}; "
                     f"{r['released_images_per_question'] / max(r['images_per_question'], 1e-9):.1f}x fewer)")
        lines.append(f"images generated / (k x distinct image prompts = {k} x {distinct}): "
                     f"{r['images_over_floor']:g}")
    if "warm_over_text" in r:
        lines.append(f"warm-cache time / text-only time: {r['warm_over_text']:.3f}")
    if "cold_over_warm" in r:
        lines.append(f"cold-cache time / warm-cache time: {r['cold_over_warm']:.3f}")
    if "cold_over_floor" in r:
        lines.append(f"cold-cache time / (generation time + text-only time): {r['cold_over_floor']:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- start-up
def _child(cmd: list[str], tree: Path) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one fresh process running ``cmd`` from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {tree}:\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def startup(args, work: Path) -> dict:
    """Median wall and CPU seconds of ``--help`` and of a one-question text-only run in fresh processes,
    for this tree and (interleaved, one after the other) for ``--baseline_tree``."""
    trees = {"this": REPO}
    if args.baseline_tree:
        trees["baseline"] = Path(args.baseline_tree).resolve()
    commands = {
        "help": ["eval_scripts/imagenetVC.py", "--help"],
        "one_question": ["eval_scripts/imagenetVC.py", "--limit", "1", "--subsets", args.subsets.split(",")[0],
                         "--device", args.device or "cpu", "--model_name", str(args.model_name),
                         "--output_dir", str(work / "startup")] + (["--data_dir", str(args.data_dir)]
                                                                   if args.data_dir else []),
    }
    runs = {t: {c: [] for c in commands} for t in trees}
    for i in range(args.startup):
        for name, cmd in commands.items():
            for tree_name, tree in trees.items():
                extra = ["--run_name", f"{tree_name}-{i}-{uuid.uuid4().hex[:6]}"] if name == "one_question" else []
                runs[tree_name][name].append(_child([sys.executable, *cmd, *extra], tree))
    out = {t: {c: {"wall_s": round(statistics.median(w for w, _ in rs), 3),
                   "cpu_s": round(statistics.median(c for _, c in rs), 3),
                   "wall_s_runs": [round(w, 3) for w, _ in rs]} for c, rs in cs.items()}
           for t, cs in runs.items()}
    if "baseline" in out:
        out["this_over_baseline"] = {c: {m: round(out["this"][c][m] / out["baseline"][c][m], 3)
                                         for m in ("wall_s", "cpu_s")} for c in commands}
    return out


def startup_report(s: dict) -> str:
    lines = []
    for tree in ("this", "baseline"):
        if tree in s:
            for c, v in s[tree].items():
                lines.append(f"start-up {tree:<9} {c:<13} wall {v['wall_s']:.3f} s (median), cpu {v['cpu_s']:.3f} s")
    for c, v in s.get("this_over_baseline", {}).items():
        lines.append(f"start-up this / baseline {c:<13} wall {v['wall_s']:.3f}, cpu {v['cpu_s']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.tiny:
            use_tiny_zoo(args, stack, ("model_name", "vision_encoder", "image_generator"))
            args.image_size = args.image_size or "64"
        if args.real_shapes:
            real = build_real_shapes(args.zoo_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="real-")))
            for name, value in real.items():
                if getattr(args, name) is None:
                    setattr(args, name, value)
            args.device = args.device or "cpu"
        if args.data_dir is None and repo_data("imagenetvc") is not None:
            args.data_dir = str(repo_data("imagenetvc"))
        work = Path(args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="eval-cost-")))
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        args.device = device
        distinct = distinct_image_prompts(args)
        args.fast512 = Fast512() if args.generator == "fast512" else None  # its pool is made before any clock
        if args.ways and not args.no_warmup:
            run_way(args, "text", work / "warmup-cache", work / "out", device, limit=1)
        variants = (PREFIX_VARIANTS if args.prefix_compare else ((None, ()),))
        runs: dict[str, list[dict]] = {}
        for way in WAYS:
            if way in args.ways:
                for name, _ in (variants if way != "text" else ((None, ()),)):
                    runs[way if name is None else f"{way}_{name}"] = []
        # with --prefix_compare each warm run has a text-only run just before it, its pair: an LM pass here gets
        # slower as the process ages (the same text-only run measured 1.0x-1.45x of its first time after a few
        # ways), so each warm / text-only ratio compares neighbours
        paired = args.prefix_compare and "text" in runs and any(k.startswith("warm_") for k in runs)
        for name, _ in (variants if paired else ()):
            runs[f"text_{name}"] = []
        for _ in range(args.repeats if runs else 0):
            if "text" in runs:
                runs["text"].append(run_way(args, "text", work / "text-cache", work / "out", device))
            for name, flags in variants:
                cache = work / f"image-cache-{uuid.uuid4().hex[:8]}"  # empty: the cold run fills it
                for way in ("cold", "text", "warm") if paired else ("cold", "warm"):
                    label = way if name is None else f"{way}_{name}"
                    if way == "text":
                        runs[label].append(run_way(args, "text", work / "text-cache", work / "out", device))
                    elif label in runs:
                        runs[label].append(run_way(args, label, cache, work / "out", device, extra=flags))
        ways = {way: {**min(rs, key=lambda r: r["loop_s"]), "loop_s_runs": [r["loop_s"] for r in rs]}
                for way, rs in runs.items()}
        started = startup(args, work) if args.startup else None
    result = {"benchmark": "eval_cost", "k": args.k, "subsets": args.subsets, "questions_per_subset": args.questions,
              "distinct_image_prompts": distinct, "generator": args.generator,
              "flags": {name: getattr(args, name) for name in PASS_THROUGH} | {"extra": args.extra},
              "real_shapes": args.real_shapes, "prefix_compare": args.prefix_compare,
              "repeats": args.repeats, "machine": machine_info(device)}
    if ways:
        r = ratios(ways, args.k, distinct)
        first = next(iter(ways.values()))
        print(f"ImageNetVC {args.subsets}: {first['questions']} questions x {N_TEMPLATES} templates, "
              f"k = {args.k}, LM {args.model_name}, generator {args.generator}, device {device}")
        print(report(ways, r, args.k, distinct, first["peak_memory_kind"]))
        result.update(ways=ways, ratios=r)
        if args.prefix_compare:
            pr = {v: prefix_ratios(ways, v) for v, _ in PREFIX_VARIANTS}
            print(prefix_report(ways, pr))
            result["prefix_ratios"] = pr
    if started:
        print(startup_report(started))
        result["startup"] = started
    return finish(result, args.out)


if __name__ == "__main__":
    from eval_scripts.core import run_main

    run_main(main)
