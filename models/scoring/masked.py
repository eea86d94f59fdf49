"""Fill-mask scoring for masked LMs: the masked counterpart of :mod:`models.scoring.scorer`.

A masked LM answers where its mask token stands. A candidate question's prompt is the causal prompt
followed by a space, the mask token and a full stop (:func:`masked_prompt`), e.g.
``Q: What is the color of a banana? A: It is [MASK].``; its images come from the prompt without the
mask, as on the causal side. ``--scoring`` (``docs/masked_lm.md``):

* ``first_token``: the mixed log-probability, at the mask position, of the candidate's first word-piece
  (the first token of ``" word"``, the better of ``" word"`` and ``" Word"``, as on the causal side);
* ``full``: the pseudo-log-likelihood of all the candidate's pieces ``c_1..c_m``: the pieces fill the
  mask, and each is scored in its own copy of the prompt where it alone is masked again,
  ``sum_j log p(c_j | prompt with c_j masked)``. A one-piece candidate scores as ``first_token``
  without the capitalised variant.

The frozen encoder runs once per distinct token sequence; every copy of an item shares the item's k
images. Next-token scoring, continuations and generation need a causal LM: they raise ``InputError``.
"""
from __future__ import annotations

import torch

from models.errors import InputError
from models.scoring.scorer import Scorer, first_token_ids


def masked_prompt(prompt: str, mask_token: str) -> str:
    """The prompt a masked LM answers: ``"{prompt} {mask_token}."``."""
    return f"{prompt} {mask_token}."


class MaskedScorer(Scorer):
    """:class:`models.scoring.scorer.Scorer` for a :class:`models.fusion.masked.MaskedLateFusionLM`."""

    def answer_prompt(self, prompt: str) -> str:
        return masked_prompt(prompt, self.tokenizer.mask_token)

    def _fit(self, ids: list[int], reserve: int = 0) -> list[int]:
        """Cut an over-long sequence from the left, after its first ([CLS]/<s>) token, so that it and the
        visual prefix fit the encoder's positions with ``reserve`` to spare."""
        limit = self.model.max_positions
        if limit is None:
            return ids
        limit -= reserve + (self.rt.n_visual_tokens() if self.use_images else 0)
        return ids if len(ids) <= limit else ids[:1] + ids[len(ids) - limit + 1:]

    def _mask_position(self, ids: list[int], prompt: str) -> int:
        found = [i for i, t in enumerate(ids) if t == self.tokenizer.mask_token_id]
        if len(found) != 1:
            raise InputError(f"a masked-LM prompt needs exactly one {self.tokenizer.mask_token} token "
                            f"(found {len(found)}): {prompt!r}")
        return found[0]

    @torch.no_grad()
    def mask_logprobs(self, seqs: list[list[int]], positions: list[int], patches=None, weights=None,
                      with_text: bool = False):
        """Mixed log-probabilities ``[N, V]`` at one position of each sequence (on the model's device);
        ``patches``/``weights``: each row's images, as :meth:`images_for` returns them (or None).
        ``with_text``: also the text-only log-probabilities, from the same encoder pass."""
        ids, mask = self.rt.pad(seqs)
        pos = torch.tensor([[p] for p in positions], device=self.device)
        with self.rt.finite_guard():
            out = self.model.mixed_logprobs(ids, mask, patches, weights, self.args.mix, positions=pos,
                                            hidden=self.text_hidden(seqs), return_text=with_text)
        if with_text:
            return out[0][:, 0].float(), out[1][:, 0].float()
        return out[:, 0].float()

    def score_candidates(self, prompts: list[str], candidate_lists: list[list[str]],
                         prompt_lists: list[list[str]], scoring: str = "first_token", with_text: bool = False):
        """A score per candidate of each masked prompt (see the module docstring), and the image
        records of each prompt; ``with_text`` adds the text-only scores (see :class:`Scorer`)."""
        if scoring not in ("first_token", "full"):
            raise InputError(f"unknown scoring {scoring!r}; use first_token or full")
        pieces = {c: self.encode(" " + c, special=False) for cands in candidate_lists for c in cands}
        if any(not p for p in pieces.values()):
            raise InputError(f"candidate {next(c for c, p in pieces.items() if not p)!r} has no token")
        reserve = max(len(p) for p in pieces.values()) - 1 if scoring == "full" else 0
        seqs = [self._fit(self.encode(p), reserve) for p in prompts]
        positions = [self._mask_position(ids, p) for ids, p in zip(seqs, prompts)]
        patches, weights, images = self.images_for(prompt_lists)
        if scoring == "first_token":
            out = self.mask_logprobs(seqs, positions, patches, weights, with_text)
            tables = [t.cpu() for t in out] if with_text else [out.cpu()]
            scores = [[[max(float(logp[i, t]) for t in first_token_ids(self.tokenizer, c)) for c in cands]
                       for i, cands in enumerate(candidate_lists)] for logp in tables]
            return (scores[0], images, scores[1]) if with_text else (scores[0], images)
        rows, where = [], []  # (sequence, scored position, target piece), (item, candidate)
        for i, cands in enumerate(candidate_lists):
            seq, pos = seqs[i], positions[i]
            for j, c in enumerate(cands):
                filled = seq[:pos] + pieces[c] + seq[pos + 1:]
                for m, piece in enumerate(pieces[c]):
                    copy = list(filled)
                    copy[pos + m] = self.tokenizer.mask_token_id
                    rows.append((copy, pos + m, piece))
                    where.append((i, j))
        owner = torch.tensor([i for i, _ in where], device=self.device)
        out = self.mask_logprobs([r[0] for r in rows], [r[1] for r in rows],
                                 None if patches is None else patches[owner.to(patches.device)],
                                 None if weights is None else weights[owner.to(weights.device)], with_text)
        targets = torch.tensor([[r[2]] for r in rows], device=self.device)
        tables = []
        for logp in (out if with_text else (out,)):
            picked = logp.gather(1, targets.to(logp.device))[:, 0].tolist()
            scores = [[0.0] * len(cands) for cands in candidate_lists]
            for (i, j), lp in zip(where, picked):
                scores[i][j] += lp
            tables.append(scores)
        return (tables[0], images, tables[1]) if with_text else (tables[0], images)

    def _causal_only(self, *args, **kwargs):
        raise InputError("this task needs a causal LM (next-token scoring or generation); a masked LM answers "
                        "fill-mask questions only (object_commonsense.py, imagenetVC.py)")

    next_token_logprobs = token_logprobs = continuation_logprobs = generate = _causal_only
