"""The evaluation core every benchmark script shares.

A script parses its flags with :func:`build_parser`, builds an :class:`Evaluator`, turns its data
into items (dicts with an ``id`` and whatever its ``compute`` function needs, including the k image
prompts of each item), and calls :meth:`Evaluator.run` then :meth:`Evaluator.finish`.

The evaluator owns: the model (frozen LM + trained fusion weights), the vision encoder and image
generator (loaded only when images are requested; the pipeline lazily, only on a cache miss),
batching, the scoring primitives (next-token, continuation log-likelihood, fused greedy generation),
progress bars, resumable per-example sample files, multi-process sharding and result files:

* ``<output_dir>/<run_name>/<task>.json``: metrics, config, counts, timing, versions, git commit, date;
* ``<output_dir>/<run_name>/<task>_samples.jsonl``: one line per example (and template).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from models.late_fusion import HiddenStateMemo

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# settings that must match for a re-run with the same --run_name to resume
_RESUME_KEYS = ("model_name", "pretrained_model", "vision_encoder", "generate_images", "k", "image_prompt",
                "image_generator", "image_size", "num_inference_steps", "guidance_scale", "mix",
                "clip_temperature", "uniform_weights", "seed")


# The frozen LM's hidden states per token sequence, shared by every Evaluator in this process (e.g.
# the demo's text-only, k=1, k=3 and k=6 runs score the same prompts). Bounded in bytes.
_HIDDEN_MEMO = HiddenStateMemo()


def clear_memos() -> None:
    """Forget memoised LM hidden states (benchmarks call this to start each way from a clean state)."""
    _HIDDEN_MEMO.clear()


class EvalError(Exception):
    """Bad input: reported as one line, exit status 2."""


def _bool_word(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "y", "on"):
        return True
    if v in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser(description: str, *, image_prompt_choices=("sentences", "full", "question"),
                 default_image_prompt: str = "sentences", default_k: int = 10) -> argparse.ArgumentParser:
    """The flags every eval script shares (released spellings kept as aliases)."""
    from models.image_generation import add_generation_args
    from models.mixing import MIX_MODES

    p = argparse.ArgumentParser(description=description)
    g = p.add_argument_group("model")
    g.add_argument("--model_name", "--model_name_or_path", dest="model_name", default="gpt2",
                   help="causal LM: hub id or local dir")
    g.add_argument("--pretrained_model", default=None,
                   help="trained fusion weights: a dir written by train.py, or a released .bin (suffix optional)")
    g.add_argument("--vision_encoder", default=None,
                   help="CLIP spec (default: the checkpoint's, else ViT-B-32-quickgelu/openai)")
    g.add_argument("--proj_hidden", type=int, default=None, help="projector width when no checkpoint is given")
    g = p.add_argument_group("images")
    g.add_argument("--generate_images", nargs="?", const=True, default=False, type=_bool_word,
                   help="fuse k generated images (a switch; '--generate_images True/False' also works)")
    g.add_argument("--k", type=int, default=default_k, help="images per input")
    g.add_argument("--image_prompt", choices=image_prompt_choices, default=default_image_prompt,
                   help="how image prompts are derived from the input")
    add_generation_args(p)
    g = p.add_argument_group("mixing")
    g.add_argument("--mix", choices=MIX_MODES, default="logits",
                   help="logits: average weighted logits (the released code); probs: the paper's Eq. 2")
    g.add_argument("--clip_temperature", type=float, default=2.0, help="tau in s_i = tau * max(0, cos)")
    g.add_argument("--uniform_weights", "--no_clip_rescaling", dest="uniform_weights", action="store_true",
                   help="weight every image 0.5 instead of by CLIP agreement")
    g = p.add_argument_group("run")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples (per subset)")
    g.add_argument("--batch_size", type=int, default=8, help="texts per forward pass")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: accelerator's choice)")
    g.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="frozen LM and CLIP dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--seed", type=int, default=0, help="base seed of every generated image")
    g.add_argument("--data_dir", default=None, help="local data in the original format (default: the hub)")
    g.add_argument("--output_dir", default="output/results")
    g.add_argument("--run_name", default=None, help="results go to OUTPUT_DIR/RUN_NAME (default: a timestamp)")
    return p


def parse_choices(value: str, allowed, what: str) -> list[str]:
    """A comma-separated flag value, every item checked against ``allowed``."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise EvalError(f"unknown {what} {unknown[0] if unknown else value!r}; choose from {', '.join(allowed)}")
    return items


