"""The embedded offline "visual world" used by ``make demo``.

A small knowledge base of invented objects (nonsense words no pretrained LM can know), each with a
canonical color and shape drawn from the ImageNetVC answer vocabulary, plus:

* ``ToyWorldGenerator``: a stand-in for a text-to-image pipeline. A prompt that names a knowledge-base
  object gets a picture of that object (wrong in color or shape with probability ``noise``); a prompt
  that names a color and/or a shape ("a red square") gets that; any other prompt gets a random scene.
* ``make_training_examples`` / ``write_training_file``: (image, text) pairs about *generic* shapes only,
  captions and ImageNetVC-style questions. No invented object ever appears in them, so whatever the
  model knows about a "blorvik" at evaluation time can only come from the generated images.
* ``write_eval_csvs``: ImageNetVC-format ``color.csv`` and ``shape.csv`` about the invented objects,
  with a ``dev/`` folder of demonstrations, readable by the unchanged ImageNetVC loader.
* ``write_captioned_collection``: a folder of "web photos" captioned with object names only, for
  retrieving images instead of generating them (``demo.py --image_source retrieve``).

Images are pure functions of (prompt, seed): every random choice comes from a generator seeded with a
hash of both. The scene (color, shape, placement in relative units) does not depend on ``image_size``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Saturated colors; every name is an answer in ImageNetVC color.csv. "gray" is left out on purpose:
# backgrounds are grey.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 225),
    "yellow": (245, 215, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "orange": (250, 140, 20),
    "pink": (250, 120, 190),
}

# Every name is an answer in ImageNetVC shape.csv.
SHAPES: tuple[str, ...] = ("round", "square", "triangle", "rectangle", "star")

# The noun a caption uses for each shape answer ("a red circle", but the answer is "round").
SHAPE_NOUNS: dict[str, str] = {
    "round": "circle", "square": "square", "triangle": "triangle", "rectangle": "rectangle", "star": "star",
}

# Invented objects: name -> (color, shape). Each of the 8 x 5 color/shape pairs occurs exactly once, so
# neither attribute predicts the other and no answer is more frequent than its peers.
OBJECTS: dict[str, tuple[str, str]] = {
    "blorvik": ("green", "round"),
    "zantrel": ("pink", "round"),
    "quibbet": ("blue", "triangle"),
    "glimvar": ("yellow", "star"),
    "trovink": ("yellow", "round"),
    "plinzor": ("blue", "round"),
    "vextral": ("orange", "round"),
    "snorbit": ("white", "square"),
    "drumflek": ("green", "rectangle"),
    "kelvash": ("blue", "square"),
    "morlinx": ("pink", "star"),
    "prazzle": ("red", "round"),
    "wombrit": ("black", "rectangle"),
    "yuzrel": ("blue", "star"),
    "thrandle": ("pink", "rectangle"),
    "glorpex": ("yellow", "rectangle"),
    "zibbon": ("white", "triangle"),
    "crovath": ("orange", "square"),
    "lumzik": ("black", "triangle"),
    "pelgrom": ("white", "star"),
    "skivvet": ("yellow", "triangle"),
    "brontil": ("orange", "triangle"),
    "nuxley": ("green", "triangle"),
    "taffrin": ("black", "square"),
    "quorvel": ("pink", "triangle"),
    "drimble": ("blue", "rectangle"),
    "vantrok": ("red", "triangle"),
    "jaskel": ("red", "square"),
    "mirvon": ("orange", "rectangle"),
    "zelpik": ("yellow", "square"),
    "grondel": ("black", "star"),
    "flizzet": ("pink", "square"),
    "torvanx": ("white", "rectangle"),
    "bleskin": ("green", "square"),
    "kumbrel": ("orange", "star"),
    "splorn": ("red", "star"),
    "wezzik": ("red", "rectangle"),
    "frovnel": ("black", "round"),
    "cravvel": ("green", "star"),
    "plonzik": ("white", "round"),
}

# Every object is an evaluation object (none is ever trained on). DEV_OBJECTS is a quick-check subset
# that covers all 8 colors and all 5 shapes.
EVAL_OBJECTS: tuple[str, ...] = tuple(OBJECTS)
DEV_OBJECTS: tuple[str, ...] = (
    "jaskel", "blorvik", "quibbet", "glimvar", "torvanx", "lumzik", "vextral", "flizzet",
)

# ImageNetVC's five prompt templates.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "{q}", "{q} Answer:", "{q} The answer is", "Question: {q} Answer:", "Question: {q} The answer is",
)

# Question phrasings in the style of the real ImageNetVC questions. "{a}" is an article plus noun.
COLOR_QUESTIONS: tuple[str, ...] = (
    "What is the color of {a}?",
    "What's the color of {a}?",
    "What color is {the}?",
    "What is the colour of {the}?",
    "What is the main color of {a}?",
)
SHAPE_QUESTIONS: tuple[str, ...] = (
    "What is the shape of {a}?",
    "What's the shape of {the}?",
    "What shape is {the}?",
    "What is the general shape of {a}?",
)

# Real-world nouns with no fixed color or shape: training questions ask about these so that the
# fusion layer learns that the image, not the noun, holds the answer.
NEUTRAL_NOUNS: tuple[str, ...] = (
    "object", "thing", "item", "toy", "sticker", "tile", "block", "badge", "token", "sign", "card",
    "figure", "piece", "patch", "charm", "magnet",
)

# In-context demonstrations (the eval folder's dev/ CSVs): familiar things, answers from the KB vocabulary.
DEV_DEMONSTRATIONS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "color": (
        ("banana", "What is the color of a ripe banana?", "yellow"),
        ("fire engine", "What is the main color of fire engines?", "red"),
        ("snow", "What color is fresh snow?", "white"),
        ("oak", "What color are the leaves of an oak in summer?", "green"),
    ),
    "shape": (
        ("wheel", "What shape is a wheel?", "round"),
        ("chessboard", "What is the shape of a chessboard?", "square"),
        ("pizza", "What shape is a slice of pizza?", "triangle"),
        ("door", "What is the shape of a door?", "rectangle"),
    ),
}

_OBJECT_RE = re.compile(r"\b(" + "|".join(OBJECTS) + r")s?\b", re.IGNORECASE)
_WORDS = {**{c: ("color", c) for c in COLORS}, **{s: ("shape", s) for s in SHAPES},
          **{n: ("shape", s) for s, n in SHAPE_NOUNS.items()}}
_PIXEL_NOISE_STD = 6.0
_COLOR_JITTER = 12


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _rng(*key) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(map(str, key)).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------

def _star_points(cx: float, cy: float, outer: float, angle: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else 0.45 * outer
        theta = angle + i * np.pi / 5
        points.append((cx + radius * np.sin(theta), cy - radius * np.cos(theta)))
    return points


def render(color: str, shape: str, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Draw one ``shape`` in ``color`` on a grey background; placement and jitter come from ``rng``.

    The object's extent is 35-70% of the image side and it lies fully inside the image. The background
    is a mid grey (level 90-170) with a slight tint; colors get +-12 jitter per channel and the whole
    image Gaussian pixel noise (std 6).
    """
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {sorted(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    s = image_size
    grey = rng.uniform(90, 170)
    background = tuple(int(v) for v in np.clip(grey + rng.uniform(-10, 10, 3), 0, 255))
    fill = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, 3),
                                          0, 255))
    extent = rng.uniform(0.35, 0.7) * s
    # Width and height of the bounding box before placement.
    if shape == "rectangle":
        long_side, short_side = extent, extent * rng.uniform(0.4, 0.6)
        w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    elif shape == "triangle":
        w, h = extent, extent * rng.uniform(0.8, 1.0)
    else:
        w = h = extent
    x0 = rng.uniform(1, s - 1 - w)
    y0 = rng.uniform(1, s - 1 - h)
    box = (x0, y0, x0 + w, y0 + h)

    image = Image.new("RGB", (s, s), background)
    draw = ImageDraw.Draw(image)
    if shape == "round":
        draw.ellipse(box, fill=fill)
    elif shape in ("square", "rectangle"):
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        apex_up = rng.random() < 0.5
        top, bottom = (y0, y0 + h) if apex_up else (y0 + h, y0)
        draw.polygon([(x0 + w / 2, top), (x0, bottom), (x0 + w, bottom)], fill=fill)
    else:
        draw.polygon(_star_points(x0 + w / 2, y0 + h / 2, w / 2, rng.uniform(0, 2 * np.pi / 5)), fill=fill)

    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * _PIXEL_NOISE_STD
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------------

