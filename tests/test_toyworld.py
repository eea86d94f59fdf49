"""Tests for the embedded toy world (models/images/toyworld.py): rendering measured in pixels, the generator's
prompt handling and noise, training data and the ImageNetVC-format evaluation files."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.images.toyworld import (
    COLORS, DEV_OBJECTS, OBJECTS, PROMPT_TEMPLATES, SHAPES, ToyWorldGenerator, find_object,
    make_training_examples, render, write_eval_csvs, write_training_file,
)
from tests.paths import EVAL_DATA

IMAGENETVC = EVAL_DATA / "imagenetvc"
NAME_RE = re.compile(r"\b(" + "|".join(OBJECTS) + r")", re.IGNORECASE)


def measure(image: Image.Image) -> tuple[str, str]:
    """Read (color, shape) back from the pixels: the background is the median of the border ring, the
    object is every pixel far from it; its color is the palette majority, its shape follows from how
    much of its bounding box it fills (star ~0.37, triangle 0.5, circle 0.79, boxes 1) and the aspect."""
    a = np.asarray(image, dtype=np.float64)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    mask = np.linalg.norm(a - np.median(border, axis=0), axis=-1) > 45
    palette = np.array(list(COLORS.values()), dtype=np.float64)
    nearest = ((a[mask][:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
    color = list(COLORS)[np.bincount(nearest, minlength=len(COLORS)).argmax()]
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (h * w)
    if fill < 0.44:
        shape = "star"
    elif fill < 0.65:
        shape = "triangle"
    elif fill < 0.88:
        shape = "round"
    else:
        shape = "square" if max(h, w) / min(h, w) < 1.2 else "rectangle"
    return color, shape


def real_answers(subset: str) -> set[str]:
    with open(IMAGENETVC / f"{subset}.csv", newline="", encoding="utf-8") as f:
        return {row["answer"] for row in csv.DictReader(f)}


def test_knowledge_base_vocabulary_is_imagenetvc_and_balanced():
    assert set(COLORS) <= real_answers("color")
    assert set(SHAPES) <= real_answers("shape")
    assert len(OBJECTS) >= 40
    # every color/shape pair exactly once: 8 x 5 = 40 distinct pairs
    assert len(set(OBJECTS.values())) == len(COLORS) * len(SHAPES) == len(OBJECTS)
    assert all(re.fullmatch(r"[a-z]+", name) for name in OBJECTS)
    assert {OBJECTS[n][0] for n in DEV_OBJECTS} == set(COLORS)
    assert {OBJECTS[n][1] for n in DEV_OBJECTS} == set(SHAPES)


@pytest.mark.parametrize("color", list(COLORS))
@pytest.mark.parametrize("shape", SHAPES)
def test_render_draws_the_requested_color_and_shape(color, shape):
    for seed in range(3):
        image = render(color, shape, np.random.default_rng(seed), 96)
        assert image.mode == "RGB" and image.size == (96, 96)
        assert measure(image) == (color, shape)


def test_render_rejects_unknown_attributes():
    with pytest.raises(ValueError, match="purple"):
        render("purple", "round", np.random.default_rng(0), 64)
    with pytest.raises(ValueError, match="hexagon"):
        render("red", "hexagon", np.random.default_rng(0), 64)


def test_generate_is_deterministic_per_prompt_and_seed():
    prompt = "Question: What is the color of a blorvik? Answer:"
    a = ToyWorldGenerator(0.3).generate([prompt, prompt], [5, 6], image_size=64)
    b = ToyWorldGenerator(0.3).generate([prompt], [5], image_size=64)
    assert a[0].tobytes() == b[0].tobytes()
    assert a[0].tobytes() != a[1].tobytes()
    c = ToyWorldGenerator(0.3).generate(["What is the color of a zantrel?"], [5], image_size=64)
    assert c[0].tobytes() != a[0].tobytes()
    assert [im.size for im in a] == [(64, 64), (64, 64)] and a[0].mode == "RGB"


def test_noise_free_generator_draws_every_object_canonically():
    generator = ToyWorldGenerator(noise=0.0)
    assert generator.generator_id == "toyworld-v1-noise0"
    for i, (name, attributes) in enumerate(OBJECTS.items()):
        prompt = f"What is the colour of the {name.capitalize()}? The answer is"
        assert generator.scene(prompt, i) == attributes
        assert measure(generator.generate([prompt], [i], image_size=96)[0]) == attributes


def test_noisy_generator_errs_at_the_noise_rate_in_exactly_one_attribute():
    generator = ToyWorldGenerator(noise=0.3)
    names = list(OBJECTS)
    wrong = 0
    for seed in range(200):
        name = names[seed % len(names)]
        color, shape = generator.scene(f"What is the shape of a {name}?", seed)
        mismatches = (color != OBJECTS[name][0]) + (shape != OBJECTS[name][1])
        assert mismatches <= 1
        wrong += mismatches
    assert 0.2 <= wrong / 200 <= 0.4
    always = ToyWorldGenerator(noise=1.0)
    assert all(always.scene("a blorvik", s) != OBJECTS["blorvik"] for s in range(50))


def test_images_show_the_scene_even_when_wrong():
    generator = ToyWorldGenerator(noise=0.5)
    for seed, name in enumerate(OBJECTS):
        prompt = f"What is the color of a {name}?"
        assert measure(generator.generate([prompt], [seed], image_size=96)[0]) == generator.scene(prompt, seed)


def test_prompt_parsing():
    g = ToyWorldGenerator(noise=0.0)
    assert g.scene("a red square", 0) == ("red", "square")
    assert g.scene("Two Blue circles on a table.", 1) == ("blue", "round")
    # the last object named wins over earlier color words (in-context demonstrations come first)
    demo = "What is the color of a ripe banana? yellow. What is the color of the Blorviks?"
    assert g.scene(demo, 2) == OBJECTS["blorvik"]
    assert find_object("the blorvikian empire") is None
    assert find_object("a blorvik next to a Zantrel") == "zantrel"
    # a missing attribute, or both, is random
    assert {g.scene("a star", s)[0] for s in range(30)} == set(COLORS)
    assert {g.scene("a pink thing", s) for s in range(30)} == {("pink", s) for s in SHAPES}
    assert len({g.scene("What is the color of a goldfish?", s) for s in range(60)}) > 20


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="noise"):
        ToyWorldGenerator(noise=1.5)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        ToyWorldGenerator().generate(["a", "b"], [0], image_size=32)


def test_training_examples_are_generic_and_match_their_images():
    examples = make_training_examples(80, seed=3, image_size=96)
    assert [e["text"] for e in examples] == [e["text"] for e in make_training_examples(80, 3, 96)]
    kinds = {"color": 0, "shape": 0, "caption": 0}
    for e in examples:
        text, (color, shape) = e["text"], measure(e["image"])
        assert NAME_RE.search(text) is None
        question = text.split("?")[0]
        answer = text.rsplit(" ", 1)[-1].rstrip(".")
        if "?" not in text:
            kinds["caption"] += 1
            assert color in re.findall(r"[a-z]+", text.lower())
        elif "colo" in question:
            kinds["color"] += 1
            assert answer == color
        else:
            kinds["shape"] += 1
            assert answer == shape
    assert all(count >= 10 for count in kinds.values()), kinds


def test_training_text_never_names_an_invented_object_and_uses_all_templates():
    texts = [e["text"] for e in make_training_examples(600, seed=0, image_size=8)]
    assert not any(NAME_RE.search(t) for t in texts)
    # every question follows exactly one ImageNetVC template, and all five occur
    patterns = [re.escape(t.split("{q}")[0]) + r"What[^?]+\?" + re.escape(t.split("{q}")[1]) + r" \w+\."
                for t in PROMPT_TEMPLATES]
    used = []
    for text in (t for t in texts if "?" in t):
        matches = [i for i, p in enumerate(patterns) if re.fullmatch(p, text)]
        assert len(matches) == 1, text
        used += matches
    assert set(used) == set(range(5))
    answers = {t.rsplit(" ", 1)[-1].rstrip(".") for t in texts if "?" in t}
    assert answers == set(COLORS) | set(SHAPES)


def test_write_training_file(tmp_path):
    path = write_training_file(tmp_path / "toy", n=5, seed=1, image_size=32)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    expected = make_training_examples(5, seed=1, image_size=32)
    assert [r["caption"] for r in rows] == [e["text"] for e in expected]
    for row, example in zip(rows, expected):
        assert set(row) == {"image", "caption"} and not Path(row["image"]).is_absolute()
        with Image.open(path.parent / row["image"]) as image:
            assert np.array_equal(np.asarray(image), np.asarray(example["image"]))


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_eval_csvs_mirror_imagenetvc(tmp_path):
    paths = write_eval_csvs(tmp_path)
    assert paths == {"color": tmp_path / "color.csv", "shape": tmp_path / "shape.csv"}
    real_questions = {s: [r[1] for r in read_csv(IMAGENETVC / f"{s}.csv")[1:]] for s in ("color", "shape")}
    for column, subset in enumerate(("color", "shape")):
        rows = read_csv(paths[subset])
        assert rows[0] == ["category", "question", "answer"] == read_csv(IMAGENETVC / f"{subset}.csv")[0]
        assert len(rows) == 1 + len(OBJECTS)
        for category, question, answer in rows[1:]:
            assert answer == OBJECTS[category][column]
            assert question.endswith(f"{category}?")
            stem = question[: question.index(category)].removesuffix("a ").removesuffix("the ")
            assert any(q.startswith(stem) for q in real_questions[subset]), stem
        dev = read_csv(tmp_path / "dev" / f"{subset}.csv")
        assert dev[0] == read_csv(IMAGENETVC / "dev" / f"{subset}.csv")[0]
        assert len(dev) == 5 and not any(NAME_RE.search(",".join(r)) for r in dev)
        assert {r[2] for r in dev[1:]} <= set(COLORS if subset == "color" else SHAPES)


def test_eval_csvs_subset_and_unknown_object(tmp_path):
    paths = write_eval_csvs(tmp_path, DEV_OBJECTS)
    assert [r[0] for r in read_csv(paths["shape"])[1:]] == list(DEV_OBJECTS)
    with pytest.raises(ValueError, match="snark"):
        write_eval_csvs(tmp_path, ["blorvik", "snark"])