def run_main(main: Callable[[list[str] | None], dict], argv=None) -> dict:
    """Run a script's main and turn bad input into one line on stderr and exit status 2."""
    try:
        return main(argv)
    except (EvalError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------------- timing
class _Stopwatch:
    """Accumulates seconds per named phase; forward hooks time the LM and fusion passes."""

    def __init__(self, device):
        self.seconds: dict[str, float] = {"generation": 0.0, "clip": 0.0, "lm": 0.0, "fusion": 0.0}
        self.counts: dict[str, int] = {"lm": 0, "fusion": 0}
        self._cuda = torch.device(device).type == "cuda"
        self._start: dict[str, float] = {}

    def _now(self):
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def hook(self, module, name):
        module.register_forward_pre_hook(lambda *_: self._start.__setitem__(name, self._now()))

        def post(*_):
            self.seconds[name] += self._now() - self._start.pop(name)
            self.counts[name] += 1
        module.register_forward_hook(post)

    def phase(self, name):
        watch = self

        class _Ctx:
            def __enter__(self):
                self.t = watch._now()

            def __exit__(self, *exc):
                watch.seconds[name] += watch._now() - self.t
        return _Ctx()


# ---------------------------------------------------------------------------------------------- evaluator
class Evaluator:
    def __init__(self, args: argparse.Namespace, task: str, resume_keys: tuple[str, ...] = ()):
        """``resume_keys``: the script's own flags that must match for a re-run to resume."""
        from accelerate import PartialState
        from transformers import AutoTokenizer

        from models.checkpoints import load_state, load_trainable
        from models.late_fusion import LateFusionLM
        from models.vision import DEFAULT_VISION_ENCODER

        self.t0 = time.perf_counter()
        self.args, self.task = args, task
        self.resume_keys = _RESUME_KEYS + tuple(resume_keys)
        if args.generate_images and args.k < 1:
            raise EvalError(f"--k must be >= 1 when images are requested, got {args.k}")
        if args.k < 0:
            raise EvalError(f"--k must be >= 0, got {args.k}")
        if args.limit is not None and args.limit < 1:
            raise EvalError(f"--limit must be >= 1, got {args.limit}")
        if args.batch_size < 1:
            raise EvalError(f"--batch_size must be >= 1, got {args.batch_size}")
        self.use_images = bool(args.generate_images) and args.k > 0
        self.state = PartialState(cpu=args.device == "cpu")
        self.device = torch.device(args.device) if args.device else self.state.device
        self.dtype = (DTYPES[args.dtype] if args.dtype != "auto" else
                      torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        args.run_name = args.run_name or _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
        self.out_dir = Path(args.output_dir) / args.run_name
        self.is_main = self.state.is_main_process
        self.watch = _Stopwatch(self.device)

        # trained weights first: their shapes give the vision width and projector width
        ckpt_state, ckpt_cfg = (load_state(args.pretrained_model) if args.pretrained_model else ({}, {}))
        if args.pretrained_model and "mm_proj.linear1.weight" in ckpt_state:
            vision_dim = ckpt_state["mm_proj.linear1.weight"].shape[1]
            proj_hidden = ckpt_state["mm_proj.linear1.weight"].shape[0]
        else:
            vision_dim, proj_hidden = ckpt_cfg.get("vision_dim"), args.proj_hidden
        args.vision_encoder = args.vision_encoder or ckpt_cfg.get("vision_encoder") or DEFAULT_VISION_ENCODER
        self._check_resume()  # before loading any model: a mismatched re-run fails fast (writes nothing)
        self.vision = None
        if self.use_images:
            from models.vision import load_vision_encoder
            self.vision = load_vision_encoder(args.vision_encoder, device=self.device, dtype=self.dtype)
            if vision_dim is not None and vision_dim != self.vision.hidden_size:
                raise EvalError(f"--pretrained_model {args.pretrained_model!r} expects vision width {vision_dim}, "
                                f"but {args.vision_encoder!r} gives {self.vision.hidden_size}")
            vision_dim = self.vision.hidden_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(args.model_name)
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot load the tokenizer of --model_name {args.model_name!r}: "
                            f"{str(e).splitlines()[0]}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = LateFusionLM.from_pretrained(args.model_name, vision_dim=vision_dim or 768,
                                                  proj_hidden=proj_hidden, torch_dtype=self.dtype)
        if args.pretrained_model:
            load_trainable(self.model, args.pretrained_model, loaded=(ckpt_state, ckpt_cfg))
            del ckpt_state
        self.model.to(self.device, self.dtype).eval()
        self._model_key = (args.model_name, str(self.dtype), str(self.device))
        self.watch.hook(self.model.lm.base_model, "lm")
        self.watch.hook(self.model.fusion_layer, "fusion")
        self.provider = None
        if self.use_images:
            from models.image_generation import ImageCache, ImageProvider, build_generator
            generator = build_generator(args.image_generator, device=self.device, dtype=args.dtype,
                                        noise=args.toyworld_noise)
            self.provider = ImageProvider(generator, ImageCache(args.image_cache), image_size=args.image_size,
                                          num_inference_steps=args.num_inference_steps,
                                          guidance_scale=args.guidance_scale, seed=args.seed,
                                          gen_batch_size=args.gen_batch_size)
            from models import image_generation
            self._pipeline_loads0 = image_generation.PIPELINE_LOADS  # the counter is process-wide
        self._features: OrderedDict[str, tuple[torch.Tensor, float]] = OrderedDict()  # path -> (patches, cos)
        self.n_examples = 0

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def images_for(self, prompt_lists: list[list[str]]):
        """Patches ``[B, k, n_v, d]``, weights ``[B, k]`` and per-item image records, or Nones."""
        if not self.use_images:
            return None, None, [[] for _ in prompt_lists]
        from models.mixing import clip_weights
        with self.watch.phase("generation"):
            images = self.provider.get(prompt_lists)
        todo = OrderedDict((im.path, im) for item in images for im in item if im.path not in self._features)
        with self.watch.phase("clip"):
            todo_list = list(todo.values())
            for start in range(0, len(todo_list), 64):
                chunk = todo_list[start:start + 64]
                patches, embeds = self.vision.encode_images(self.vision.pixels([im.image for im in chunk]))
                cos = self.vision.image_text_similarity(embeds, [im.prompt for im in chunk])
                for im, p, c in zip(chunk, patches, cos.tolist()):
                    self._features[im.path] = (p, c)
        patches = torch.stack([torch.stack([self._features[im.path][0] for im in item]) for item in images])
        cos = torch.tensor([[self._features[im.path][1] for im in item] for item in images])
        weights = clip_weights(cos, self.args.clip_temperature, self.args.uniform_weights).to(self.device)
        records = [[{"path": im.path, "prompt": im.prompt, "weight": round(float(w), 6)}
                    for im, w in zip(item, row)] for item, row in zip(images, weights.tolist())]
        while len(self._features) > 4096:  # bounded: images are shared by nearby items only
            self._features.popitem(last=False)
        return patches, weights, records

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def max_text_tokens(self, reserve: int = 0) -> int | None:
        """Longest text the LM (and the fusion block, after its visual prefix) can take, or None."""
        cfg = self.model.lm.config
        limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        if not limit:
            return None
        n_visual = 0
        if self.use_images:
            n_visual = self.vision.encode_images(self.vision.pixels([_blank_image()]))[0].shape[1]
        return limit - n_visual - reserve

    def _fit(self, seq: list[int], reserve: int = 0) -> tuple[list[int], int]:
        """Keep the last tokens of an over-long sequence; returns it and how many were cut."""
        if not hasattr(self, "_max_text"):
            self._max_text = {}
        if reserve not in self._max_text:
            self._max_text[reserve] = self.max_text_tokens(reserve)
        limit = self._max_text[reserve]
        if limit is None or len(seq) <= limit:
            return seq, 0
        return seq[len(seq) - limit:], len(seq) - limit

    def _pad(self, seqs: list[list[int]], left: bool = False):
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def text_hidden(self, seqs: list[list[int]]) -> torch.Tensor:
        """The LM's final hidden states of right-padded ``seqs`` (memoised across runs)."""
        ids, mask = self._pad(seqs)
        return _HIDDEN_MEMO(self.model, ids, mask, key=self._model_key)

    # ------------------------------------------------------------------ scoring primitives
    @torch.no_grad()
    def next_token_logprobs(self, texts: list[str], prompt_lists: list[list[str]]):
        """Mixed log-probabilities of the token after each text: ``[B, V]`` (CPU), and image records."""
        seqs = [self._fit(self.encode(t))[0] for t in texts]
        ids, mask = self._pad(seqs)
        last = torch.tensor([[len(s) - 1] for s in seqs], device=self.device)
        patches, weights, records = self.images_for(prompt_lists)
        logp = self.model.mixed_logprobs(ids, mask, patches, weights, self.args.mix, positions=last,
                                         hidden=self.text_hidden(seqs))
        return logp[:, 0].float().cpu(), records

    @torch.no_grad()
    def token_logprobs(self, seqs: list[list[int]], starts: list[int], prompt_lists: list[list[str]]):
        """For each token sequence, the mixed log-probs of its tokens ``seq[start:]`` given the prefix."""
        fitted = [self._fit(s) for s in seqs]
        seqs = [f[0] for f in fitted]
        starts = [max(st - cut, 1) for st, (_, cut) in zip(starts, fitted)]
        if any(st < 1 or st >= len(s) for s, st in zip(seqs, starts)):
            raise ValueError("every scored sequence needs a token before its first scored token, and one to score")
        ids, mask = self._pad(seqs)
        span = max(len(s) - st for s, st in zip(seqs, starts))
        pos = torch.tensor([[min(st - 1 + j, len(s) - 2) for j in range(span)] for s, st in zip(seqs, starts)],
                           device=self.device)
        patches, weights, records = self.images_for(prompt_lists)
        logp = self.model.mixed_logprobs(ids, mask, patches, weights, self.args.mix, positions=pos,
                                         hidden=self.text_hidden(seqs)).float()
        targets = torch.tensor([[s[min(st + j, len(s) - 1)] for j in range(span)] for s, st in zip(seqs, starts)],
                               device=self.device)
        picked = logp.gather(-1, targets.unsqueeze(-1))[..., 0].cpu()
        greedy = (logp.argmax(-1) == targets).cpu()
        out = [(picked[i, :len(s) - st].tolist(), bool(greedy[i, :len(s) - st].all()))
               for i, (s, st) in enumerate(zip(seqs, starts))]
        return out, records

    def continuation_logprobs(self, contexts: list[str], continuations: list[str], prompt_lists):
        """lm-evaluation-harness style: per-token log-probs of each continuation given its context."""
        seqs, starts = [], []
        for ctx, cont in zip(contexts, continuations):
            whole, ctx_ids = self.encode(ctx + cont), self.encode(ctx)
            start = len(ctx_ids)
            if whole[:start] != ctx_ids:  # the join merged tokens: split at the last context token
                start = len(ctx_ids) - 1
                while start > 0 and whole[:start] != ctx_ids[:start]:
                    start -= 1
            seqs.append(whole)
            starts.append(max(start, 1))
        return self.token_logprobs(seqs, starts, prompt_lists)

    def score_candidates(self, prompts: list[str], candidate_lists: list[list[str]],
                         prompt_lists: list[list[str]], scoring: str = "first_token"):
        """A score per candidate of each prompt, and the image records of each prompt.

        ``first_token`` (the released protocol): the mixed log-probability of the candidate's first
        token (with a leading space) at the next position, the better of ``" word"`` and ``" Word"``.
        ``full``: the summed log-likelihood of all of ``" word"``'s tokens (multi-token candidates).
        """
        if scoring == "first_token":
            logp, images = self.next_token_logprobs(prompts, prompt_lists)
            scores = [[max(float(logp[i, t]) for t in first_token_ids(self.tokenizer, c)) for c in cands]
                      for i, cands in enumerate(candidate_lists)]
            return scores, images
        if scoring != "full":
            raise EvalError(f"unknown scoring {scoring!r}; use first_token or full")
        flat = [(i, c) for i, cands in enumerate(candidate_lists) for c in cands]
        out, flat_images = self.continuation_logprobs([prompts[i] for i, _ in flat], [" " + c for _, c in flat],
                                                      [prompt_lists[i] for i, _ in flat])
        scores, images = [[] for _ in prompts], [[] for _ in prompts]
        for (i, _), (lps, _greedy), im in zip(flat, out, flat_images):
            scores[i].append(sum(lps))
            images[i] = im
        return scores, images

    def candidate_records(self, batch: list[dict], keep: tuple[str, ...] = ()) -> list[dict]:
        """Score the ``candidates`` of each item (``--scoring``) and build its sample record; the
        prediction is the best-scoring candidate (ties: the first). ``keep``: item fields to copy."""
        scores, images = self.score_candidates([it["prompt"] for it in batch], [it["candidates"] for it in batch],
                                               [it["image_prompts"] for it in batch], self.args.scoring)
        records = []
        for it, sc, im in zip(batch, scores, images):
            pred = it["candidates"][max(range(len(sc)), key=lambda j: (sc[j], -j))]
            records.append({"id": it["id"], **{k: it[k] for k in keep}, "prompt": it["prompt"],
                            "candidates": it["candidates"], "scores": [round(x, 6) for x in sc],
                            "prediction": pred, "answer": it["answer"], "correct": pred == it["answer"],
                            "images": im})
        return records

    @torch.no_grad()
    def generate(self, prompts: list[str], prompt_lists: list[list[str]], max_new_tokens: int = 50):
        """Fused greedy generation, cut at the first newline (cut from the generated ids)."""
        ids, mask = self._pad([self._fit(self.encode(p), reserve=max_new_tokens)[0] for p in prompts], left=True)
        patches, weights, records = self.images_for(prompt_lists)
        tok = self.tokenizer

        def stop(new_ids):
            return "\n" in tok.decode(new_ids[-1:], skip_special_tokens=True)
        out = self.model.generate(ids, mask, patches, weights, self.args.mix, max_new_tokens=max_new_tokens,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, stop=stop)
        texts = []
        for row in out.tolist():
            keep = []
            for t in row:
                if t == tok.eos_token_id or "\n" in tok.decode([t], skip_special_tokens=True):
                    piece = tok.decode([t], skip_special_tokens=True).split("\n")[0]
                    texts.append(tok.decode(keep, skip_special_tokens=True) + piece)
                    break
                keep.append(t)
            else:
                texts.append(tok.decode(keep, skip_special_tokens=True))
        return [t.strip() for t in texts], records

    # ------------------------------------------------------------------ running
    def _samples_path(self) -> Path:
        return self.out_dir / f"{self.task}_samples.jsonl"

    def _part_path(self, rank: int) -> Path:
        return self.out_dir / f"{self.task}_samples.part{rank}.jsonl"

    @staticmethod
    def _read_jsonl(path: Path) -> list[dict]:
        rows = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut short by a killed run: recomputed
                    continue
        return rows

    def _done(self) -> dict[str, dict]:
        done = {}
        for path in [self._samples_path(), *sorted(self.out_dir.glob(f"{self.task}_samples.part*.jsonl"))]:
            for row in self._read_jsonl(path):
                done[row["id"]] = row
        return done

    def _check_resume(self, write: bool = False):
        """Check this run's settings against those of the run being resumed; with ``write``, record
        them if this is a new run (only once results are about to be written)."""
        run_file = self.out_dir / f"{self.task}.run.json"
        mine = json.loads(json.dumps({k: getattr(self.args, k, None) for k in self.resume_keys}))
        old = json.loads(run_file.read_text()) if run_file.is_file() else None
        self.state.wait_for_everyone()  # every rank has read the old file before the main one writes
        if write and old is None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = run_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(mine, indent=2))
            os.replace(tmp, run_file)
        diff = [k for k in self.resume_keys if old is not None and old.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise EvalError(f"run {self.args.run_name!r} was started with --{k} {old.get(k)!r}, not "
                            f"{mine[k]!r}; use another --run_name")

    def _shard(self, items: list[dict]) -> list[dict]:
        """This process's share: whole groups of items that share images (``shard_key``, e.g. the 5
        templates of one question) go to one process, so no image is generated twice."""
        n, rank = self.state.num_processes, self.state.process_index
        if n == 1:
            return items
        groups = list(OrderedDict.fromkeys(it.get("shard_key", it["id"]) for it in items))
        mine = set(groups[rank::n])
        return [it for it in items if it.get("shard_key", it["id"]) in mine]

    def run(self, items: list[dict], compute: Callable[[list[dict]], list[dict]], desc: str = "") -> list[dict]:
        """Score ``items`` in batches (skipping those already in the samples files), sharded across
        processes; returns the records of all items in their order. Items sharing a ``shard_key``
        stay together in one process."""
        from tqdm.auto import tqdm

        self._check_resume(write=True)
        self.state.wait_for_everyone()
        done = self._done()
        todo = self._shard([it for it in items if it["id"] not in done])
        bs = self.args.batch_size
        correct = total = 0
        part = self._part_path(self.state.process_index)
        if part.is_file() and part.stat().st_size:  # a line cut short by a kill: end it first
            with open(part, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        with open(part, "a", encoding="utf-8") as f, \
                tqdm(total=len(todo), desc=desc or self.task, unit="ex", disable=not self.is_main) as bar:
            for start in range(0, len(todo), bs):
                recs = compute(todo[start:start + bs])
                for r in recs:
                    f.write(json.dumps(r) + "\n")
                    correct += bool(r.get("correct"))
                    total += 1
                f.flush()
                bar.update(len(recs))
                post = {"acc": f"{correct / max(total, 1):.3f}"}
                if self.provider is not None:
                    post["img"] = self.provider.generated
                bar.set_postfix(post)
        self.state.wait_for_everyone()
        done = self._done()
        missing = [it["id"] for it in items if it["id"] not in done]
        if missing:
            raise RuntimeError(f"{len(missing)} examples have no result (e.g. {missing[0]})")
        self.n_examples += len(items)
        return [done[it["id"]] for it in items]

    def _stats(self) -> dict:
        s = {"generated": 0, "hits": 0, "pipeline_loads": 0}
        if self.provider is not None:
            from models import image_generation
            s.update(generated=self.provider.generated, hits=self.provider.hits,
                     pipeline_loads=image_generation.PIPELINE_LOADS - self._pipeline_loads0)
        return {**s, "seconds": dict(self.watch.seconds), "passes": dict(self.watch.counts)}

    def finish(self, metrics: dict, table: list[tuple[str, str]] | None = None) -> dict | None:
        """Merge samples, write ``<task>.json`` (main process) and print a short table."""
        stats_path = self.out_dir / f"{self.task}.stats{self.state.process_index}.json"
        stats_path.write_text(json.dumps(self._stats()))
        self.state.wait_for_everyone()
        if not self.is_main:
            return None
        all_stats = [json.loads(p.read_text()) for p in sorted(self.out_dir.glob(f"{self.task}.stats*.json"))]
        gen = sum(s["generated"] for s in all_stats)
        seconds = {k: round(sum(s["seconds"][k] for s in all_stats), 3) for k in all_stats[0]["seconds"]}
        seconds["total"] = round(time.perf_counter() - self.t0, 3)
        result = {
            "task": self.task,
            "metrics": metrics,
            "config": {k: v for k, v in vars(self.args).items()},
            "counts": {"examples": self.n_examples, "images_generated": gen,
                       "images_cached": sum(s["hits"] for s in all_stats),
                       "pipeline_loads": sum(s["pipeline_loads"] for s in all_stats),
                       "lm_passes": sum(s["passes"]["lm"] for s in all_stats),
                       "fusion_passes": sum(s["passes"]["fusion"] for s in all_stats)},
            "timing": seconds,
            "versions": _versions(),
            "git_commit": _git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "num_processes": self.state.num_processes,
        }
        merged = self._done()
        tmp = self._samples_path().with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in merged.values():
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self._samples_path())
        for p in [*self.out_dir.glob(f"{self.task}_samples.part*.jsonl"), *self.out_dir.glob(f"{self.task}.stats*.json")]:
            p.unlink()
        out = self.out_dir / f"{self.task}.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        os.replace(tmp, out)
        width = max([len(k) for k, _ in (table or [])] + [8])
        for k, v in table or []:
            print(f"{k:<{width}}  {v}")
        if self.use_images:
            c = result["counts"]
            print(f"images: {c['images_generated']} generated, {c['images_cached']} from the cache, "
                  f"pipeline loaded {c['pipeline_loads']} time(s)")
        print(f"results: {out}")
        return result


@functools.lru_cache(maxsize=8192)
def first_token_ids(tokenizer, word: str) -> tuple[int, ...]:
    """The first token of ``" word"`` and of ``" Word"`` (the released scripts' capitalised variant)."""
    spellings = {" " + word, " " + word[:1].upper() + word[1:]}
    return tuple(sorted({tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in spellings}))


def _blank_image():
    from PIL import Image
    return Image.new("RGB", (64, 64))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "accelerate", "diffusers", "open_clip_torch", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
