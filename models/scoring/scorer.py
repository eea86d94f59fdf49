"""Scoring primitives on a :class:`models.scoring.runtime.ModelRuntime`, with one task's mixing settings
(the eval scripts, the suite, the harness adapter and the Python API all score through them).

* :meth:`Scorer.images_for`: the k images of each item (their keys; features from memory, the feature
  cache, or images generated or read and encoded), CLIP patch tokens and weights ``s_i``, and the image
  records written to the samples file;
* :meth:`Scorer.next_token_logprobs`: mixed log-probabilities of the next token after each text;
* :meth:`Scorer.token_logprobs`: mixed log-probabilities of given tokens of whole sequences (the
  released commonsense protocol);
* :meth:`Scorer.encode_pair` / :meth:`Scorer.pair_logprobs` / :meth:`Scorer.continuation_logprobs`:
  continuations given contexts exactly as lm-evaluation-harness's ``hf`` model scores them
  (encoding, empty contexts, window truncation; ``eval_scripts/harness.py`` shares them);
* :meth:`Scorer.score_candidates` / :meth:`Scorer.candidate_records`: fixed candidate lists
  (first-token or full scoring, see ``docs/protocols.md``);
* :meth:`Scorer.generate`: fused greedy generation cut at the first newline (and, asked, the LM's own).
"""
from __future__ import annotations

import argparse
import functools
from typing import TYPE_CHECKING

import torch

from models.errors import InputError
from models.errors import NonFiniteScores

if TYPE_CHECKING:
    from models.scoring.runtime import ModelRuntime


@functools.lru_cache(maxsize=8192)
def first_token_ids(tokenizer, word: str) -> tuple[int, ...]:
    """The first token of ``" word"`` and of ``" Word"`` (the released scripts' capitalised variant)."""
    spellings = {" " + word, " " + word[:1].upper() + word[1:]}
    return tuple(sorted({tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in spellings}))


def best_candidate(candidates: list, scores: list[float]):
    """The best-scoring candidate (ties: the first listed)."""
    return candidates[max(range(len(scores)), key=lambda j: (scores[j], -j))]


