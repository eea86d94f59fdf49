"""Scoring primitives on a :class:`eval_scripts.runtime.Runtime`, with one task's mixing settings.

* :meth:`Scorer.images_for`: the k images of each item (their keys; features from memory, the feature
  cache, or images generated or read and encoded), CLIP patch tokens and weights ``s_i``, and the image
  records written to the samples file;
* :meth:`Scorer.next_token_logprobs`: mixed log-probabilities of the next token after each text;
* :meth:`Scorer.token_logprobs` / :meth:`Scorer.continuation_logprobs`: mixed log-probabilities of
  given tokens (lm-evaluation-harness style continuations);
* :meth:`Scorer.score_candidates` / :meth:`Scorer.candidate_records`: fixed candidate lists
  (first-token or full scoring, see ``docs/protocols.md``);
* :meth:`Scorer.generate`: fused greedy generation cut at the first newline.
"""
from __future__ import annotations

import argparse
import functools

import torch

from eval_scripts.cli import EvalError
from eval_scripts.runtime import Runtime


@functools.lru_cache(maxsize=8192)
def first_token_ids(tokenizer, word: str) -> tuple[int, ...]:
    """The first token of ``" word"`` and of ``" Word"`` (the released scripts' capitalised variant)."""
    spellings = {" " + word, " " + word[:1].upper() + word[1:]}
    return tuple(sorted({tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in spellings}))


class Scorer:
    def __init__(self, runtime: Runtime, args: argparse.Namespace, use_images: bool):
        self.rt, self.args, self.use_images = runtime, args, use_images
        self.model, self.tokenizer, self.device = runtime.model, runtime.tokenizer, runtime.device

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def images_for(self, prompt_lists: list[list[str]]):
        """Patches ``[B, k, n_v, d]``, weights ``[B, k]`` and per-item image records, or Nones.

        Only the image keys are computed here; images are read, generated and encoded only when their
        vision features are neither in memory nor in the feature cache (:meth:`Runtime.image_features`).
        """
        if not self.use_images:
            return None, None, [[] for _ in prompt_lists]
        from models.mixing import clip_weights
        refs = self.rt.provider.refs(prompt_lists)
        flat = [r for item in refs for r in item]
        patches, cos = self.rt.image_features(flat)
        k = len(refs[0]) if refs else 0
        patches = torch.stack(patches).unflatten(0, (len(refs), k))
        cos = torch.tensor(cos).view(len(refs), k)
        weights = clip_weights(cos, self.args.clip_temperature, self.args.uniform_weights).to(self.device)
        records = [[{"path": r.path, "prompt": r.prompt, "weight": round(float(w), 6)}
                    for r, w in zip(item, row)] for item, row in zip(refs, weights.tolist())]
        return patches, weights, records

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.rt.encode(text, special)

    def fit(self, seq: list[int], reserve: int = 0) -> tuple[list[int], int]:
        return self.rt.fit(seq, reserve, with_images=self.use_images)

    def text_hidden(self, seqs: list[list[int]]) -> torch.Tensor:
        return self.rt.text_hidden(seqs)

    # ------------------------------------------------------------------ scoring primitives
    @torch.no_grad()
    def next_token_logprobs(self, texts: list[str], prompt_lists: list[list[str]]):
        """Mixed log-probabilities of the token after each text: ``[B, V]`` (CPU), and image records."""
        seqs = [self.fit(self.encode(t))[0] for t in texts]
        ids, mask = self.rt.pad(seqs)
        last = torch.tensor([[len(s) - 1] for s in seqs], device=self.device)
        patches, weights, records = self.images_for(prompt_lists)
        logp = self.model.mixed_logprobs(ids, mask, patches, weights, self.args.mix, positions=last,
                                         hidden=self.text_hidden(seqs))
        return logp[:, 0].float().cpu(), records

    @torch.no_grad()
    def token_logprobs(self, seqs: list[list[int]], starts: list[int], prompt_lists: list[list[str]]):
        """For each token sequence, the mixed log-probs of its tokens ``seq[start:]`` given the prefix."""
        fitted = [self.fit(s) for s in seqs]
        seqs = [f[0] for f in fitted]
        starts = [max(st - cut, 1) for st, (_, cut) in zip(starts, fitted)]
        if any(st < 1 or st >= len(s) for s, st in zip(seqs, starts)):
            raise ValueError("every scored sequence needs a token before its first scored token, and one to score")
        ids, mask = self.rt.pad(seqs)
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
        ids, mask = self.rt.pad([self.fit(self.encode(p), reserve=max_new_tokens)[0] for p in prompts], left=True)
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
