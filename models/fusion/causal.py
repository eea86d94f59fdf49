"""Late multi-image fusion around any HuggingFace causal LM (docs/method.md, sections 1-2).

Parts:

* ``lm``: the frozen causal LM (eval mode, no grads). Its final hidden states ``H`` (what the LM
  head reads) and its text-only logits ``L0 = lm_head(H)`` come from ONE pass per text.
* ``mm_proj``: ``Linear(d_clip -> m) -> GELU -> Linear(m -> d)``, trained (:mod:`models.fusion.projector`).
* ``fusion_layer``: one new decoder block of the LM's own architecture -- the LM's *base model*
  class built from its config with one layer and no token embedding -- trained
  (:mod:`models.fusion.blocks`). It runs over the sequence ``[V ; H]`` (visual prefix first, causal)
  and the LM's frozen head reads its outputs at the text positions: the fused logits ``L_img``.

The vision encoder is NOT part of this module: callers pass CLIP patch tokens in. Checkpoints hold
only ``mm_proj`` and ``fusion_layer``.

Masked LMs (BERT, RoBERTa, ...) get the same model around an encoder: :mod:`models.fusion.masked`.
:func:`models.fusion.factory.load_late_fusion_model` loads an LM and wraps it in the class of its kind.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from models.fusion.blocks import build_fusion_layer, hidden_size, positions_from_mask
from models.fusion.mixing import mix_logprobs
from models.fusion.projector import VisualProjector, default_proj_hidden


@dataclass
class FusionOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # fused logits at the text positions [B, T, V], when asked for


def _cache_kwarg(module: nn.Module) -> str:
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out):
    name = "cache" if "cache" in getattr(out, "__dataclass_fields__", {}) else "past_key_values"
    return out.get(name)


class LateFusionLM(nn.Module):
    """A frozen causal LM plus a trained projector and one fusion block.

    Built around an LM already loaded; :func:`models.fusion.factory.load_late_fusion_model` loads one and
    picks this class or :class:`models.fusion.masked.MaskedLateFusionLM` by its kind."""

    kind = "causal"
    label_shift = 1  # the loss predicts the token after each position
    build_fusion = staticmethod(build_fusion_layer)

    def __init__(self, lm: nn.Module, vision_dim: int, proj_hidden: int | None = None):
        super().__init__()
        self.lm = lm
        self.lm.requires_grad_(False)
        self.lm.eval()
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.model_type = cfg.model_type
        self.hidden_size = hidden_size(cfg)
        self.vision_dim = int(vision_dim)
        self.proj_hidden = int(proj_hidden or default_proj_hidden(self.model_type, self.hidden_size))
        self.mm_proj = VisualProjector(self.vision_dim, self.proj_hidden, self.hidden_size)
        self.fusion_layer, self.fusion_input_scale = self.build_fusion(lm.config)
        self._softcap = getattr(cfg, "final_logit_softcapping", None)
        # the head is one affine map (a causal LM's output embedding, no soft-capping): see :meth:`mix`. A
        # masked LM's MLM head transforms the states first, so it is not
        self._linear_head = (self.kind == "causal" and type(lm.get_output_embeddings()) is nn.Linear
                             and not self._softcap)
        self._lm_cache_kw = _cache_kwarg(self.lm.base_model)
        self._fusion_cache_kw = _cache_kwarg(self.fusion_layer)
        self.calls = {"lm": 0, "fusion": 0, "prefix": 0}  # pass counters, for tests and benchmarks

    # ------------------------------------------------------------------ training mode and weights
    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.eval()  # the frozen LM never drops out
        return self

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for prefix, module in (("mm_proj.", self.mm_proj), ("fusion_layer.", self.fusion_layer)):
            sd.update({prefix + k: v for k, v in module.state_dict().items()})
        return sd

    @property
    def fusion_dtype(self) -> torch.dtype:
        return self.mm_proj.linear1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mm_proj.linear1.weight.device

    # ------------------------------------------------------------------ pieces
    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM's own frozen head (plus its logit soft-capping, if it has one)."""
        head = self.lm.get_output_embeddings()
        logits = head(hidden.to(head.weight.dtype))
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def text_hidden(self, input_ids, attention_mask, cache=None, position_ids=None, use_cache=False):
        """One pass of the frozen LM: final (normed) hidden states, and its cache when asked."""
        self.calls["lm"] += 1
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=use_cache, **{self._lm_cache_kw: cache})
        return out.last_hidden_state, _output_cache(out)

    def text_logits(self, input_ids, attention_mask) -> torch.Tensor:
        """``L0`` for every position: exactly the base LM's logits."""
        hidden, _ = self.text_hidden(input_ids, attention_mask)
        return self.lm_head(hidden)

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        return self.mm_proj(patches.to(self.fusion_dtype))

    def fuse(self, visual: torch.Tensor | None, hidden: torch.Tensor, attention_mask: torch.Tensor,
             cache=None, past_mask: torch.Tensor | None = None):
        """Run the fusion block over ``[visual ; hidden]`` and return the outputs at the text positions.

        ``visual`` is ``[N, n_v, d]`` (None on cached decode steps), ``hidden`` ``[N, T, d]``,
        ``attention_mask`` ``[N, T]`` for the text. With a cache, ``past_mask`` is the mask of
        everything already in the cache (the visual prefix included).
        """
        self.calls["fusion"] += 1
        hidden = hidden.to(self.fusion_dtype)
        if visual is not None:
            seq = torch.cat([visual.to(hidden.dtype), hidden], dim=1)
            vis_mask = attention_mask.new_ones(visual.shape[:2])
            mask = torch.cat([vis_mask, attention_mask], dim=1)
        else:
            seq, mask = hidden, attention_mask
        full_mask = mask if past_mask is None else torch.cat([past_mask, mask], dim=1)
        positions = positions_from_mask(full_mask)[:, -seq.shape[1]:]
        if self.fusion_input_scale != 1.0:
            seq = seq * torch.tensor(self.fusion_input_scale, dtype=seq.dtype)
        out = self.fusion_layer(inputs_embeds=seq, attention_mask=full_mask, position_ids=positions,
                                use_cache=cache is not None, **{self._fusion_cache_kw: cache})
        text_out = out.last_hidden_state[:, seq.shape[1] - hidden.shape[1]:]
        return text_out, _output_cache(out), full_mask

    # ------------------------------------------------------------------ the visual prefix
    @property
    def prefix_cacheable(self) -> bool:
        """Whether the fusion block's keys and values over a visual prefix can be computed apart from the text
        and reused (:mod:`models.fusion.prefix`): a causal block with full attention. A sliding-window block
        would cut the prefix differently with and without a cache, so it keeps the one-pass path."""
        if self.kind != "causal":  # a masked LM's block attends both ways: the prefix sees the text
            return False
        cfg = self.fusion_layer.config
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, (list, tuple)) and types:
            return types[0] == "full_attention"
        return not getattr(cfg, "sliding_window", None) or getattr(cfg, "use_sliding_window", True) is False

    @torch.no_grad()
    def visual_prefix(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fusion block's keys and values over projected visual prefixes ``[N, n_v, d]`` alone:
        ``(keys, values)``, each ``[N, kv_heads, n_v, head_dim]`` (positions 0 .. n_v - 1, rotary applied).

        In a causal block the prefix comes first, so these do not depend on any text that follows:
        :meth:`fuse_after_prefix` continues from them exactly as :meth:`fuse` runs ``[V ; H]`` in one pass."""
        from transformers import DynamicCache

        self.calls["prefix"] += 1
        seq = visual.to(self.fusion_dtype)
        if self.fusion_input_scale != 1.0:
            seq = seq * torch.tensor(self.fusion_input_scale, dtype=seq.dtype)
        n, n_v = seq.shape[:2]
        mask = torch.ones(n, n_v, dtype=torch.long, device=seq.device)
        positions = torch.arange(n_v, device=seq.device).expand(n, -1)
        cache = DynamicCache(config=self.fusion_layer.config)
        self.fusion_layer(inputs_embeds=seq, attention_mask=mask, position_ids=positions, use_cache=True,
                          **{self._fusion_cache_kw: cache})
        layer = cache.layers[0]
        return layer.keys, layer.values

    def fuse_after_prefix(self, prefix: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor,
                          attention_mask: torch.Tensor, keep_cache: bool = False):
        """:meth:`fuse` over ``[V ; H]`` with the prefix's keys and values given (:meth:`visual_prefix`),
        so that only the text positions run. Returns what :meth:`fuse` returns; the cache (a fresh one per
        call: the prefix tensors are never changed) holds prefix and text, for decoding on."""
        from transformers import DynamicCache

        keys, values = prefix
        cache = DynamicCache(config=self.fusion_layer.config)
        cache.update(keys, values, 0)
        past_mask = attention_mask.new_ones(keys.shape[0], keys.shape[-2])
        text_out, cache, full_mask = self.fuse(None, hidden, attention_mask, cache=cache, past_mask=past_mask)
        return text_out, (cache if keep_cache else None), full_mask

    @property
    def one_layer(self) -> bool:
        """Whether the block is one layer (it always is when built here): then its keys and values at the text
        positions are functions of the text alone, which :meth:`fuse_at` relies on."""
        cfg = self.fusion_layer.config
        return next((getattr(cfg, n) for n in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(cfg, n)),
                    None) == 1

    @torch.no_grad()
    def text_keys_values(self, hidden: torch.Tensor, attention_mask: torch.Tensor, n_v: int):
        """The block's keys and values at the text positions of ``[V ; H]`` (``[B, kv_heads, T, head_dim]``
        each), computed once per text: in a one-layer block they depend on the LM's hidden state and the
        position only, not on the image before them (positions follow an ``n_v``-token prefix)."""
        from transformers import DynamicCache

        seq = hidden.to(self.fusion_dtype)
        if self.fusion_input_scale != 1.0:
            seq = seq * torch.tensor(self.fusion_input_scale, dtype=seq.dtype)
        full = torch.cat([attention_mask.new_ones(attention_mask.shape[0], n_v), attention_mask], dim=1)
        cache = DynamicCache(config=self.fusion_layer.config)
        self.fusion_layer(inputs_embeds=seq, attention_mask=attention_mask,
                          position_ids=positions_from_mask(full)[:, n_v:], use_cache=True,
                          **{self._fusion_cache_kw: cache})
        layer = cache.layers[0]
        return layer.keys, layer.values

    def fuse_at(self, prefix: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor, attention_mask: torch.Tensor,
                positions: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The block's outputs at the text ``positions`` ``[B, P]`` only, for each of the ``k`` images of each
        text: ``[B*k, P, d]``, equal to :meth:`fuse` over ``[V ; H]`` picked at those positions.

        ``prefix``: the ``B*k`` visual prefixes' keys and values (row ``b*k + i``). In a one-layer block the
        text's keys and values do not depend on the image (:meth:`text_keys_values`, computed once per text,
        or given as ``text_kv``), so per image only the queries run: each row's span ``s .. s + P' - 1`` of
        requested positions enters as new tokens after the prefix and the text's keys before ``s``."""
        from transformers import DynamicCache

        self.calls["fusion"] += 1
        keys, values = prefix
        b, t = attention_mask.shape
        n, n_v = keys.shape[0], keys.shape[-2]
        k = n // b
        if text_kv is None:
            text_kv = self.text_keys_values(hidden, attention_mask, n_v)
        positions = positions.to(hidden.device)
        start = positions.min(1).values                                           # [B]
        span = int((positions.max(1).values - start).max()) + 1
        wanted = start[:, None] + torch.arange(span, device=hidden.device)        # [B, P']
        idx = wanted.clamp(max=t - 1)
        new_mask = attention_mask.gather(1, idx) * (wanted < t).to(attention_mask.dtype)
        text_pos = positions_from_mask(torch.cat([attention_mask.new_ones(b, n_v), attention_mask], 1))[:, n_v:]
        seq = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])).to(self.fusion_dtype)
        if self.fusion_input_scale != 1.0:
            seq = seq * torch.tensor(self.fusion_input_scale, dtype=seq.dtype)
        before = attention_mask * (torch.arange(t, device=hidden.device)[None] < start[:, None]).to(attention_mask.dtype)
        mask = torch.cat([attention_mask.new_ones(b, n_v), before, new_mask], dim=1)
        cache = DynamicCache(config=self.fusion_layer.config)
        cache.update(torch.cat([keys, text_kv[0].repeat_interleave(k, 0)], dim=-2),
                     torch.cat([values, text_kv[1].repeat_interleave(k, 0)], dim=-2), 0)
        out = self.fusion_layer(inputs_embeds=seq.repeat_interleave(k, 0), attention_mask=mask.repeat_interleave(k, 0),
                                position_ids=text_pos.gather(1, idx).repeat_interleave(k, 0), use_cache=True,
                                **{self._fusion_cache_kw: cache}).last_hidden_state   # [B*k, P', d]
        pick = (positions - start[:, None]).repeat_interleave(k, 0)
        return out.gather(1, pick.unsqueeze(-1).expand(-1, -1, out.shape[-1]))

    # ------------------------------------------------------------------ training
    def forward(self, input_ids, attention_mask, image_patches, labels=None, hidden=None,
                return_logits: bool | None = None) -> FusionOutput:
        """One image per row: the next-token loss on the fused logits at the text positions.

        ``labels`` are aligned with ``input_ids`` (-100 where ignored); they are shifted here by
        ``label_shift`` (a masked LM predicts its own positions: no shift), and the LM head runs only on
        positions that have a label (unless ``return_logits``, the default when
        no labels are given, asks for all of them). ``hidden``: the frozen LM's hidden states, if the
        caller has them memoised.
        """
        if hidden is None:
            with torch.no_grad():
                hidden, _ = self.text_hidden(input_ids, attention_mask)
        fused, _, _ = self.fuse(self.project(image_patches), hidden.detach(), attention_mask)
        return_logits = labels is None if return_logits is None else return_logits
        logits = self.lm_head(fused) if return_logits else None
        loss = None
        if labels is not None:
            width = labels.shape[1] - self.label_shift
            targets = labels[:, self.label_shift:]
            keep = targets != -100
            scored = logits[:, :width][keep] if logits is not None else self.lm_head(fused[:, :width][keep])
            loss = nn.functional.cross_entropy(scored.float(), targets[keep]) if keep.any() \
                else fused.sum() * 0.0
        return FusionOutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def mixed_logprobs(self, input_ids, attention_mask, image_patches=None, weights=None, mode="logits",
                       positions: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                       return_text: bool = False, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Mixed next-token log-probabilities.

        Args:
            input_ids, attention_mask: ``[B, T]`` text batch (any padding side).
            image_patches: ``[B, k, n_v, d_clip]`` CLIP patch tokens of each row's k images, or None.
            weights: ``[B, k]`` image weights ``s_i``.
            mode: ``logits`` or ``probs`` (see :mod:`models.fusion.mixing`).
            positions: optional ``[B, P]`` indices of the text positions whose prediction is
                needed (the LM head then runs on those only); all ``T`` when None.
            hidden: the LM's final hidden states ``[B, T, d]`` if the caller already has them
                (e.g. memoised across runs); the LM is not run then.
            return_text: also return the text-only log-probabilities ``log_softmax(L0)`` (same
                shape): what the base LM alone predicts, from the ``L0`` the mixing already has
                (no extra LM pass).
            prefix: the fusion block's keys and values of the ``B*k`` visual prefixes (row ``b*k + i``:
                image i of text b), from :meth:`visual_prefix` or a :class:`models.fusion.prefix.VisualPrefixCache`;
                the projector and the prefix positions of the block are not run then.
        Returns:
            ``[B, P, V]`` (or ``[B, T, V]``) float32 log-probabilities, or ``(mixed, text_only)``
            with ``return_text``. The LM runs once per text whatever k is; the k images of all
            rows go through projector and fusion as one batch.
        """
        if hidden is None:
            hidden, _ = self.text_hidden(input_ids, attention_mask)

        def pick(h):
            if positions is None:
                return h
            idx = positions.to(h.device).unsqueeze(-1).expand(-1, -1, h.shape[-1])
            return h.gather(1, idx)

        if image_patches is None or image_patches.shape[1] == 0:
            text_only = mix_logprobs(self.lm_head(pick(hidden)), None, None, mode)
            return (text_only, text_only) if return_text else text_only
        b, k = image_patches.shape[:2]
        positions_done = False
        if weights is None or tuple(weights.shape) != (b, k):
            raise ValueError(f"weights must have shape {(b, k)}, got "
                             f"{None if weights is None else tuple(weights.shape)}")
        if prefix is not None and positions is not None and self.one_layer:  # only the wanted positions run
            fused = self.fuse_at(prefix, hidden, attention_mask, positions)
            positions_done = True
        elif prefix is not None:
            fused, _, _ = self.fuse_after_prefix(prefix, hidden.repeat_interleave(k, 0),
                                                 attention_mask.repeat_interleave(k, 0))
        else:
            visual = self.project(image_patches.flatten(0, 1))                   # [B*k, n_v, d]
            fused, _, _ = self.fuse(visual, hidden.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0))
        if positions is not None and not positions_done:
            fused = fused.gather(1, positions.to(fused.device).repeat_interleave(k, 0)
                                 .unsqueeze(-1).expand(-1, -1, fused.shape[-1]))
        mixed = self.mix(pick(hidden), fused.unflatten(0, (b, k)), weights, mode)
        if return_text:  # the base LM's own prediction, from the same LM pass
            return mixed, mix_logprobs(self.lm_head(pick(hidden)), None, None, mode)
        return mixed

    def mix(self, hidden: torch.Tensor, fused: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
        """Mixed log-probabilities from the text-only hidden states ``[B, P, d]`` and the fused ones
        ``[B, k, P, d]`` (see :mod:`models.fusion.mixing`), in float32.

        ``logits`` mode with a linear head (no soft-capping): ``(1/k) sum_i s_i L_i + (1 - mean s) L0`` with
        ``L = W h (+ b)`` equals the head applied to the same mix of hidden states, so the head runs once
        per text instead of k + 1 times (equal up to float rounding)."""
        if mode == "logits" and self._linear_head:
            w = weights.float().to(fused.device).reshape(*weights.shape, *([1] * (fused.dim() - 2)))
            mixed = (w * fused.float()).mean(1) + (1.0 - w.mean(1)) * hidden.float()
            return torch.log_softmax(self.lm_head(mixed).float(), dim=-1)
        text_logits = self.lm_head(hidden)
        return mix_logprobs(text_logits, self.lm_head(fused), weights.to(text_logits.device), mode)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, image_patches=None, weights=None, mode="logits",
                 max_new_tokens: int = 50, eos_token_id=None, pad_token_id: int = 0,
                 stop=None, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Greedy generation with every decoding step fused.

        ``input_ids`` must be LEFT-padded. Both the LM's and the fusion block's KV caches are local
        to this call (never stored on the module); the visual prefix stays in the fusion cache.
        ``stop(row_token_ids) -> bool`` ends a row early (e.g. at a newline); EOS ends it too.
        ``prefix``: the visual prefixes' keys and values, as for :meth:`mixed_logprobs`.
        Returns the new tokens ``[B, n]`` (rows that stopped are padded with ``pad_token_id``).
        """
        from transformers import DynamicCache

        b = input_ids.shape[0]
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        use_images = image_patches is not None and image_patches.shape[1] > 0
        k = image_patches.shape[1] if use_images else 0
        lm_cache = DynamicCache(config=self.lm.config)
        fusion_cache = DynamicCache(config=self.fusion_layer.config) if use_images else None
        mask = attention_mask
        hidden, lm_cache = self.text_hidden(input_ids, mask, cache=lm_cache, use_cache=True)
        if use_images and prefix is not None and self.one_layer:  # the prompt's last position runs per image
            n_v = prefix[0].shape[-2]
            text_k, text_v = self.text_keys_values(hidden, mask, n_v)
            last = torch.full((b, 1), mask.shape[1] - 1, device=mask.device)  # left-padded: every row ends there
            fused = self.fuse_at(prefix, hidden, mask, last, (text_k, text_v))
            fusion_cache = DynamicCache(config=self.fusion_layer.config)
            fusion_cache.update(torch.cat([prefix[0], text_k.repeat_interleave(k, 0)], dim=-2),
                                torch.cat([prefix[1], text_v.repeat_interleave(k, 0)], dim=-2), 0)
            fmask = torch.cat([mask.new_ones(b * k, n_v), mask.repeat_interleave(k, 0)], dim=1)
        elif use_images and prefix is not None:
            fused, fusion_cache, fmask = self.fuse_after_prefix(prefix, hidden.repeat_interleave(k, 0),
                                                                mask.repeat_interleave(k, 0), keep_cache=True)
        elif use_images:
            visual = self.project(image_patches.flatten(0, 1))
            fused, fusion_cache, fmask = self.fuse(visual, hidden.repeat_interleave(k, 0),
                                                   mask.repeat_interleave(k, 0), cache=fusion_cache)
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out_tokens = []
        for step in range(max_new_tokens):
            logp = (self.mix(hidden[:, -1:], fused[:, -1:].unflatten(0, (b, k)), weights, mode) if use_images
                    else mix_logprobs(self.lm_head(hidden[:, -1:]), None, None, mode))[:, -1]
            nxt = logp.argmax(-1)  # fed back to the models; finished rows report pad_token_id
            out_tokens.append(torch.where(done, torch.full_like(nxt, pad_token_id), nxt))
            new = torch.stack(out_tokens, 1)
            for row in range(b):
                if not done[row] and (int(nxt[row]) in eos or (stop is not None and stop(new[row].tolist()))):
                    done[row] = True
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            step_mask = mask.new_ones(b, 1)
            pos = positions_from_mask(torch.cat([mask, step_mask], 1))[:, -1:]
            hidden, lm_cache = self.text_hidden(nxt[:, None], torch.cat([mask, step_mask], 1), cache=lm_cache,
                                                position_ids=pos, use_cache=True)
            if use_images:
                fused, fusion_cache, fmask = self.fuse(None, hidden.repeat_interleave(k, 0),
                                                       step_mask.repeat_interleave(k, 0),
                                                       cache=fusion_cache, past_mask=fmask)
            mask = torch.cat([mask, step_mask], 1)
        return torch.stack(out_tokens, 1)