def find_object(prompt: str) -> str | None:
    """The last knowledge-base object named in ``prompt`` (whole word, any case, optional plural 's')."""
    matches = _OBJECT_RE.findall(prompt)
    return matches[-1].lower() if matches else None


def _generic_attributes(prompt: str) -> tuple[str | None, str | None]:
    """The last color word and the last shape word in ``prompt`` (plural nouns count)."""
    color = shape = None
    for token in re.findall(r"[a-z]+", prompt.lower()):
        hit = _WORDS.get(token) or (_WORDS.get(token[:-1]) if token.endswith("s") else None)
        if hit and hit[0] == "color":
            color = hit[1]
        elif hit:
            shape = hit[1]
    return color, shape


class ToyWorldGenerator:
    """A deterministic, instant text-to-image "model" of the toy world (duck-types the diffusers wrapper).

    Prompt handling, in order:
    1. names a knowledge-base object (the last one named wins): its canonical color and shape;
    2. names a color and/or a shape ("a red square", "blue circles"): those, a missing one at random;
    3. anything else: a random color and shape.
    In cases 1 and 2 the generator errs with probability ``noise``: it then draws either a wrong
    color or a wrong shape (each half of the time), chosen uniformly among the other values.
    """

    def __init__(self, noise: float = 0.3):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        self.noise = noise
        self.generator_id = f"toyworld-v1-noise{noise:g}"

    def scene(self, prompt: str, seed: int) -> tuple[str, str]:
        """The (color, shape) that ``generate`` draws for this prompt and seed."""
        rng = _rng("scene", prompt, seed)
        name = find_object(prompt)
        if name is not None:
            color, shape = OBJECTS[name]
        else:
            color, shape = _generic_attributes(prompt)
            if color is None and shape is None:
                return _pick(rng, list(COLORS)), _pick(rng, SHAPES)
            color = color or _pick(rng, list(COLORS))
            shape = shape or _pick(rng, SHAPES)
        if rng.random() < self.noise:
            if rng.random() < 0.5:
                color = _pick(rng, [c for c in COLORS if c != color])
            else:
                shape = _pick(rng, [s for s in SHAPES if s != shape])
        return color, shape

    def generate(self, prompts: list[str], seeds: list[int], *, image_size: int,
                 num_inference_steps: int = 1, guidance_scale: float = 0.0) -> list[Image.Image]:
        """One RGB ``image_size`` x ``image_size`` image per (prompt, seed); the step and guidance
        arguments exist for interface compatibility and change nothing."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        images = []
        for prompt, seed in zip(prompts, seeds):
            color, shape = self.scene(prompt, seed)
            images.append(render(color, shape, _rng("render", prompt, seed), image_size))
        return images


# ----------------------------------------------------------------------------------------------------
# Training data (generic shapes only)
# ----------------------------------------------------------------------------------------------------

def _training_text(color: str, shape: str, rng: np.random.Generator) -> str:
    noun = SHAPE_NOUNS[shape]
    kind = rng.random()
    if kind < 0.3:
        caption = _pick(rng, (
            "a {c} {n} on a grey background",
            "A photo of {ac} {n}.",
            "An image of {ac} {n} on a grey background.",
            "{Ac} {n}.",
            "{Ac} {s} shape.",
            "The {n} is {c}.",
        ))
        ac = _article(color)
        return caption.format(c=color, n=noun, s=shape, ac=ac, Ac=ac.capitalize())
    if kind < 0.65:
        subject = noun if rng.random() < 0.5 else _pick(rng, NEUTRAL_NOUNS)
        question, answer = _pick(rng, COLOR_QUESTIONS), color
    else:
        subject = _pick(rng, NEUTRAL_NOUNS)
        if rng.random() < 0.5:
            subject = f"{color} {subject}"
        question, answer = _pick(rng, SHAPE_QUESTIONS), shape
    q = question.format(a=_article(subject), the="the " + subject)
    return _pick(rng, PROMPT_TEMPLATES).format(q=q) + f" {answer}."


def make_training_examples(n: int, seed: int, image_size: int) -> list[dict]:
    """``n`` examples ``{"image": PIL.Image, "text": str}`` about uniformly random generic shapes:
    30% captions, 35% color questions, 35% shape questions in the five ImageNetVC templates, each
    question followed by " <answer>.". Deterministic in ``seed``; never mentions an invented object."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        color, shape = _pick(rng, list(COLORS)), _pick(rng, SHAPES)
        examples.append({"image": render(color, shape, rng, image_size), "text": _training_text(color, shape, rng)})
    return examples


