"""Tests for data/captions.py: every training source, the name rule, bad inputs and the collator."""

import importlib.util
import json
import logging
import pickle
import re
import shutil
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader

from data import captions
from data.captions import (CaptionCollator, CaptionFile, LaionCaptions, VGRegions, WikiChunks, build_train_dataset,
                           clamp_box, select_sources, wiki_image_prompts)

from tests.paths import TEST_DATA
VG_SAMPLE = TEST_DATA / "visual_genome"
WIKI_SAMPLE = TEST_DATA / "wikitext2" / "valid.txt"
EOT = 50256  # GPT-2 <|endoftext|>


@pytest.fixture(scope="module", autouse=True)
def sentence_splitter():
    """Use data.prompts.split_sentences when it exists, else a stand-in regex splitter."""
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("data.prompts") is None:
            fake = types.ModuleType("data.prompts")
            fake.split_sentences = lambda text: [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
            mp.setitem(sys.modules, "data.prompts", fake)
        yield


def pattern_image(width, height, seed=0):
    """An RGB image whose pixels depend on position, so a shifted crop cannot match."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x + seed) % 256, (y * 3) % 256, (x * y // 7) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def make_vg_dir(root, version="v1.2", regions=None):
    """A VG folder with the sample JSON (or ``regions``) and stand-in JPEGs at the url's folder."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(VG_SAMPLE / version / "image_data.json", root / "image_data.json")
    if regions is None:
        shutil.copyfile(VG_SAMPLE / version / "region_descriptions.json", root / "region_descriptions.json")
    else:
        (root / "region_descriptions.json").write_text(json.dumps(regions))
    for entry in json.loads((root / "image_data.json").read_text()):
        folder, name = entry["url"].split("/")[-2:]
        (root / folder).mkdir(exist_ok=True)
        pattern_image(entry["width"], entry["height"], entry["image_id"]).save(root / folder / name, quality=90)
    return root


@pytest.fixture(scope="module")
def vg_dir(tmp_path_factory):
    return make_vg_dir(tmp_path_factory.mktemp("vg") / "v1.2")


def sample_regions(version="v1.2"):
    return json.loads((VG_SAMPLE / version / "region_descriptions.json").read_text())


class FakeImage:
    def __init__(self, prompt, image):
        self.path, self.prompt, self.image = None, prompt, image


class FakeProvider:
    """ImageProvider stand-in: a 16x16 image whose red channel is the prompt's length; records its calls."""

    def __init__(self):
        self.calls = []

    def get(self, prompt_lists):
        self.calls.append(prompt_lists)
        return [[FakeImage(p, Image.new("L", (16, 16), len(p) % 256)) for p in prompts] for prompts in prompt_lists]


class ToTensor:
    """A picklable PIL -> [3, 8, 8] float tensor transform."""

    def __call__(self, image):
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


# ----------------------------------------------------------------------------- dataset names

@pytest.mark.parametrize("name, expected", [
    ("cropped_vg", ["cropped_vg"]),
    ("wiki", ["wiki"]),
    ("laion_220", ["laion_220"]),
    ("laion_220_short", ["laion_220_short"]),
    ("wiki_laion_220", ["wiki", "laion_220"]),
    ("ft_wiki_laion_220_2", ["wiki", "laion_220"]),
    ("wiki_laion_220_short", ["wiki", "laion_220_short"]),
    ("laion_220_short_laion_220", ["laion_220_short", "laion_220"]),
    ("cropped_vg_wiki", ["cropped_vg", "wiki"]),
    ("coco", []),
    (None, []),
])
def test_select_sources(name, expected):
    assert select_sources(name) == expected


def test_name_matching_nothing_raises():
    with pytest.raises(ValueError, match="names no source"):
        build_train_dataset("coco_captions")


def test_clamp_box():
    assert clamp_box(10, 20, 30, 40, 100, 100) == (10, 20, 40, 60)
    assert clamp_box(-10, 590, 50, 30, 800, 600) == (0, 590, 40, 600)
    assert clamp_box(900, 10, 50, 50, 800, 600) is None
    assert clamp_box(10, 10, 0, 5, 800, 600) is None


# ----------------------------------------------------------------------------- Visual Genome

def test_vg_region_count_and_phrases(vg_dir):
    records = sample_regions()
    expected = [r["phrase"].strip() for rec in records for r in rec["regions"]]
    ds = VGRegions(vg_dir)
    assert len(ds) == len(expected) == 1278
    for i in (0, 1, 640, 1277):
        assert ds[i]["text"] == expected[i]
    assert ds[0]["text"] == "the clock is green in colour"


def test_vg_crops_equal_direct_pil_crop(vg_dir):
    regions = [r for rec in sample_regions() for r in rec["regions"]]
    ds = VGRegions(vg_dir)
    folders = {1: "VG_100K_2"}
    for i in range(0, len(regions), 101):
        r = regions[i]
        box = (r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"])  # every sample box lies inside
        path = vg_dir / folders.get(r["image_id"], "VG_100K") / f"{r['image_id']}.jpg"
        with Image.open(path) as full:
            assert box[2] <= full.width and box[3] <= full.height
            expected = full.convert("RGB").crop(box)
        item = ds[i]
        assert item["image"].mode == "RGB"
        assert item["image"].size == (r["width"], r["height"])
        assert np.array_equal(np.asarray(item["image"]), np.asarray(expected))


def test_vg_partial_box_is_clamped(tmp_path):
    regions = [{"id": 1, "regions": [
        {"region_id": 7, "image_id": 1, "phrase": "bottom left", "x": -10, "y": 590, "width": 50, "height": 30},
        {"region_id": 8, "image_id": 1, "phrase": "right edge", "x": 780, "y": -5, "width": 100, "height": 20},
    ]}]
    root = make_vg_dir(tmp_path / "vg", regions=regions)
    ds = VGRegions(root)
    with Image.open(root / "VG_100K_2" / "1.jpg") as full:
        full = full.convert("RGB")
    for i, box in enumerate([(0, 590, 40, 600), (780, 0, 800, 15)]):
        item = ds[i]
        assert item["image"].size == (box[2] - box[0], box[3] - box[1])
        assert np.array_equal(np.asarray(item["image"]), np.asarray(full.crop(box)))


def test_vg_box_outside_image(tmp_path, caplog):
    regions = [{"id": 1, "regions": [
        {"region_id": 7, "image_id": 1, "phrase": "inside", "x": 1, "y": 1, "width": 5, "height": 5},
        {"region_id": 4242, "image_id": 1, "phrase": "outside", "x": 900, "y": 10, "width": 50, "height": 50},
    ]}]
    root = make_vg_dir(tmp_path / "vg", regions=regions)
    with pytest.raises(ValueError, match="region 4242 box"):
        VGRegions(root)
    with caplog.at_level(logging.WARNING):
        ds = VGRegions(root, skip_invalid_boxes=True)
    assert len(ds) == 1 and ds[0]["text"] == "inside"
    assert "skipped 1 regions whose box lies outside" in caplog.text


def test_vg_v10_field_names(tmp_path):
    ds = VGRegions(make_vg_dir(tmp_path / "vg", version="v1.0"))
    assert len(ds) == sum(len(rec["regions"]) for rec in sample_regions("v1.0")) == 1288
    assert ds[0]["text"] == "the clock is green in colour"
    assert ds[0]["image"].size == (82, 139)


def test_vg_missing_images(tmp_path, caplog):
    root = make_vg_dir(tmp_path / "vg")
    shutil.rmtree(root / "VG_100K")  # keeps only image 1 (in VG_100K_2)
    image1 = sum(len(rec["regions"]) for rec in sample_regions() if rec["id"] == 1)
    with caplog.at_level(logging.WARNING):
        ds = VGRegions(root)
    assert len(ds) == image1
    assert f"skipped {1278 - image1} regions whose image file is missing" in caplog.text
    shutil.rmtree(root / "VG_100K_2")
    with pytest.raises(ValueError, match="no usable region"):
        VGRegions(root)


def test_vg_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        VGRegions(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="region_descriptions.json not found"):
        VGRegions(tmp_path)


def test_vg_max_train_samples(vg_dir):
    ds = build_train_dataset("cropped_vg", vg_dir=vg_dir, max_train_samples=5)
    assert isinstance(ds, VGRegions) and len(ds) == 5
    assert ds[4]["text"] == sample_regions()[0]["regions"][4]["phrase"].strip()


# ----------------------------------------------------------------------------- WikiText

@pytest.fixture(scope="module")
def wiki_reference(gpt2_tokenizer):
    """Reference token stream: every line of the sample tokenized on its own, concatenated."""
    with open(WIKI_SAMPLE, encoding="utf-8") as f:
        lines = f.readlines()
    return [t for line in lines for t in gpt2_tokenizer(line, add_special_tokens=False)["input_ids"]]


def test_wiki_chunks_are_447_tokens(gpt2_tokenizer, wiki_reference):
    provider = FakeProvider()
    ds = build_train_dataset("wiki", wiki_file=WIKI_SAMPLE, tokenizer=gpt2_tokenizer, image_provider=provider)
    assert isinstance(ds, WikiChunks)
    assert len(ds) == len(wiki_reference) // 447 == 58  # the last partial chunk is dropped
    for i in (0, 1, 30, 57):
        assert ds.chunk_ids(i) == wiki_reference[447 * i:447 * (i + 1)]
        item = ds[i]
        assert item["text"] == gpt2_tokenizer.decode(wiki_reference[447 * i:447 * (i + 1)])
        assert len(gpt2_tokenizer(item["text"])["input_ids"]) == 447
    assert ds[0]["text"].startswith(" \n = Homarus gammarus = \n \n Homarus gammarus , known as")


def test_wiki_image_from_seeded_sentence(gpt2_tokenizer):
    provider = FakeProvider()
    ds = WikiChunks(WIKI_SAMPLE, tokenizer=gpt2_tokenizer, max_chunks=4, image_provider=provider, seed=3)
    assert len(ds) == 4
    item = ds[2]
    assert provider.calls == [[[ds.prompt(2)]]]
    assert item["image"].mode == "RGB" and item["image"].getpixel((0, 0))[0] == len(ds.prompt(2)) % 256
    for i in range(4):  # a whole sentence of its own chunk, never a heading
        flat = " ".join(re.sub(r" @(.)@ ", r"\1", ds.text(i)).split())
        prompt = ds.prompt(i)
        assert prompt and "=" not in prompt and prompt in flat
    again = WikiChunks(WIKI_SAMPLE, tokenizer=gpt2_tokenizer, max_chunks=4, seed=3)
    assert [again.prompt(i) for i in range(4)] == [ds.prompt(i) for i in range(4)]
    other = WikiChunks(WIKI_SAMPLE, tokenizer=gpt2_tokenizer, max_chunks=4, seed=4)
    assert [other.prompt(i) for i in range(4)] != [ds.prompt(i) for i in range(4)]


def test_wiki_image_prompts_match_dataset(gpt2_tokenizer, wiki_reference):
    prompts = wiki_image_prompts(WIKI_SAMPLE, tokenizer=gpt2_tokenizer, max_elements=10, max_train_samples=3, seed=1)
    provider = FakeProvider()
    ds = build_train_dataset("wiki", wiki_file=WIKI_SAMPLE, tokenizer=gpt2_tokenizer, image_provider=provider,
                             max_elements=10, max_train_samples=3, seed=1)
    assert len(ds) == len(prompts) == 3
    assert ds.chunk_ids(2) == wiki_reference[2 * 447:3 * 447]
    for i in range(3):
        ds[i]
    assert provider.calls == [[[p]] for p in prompts]


def test_wiki_parquet_and_hub(tmp_path, gpt2_tokenizer, monkeypatch):
    import datasets

    rows = ["", " = A = \n", "", " The cat sat on the mat . It was red . \n"] * 30
    pd.DataFrame({"text": rows}).to_parquet(tmp_path / "train-00000-of-00001.parquet")
    expected = [t for r in rows for t in gpt2_tokenizer(r, add_special_tokens=False)["input_ids"]]
    local = WikiChunks(tmp_path / "train-00000-of-00001.parquet", tokenizer=gpt2_tokenizer, chunk_tokens=50)
    assert len(local) == len(expected) // 50
    assert local.chunk_ids(1) == expected[50:100]

    seen = {}

    def fake_load(path, name=None, split=None, **kw):
        seen.update(path=path, name=name, split=split)
        return datasets.Dataset.from_dict({"text": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    hub = WikiChunks(None, tokenizer=gpt2_tokenizer, chunk_tokens=50, hub_config="wikitext-103-v1")
    assert seen == {"path": "Salesforce/wikitext", "name": "wikitext-103-v1", "split": "train"}
    assert hub.chunk_ids(1) == expected[50:100]


def test_wiki_bad_inputs(tmp_path, gpt2_tokenizer):
    short = tmp_path / "short.txt"
    short.write_text(" = Tiny = \n a few words . \n")
    with pytest.raises(ValueError, match="fewer than one chunk of 447"):
        WikiChunks(short, tokenizer=gpt2_tokenizer)
    with pytest.raises(FileNotFoundError, match="missing.txt not found"):
        build_train_dataset("wiki", wiki_file=tmp_path / "missing.txt", tokenizer=gpt2_tokenizer,
                            image_provider=FakeProvider())
    with pytest.raises(ValueError, match="needs the LM tokenizer and an image_provider"):
        build_train_dataset("wiki", wiki_file=WIKI_SAMPLE, tokenizer=gpt2_tokenizer)


# ----------------------------------------------------------------------------- LAION-220

@pytest.fixture
def laion_root(tmp_path):
    """COCO-style image root: train2017/ and val2017/ with three images (the sizes tell them apart)."""
    root = tmp_path / "coco"
    for folder, number, width in (("train2017", 9, 30), ("train2017", 25, 40), ("val2017", 139, 50)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        pattern_image(width, 20).save(root / folder / f"{number:012d}.jpg")
    return root


LAION_ROWS = {
    "url": ["http://images.cocodataset.org/train2017/000000000009.jpg",
            "http://images.cocodataset.org/train2017/000000000777.jpg",  # no such image
            "http://images.cocodataset.org/val2017/000000000139.jpg",
            "http://images.cocodataset.org/train2017/000000000025.jpg"],
    "caption": ["A bowl of fruit on a table. ", "Missing.", "A living room.", "A giraffe eating."],
    "short_caption": ["Fruit bowl.", "Missing.", "Living room.", "Giraffe."],
}


def test_laion_parquet_long_and_short(tmp_path, laion_root, caplog):
    pd.DataFrame(LAION_ROWS).to_parquet(tmp_path / "lvis_caption_url.parquet")
    with caplog.at_level(logging.WARNING):
        long = build_train_dataset("laion_220", laion_file=tmp_path / "lvis_caption_url.parquet",
                                   laion_image_root=laion_root)
    assert "skipped 1 rows whose image is not under" in caplog.text
    assert [long[i]["text"] for i in range(len(long))] == ["A bowl of fruit on a table.", "A living room.",
                                                            "A giraffe eating."]
    assert [long[i]["image"].size for i in range(3)] == [(30, 20), (50, 20), (40, 20)]
    short = build_train_dataset("laion_220_short", laion_file=tmp_path / "lvis_caption_url.parquet",
                                laion_image_root=laion_root)
    assert isinstance(short, LaionCaptions)
    assert [short[i]["text"] for i in range(3)] == ["Fruit bowl.", "Living room.", "Giraffe."]
    both = build_train_dataset("laion_220_short_laion_220", laion_file=tmp_path / "lvis_caption_url.parquet",
                               laion_image_root=laion_root, max_train_samples=2)
    assert [both[i]["text"] for i in range(4)] == ["A bowl of fruit on a table.", "A living room.",
                                                   "Fruit bowl.", "Living room."]


def test_laion_jsonl_and_csv(tmp_path, laion_root):
    frame = pd.DataFrame(LAION_ROWS).rename(columns={"short_caption": "short_captions"})
    frame.to_json(tmp_path / "laion.jsonl", orient="records", lines=True)
    frame.to_csv(tmp_path / "laion.csv", index=False)
    for name in ("laion.jsonl", "laion.csv"):
        ds = LaionCaptions(laion_root, tmp_path / name, short=True)
        assert [(ds[i]["text"], ds[i]["image"].size) for i in range(len(ds))] == [
            ("Fruit bowl.", (30, 20)), ("Living room.", (50, 20)), ("Giraffe.", (40, 20))]


def test_laion_hub(monkeypatch, laion_root):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, split=None, **kw: datasets.Dataset.from_dict(LAION_ROWS)
                        if (path, split) == (captions.LAION_HUB_ID, "train") else None)
    ds = LaionCaptions(laion_root)
    assert len(ds) == 3 and ds[2]["text"] == "A giraffe eating."


def test_laion_bad_inputs(tmp_path, laion_root):
    pd.DataFrame(LAION_ROWS).to_parquet(tmp_path / "laion.parquet")
    with pytest.raises(ValueError, match="LAION-220 image root .* is required"):
        build_train_dataset("laion_220", laion_file=tmp_path / "laion.parquet")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        build_train_dataset("laion_220", laion_file=tmp_path / "laion.parquet", laion_image_root=tmp_path / "no")
    with pytest.raises(FileNotFoundError, match="caption file .*nope.parquet not found"):
        LaionCaptions(laion_root, tmp_path / "nope.parquet")
    pd.DataFrame({"url": LAION_ROWS["url"], "text": LAION_ROWS["caption"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="needs columns 'url' and 'caption'"):
        LaionCaptions(laion_root, tmp_path / "bad.parquet")
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    with pytest.raises(ValueError, match="no row has both"):
        LaionCaptions(empty_root, tmp_path / "laion.parquet")


def test_missing_root_fails_before_other_sources_load(tmp_path):
    vg = tmp_path / "vg"
    vg.mkdir()
    (vg / "region_descriptions.json").write_text("not json")  # reading it first would raise JSONDecodeError
    (vg / "image_data.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="LAION-220 image root"):
        build_train_dataset("cropped_vg_laion_220", vg_dir=vg, laion_image_root=tmp_path / "none")


# ----------------------------------------------------------------------------- generic train_file

def test_train_file_jsonl_with_crops(tmp_path):
    (tmp_path / "img").mkdir()
    pattern_image(60, 40).save(tmp_path / "img" / "a.png")
    abs_path = tmp_path / "b.png"
    pattern_image(20, 20, seed=5).save(abs_path)
    rows = [{"image": "img/a.png", "caption": "whole"},
            {"image": "img/a.png", "caption": "list crop", "crop": [10, 5, 20, 10]},
            {"image": "img/a.png", "caption": "string crop", "crop": "50,30,20,20"},
            {"image": str(abs_path), "caption": " absolute "}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = build_train_dataset(None, train_file=tmp_path / "train.jsonl")
    assert isinstance(ds, CaptionFile) and len(ds) == 4
    full = Image.open(tmp_path / "img" / "a.png").convert("RGB")
    expected = [full, full.crop((10, 5, 30, 15)), full.crop((50, 30, 60, 40)),
                Image.open(abs_path).convert("RGB")]
    for i, (row, image) in enumerate(zip(rows, expected)):
        assert ds[i]["text"] == row["caption"].strip()
        assert np.array_equal(np.asarray(ds[i]["image"]), np.asarray(image))


def test_train_file_csv_added_to_named_sources(tmp_path, vg_dir):
    pattern_image(60, 40).save(tmp_path / "a.png")
    (tmp_path / "train.csv").write_text('image,caption,crop\na.png,"a crop, quoted","1,2,3,4"\na.png,plain,\n')
    ds = build_train_dataset("cropped_vg", vg_dir=vg_dir, train_file=tmp_path / "train.csv")
    assert isinstance(ds, ConcatDataset) and len(ds) == 1278 + 2
    assert ds[1278]["text"] == "a crop, quoted" and ds[1278]["image"].size == (3, 4)
    assert ds[1279]["image"].size == (60, 40)


def test_train_file_bad_inputs(tmp_path):
    pattern_image(10, 10).save(tmp_path / "a.png")
    cases = {
        "cap.jsonl": ('{"image": "a.png", "caption": "ok"}\n{"image": "a.png"}\n', ValueError,
                      r"cap.jsonl:2: missing or empty column 'caption'"),
        "img.csv": ("caption\nhello\n", ValueError, r"img.csv:2: missing or empty column 'image'"),
        "gone.jsonl": ('{"image": "b.png", "caption": "x"}\n', FileNotFoundError, r"gone.jsonl:1: image .*b.png"),
        "crop.jsonl": ('{"image": "a.png", "caption": "x", "crop": [1, 2, 3]}\n', ValueError,
                       r"crop.jsonl:1: crop must be"),
        "empty.jsonl": ("\n", ValueError, "holds no rows"),
        "data.txt": ("a.png hello\n", ValueError, "unsupported file type"),
    }
    for name, (text, error, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(error, match=message):
            build_train_dataset("", train_file=tmp_path / name)
    (tmp_path / "out.jsonl").write_text('{"image": "a.png", "caption": "x", "crop": "20,20,5,5"}\n')
    ds = CaptionFile(tmp_path / "out.jsonl")
    with pytest.raises(ValueError, match=r"out.jsonl:1: box .* lies outside its 10x10 image"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="train_file .*none.jsonl not found"):
        build_train_dataset("coco", train_file=tmp_path / "none.jsonl")


# ----------------------------------------------------------------------------- combined + collator

def test_wiki_laion_combination(tmp_path, laion_root, gpt2_tokenizer):
    pd.DataFrame(LAION_ROWS).to_parquet(tmp_path / "laion.parquet")
    ds = build_train_dataset("ft_wiki_laion_220_2", wiki_file=WIKI_SAMPLE, tokenizer=gpt2_tokenizer,
                             image_provider=FakeProvider(), max_elements=5, laion_file=tmp_path / "laion.parquet",
                             laion_image_root=laion_root)
    assert [type(d) for d in ds.datasets] == [WikiChunks, LaionCaptions]
    assert len(ds) == 5 + 3 and ds[7]["text"] == "A giraffe eating."


def test_collator_hand_computed(gpt2_tokenizer):
    # GPT-2 ids: "Hello" 15496, " world" 995; no pad token, so padding uses <|endoftext|> 50256.
    collate = CaptionCollator(gpt2_tokenizer, ToTensor())
    image = pattern_image(8, 8)
    batch = collate([{"image": image, "text": "Hello world"}, {"image": image, "text": "Hello"}])
    assert batch["input_ids"].tolist() == [[15496, 995, EOT], [15496, EOT, EOT]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[15496, 995, EOT], [15496, EOT, -100]]  # the real EOS keeps its label
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert torch.equal(batch["pixel_values"][0], ToTensor()(image))

    cut = CaptionCollator(gpt2_tokenizer, ToTensor(), max_length=2)([{"image": image, "text": "Hello world"}])
    assert cut["input_ids"].tolist() == [[15496, EOT]]
    plain = CaptionCollator(gpt2_tokenizer, ToTensor(), add_eos=False)(
        [{"image": image, "text": "Hello"}, {"image": image, "text": "Hello world"}])
    assert plain["input_ids"].tolist() == [[15496, EOT], [15496, 995]]
    assert plain["labels"].tolist() == [[15496, -100], [15496, 995]]


def test_collator_uses_pad_token(gpt2_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    tokenizer.pad_token = "!"  # id 0
    batch = CaptionCollator(tokenizer, ToTensor())([{"image": pattern_image(8, 8), "text": t}
                                                    for t in ("Hello", "Hello world world")])
    assert batch["input_ids"].tolist() == [[15496, EOT, 0, 0], [15496, 995, 995, EOT]]
    assert batch["labels"].tolist() == [[15496, EOT, -100, -100], [15496, 995, 995, EOT]]
    assert (batch["labels"] == -100).equal(batch["attention_mask"] == 0)


def test_dataloader_workers(vg_dir, gpt2_tokenizer):
    collate = pickle.loads(pickle.dumps(CaptionCollator(gpt2_tokenizer, ToTensor(), max_length=16)))
    ds = VGRegions(vg_dir, max_samples=8)
    batches = list(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate))
    assert [b["pixel_values"].shape for b in batches] == [(4, 3, 8, 8)] * 2
    first = gpt2_tokenizer("the clock is green in colour")["input_ids"] + [EOT]
    row = batches[0]["input_ids"][0][batches[0]["attention_mask"][0].bool()].tolist()
    assert row == first
    for b in batches:
        assert (b["labels"] == -100).equal(b["attention_mask"] == 0)


def test_prompt_column_is_context_without_loss(tmp_path, gpt2_tokenizer):
    pattern_image(8, 8).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "prompt": "Hello", "caption": "world"}, {"image": "a.png", "caption": "Hello world"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = CaptionFile(tmp_path / "t.jsonl")
    assert ds[0]["prompt"] == "Hello " and "prompt" not in ds[1]
    batch = CaptionCollator(gpt2_tokenizer, ToTensor())([ds[0], ds[1]])
    assert batch["input_ids"].tolist() == [[15496, 995, EOT], [15496, 995, EOT]]
    assert batch["labels"].tolist() == [[-100, 995, EOT], [15496, 995, EOT]]  # "Hello" is context only
