"""Retrieved images in the evaluation core and train.py (``--image_source retrieve``) on the tiny zoo."""
import json
from pathlib import Path

import pytest

from eval_scripts.core import EvalError, Evaluator, run_main
from eval_scripts.imagenetVC import OPTIONS, main, parse_args
from models.images import index as image_index
from models.images.index import ImageIndex
from models.images.retrieval import ImageRetriever
from tests.paths import EVAL_DATA, TEST_DATA
from tests.test_image_index import draw_stand_ins
from tests.zoo import boosted_checkpoint

VC = EVAL_DATA / "imagenetvc"
NAMES = [f"photo{i:02d}.png" for i in range(12)]
CANDIDATE_PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a black rectangle",
                     "a photo of a dog", "a white cat", "an orange", "a pink flower", "a lake in the mountains"]

pytestmark = pytest.mark.usefixtures("one_thread")


def build_index(images: Path, out: Path, clip: str) -> Path:
    image_index.main(["build", "--images", str(images), "--out", str(out), "--vision_encoder", clip,
                      "--num_workers", "0", "--device", "cpu"])
    return out


@pytest.fixture(scope="module")
def zoo(one_thread, tmp_path_factory, lm_dirs, tiny_clip_spec):
    root = tmp_path_factory.mktemp("retrieval-eval")
    _, ckpt = boosted_checkpoint(root, lm_dirs["llama"], tiny_clip_spec, seed=1)
    images = draw_stand_ins(root / "photos", NAMES)
    (images / "captions.jsonl").write_text("".join(json.dumps({"image": n, "caption": f"photo number {i}"}) + "\n"
                                                   for i, n in enumerate(NAMES)))
    return {"lm": lm_dirs["llama"], "clip": tiny_clip_spec, "ckpt": str(ckpt), "out": root / "out",
            "index": build_index(images, root / "index", tiny_clip_spec), "root": root}


