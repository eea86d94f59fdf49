"""The Python API: :class:`LateFusionPipeline`, a trained late-fusion model in two or three lines.

    from models import LateFusionPipeline
    pipe = LateFusionPipeline.from_pretrained("output/gpt2/ft_wiki_laion_220_2")   # or a hub id ORG/NAME
    out = pipe.score("What color is a banana? Answer:", ["yellow", "blue", "red"], k=6)
    out.prediction, out.scores, out.text_only_scores, out.images

The pipeline is built on the eval scripts' own loading and scoring code (:class:`models.scoring.runtime.
ModelRuntime`, :class:`models.scoring.scorer.Scorer`): for the same item and settings :meth:`~LateFusionPipeline.
score` gives the scores an eval script records (same candidate scoring, CLIP weights and mixing) and
:meth:`~LateFusionPipeline.generate` the text the generation benchmarks record. Settings are the eval
scripts' options, given as keywords (``model_name=``, ``vision_encoder=``, ``image_generator=``, ``mix=``,
...), each checked as its flag is. Bad input is a ``ValueError`` naming what is wrong.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import InputError
from models.options import Option, OptionError, Settings, catalog, checked_values

if TYPE_CHECKING:
    from PIL import Image

SCORING = Option("scoring", kind="choice", choices=("first_token", "full"), default="first_token",
                 help="first_token: the released first-token probability; full: whole-candidate log-likelihood")
# the keywords of from_pretrained: the eval scripts' model, image, generation, retrieval, mixing and device options
OPTIONS: tuple[Option, ...] = (
    catalog.MODEL_NAME.replace(default=None), catalog.VISION_ENCODER, catalog.PROJ_HIDDEN, catalog.K,
    catalog.IMAGE_PROMPT.replace(choices=("sentences", "full")), *catalog.GENERATION, *catalog.RETRIEVAL,
    *catalog.MIXING, catalog.DEVICE, catalog.DTYPE, catalog.SEED, SCORING,
)
KEYWORDS = tuple(o.name for o in OPTIONS)
WHERE = "LateFusionPipeline.from_pretrained"


@dataclass
class ScoreResult:
    """What :meth:`LateFusionPipeline.score` gives for one prompt.

    ``scores``: one log-probability score per candidate (fused with the images); ``text_only_scores``: the
    same scoring by the frozen LM alone (equal to ``scores`` without images); ``prediction``: the best
    candidate (ties: the first listed); ``images``: the images fused, each ``{"image": PIL.Image, "prompt",
    "weight", "path"}`` (``weight``: its CLIP weight s_i; ``path``: its file, None for an image given in memory).
    """

    prompt: str
    candidates: list[str]
    scores: list[float]
    text_only_scores: list[float]
    prediction: str
    text_only_prediction: str
    images: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class _GivenRef:
    key: str
    prompt: str
    path: str
    image: Any


class GivenImages:
    """An image source for images the caller hands over (PIL images or files): each slot's image is given."""

    def __init__(self, slots: list[list[_GivenRef]]):
        self.slots = slots

    def refs(self, prompt_lists):
        return self.slots

    def image_root(self):
        """None: given images lie wherever the caller keeps them, and their records name them as given."""
        return None


def _image_key(image) -> str:
    """Content key of a PIL image (its size, mode and pixels): the feature memo knows it by this."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return "given-" + h.hexdigest()


def _as_image(item, where: str):
    """A PIL image from a PIL image or a path, RGB; ValueError naming ``where`` otherwise."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item.convert("RGB"), None
    if isinstance(item, (str, os.PathLike)):
        path = Path(item).expanduser()
        if not path.is_file():
            raise ValueError(f"{where}: no image file {str(item)!r}")
        try:
            with Image.open(path) as im:
                return im.convert("RGB"), str(path)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{where}: {str(item)!r} is not a readable image ({type(e).__name__})") from None
    raise ValueError(f"{where}: images must be PIL images or paths to image files, got {type(item).__name__}")


def _refuse_unknown(method: str, unknown: dict, allowed: tuple[str, ...]) -> None:
    if unknown:
        raise ValueError(f"{method}: unknown keyword {next(iter(unknown))!r}; allowed: {', '.join(allowed)}")


def _released_base_model(spec: str) -> str | None:
    """The base LM of a released checkpoint named by its download path (``output/gpt2/ft_wiki_laion_220_2``)."""
    from models.checkpoints.download import RELEASED

    parent = Path(spec).parent.name
    return RELEASED[parent][1] if parent in RELEASED else None


