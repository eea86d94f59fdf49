"""The image-source interface (models/images/source.py) and its registry (models/images/sources/): both sources
implement the protocol, their counters add up, build_image_source chooses from the flags, and a source is
registered by the one file that declares it."""
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from models.options import catalog, parse
from models.images.provider import ImageProvider
from models.images.retrieval import ImageRetriever
from models.images.source import SLOT_ORIGINS, SOURCE_COUNTERS, ImageSource
from models.images.sources import SourceSpec, build_image_source, discover, image_source_names
from tests.test_image_index import draw_stand_ins

REPO = Path(__file__).resolve().parents[1]
NAMES = [f"photo{i:02d}.png" for i in range(6)]
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle", "a green star"]

pytestmark = pytest.mark.usefixtures("one_thread")


def flags(*argv: str):
    return parse((*catalog.GENERATION, *catalog.RETRIEVAL, catalog.SEED), list(argv), raise_errors=True)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_clip_spec, one_thread):
    from models.images import index as image_index

    root = tmp_path_factory.mktemp("source")
    photos = draw_stand_ins(root / "photos", NAMES)
    (photos / "captions.jsonl").write_text("".join(json.dumps({"image": n, "caption": c}) + "\n"
                                                   for n, c in zip(NAMES, CAPTIONS)))
    image_index.main(["build", "--images", str(photos), "--out", str(root / "index"), "--vision_encoder",
                      tiny_clip_spec, "--num_workers", "0", "--device", "cpu"])
    return root / "index"


def protocol_methods() -> list[str]:
    return [name for name, value in vars(ImageSource).items() if inspect.isfunction(value) and not name.startswith("_")]


@pytest.mark.parametrize("cls", [ImageProvider, ImageRetriever], ids=lambda c: c.__name__)
def test_both_sources_implement_every_method_of_the_protocol(cls):
    assert issubclass(cls, ImageSource)
    assert protocol_methods() == ["check_k", "image_root", "bind", "refs", "images", "write_later", "get", "prefetch", "flush",
                                  "stats"]
    for name in protocol_methods():
        wanted = list(inspect.signature(getattr(ImageSource, name)).parameters.values())
        given = list(inspect.signature(getattr(cls, name)).parameters.values())
        assert [p.name for p in given[:len(wanted)]] == [p.name for p in wanted], (cls.__name__, name)
        assert [p.default for p in given[:len(wanted)]] == [p.default for p in wanted], (cls.__name__, name)
        assert all(p.default is not inspect.Parameter.empty for p in given[len(wanted):]), (cls.__name__, name)


def test_generating_source_counters_add_up(tmp_path):
    toy = ("--image_generator", "toyworld", "--image_cache", str(tmp_path), "--image_size", "8")
    source = build_image_source(flags(*toy), "cpu")
    assert isinstance(source, ImageProvider) and isinstance(source, ImageSource)
    source.get([["a", "a", "b"], ["b"]])  # a#0, a#1, b#0 generated; b#0 again: reused
    assert source.stats() == {"slots": 4, "generated": 3, "from_cache": 0, "reused": 1, "pipeline_loads": 0}
    source.flush()
    fresh = build_image_source(flags(*toy), "cpu")  # another run over the same cache
    fresh.prefetch([["a", "a"], ["b", "c"]])  # only the list with a missing image is served (and counted)
    assert fresh.stats() == {"slots": 2, "generated": 1, "from_cache": 1, "reused": 0, "pipeline_loads": 0}
    fresh.get([["c", "a"]])
    assert fresh.stats() == {"slots": 4, "generated": 1, "from_cache": 2, "reused": 1, "pipeline_loads": 0}
    stats = fresh.stats()
    assert tuple(stats) == SOURCE_COUNTERS and stats["slots"] == sum(stats[o] for o in SLOT_ORIGINS)