def args_for(zoo, run_name, *extra, k=2, limit=2):
    return ["--model_name", zoo["lm"], "--pretrained_model", zoo["ckpt"], "--subsets", "color",
            "--data_dir", str(VC), "--limit", str(limit), "--batch_size", "8", "--output_dir", str(zoo["out"]),
            "--run_name", run_name, "--device", "cpu", "--vision_encoder", zoo["clip"], "--k", str(k),
            "--image_source", "retrieve", "--image_index", str(zoo["index"]), *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def direct_cosines(vision, image, prompts):
    """CLIP cosine of one image with each prompt, computed from scratch."""
    _, embeds = vision.encode_images(vision.pixels([image]))
    return vision.image_text_similarity(embeds.expand(len(prompts), -1), prompts).tolist()


def test_imagenetvc_fuses_retrieved_images_with_their_clip_weights(zoo):
    result = main(args_for(zoo, "retrieved", "--dedup_threshold", "1"))  # --generate_images implied
    assert result["config"]["generate_images"] is True and result["counts"]["images_generated"] == 0
    assert result["image_root"]["kind"] == "index" and result["image_root"]["absolute"] == str(
        ImageIndex(zoo["index"]).root.resolve())
    rows = read_jsonl(zoo["out"] / "retrieved" / "imagenetvc_samples.jsonl")
    assert len(rows) == 10 and all(len(r["images"]) == 2 for r in rows)
    from models.vision import load_vision_encoder
    from PIL import Image

    vision = load_vision_encoder(zoo["clip"])
    index = ImageIndex(zoo["index"])
    retriever = ImageRetriever(index, vision, dedup_threshold=1.0)
    for r in rows:
        question = r["images"][0]["prompt"]
        assert r["images"][1]["prompt"] == question and question in r["prompt"]  # k copies of the question
        best = retriever.rank([question], 2)[0]
        assert [im["row"] for im in r["images"]] == [row for row, _ in best]  # its 2 best images, in order
        for im, (row, score) in zip(r["images"], best):
            assert im["path"] == index.paths[row] and im["similarity"] == pytest.approx(score, abs=1e-6)  # root-relative
            cos = direct_cosines(vision, Image.open(index.root / im["path"]).convert("RGB"), [question])[0]
            assert im["weight"] == pytest.approx(2.0 * max(0.0, cos), abs=1e-5)


def test_one_image_retrieved_for_two_prompts_gets_each_prompts_own_weight(zoo, tmp_path):
    """The per-image feature memo must key the CLIP cosine by (image, prompt): keyed by path alone, the
    second prompt would get the first prompt's weight."""
    images = draw_stand_ins(tmp_path / "one", ["only.png"])
    index_dir = build_index(images, tmp_path / "index", zoo["clip"])
    ev = Evaluator(parse_args(args_for(zoo, "one-image", "--image_index", str(index_dir), k=1)), "imagenetvc", OPTIONS)
    from PIL import Image

    image = Image.open(images / "only.png").convert("RGB")
    cosines = dict(zip(CANDIDATE_PROMPTS, direct_cosines(ev.vision, image, CANDIDATE_PROMPTS)))
    p1, p2 = sorted(CANDIDATE_PROMPTS, key=cosines.get)[-2:]  # two prompts the image agrees with, unequally
    assert cosines[p2] > cosines[p1] > 0
    for order in ([p1, p2], [p2, p1]):
        _, weights, records = ev.images_for([[order[0]], [order[1]]])
        assert [rec[0]["row"] for rec in records] == [0, 0] and records[0][0]["path"] == records[1][0]["path"]
        assert weights[:, 0].tolist() == pytest.approx([2 * cosines[order[0]], 2 * cosines[order[1]]], abs=1e-5)


@pytest.mark.parametrize("case", ["k_too_large", "no_index_flag", "missing_index", "other_encoder", "no_captions"])
def test_bad_retrieval_input_is_one_line_and_writes_nothing(case, zoo, tmp_path, capsys):
    run = f"bad-{case}"
    argv = args_for(zoo, run)
    if case == "k_too_large":
        argv += ["--k", "13"]
        expect = f"error: --k 13 is larger than the image index {zoo['index']} (12 images)"
    elif case == "no_index_flag":
        argv = [a for a in argv if a != str(zoo["index"]) and a != "--image_index"]
        expect = "error: --image_source retrieve needs --image_index INDEX_DIR"
    elif case == "missing_index":
        argv += ["--image_index", str(tmp_path / "nowhere")]
        expect = f"error: image index {tmp_path / 'nowhere'}: no manifest.json"
    elif case == "other_encoder":
        from models.tiny_models import build_tiny_clip

        other = build_tiny_clip(tmp_path / "other-clip", seed=1)
        images = draw_stand_ins(tmp_path / "photos", NAMES[:3])
        argv += ["--image_index", str(build_index(images, tmp_path / "other-index", other))]
        expect = (f"error: image index {tmp_path / 'other-index'} was built with vision encoder {other!r}, "
                  f"not {zoo['clip']!r}")
    else:
        images = draw_stand_ins(tmp_path / "photos", NAMES[:3])
        argv += ["--image_index", str(build_index(images, tmp_path / "plain-index", zoo["clip"])),
                 "--retrieve_by", "caption"]
        expect = f"error: --retrieve_by caption: image index {tmp_path / 'plain-index'} has no captions"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(expect), err
    assert not (zoo["out"] / run).exists()


def test_caption_retrieval_records_bm25_scores(zoo):
    main(args_for(zoo, "by-caption", "--retrieve_by", "caption", "--dedup_threshold", "1", k=1, limit=1))
    rows = read_jsonl(zoo["out"] / "by-caption" / "imagenetvc_samples.jsonl")
    # the question shares no word with "photo number N": every score is 0 and rows come in index order
    assert {(im["row"], im["similarity"]) for r in rows for im in r["images"]} == {(0, 0.0)}


def test_a_rerun_with_another_image_source_does_not_resume(zoo, capsys):
    main(args_for(zoo, "resumed", k=1, limit=1))
    with pytest.raises(SystemExit) as e:
        run_main(main, args_for(zoo, "resumed", "--retrieve_by", "caption", k=1, limit=1))
    assert e.value.code == 2
    assert "was started with --retrieve_by 'clip'" in capsys.readouterr().err


def test_generate_images_false_still_turns_retrieval_off(zoo):
    result = main(args_for(zoo, "text-only", "--generate_images", "False"))
    assert result["config"]["generate_images"] is False and result["counts"]["fusion_passes"] == 0


# ---------------------------------------------------------------------------------------------- train.py
@pytest.fixture
def fresh_accelerate():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_argv(zoo, lm, out, *extra):
    return ["--output_dir", str(out), "--model_name_or_path", lm, "--vision_encoder", zoo["clip"],
            "--device", "cpu", "--lm_dtype", "fp32", "--seed", "0", "--dataset_name", "wiki",
            "--wiki_file", str(TEST_DATA / "wikitext2" / "valid.txt"), "--max_elements", "4",
            "--wiki_chunk_tokens", "24", "--image_cache", str(out / "cache"), "--image_size", "32",
            "--per_device_train_batch_size", "2", "--max_train_steps", "2", *extra]


def test_train_takes_the_wiki_images_from_the_index(zoo, lm_dirs, tmp_path, fresh_accelerate):
    import train

    out = tmp_path / "train"
    result = train.main(train_argv(zoo, lm_dirs["gpt2"], out, "--image_source", "retrieve", "--image_index",
                                   str(zoo["index"]), "--num_workers", "1"))
    assert result["completed_steps"] == 2
    assert not (out / "cache").exists()  # nothing generated
    saved = json.loads((Path(result["saved"][-1]) / "config.json").read_text())
    assert saved["run_args"]["image_source"] == "retrieve"


def test_train_retrieval_needs_the_wiki_source(zoo, lm_dirs, tmp_path, capsys, fresh_accelerate):
    import train

    argv = train_argv(zoo, lm_dirs["gpt2"], tmp_path / "t", "--image_source", "retrieve", "--image_index",
                      str(zoo["index"]), "--num_workers", "0")
    argv[argv.index("wiki")] = "cropped_vg"
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith("has no wiki source")


def test_evaluator_refuses_k_above_the_index_before_loading_models(zoo, monkeypatch):
    import transformers

    def no_loading(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    with pytest.raises(EvalError, match="larger than the image index"):
        Evaluator(parse_args(args_for(zoo, "early", k=99)), "imagenetvc", OPTIONS)


SCRIPTS = [("boolq", "boolq", ["--data_dir", str(TEST_DATA / "boolq")]),
           ("commonsenseQA", "commonsense_piqa", ["--testset", "piqa", "--data_dir", str(TEST_DATA / "piqa")]),
           ("squad", "squad", ["--data_dir", str(TEST_DATA / "squad_v2"), "--max_new_tokens", "3"])]


@pytest.mark.parametrize("script,task,extra", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_other_eval_scripts_take_retrieved_images(zoo, script, task, extra):
    import importlib

    module = importlib.import_module(f"eval_scripts.{script}")
    argv = ["--model_name", zoo["lm"], "--vision_encoder", zoo["clip"], "--k", "3", "--limit", "2",
            "--device", "cpu", "--output_dir", str(zoo["out"]), "--run_name", f"other-{script}",
            "--image_source", "retrieve", "--image_index", str(zoo["index"]), *extra]
    module.main(argv)
    rows = read_jsonl(zoo["out"] / f"other-{script}" / f"{task}_samples.jsonl")
    per_item = [group for r in rows for group in (r["images"] if isinstance(r["images"][0], list) else [r["images"]])]
    images = [im for group in per_item for im in group]  # commonsense QA: one image set per answer option
    assert images and all(len(group) == 3 for group in per_item)
    assert all(set(im) == {"path", "prompt", "weight", "row", "similarity", "sha256"} and 0 <= im["row"] < 12
               for im in images)
    # each image's sha256 is that of the file it names (relative to the run's image root): what a report checks
    import hashlib

    result = json.loads((zoo["out"] / f"other-{script}" / f"{task}.json").read_text())
    root = Path(result["image_root"]["absolute"])
    assert result["image_root"]["kind"] == "index"
    assert all(hashlib.sha256((root / im["path"]).read_bytes()).hexdigest() == im["sha256"] for im in images)
