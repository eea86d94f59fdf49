"""The one place that builds a late-fusion model: the frozen LM, and the wrapper its kind gets.

:func:`load_late_fusion_model` loads the LM (:func:`models.fusion.loading.load_lm`), asks
:func:`models.fusion.kinds.model_kind` which kind it is and wraps it in that kind's class of
:data:`WRAPPERS`, with a new projector and fusion block. A new kind of LM is one more class and one
more entry here; the wrappers themselves build nothing but their own parts.
"""
from __future__ import annotations

from models.fusion.causal import LateFusionLM
from models.fusion.kinds import model_kind
from models.fusion.loading import load_lm
from models.fusion.masked import MaskedLateFusionLM

WRAPPERS: dict[str, type[LateFusionLM]] = {"causal": LateFusionLM, "masked": MaskedLateFusionLM}


def load_late_fusion_model(model_name_or_path: str, vision_dim: int, proj_hidden: int | None = None,
                           torch_dtype=None, device=None, **lm_kwargs) -> LateFusionLM:
    """The frozen LM from the hub or a folder, in the wrapper of its kind (:data:`WRAPPERS`), with a new
    projector and fusion block; in eval mode, like HF ``from_pretrained`` (training calls ``train()``).
    ``lm_kwargs`` go to :func:`load_lm` (``config``, ``revision``, ``trust_remote_code``, ...)."""
    lm = load_lm(model_name_or_path, torch_dtype=torch_dtype, **lm_kwargs)
    model = WRAPPERS[model_kind(lm.config)](lm, vision_dim=vision_dim, proj_hidden=proj_hidden)
    model.eval()
    return model.to(device) if device is not None else model