def test_retrieving_source_without_an_encoder_counts_like_the_generator(index_dir):
    """Training builds the retriever before its vision encoder loads: caption ranking needs none."""
    source = build_image_source(flags("--image_source", "retrieve", "--image_index", str(index_dir),
                                      "--retrieve_by", "caption", "--dedup_threshold", "1"), "cpu")
    assert isinstance(source, ImageRetriever) and source.encoder is None and isinstance(source, ImageSource)
    items = source.get([["a red circle", "a red circle"], ["a blue square"], ["a red circle"]])
    assert [[im.row for im in item] for item in items][1:] == [[1], [0]]
    assert items[0][0].row == 0 and items[0][1].row != 0  # the repeated prompt: its two best images
    # three distinct images, each counted once from the disk; the last slot repeats the first one's image
    assert source.stats() == {"slots": 4, "generated": 0, "from_cache": 3, "reused": 1, "pipeline_loads": 0}
    refs = source.refs([["a green star"]])  # refs count nothing (the feature cache counts its slots)
    assert refs[0][0].row == 5 and refs[0][0].key == refs[0][0].path and source.stats()["slots"] == 4
    source.check_k(6)
    with pytest.raises(ValueError, match=f"--k 7 is larger than the image index {index_dir} \\(6 images\\)"):
        source.check_k(7)
    with pytest.raises(ValueError, match="k must be >= 1"):
        source.check_k(0)


def test_build_image_source_reads_the_flags(tmp_path, index_dir):
    toy = build_image_source(flags("--image_generator", "toyworld", "--toyworld_noise", "0.25", "--image_size", "16",
                                   "--seed", "3", "--image_cache", str(tmp_path / "cache")), "cpu")
    assert type(toy.generator).__name__ == "ToyWorldGenerator" and toy.generator.noise == 0.25
    assert (toy.image_size, toy.seed, toy.cache.root) == (16, 3, tmp_path / "cache")
    # name= overrides --image_source (pre-generation always generates); retrieval makes no image cache
    args = flags("--image_source", "retrieve", "--image_index", str(index_dir), "--image_cache", str(tmp_path / "c2"))
    assert isinstance(build_image_source(args, "cpu", name="generate"), ImageProvider)
    retrieve = flags("--image_source", "retrieve", "--image_index", str(index_dir), "--image_cache",
                     str(tmp_path / "never"))
    assert isinstance(build_image_source(retrieve, "cpu"), ImageRetriever)
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="--image_source retrieve needs --image_index INDEX_DIR"):
        build_image_source(flags("--image_source", "retrieve"), "cpu")
    with pytest.raises(ValueError, match="unknown image source 'fetch'; choose from generate, retrieve"):
        build_image_source(args, "cpu", name="fetch")


def test_the_registry_is_one_file_per_source_and_imports_no_torch():
    script = ("import sys, json\n"
              "from models.images.sources import image_source_names, image_sources\n"
              "names = image_source_names()\n"
              "print(json.dumps([names, [s.description for s in image_sources().values()],\n"
              "                  sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'PIL'})]))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    names, descriptions, heavy = json.loads(out.stdout)
    assert names == ["generate", "retrieve"] == list(image_source_names()) and heavy == []
    assert all(d and "\n" not in d for d in descriptions)
    modules = sorted(p.stem for p in (REPO / "models" / "images" / "sources").glob("*.py") if p.stem != "__init__")
    assert modules == names


def test_a_new_source_registers_itself_by_existing(tmp_path, monkeypatch):
    package = tmp_path / "more_sources"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "blank.py").write_text(textwrap.dedent("""
        from models.images.sources import SourceSpec

        SOURCE = SourceSpec("blank", "one grey image per slot", lambda args, device, *, dtype, encoder: "built")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import more_sources

    found = discover(more_sources)
    assert list(found) == ["blank"] and isinstance(found["blank"], SourceSpec)
    assert found["blank"].build(None, None, dtype=None, encoder=None) == "built"
    (package / "broken.py").write_text("NOT_A_SOURCE = 1\n")
    with pytest.raises(TypeError, match="more_sources.broken declares no SOURCE"):
        discover(more_sources)