class Scorer:
    """``args``: the mixing settings (``mix``, ``clip_temperature``, ``uniform_weights``; ``scoring`` for
    :meth:`candidate_records`). ``source`` and ``features``: where the images come from and how they are
    encoded, when not the runtime's own (the Python API's caller-given images)."""

    def __init__(self, runtime: "ModelRuntime", args: argparse.Namespace, use_images: bool, *, source=None,
                 features=None):
        self.rt, self.args, self.use_images = runtime, args, use_images
        self.model, self.tokenizer, self.device = runtime.model, runtime.tokenizer, runtime.device
        self.source = source if source is not None else runtime.source
        self.features = features if features is not None else runtime.image_features
        # the visual prefix cache knows images by the runtime's feature store (caller-given images: no cache)
        self.own_images = source is None and features is None

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def images_for(self, prompt_lists: list[list[str]]):
        """Patches ``[B, k, n_v, d]``, weights ``[B, k]`` and per-item image records, or Nones.

        Only the image keys are computed here; images are read, generated and encoded only when their
        vision features are neither in memory nor in the feature cache (:meth:`ModelRuntime.image_features`).
        """
        return self.images_and_prefix(prompt_lists, with_prefix=False)[:3]

    @torch.no_grad()
    def images_and_prefix(self, prompt_lists: list[list[str]], with_prefix: bool = True):
        """:meth:`images_for` and the fusion block's keys and values of the ``B*k`` visual prefixes (from the
        runtime's prefix cache; None when it is off, there are no images or ``with_prefix`` is False)."""
        if not self.use_images:
            return None, None, [[] for _ in prompt_lists], None
        from models.fusion.mixing import clip_weights
        refs = self.source.refs(prompt_lists)
        flat = [r for item in refs for r in item]
        patches, cos = self.features(flat)
        k = len(refs[0]) if refs else 0
        patches = torch.stack(patches).unflatten(0, (len(refs), k))
        cos = torch.tensor(cos).view(len(refs), k)
        weights = clip_weights(cos, self.args.clip_temperature, self.args.uniform_weights).to(self.device)
        if not bool(torch.isfinite(weights).all()):
            raise NonFiniteScores("the vision encoder gave NaN or infinite image weights")
        root = self.source.image_root()  # paths are recorded relative to it (the results record it once)
        records = [[{"path": root.relative(r.path) if root is not None else r.path, "prompt": r.prompt,
                     "weight": round(float(w), 6),
                     **getattr(r, "provenance", {})}  # retrieved images: index row and similarity
                    for r, w in zip(item, row)] for item, row in zip(refs, weights.tolist())]
        prefix = (self.rt.visual_prefix(patches.flatten(0, 1), [r.key for r in flat])
                  if k and with_prefix and self.own_images else None)
        return patches, weights, records, prefix

    # ------------------------------------------------------------------ tokens
    def answer_prompt(self, prompt: str) -> str:
        """The prompt whose answer is scored: as is for a causal LM (a masked LM's scorer adds its mask)."""
        return prompt

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.rt.encode(text, special)

    def fit(self, seq: list[int], reserve: int = 0) -> tuple[list[int], int]:
        return self.rt.fit(seq, reserve, with_images=self.use_images)

    def text_hidden(self, seqs: list[list[int]]) -> torch.Tensor:
        return self.rt.text_hidden(seqs)

    # ------------------------------------------------------------------ scoring primitives
    @torch.no_grad()
    def next_token_logprobs(self, texts: list[str], prompt_lists: list[list[str]], with_text: bool = False):
        """Mixed log-probabilities of the token after each text: ``[B, V]`` (CPU), and image records;
        ``with_text`` adds the text-only log-probabilities ``[B, V]`` (from the same LM pass)."""
        seqs = [self.fit(self.encode(t))[0] for t in texts]
        ids, mask = self.rt.pad(seqs)
        last = torch.tensor([[len(s) - 1] for s in seqs], device=self.device)
        patches, weights, records, prefix = self.images_and_prefix(prompt_lists)
        with self.rt.finite_guard():
            logp = self.model.mixed_logprobs(ids, mask, patches, weights, self.args.mix, positions=last,
                                             hidden=self.text_hidden(seqs), return_text=with_text, prefix=prefix)
        if with_text:
            return logp[0][:, 0].float().cpu(), records, logp[1][:, 0].float().cpu()
        return logp[:, 0].float().cpu(), records

    @torch.no_grad()
    def token_logprobs(self, seqs: list[list[int]], starts: list[int], prompt_lists: list[list[str]],
                       with_text: bool = False):
        """For each token sequence, the mixed log-probs of its tokens ``seq[start:]`` given the prefix;
        ``with_text`` adds each sequence's text-only log-probs of the same tokens (same LM pass)."""
        fitted = [self.fit(s) for s in seqs]
        seqs = [f[0] for f in fitted]
        starts = [max(st - cut, 1) for st, (_, cut) in zip(starts, fitted)]
        if any(st < 1 or st >= len(s) for s, st in zip(seqs, starts)):
            raise ValueError("every scored sequence needs a token before its first scored token, and one to score")
        return self._logprobs_at(seqs, [st - 1 for st in starts], [s[st:] for s, st in zip(seqs, starts)],
                                 prompt_lists, with_text)

    @torch.no_grad()
    def _logprobs_at(self, inputs: list[list[int]], first: list[int], targets: list[list[int]], prompt_lists,
                     with_text: bool = False):
        """Mixed log-probs of ``targets[i]`` as predicted at positions ``first[i], first[i] + 1, ...`` of
        ``inputs[i]``: ``[(per-token log-probs, every target the argmax)]`` and the image records (and,
        with ``with_text``, the text-only per-token log-probs, from the same LM pass)."""
        ids, mask = self.rt.pad(inputs)
        span = max(len(t) for t in targets)
        pos = torch.tensor([[min(f + j, len(s) - 1) for j in range(span)] for s, f in zip(inputs, first)],
                           device=self.device)
        patches, weights, records, prefix = self.images_and_prefix(prompt_lists)
        with self.rt.finite_guard():
            logp = self.model.mixed_logprobs(ids, mask, patches, weights, self.args.mix, positions=pos,
                                             hidden=self.text_hidden(inputs), return_text=with_text, prefix=prefix)
        logp, text = logp if with_text else (logp, None)
        tgt = torch.tensor([[t[min(j, len(t) - 1)] for j in range(span)] for t in targets], device=self.device)
        picked = logp.float().gather(-1, tgt.unsqueeze(-1))[..., 0].cpu()
        greedy = (logp.argmax(-1) == tgt).cpu()
        out = [(picked[i, :len(t)].tolist(), bool(greedy[i, :len(t)].all())) for i, t in enumerate(targets)]
        if not with_text:
            return out, records
        text = text.float().gather(-1, tgt.unsqueeze(-1))[..., 0].cpu()
        return out, records, [text[i, :len(t)].tolist() for i, t in enumerate(targets)]

    # ------------------------------------------------------------------ lm-evaluation-harness semantics
    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: the BOS token, else EOS (the harness's ``hf`` model)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def harness_encode(self, text: str, special: bool | None = None) -> list[int]:
        """Token ids as the harness encodes a string: the tokenizer's special tokens unless ``special``
        says otherwise or the text already starts with the prefix token."""
        if special is None:
            special = not text.startswith(self.tokenizer.decode(self.prefix_token_id))
        return self.encode(text, special)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)`` of one request, as the harness encodes it.

        Trailing whitespace of the context moves to the continuation; the continuation's ids are those
        of ``context + continuation`` after the context's own ids. An empty context becomes the prefix
        token (BOS, else EOS), unless the continuation already starts with it.
        """
        if context == "":
            cont = self.harness_encode(continuation, special=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        ctx = self.harness_encode(context)
        return ctx, self.harness_encode(context + continuation)[len(ctx):]

    def window(self) -> int:
        """Tokens one scored input may hold (the LM's window, less the visual prefix with images)."""
        return self.rt.max_text_tokens(with_images=self.use_images)

    def pair_logprobs(self, pairs: list[tuple[list[int], list[int]]], prompt_lists, names=None,
                      with_text: bool = False):
        """Per-token mixed log-probs of each continuation given its context (token ids), and whether
        greedy decoding would produce it, truncated as the harness does: the input is the last
        ``window + 1`` tokens of context + continuation without its last token. A continuation
        longer than the window is an error naming ``names[i]`` (e.g. the example id)."""
        window = self.window()
        inputs, first = [], []
        for i, (ctx, cont) in enumerate(pairs):
            name = f"{names[i]}: " if names is not None else ""
            if not ctx or not cont:
                raise InputError(f"{name}nothing to score: the {'continuation' if ctx else 'context'} "
                                "encodes to no tokens")
            if len(cont) > window:
                raise InputError(f"{name}the continuation has {len(cont)} tokens, more than the model's "
                                f"window of {window}")
            inp = (ctx + cont)[-(window + 1):][:-1]
            inputs.append(inp)
            first.append(len(inp) - len(cont))
        return self._logprobs_at(inputs, first, [cont for _, cont in pairs], prompt_lists, with_text)

    def continuation_logprobs(self, contexts: list[str], continuations: list[str], prompt_lists,
                              with_text: bool = False, names=None):
        """lm-evaluation-harness's loglikelihood: per-token log-probs of each continuation given its
        context (:meth:`encode_pair`, then :meth:`pair_logprobs`; ``with_text``: and the text-only ones)."""
        pairs = [self.encode_pair(ctx, cont) for ctx, cont in zip(contexts, continuations)]
        return self.pair_logprobs(pairs, prompt_lists, names, with_text)

    def score_candidates(self, prompts: list[str], candidate_lists: list[list[str]],
                         prompt_lists: list[list[str]], scoring: str = "first_token", with_text: bool = False):
        """A score per candidate of each prompt, and the image records of each prompt; ``with_text``
        adds the text-only scores (the same scoring under the base LM alone, from the same LM pass).

        ``first_token`` (the released protocol): the mixed log-probability of the candidate's first
        token (with a leading space) at the next position, the better of ``" word"`` and ``" Word"``.
        ``full``: the summed log-likelihood of all of ``" word"``'s tokens (multi-token candidates).
        """
        if scoring == "first_token":
            out = self.next_token_logprobs(prompts, prompt_lists, with_text=with_text)

            def first_token_scores(logp):
                return [[max(float(logp[i, t]) for t in first_token_ids(self.tokenizer, c)) for c in cands]
                        for i, cands in enumerate(candidate_lists)]
            scores = first_token_scores(out[0])
            return (scores, out[1], first_token_scores(out[2])) if with_text else (scores, out[1])
        if scoring != "full":
            raise InputError(f"unknown scoring {scoring!r}; use first_token or full")
        flat = [(i, c) for i, cands in enumerate(candidate_lists) for c in cands]
        out = self.continuation_logprobs([prompts[i] for i, _ in flat], [" " + c for _, c in flat],
                                         [prompt_lists[i] for i, _ in flat], with_text=with_text)
        scores, images, text = [[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts]
        for n, ((i, _), (lps, _greedy), im) in enumerate(zip(flat, out[0], out[1])):
            scores[i].append(sum(lps))
            images[i] = im
            if with_text:
                text[i].append(sum(out[2][n]))
        return (scores, images, text) if with_text else (scores, images)

    def candidate_records(self, batch: list[dict], keep: tuple[str, ...] = ()) -> list[dict]:
        """Score the ``candidates`` of each item (``--scoring``) and build its sample record; the
        prediction is the best-scoring candidate (ties: the first). ``keep``: item fields to copy.
        With images, the record also holds ``text_only_scores`` and ``text_only_prediction``: what the
        base LM alone scores and predicts (from the same LM pass)."""
        out = self.score_candidates([it["prompt"] for it in batch], [it["candidates"] for it in batch],
                                    [it["image_prompts"] for it in batch], self.args.scoring,
                                    with_text=self.use_images)
        records = []
        for n, (it, sc, im) in enumerate(zip(batch, out[0], out[1])):
            pred = best_candidate(it["candidates"], sc)
            rec = {"id": it["id"], **{k: it[k] for k in keep}, "prompt": it["prompt"],
                   "candidates": it["candidates"], "scores": [round(x, 6) for x in sc],
                   "prediction": pred, "answer": it["answer"], "correct": pred == it["answer"], "images": im}
            if self.use_images:
                rec.update(text_only_scores=[round(x, 6) for x in out[2][n]],
                           text_only_prediction=best_candidate(it["candidates"], out[2][n]))
            records.append(rec)
        return records

    @torch.no_grad()
    def generate(self, prompts: list[str], prompt_lists: list[list[str]], max_new_tokens: int = 50,
                 with_text: bool = False):
        """Fused greedy generation, cut at the first newline (cut from the generated ids): the answers and the
        image records; ``with_text`` adds the LM's own greedy answers (a second, unfused decode of the prompts
        fitted as a text-only run fits them)."""
        ids, mask = self.rt.pad([self.fit(self.encode(p), reserve=max_new_tokens)[0] for p in prompts], left=True)
        patches, weights, records, prefix = self.images_and_prefix(prompt_lists)
        texts = self._decode(ids, mask, patches, weights, max_new_tokens, prefix)
        if not with_text:
            return texts, records
        ids, mask = self.rt.pad([self.rt.fit(self.encode(p), max_new_tokens, with_images=False)[0] for p in prompts],
                                left=True)
        return texts, records, self._decode(ids, mask, None, None, max_new_tokens)

    def _decode(self, ids, mask, patches, weights, max_new_tokens: int, prefix=None) -> list[str]:
        tok = self.tokenizer

        def stop(new_ids):
            return "\n" in tok.decode(new_ids[-1:], skip_special_tokens=True)
        with self.rt.finite_guard():
            out = self.model.generate(ids, mask, patches, weights, self.args.mix, max_new_tokens=max_new_tokens,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, stop=stop,
                                      prefix=prefix)
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
        return [t.strip() for t in texts]
