"""The frozen LM, loaded from the hub or a folder with every failure one line (:func:`load_lm`).

Which class loads it (``AutoModelForCausalLM`` or ``AutoModelForMaskedLM``) is :mod:`models.fusion.kinds`'s
decision; the wrapper around it is :mod:`models.fusion.factory`'s.
"""
from __future__ import annotations

import os

from models.errors import raised_while_unpickling
from models.fusion.kinds import SUPPORTED_MODELS, UnsupportedModelError, check_supported

# kwargs of AutoModelFor*.from_pretrained that AutoConfig.from_pretrained needs as well
_CONFIG_KWARGS = ("trust_remote_code", "revision", "subfolder", "token", "cache_dir", "gguf_file")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _weights_named(path: str, suffix: str) -> str:
    """The weight files of a local model folder with ``suffix``, for error messages."""
    names = sorted(f for f in os.listdir(path) if f.endswith(suffix)) if os.path.isdir(path) else []
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else f"a {suffix} file"


def load_lm(model_name_or_path: str, torch_dtype=None, **lm_kwargs):
    """The frozen LM: ``AutoModelForCausalLM`` or ``AutoModelForMaskedLM`` by :func:`check_supported`, with
    every failure one line (ValueError, or FileNotFoundError when nothing loadable is there): an
    unsupported model, an unreadable weights file, or weights missing from the checkpoint (they would be
    random; a missing head means the checkpoint is not the LM it claims to be)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    what = f"language model {model_name_or_path!r}"
    config = lm_kwargs.pop("config", None)
    try:
        if config is None:
            config = AutoConfig.from_pretrained(model_name_or_path,
                                                **{k: lm_kwargs[k] for k in _CONFIG_KWARGS if k in lm_kwargs})
        kind = check_supported(config, what)
        auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
        lm, info = auto.from_pretrained(model_name_or_path, config=config, dtype=torch_dtype,
                                        output_loading_info=True, **lm_kwargs)
    except OSError as e:
        raise FileNotFoundError(f"cannot load {what}: {_first_line(e)}") from None
    except UnsupportedModelError:
        raise
    except SafetensorError as e:
        raise ValueError(f"cannot load {what}: {_weights_named(model_name_or_path, '.safetensors')} is not a "
                         f"valid safetensors file ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - a damaged .bin surfaces as many kinds (see raised_while_unpickling)
        if raised_while_unpickling(e):  # never suggest weights_only=False: the file is not a checkpoint
            raise ValueError(f"cannot load {what}: {_weights_named(model_name_or_path, '.bin')} is not a PyTorch "
                             "checkpoint") from None
        if isinstance(e, ValueError):
            raise ValueError(f"cannot load {what}: {_first_line(e)}") from None
        raise
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        head = next((n for n, m in lm.named_modules() if m is lm.get_output_embeddings()), None)
        head_missing = [k for k in missing if head and k.startswith(head + ".")]
        if head_missing:
            raise UnsupportedModelError(
                f"{what}: its checkpoint has no {'LM' if kind == 'causal' else 'MLM'} head weights "
                f"({', '.join(head_missing[:3])}; model_type {config.model_type!r}); late fusion supports "
                f"{SUPPORTED_MODELS}")
        raise ValueError(f"{what}: {len(missing)} weights are missing from its checkpoint and would be random "
                         f"(e.g. {', '.join(missing[:3])})")
    return lm
