"""The one dtype table, and the named rules that turn ``auto`` into a dtype.

``auto`` means one of two things, each with its own name here:

* ``AUTO_LM`` (the frozen LM and CLIP, in evaluation and training): bf16 on a CUDA device that supports it,
  else fp32;
* ``AUTO_HALF`` (the text-to-image pipeline, and the encoder that builds an image index): fp16 on CUDA, else
  fp32 (diffusers pipelines and their caches are made in fp16).

Importing this module imports no torch; :func:`torch_dtype` and :func:`resolve` do, when called.
"""
from __future__ import annotations

DTYPE_NAMES = ("bf16", "fp16", "fp32")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
# other spellings accepted where a dtype is named (lm-eval's model_args say float16, bfloat16, ...)
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
_TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

AUTO_LM = "lm"
AUTO_HALF = "half"
AUTO_RULES = {
    AUTO_LM: "auto: bf16 on a CUDA device that supports it, else fp32",
    AUTO_HALF: "auto: fp16 on CUDA, else fp32",
}


def canonical(name: str) -> str:
    """A dtype name in the table's spelling (``float16`` -> ``fp16``); unknown names are returned as given."""
    return DTYPE_ALIASES.get(name, name)


def torch_dtype(name: str):
    """The torch dtype of a table name (``bf16``, ``fp16``, ``fp32``)."""
    import torch

    return getattr(torch, _TORCH_NAMES[canonical(name)])


def name_of(dtype) -> str:
    """The table name of a torch dtype (``torch.float16`` -> ``fp16``)."""
    text = str(dtype).removeprefix("torch.")
    for short, long in _TORCH_NAMES.items():
        if text == long:
            return short
    raise ValueError(f"{dtype} is not one of {', '.join(DTYPE_NAMES)}")


def resolve(name: str, device, rule: str) -> str:
    """``name``, or for ``auto`` what ``rule`` (``AUTO_LM``, ``AUTO_HALF``) gives on ``device``: a table name."""
    name = canonical(name)
    if name != "auto":
        if name not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        return name
    import torch

    kind = torch.device(device).type if device is not None else "cpu"
    if kind != "cuda":
        return "fp32"
    if rule == AUTO_HALF:
        return "fp16"
    if rule == AUTO_LM:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    raise ValueError(f"unknown auto rule {rule!r}")