class LateFusionPipeline:
    """A trained late-fusion model ready to score and generate (see the module docstring).

    Build it with :meth:`from_pretrained`. ``settings``: the resolved settings (read-only); ``runtime``: the
    loaded model (:class:`models.scoring.runtime.ModelRuntime`: ``model``, ``tokenizer``, ``vision``, ``source``).
    """

    def __init__(self, runtime, settings: Settings):
        self.runtime, self.settings = runtime, settings
        self._given_features = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, **overrides) -> "LateFusionPipeline":
        """Load a trained checkpoint: a ``train.py`` folder, a released ``.bin`` (suffix optional) or a hub id
        ``ORG/NAME`` (downloaded with ``huggingface_hub``; with ``HF_HUB_OFFLINE=1`` from the local cache).

        The checkpoint's ``config.json`` names the base LM (``model_name``) and the vision encoder
        (``vision_encoder``); every setting can be given as a keyword: ``model_name``, ``vision_encoder``,
        ``image_generator``, ``image_source``, ``image_index``, ``image_cache``, ``mix``, ``device``,
        ``dtype``, ``k`` (the default number of images), and the eval scripts' other image, retrieval and
        mixing options (:data:`KEYWORDS`). An unknown keyword or a bad value is a ``ValueError``."""
        unknown = [k for k in overrides if k not in KEYWORDS]
        if unknown:
            raise ValueError(f"{WHERE}: unknown keyword {unknown[0]!r}; allowed: {', '.join(KEYWORDS)}")
        if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained).strip():
            raise ValueError(f"{WHERE}: the checkpoint must be a path or a hub id ORG/NAME, got {pretrained!r}")
        try:
            given = checked_values({k: v for k, v in overrides.items() if v is not None}, OPTIONS, WHERE)
        except OptionError as err:
            raise ValueError(str(err)) from None
        values = {o.name: o.default for o in OPTIONS}
        values.update(given)
        pretrained = str(pretrained)
        config = cls._checkpoint_config(pretrained)
        if values["model_name"] is None:
            values["model_name"] = config.get("base_model") or _released_base_model(pretrained)
            if not isinstance(values["model_name"], str) or not values["model_name"]:
                raise ValueError(f"{WHERE}: checkpoint {pretrained!r} names no base LM; give model_name=...")
        if values["vision_encoder"] is None:
            spec = config.get("vision_encoder")
            values["vision_encoder"] = spec if isinstance(spec, str) and spec else catalog.DEFAULT_VISION_ENCODER
        settings = Settings(**values, pretrained_model=pretrained, generate_images=True)
        return cls(cls._load(settings), settings)

    @staticmethod
    def _checkpoint_config(pretrained: str) -> dict:
        from models.checkpoints.config_file import read_checkpoint_config
        from models.checkpoints.locate import exists_locally, locate_checkpoint

        folder = locate_checkpoint(pretrained)  # a hub id: downloaded (CheckpointNotFound is a ValueError)
        if not exists_locally(folder):
            raise ValueError(f"{WHERE}: checkpoint {pretrained!r} not found (also tried {folder.name}.bin; a hub "
                             "id is ORG/NAME)")
        return read_checkpoint_config(folder) if folder.is_dir() else {}

    @staticmethod
    def _load(settings: Settings):
        import torch

        from models.options.dtypes import AUTO_LM, resolve, torch_dtype
        from models.scoring.runtime import ModelRuntime

        if settings.device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(settings.device)
        dtype = torch_dtype(resolve(settings.dtype, device, AUTO_LM))
        try:
            return ModelRuntime(settings, True, device=device, dtype=dtype, flag="")
        except InputError as err:
            raise ValueError(str(err)) from None

    # ------------------------------------------------------------------ views
    model = property(lambda self: self.runtime.model)
    tokenizer = property(lambda self: self.runtime.tokenizer)
    device = property(lambda self: self.runtime.device)

    # ------------------------------------------------------------------ checks
    def _k(self, k, images) -> int:
        if images is not None:
            if k is not None and k != len(images):
                raise ValueError(f"k={k} but {len(images)} image(s) given: leave out k, or give k images")
            k = len(images)
            if k < 1:
                raise ValueError("k must be >= 1 when images are requested (images=[] gives none)")
            return k
        k = self.settings.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an integer >= 0 (0: the text-only LM), got {k!r}")
        return k

    @staticmethod
    def _prompt(prompt, what: str = "prompt") -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{what} must be a non-empty string, got {prompt!r}")
        return prompt

    @staticmethod
    def _candidates(candidates) -> list[str]:
        if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)) or not candidates:
            raise ValueError(f"candidates must be a non-empty list of strings, got {candidates!r}")
        bad = [c for c in candidates if not isinstance(c, str) or not c.strip()]
        if bad:
            raise ValueError(f"every candidate must be a non-empty string, got {bad[0]!r}")
        return list(candidates)

    def _image_prompts(self, prompt: str, k: int, image_prompts) -> list[str]:
        """The k image prompts of ``prompt``: as given (a list of k strings, or one string for all k), else
        derived as the eval scripts derive them (``image_prompt=``: sentences or full)."""
        if image_prompts is None:
            from data.prompts import derive_prompts

            return derive_prompts(prompt, k, self.settings.image_prompt)
        if isinstance(image_prompts, str):
            image_prompts = [image_prompts] * k
        if (not isinstance(image_prompts, (list, tuple)) or len(image_prompts) != k
                or not all(isinstance(p, str) and p.strip() for p in image_prompts)):
            raise ValueError(f"image_prompts must be a string or a list of {k} non-empty strings, got {image_prompts!r}")
        return list(image_prompts)

    def _batch(self, prompt, per_item: dict):
        """``(prompts, {name: per-prompt values}, single)``: a single call or a batch (lists)."""
        if isinstance(prompt, str):
            return [prompt], {name: [v] for name, v in per_item.items()}, True
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        out = {}
        for name, v in per_item.items():
            if v is None:
                out[name] = [None] * len(prompt)
            elif not isinstance(v, (list, tuple)) or len(v) != len(prompt):
                raise ValueError(f"with a batch of {len(prompt)} prompts, {name} must be a list of "
                                 f"{len(prompt)} (one per prompt)")
            else:
                out[name] = list(v)
        return list(prompt), out, False

    def _scorer(self, use_images: bool, given=None, scoring: str | None = None):
        """The eval scripts' scorer on this model, with this pipeline's mixing settings (and images given)."""
        from models.scoring.masked import MaskedScorer
        from models.scoring.scorer import Scorer

        cls = MaskedScorer if self.model.kind == "masked" else Scorer
        args = self.settings if scoring is None else self.settings.replace(scoring=scoring)
        if given is None:
            return cls(self.runtime, args, use_images)
        if self._given_features is None:
            from models.images.features import VisionFeatures

            self._given_features = VisionFeatures(self.runtime.vision)  # in memory only: nothing written
        return cls(self.runtime, args, use_images, source=GivenImages(given), features=self._given_features)

    def _prepare(self, prompts, ks, images, image_prompts, single_k):
        """Per prompt: its image prompts, and the given images as refs (or None: the image source's)."""
        prompt_lists, given = [], []
        for n, (p, imgs, ips) in enumerate(zip(prompts, images, image_prompts)):
            where = "images" if len(prompts) == 1 else f"images[{n}]"
            if imgs is not None and (isinstance(imgs, (str, os.PathLike)) or not isinstance(imgs, (list, tuple))):
                raise ValueError(f"{where} must be a list of PIL images or paths, got {type(imgs).__name__}")
            k = self._k(single_k, imgs)
            ks.append(k)
            prompt_lists.append(self._image_prompts(p, k, ips) if k else [])
            if imgs is None:
                if k:
                    self.runtime.source.check_k(k)  # e.g. no more images per prompt than an index holds
                given.append(None)
                continue
            refs = []
            for im, ip in zip(imgs, prompt_lists[-1]):
                pil, path = _as_image(im, where)
                refs.append(_GivenRef(_image_key(pil), ip, path or "", pil))
            given.append(refs)
        if len(set(ks)) > 1:
            raise ValueError(f"every prompt of a batch needs the same number of images, got {sorted(set(ks))}")
        if any(g is not None for g in given) and any(g is None for g in given):
            raise ValueError("give images for every prompt of a batch, or for none")
        return prompt_lists, (given if given and given[0] is not None else None)

    def _served(self, prompt_lists, records, given) -> list[list[dict]]:
        """The image records of each prompt with their PIL images."""
        if given is not None:
            return [[{"image": ref.image, "prompt": r["prompt"], "weight": r["weight"], "path": ref.path or None}
                     for ref, r in zip(refs, recs)] for refs, recs in zip(given, records)]
        source = self.runtime.source
        source.flush()  # the files of images generated now are on disk
        refs = source.refs(prompt_lists)
        found = source.images([r for item in refs for r in item])
        root = source.image_root()  # the records name files relative to it; the API hands out full paths
        return [[{"image": found[ref.key][0], "prompt": r["prompt"], "weight": r["weight"],
                  "path": str(Path(root.path) / r["path"]),
                  **{k: v for k, v in r.items() if k not in ("path", "prompt", "weight")}}
                 for ref, r in zip(item, recs)] for item, recs in zip(refs, records)]

    # ------------------------------------------------------------------ scoring
    def score(self, prompt, candidates, k: int | None = None, *, images=None, image_prompts=None,
              scoring: str | None = None, **unknown):
        """Score ``candidates`` as answers to ``prompt`` with k images fused (generated or retrieved from the
        image prompts, or ``images``: your own PIL images or image files), exactly as the eval scripts score a
        candidate question. ``k=0``: the text-only LM. ``scoring``: ``first_token`` (default) or ``full``.

        A list of prompts (with a list of candidate lists, and ``images``/``image_prompts`` per prompt) is
        scored as one batch and gives a list. Returns :class:`ScoreResult`."""
        _refuse_unknown("score", unknown, ("k", "images", "image_prompts", "scoring"))
        if scoring is not None and scoring not in SCORING.choice_values:
            raise ValueError(f"scoring must be one of {', '.join(SCORING.choice_values)}, got {scoring!r}")
        prompts, per, single = self._batch(prompt, {"candidates": candidates, "images": images,
                                                     "image_prompts": image_prompts})
        if single:
            per["candidates"] = [candidates]
        prompts = [self._prompt(p, "prompt" if single else f"prompt[{n}]") for n, p in enumerate(prompts)]
        cand_lists = [self._candidates(c) for c in per["candidates"]]
        ks: list[int] = []
        prompt_lists, given = self._prepare(prompts, ks, per["images"], per["image_prompts"], k)
        use_images = ks[0] > 0
        scorer = self._scorer(use_images, given, scoring)
        try:
            out = scorer.score_candidates([scorer.answer_prompt(p) for p in prompts], cand_lists, prompt_lists,
                                          scorer.args.scoring, with_text=use_images)
        except InputError as err:
            raise ValueError(str(err)) from None
        scores, records = out[0], out[1]
        text = out[2] if use_images else scores
        served = self._served(prompt_lists, records, given) if use_images else [[] for _ in prompts]
        from models.scoring.scorer import best_candidate

        results = [ScoreResult(prompt=p, candidates=c, scores=list(s), text_only_scores=list(t),
                               prediction=best_candidate(c, s), text_only_prediction=best_candidate(c, t), images=im)
                   for p, c, s, t, im in zip(prompts, cand_lists, scores, text, served)]
        return results[0] if single else results

    def generate(self, prompt, k: int | None = None, max_new_tokens: int = 50, *, images=None, image_prompts=None,
                 **unknown):
        """Greedy generation from ``prompt`` with k images fused at every step (cut at the first newline),
        as the generation benchmarks (SQuAD, QuAC) generate. ``images``/``image_prompts``/``k``: as in
        :meth:`score`. A list of prompts gives a list of texts."""
        _refuse_unknown("generate", unknown, ("k", "max_new_tokens", "images", "image_prompts"))
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if self.model.kind == "masked":
            raise ValueError("generation needs a causal LM; a masked LM fills masks (use score)")
        prompts, per, single = self._batch(prompt, {"images": images, "image_prompts": image_prompts})
        prompts = [self._prompt(p, "prompt" if single else f"prompt[{n}]") for n, p in enumerate(prompts)]
        ks: list[int] = []
        prompt_lists, given = self._prepare(prompts, ks, per["images"], per["image_prompts"], k)
        scorer = self._scorer(ks[0] > 0, given)
        try:
            texts, _ = scorer.generate(prompts, prompt_lists, max_new_tokens=max_new_tokens)
        except InputError as err:
            raise ValueError(str(err)) from None
        return texts[0] if single else texts

    def __repr__(self) -> str:
        s = self.settings
        return (f"LateFusionPipeline({s.pretrained_model!r}, model_name={s.model_name!r}, "
                f"vision_encoder={s.vision_encoder!r}, image_source={s.image_source!r}, k={s.k})")