DEMO_SUBJECTS = ("object", "thing")


def make_qa_examples(n: int, seed: int, image_size: int, subjects: tuple[str, ...] = DEMO_SUBJECTS) -> list[dict]:
    """``n`` visual-QA examples ``{"image", "prompt", "text"}`` about random generic shapes, split into a
    templated question (``prompt``: context only in training) and its answer (``text``, e.g. "red.").

    Few subjects and two phrasings per question type keep the number of distinct prompts small
    (2 x 2 x 5 templates x |subjects| x answers), so a frozen LM's hidden states of every training
    text can be computed once and reused -- what makes the CPU demo fast. Never mentions an invented object.
    """
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        color, shape = _pick(rng, list(COLORS)), _pick(rng, SHAPES)
        subject = _pick(rng, subjects)
        if rng.random() < 0.5:
            question, answer = _pick(rng, COLOR_QUESTIONS[:2]), color
        else:
            question, answer = _pick(rng, SHAPE_QUESTIONS[:2]), shape
        q = question.format(a=_article(subject), the="the " + subject)
        examples.append({"image": render(color, shape, rng, image_size),
                         "prompt": _pick(rng, PROMPT_TEMPLATES).format(q=q), "text": f"{answer}."})
    return examples


def write_training_file(out_dir: str | Path, n: int, seed: int, image_size: int, qa: bool = False) -> Path:
    """Write training examples as ``out_dir/images/NNNNNN.png`` plus ``out_dir/train.jsonl`` with one
    ``{"image": path relative to out_dir, "caption": text}`` per line (and ``"prompt"`` with ``qa``:
    :func:`make_qa_examples` instead of :func:`make_training_examples`); returns the JSONL path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / "train.jsonl"
    examples = make_qa_examples(n, seed, image_size) if qa else make_training_examples(n, seed, image_size)
    with open(path, "w", encoding="utf-8") as f:
        for i, example in enumerate(examples):
            relative = f"images/{i:06d}.png"
            example["image"].save(out_dir / relative)
            row = {"image": relative, "caption": example["text"]}
            if "prompt" in example:
                row["prompt"] = example["prompt"]
            f.write(json.dumps(row) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# Evaluation data (ImageNetVC format)
# ----------------------------------------------------------------------------------------------------

def _write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "question", "answer"])
        writer.writerows(rows)


def _known_objects(objects) -> list[str]:
    """The objects named (default: every evaluation object), in order; a ValueError names any unknown one."""
    names = list(OBJECTS) if objects is None else list(objects)
    unknown = [name for name in names if name not in OBJECTS]
    if unknown:
        raise ValueError(f"unknown toy-world objects: {unknown}")
    return names


def write_eval_csvs(out_dir: str | Path, objects=None) -> dict[str, Path]:
    """Write ImageNetVC-format ``color.csv`` and ``shape.csv`` (one question per object each) and the
    demonstrations ``dev/color.csv`` and ``dev/shape.csv`` under ``out_dir``.

    ``objects``: names to include, in order (default: every object). Returns ``{"color": path,
    "shape": path}``; read them back with the ImageNetVC loader and ``--subsets color,shape``.
    """
    names = _known_objects(objects)
    out_dir = Path(out_dir)
    (out_dir / "dev").mkdir(parents=True, exist_ok=True)
    questions = {"color": COLOR_QUESTIONS, "shape": SHAPE_QUESTIONS}
    paths = {}
    for column, subset in enumerate(("color", "shape")):
        rows = []
        for name in names:
            i = list(OBJECTS).index(name)
            q = questions[subset][i % len(questions[subset])].format(a=_article(name), the="the " + name)
            rows.append((name, q, OBJECTS[name][column]))
        paths[subset] = out_dir / f"{subset}.csv"
        _write_csv(paths[subset], rows)
        _write_csv(out_dir / "dev" / f"{subset}.csv", DEV_DEMONSTRATIONS[subset])
    return paths


# ----------------------------------------------------------------------------------------------------
# A captioned image collection (retrieved instead of generated images)
# ----------------------------------------------------------------------------------------------------

_ONSETS = ("bl", "br", "cr", "dr", "fl", "gl", "gr", "kr", "pl", "pr", "sk", "sn", "sp", "st", "tr", "v", "z",
           "m", "n", "j", "qu", "th", "w", "y")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ee", "oo")
_CODAS = ("b", "k", "l", "m", "n", "r", "t", "v", "x", "z", "sh", "nd", "rk", "lt")


def distractor_names(n: int, seed: int = 0) -> list[str]:
    """``n`` more invented object names (two syllables, deterministic in ``seed``), none of them an
    evaluation object or its plural."""
    rng = np.random.default_rng(seed)
    taken = set(OBJECTS) | {name + "s" for name in OBJECTS}
    names: list[str] = []
    while len(names) < n:
        name = (_pick(rng, _ONSETS) + _pick(rng, _VOWELS) + _pick(rng, _CODAS) + _pick(rng, _VOWELS)
                + _pick(rng, _CODAS))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def write_captioned_collection(out_dir: str | Path, objects=None, *, per_object: int = 6, distractor_factor: int = 10,
                               noise: float = 0.3, seed: int = 0, image_size: int = 64) -> Path:
    """A folder of renderings with a ``captions.jsonl`` beside them (``{"image", "caption"}`` rows), like
    photos from the web captioned with the object's name only:

    * ``per_object`` renderings of each of ``objects`` (default: every evaluation object), each wrong in
      colour or shape with probability ``noise``, as the toy generator is;
    * ``distractor_factor`` times as many renderings of other invented objects (:func:`distractor_names`),
      each with its own colour and shape.

    Deterministic in ``seed``; returns the folder (give it to ``python -m models.images.index build --images``).
    """
    names = _known_objects(objects)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    generator = ToyWorldGenerator(noise=noise)
    scenes = [(name, i, generator.scene(name, seed * 1_000_003 + i)) for name in names for i in range(per_object)]
    rng = np.random.default_rng(seed)
    for name in distractor_names(distractor_factor * len(names), seed):
        attributes = (_pick(rng, list(COLORS)), _pick(rng, SHAPES))
        scenes += [(name, i, attributes) for i in range(per_object)]
    with open(out_dir / "captions.jsonl", "w", encoding="utf-8") as f:
        for name, i, (color, shape) in scenes:
            relative = f"images/{name}-{i}.png"
            render(color, shape, _rng("collection", name, i, seed), image_size).save(out_dir / relative,
                                                                                   compress_level=1)
            f.write(json.dumps({"image": relative, "caption": name}) + "\n")
    return out_dir
