"""Benchmark readers: every benchmark from its original local files or from a hub id.

Each reader takes ``data_dir`` (the folder holding the benchmark's original files), or ``data_file``
(one such file), or neither: then it loads a parquet hub id through ``datasets.load_dataset`` (no
loading scripts, so it works with datasets >= 4). ImageNetVC and the object-commonsense sets ship with
the project under ``data/evaluation/`` (``SHIPPED_DATA``), which the eval scripts read by default. Bad
input raises ``ValueError`` naming the file and line (or the hub id and row): malformed rows, a file
that is not UTF-8, a file without a single example; a missing file raises ``FileNotFoundError`` naming
every file that was looked for. Local files are read as UTF-8 with or without a byte-order mark.
Scoring rules: ``docs/protocols.md``.

Benchmarks and their record forms:

* ImageNetVC (``load_imagenetvc``): dicts ``id, category, question, answer, candidates, group``.
  Candidate lists and the five templates follow the reference script of the first release; the
  ``others`` subset picks its list (``others_yes``, ``others_number``, ``others_other``) by answer.
* Object commonsense (``load_object_commonsense``, VaLM's files; ``load_vicomte``, ViComTe's).
* Multiple-choice commonsense (``load_commonsense``): ``MCExample`` with the lm-evaluation-harness
  context/continuations and the query strings the released ``commonsenseQA.py`` scored.
* BoolQ (``load_boolq``), SQuAD 2.0 (``load_squad``) and QuAC (``load_quac``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

# The evaluation files the project ships (see each folder's SOURCE.md).
SHIPPED_DATA = Path(__file__).resolve().parent / "evaluation"
IMAGENETVC_DIR = SHIPPED_DATA / "imagenetvc"
OBJECT_COMMONSENSE_DIR = SHIPPED_DATA / "object_commonsense"

# ----------------------------------------------------------------------------------------------
# shared helpers


def _hub_rows(path: str, name: str | None = None, split: str = "validation", *,
              revision: str | None = None, data_files=None) -> Iterator[dict]:
    """Rows of a hub dataset split (imported lazily: ``datasets`` is slow to import)."""
    import datasets

    ds = datasets.load_dataset(path, name, split=split, revision=revision, data_files=data_files)
    return iter(ds)


def _hub_where(path: str, name: str | None, split: str) -> str:
    return f"{path}{'/' + name if name else ''} [{split}]"


def _limit(items: list, limit: int | None) -> list:
    if limit is None:
        return items
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return items[:limit]


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    return path


def _find_file(folders: Iterable[Path], filenames: str | Iterable[str], what: str) -> Path:
    """The first ``folder/filename`` that exists (folders in order, then names in order); the error
    names every file looked for."""
    folders = list(folders)
    names = [filenames] if isinstance(filenames, str) else list(filenames)
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    where = folders[0] if len(folders) == 1 else "any of " + ", ".join(map(str, folders))
    raise FileNotFoundError(f"{what}: no {' or '.join(names)} in {where}")


def _text(raw: dict, key: str, allow_empty: bool = False) -> str:
    """A string field of a row; ValueError (without location) when missing, not text or empty."""
    if key not in raw or raw[key] is None:
        raise ValueError(f"missing field {key!r}")
    value = raw[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is not text: {value!r}")
    if not allow_empty and not value.strip():
        raise ValueError(f"empty field {key!r}")
    return value


def _located(where: str, fn, *args):
    """``fn(*args)``, with a ValueError prefixed by its location."""
    try:
        return fn(*args)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, with or without a byte-order mark (spreadsheet exports add one);
    anything else is a ValueError naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8") from None


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """``(line_number, object)`` for each non-blank line."""
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        rows.append((lineno, obj))
    return rows


def _nonempty(rows: list, path: Path, what: str = "rows") -> list:
    """``rows``, or a ValueError when a benchmark file holds none (an empty or header-only file)."""
    if not rows:
        raise ValueError(f"{path}: the file holds no {what}")
    return rows


def _read_benchmark_jsonl(path: Path) -> list[tuple[int, dict]]:
    return _nonempty(read_jsonl(path), path)


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict]]:
    """``(line_number, row)`` for each CSV row; ValueError when a required column is missing or when
    there is no row."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    if not reader.fieldnames:
        raise ValueError(f"{path}: the file is empty (expected a header with {', '.join(columns)})")
    missing = [c for c in columns if c not in reader.fieldnames]
    if missing:
        raise ValueError(f"{path}:1: missing column(s) {', '.join(missing)}")
    return _nonempty([(reader.line_num, row) for row in reader], path, "rows after its header")


def _read_labels(path: Path, n_rows: int, data_path: Path, allowed: tuple[str, ...]) -> list[int]:
    """Line-aligned labels as indices into ``allowed`` (e.g. SIQA's "1","2","3" -> 0,1,2)."""
    labels = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        value = line.strip()
        if not value:
            continue
        if value not in allowed:
            raise ValueError(f"{path}:{lineno}: label {value!r} outside the options {list(allowed)}")
        labels.append(allowed.index(value))
    if len(labels) != n_rows:
        raise ValueError(f"{path}:{min(len(labels), n_rows) + 1}: {len(labels)} labels but "
                         f"{data_path} has {n_rows} rows")
    return labels


# ----------------------------------------------------------------------------------------------
# ImageNetVC

IMAGENETVC_HUB = "hemingkx/ImageNetVC"
IMAGENETVC_SUBSETS = ("color", "shape", "material", "component", "others")
IMAGENETVC_TEMPLATES = (
    "{q}",
    "{q} Answer:",
    "{q} The answer is",
    "Question: {q} Answer:",
    "Question: {q} The answer is",
)
IMAGENETVC_CANDIDATES: dict[str, tuple[str, ...]] = {
    "color": ("brown", "black", "white", "yellow", "green", "gray", "red", "orange", "blue",
              "silver", "pink"),
    "shape": ("round", "rectangle", "triangle", "square", "oval", "curved", "cylinder", "straight",
              "cone", "curly", "heart", "star"),
    "material": ("metal", "wood", "plastic", "cotton", "glass", "fabric", "stone", "rubber",
                 "ceramic", "cloth", "leather", "flour", "paper", "clay", "wax", "concrete"),
    "component": ("yes", "no"),
    "others_yes": ("yes", "no"),
    "others_number": ("2", "4", "6", "1", "8", "3", "5"),
    "others_other": ("long", "small", "short", "large", "forest", "water", "ocean", "big", "tree",
                     "ground", "tall", "wild", "outside", "thin", "head", "thick", "circle", "brown",
                     "soft", "land", "neck", "rough", "chest", "smooth", "fur", "hard", "top",
                     "plants", "black", "metal", "books", "vertical", "lake", "grass", "road", "sky",
                     "front", "kitchen", "feathers", "stripes", "baby", "hair", "feet", "mouth",
                     "female", "table"),
}


def imagenetvc_group(subset: str, answer: str | None = None) -> str:
    """The candidate-list (and demonstration-file) name of a question: the subset itself, or for
    ``others`` one of ``others_yes`` / ``others_number`` / ``others_other`` chosen by the answer."""
    if subset in IMAGENETVC_CANDIDATES:
        return subset
    if subset != "others":
        raise ValueError(f"unknown ImageNetVC subset {subset!r}; expected one of {IMAGENETVC_SUBSETS}")
    if answer is None:
        raise ValueError("the 'others' subset needs the answer to pick its candidate list")
    answer = str(answer).strip().lower()
    if answer in IMAGENETVC_CANDIDATES["others_yes"]:
        return "others_yes"
    if answer in IMAGENETVC_CANDIDATES["others_number"]:
        return "others_number"
    return "others_other"


def imagenetvc_candidates(subset: str, answer: str | None = None) -> list[str]:
    """The fixed candidate list of a subset (for ``others``, of the answer's group)."""
    return list(IMAGENETVC_CANDIDATES[imagenetvc_group(subset, answer)])


def imagenetvc_prompt(question: str, template: int, demos: Iterable[dict] = ()) -> str:
    """Template ``template`` (0-4) applied to ``question``, after the in-context demonstrations, each
    written in the same template and followed by ``" {answer}. "`` (the released ICL format)."""
    fmt = IMAGENETVC_TEMPLATES[template]
    prefix = "".join(f"{fmt.format(q=d['question'])} {d['answer']}. " for d in demos)
    return prefix + fmt.format(q=question)


def _imagenetvc_rows(filename: str, data_dir, data_file=None) -> list[tuple[str, dict]]:
    """``(location, row)`` pairs of one ImageNetVC CSV: ``data_file``, ``data_dir/filename`` or the hub."""
    columns = ("category", "question", "answer")
    if data_file is not None or data_dir is not None:
        path = _require_file(Path(data_file) if data_file is not None else Path(data_dir) / filename, "ImageNetVC")
        return [(f"{path}:{line}", row) for line, row in _read_csv(path, columns)]
    rows = list(_hub_rows(IMAGENETVC_HUB, split="train", data_files={"train": filename}))
    where = f"{IMAGENETVC_HUB}/{filename}"
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}")
    return [(f"{where} row {i}", row) for i, row in enumerate(rows)]


def _imagenetvc_record(row: dict) -> dict:
    """Category, question and (lower-cased) answer of a row, each required to be non-empty."""
    clean = {k: "" if row.get(k) is None else str(row[k]).strip() for k in ("category", "question", "answer")}
    for key, value in clean.items():
        if not value:
            raise ValueError(f"empty {key!r}")
    clean["answer"] = clean["answer"].lower()
    return clean


def load_imagenetvc(subset: str, data_dir=None, limit: int | None = None, data_file=None) -> list[dict]:
    """ImageNetVC questions of one subset, from ``data_file``, ``data_dir/{subset}.csv`` or the hub.

    Each record: ``id`` ("{subset}-{row index}"), ``category``, ``question``, ``answer``
    (lower-cased, as the reference script compares), ``candidates`` (the fixed list) and ``group``
    (the candidate-list name; for ``others`` it names the demonstration file as well).
    An answer outside its candidate list is a ValueError.
    """
    if subset not in IMAGENETVC_SUBSETS:
        raise ValueError(f"unknown ImageNetVC subset {subset!r}; expected one of {IMAGENETVC_SUBSETS}")
    records = []
    for i, (where, row) in enumerate(_imagenetvc_rows(f"{subset}.csv", data_dir, data_file)):
        try:
            rec = _imagenetvc_record(row)
            group = imagenetvc_group(subset, rec["answer"])
            if rec["answer"] not in IMAGENETVC_CANDIDATES[group]:
                raise ValueError(f"answer {rec['answer']!r} is not in the {group} candidate list")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        records.append({"id": f"{subset}-{i}", **rec,
                        "candidates": list(IMAGENETVC_CANDIDATES[group]), "group": group})
    return _limit(records, limit)


def load_imagenetvc_demos(subset: str, data_dir=None, answer: str | None = None) -> list[dict]:
    """In-context demonstrations from ``data_dir/dev/{group}.csv`` (or the hub's ``dev/``).

    ``subset`` is a subset or a candidate-list name (its group); ``others`` needs the test example's ``answer``
    to pick ``others_yes`` / ``others_number`` / ``others_other``. Returns dicts ``category,
    question, answer``. Demonstration answers are not checked against the candidate lists: the
    released ``others_number`` demos include "10", which is not a candidate.
    """
    group = imagenetvc_group(subset, answer)
    demos = []
    for where, row in _imagenetvc_rows(f"dev/{group}.csv", data_dir):
        try:
            demos.append(_imagenetvc_record(row))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return demos


# ----------------------------------------------------------------------------------------------
# Object commonsense (VaLM's sets, the paper's Table 1) and ViComTe

OBJECT_SETS = ("memory_color", "color_terms", "shape", "relative_size")
_OBJECT_FILES = {
    # name: (file, id column or None, descriptor column or None, object column, answer column)
    "memory_color": ("memory_color_data.csv", "Index", "Descriptor", "Item", "Shape"),
    "color_terms": ("color-concrete-objects.csv", None, None, "object", "color"),
    "shape": ("shape.csv", "Index", "Descriptor", "Item", "Shape"),
}
RELATIVE_SIZE_ANSWERS = ("larger", "smaller")
OBJECT_SET_FILES = {**{name: spec[0] for name, spec in _OBJECT_FILES.items()}, "relative_size": "size.csv"}


def object_phrase(descriptor: str, obj: str) -> str:
    """"a sunflower", "the inside of a pineapple", or the bare object when there is no descriptor."""
    return f"{descriptor} {obj}" if descriptor else obj


def object_set_of_file(path) -> str | None:
    """The object-commonsense set a VaLM file holds, by its released file name (None if unknown)."""
    return {file: name for name, file in OBJECT_SET_FILES.items()}.get(Path(path).name)


def load_object_commonsense(name: str, data_dir=None, data_file=None) -> list[dict]:
    """One of VaLM's object-commonsense sets, from ``data_file`` or ``data_dir`` (the folder holding
    the VaLM files, or its parent with a ``valm/`` subfolder; default: the shipped files).

    * ``memory_color`` (memory_color_data.csv; its color column is headed "Shape" in the release),
      ``color_terms`` (color-concrete-objects.csv), ``shape`` (shape.csv): records ``id, object,
      descriptor`` ("" when none), ``answer``, ``candidates``. The candidates are VaLM's closed
      vocabulary: the distinct answers of that file, sorted, spelled as in the file (memory colors
      hold both "gray" and "grey", as VaLM's script scored them).
    * ``relative_size`` (size.csv, ``Descriptor1,Item1,Descriptor2,Item2,Label``): records ``id,
      obj1, descriptor1, obj2, descriptor2, answer, candidates`` where ``answer`` says how obj1
      compares with obj2: "larger" for Label "yes", "smaller" for "no"; candidates are
      ("larger", "smaller"). An evaluation may ask both directions ("Is obj1 larger/smaller than
      obj2?"), as VaLM's size script does.
    """
    if name not in OBJECT_SETS:
        raise ValueError(f"unknown object-commonsense set {name!r}; expected one of {OBJECT_SETS}")
    data_dir = Path(data_dir) if data_dir is not None else OBJECT_COMMONSENSE_DIR
    folders = [data_dir, data_dir / "valm"]
    if name == "relative_size":
        return _load_relative_size(_require_file(Path(data_file), name) if data_file is not None
                                   else _find_file(folders, "size.csv", name))
    filename, id_col, desc_col, obj_col, ans_col = _OBJECT_FILES[name]
    path = _require_file(Path(data_file), name) if data_file is not None else _find_file(folders, filename, name)
    columns = tuple(c for c in (id_col, desc_col, obj_col, ans_col) if c)
    records = []
    for i, (line, row) in enumerate(_read_csv(path, columns)):
        obj, answer = (row[obj_col] or "").strip(), (row[ans_col] or "").strip()
        if not obj or not answer:
            raise ValueError(f"{path}:{line}: empty {obj_col if not obj else ans_col!r}")
        records.append({"id": f"{name}-{(row[id_col] or '').strip() if id_col else i}", "object": obj,
                        "descriptor": (row[desc_col] or "").strip() if desc_col else "",
                        "answer": answer})
    vocabulary = sorted({r["answer"] for r in records})
    return [{**r, "candidates": list(vocabulary)} for r in records]


def _load_relative_size(path: Path) -> list[dict]:
    records = []
    for i, (line, row) in enumerate(_read_csv(path, ("Descriptor1", "Item1", "Descriptor2", "Item2", "Label"))):
        obj1, obj2 = (row["Item1"] or "").strip(), (row["Item2"] or "").strip()
        label = (row["Label"] or "").strip().lower()
        if not obj1 or not obj2:
            raise ValueError(f"{path}:{line}: empty item")
        if label not in ("yes", "no"):
            raise ValueError(f"{path}:{line}: label {label!r} is not yes/no")
        records.append({"id": f"relative_size-{i}", "obj1": obj1, "descriptor1": (row["Descriptor1"] or "").strip(),
                        "obj2": obj2, "descriptor2": (row["Descriptor2"] or "").strip(),
                        "answer": "larger" if label == "yes" else "smaller",
                        "candidates": list(RELATIVE_SIZE_ANSWERS)})
    return records


VICOMTE_RELATIONS = ("color", "shape", "larger", "smaller")


def load_vicomte(relation: str, data_dir) -> list[dict]:
    """ViComTe triples ``{"sub", "obj", "alt"}`` from ``data_dir/{relation}.jsonl`` (or
    ``data_dir/vicomte/``), as shipped with the first release (train splits).

    Records: ``id, object`` (sub), ``answer`` (obj: its color/shape, or an object that ``sub`` is
    larger/smaller than), ``distractor`` (alt) and ``candidates``: for color and shape the file's
    sorted answer vocabulary, for larger/smaller the pair ``[answer, distractor]``.
    """
    if relation not in VICOMTE_RELATIONS:
        raise ValueError(f"unknown ViComTe relation {relation!r}; expected one of {VICOMTE_RELATIONS}")
    path = _find_file([Path(data_dir), Path(data_dir) / "vicomte"], f"{relation}.jsonl", "ViComTe")
    records = []
    for i, (line, raw) in enumerate(_read_benchmark_jsonl(path)):
        try:
            sub, obj, alt = _text(raw, "sub").strip(), _text(raw, "obj").strip(), _text(raw, "alt").strip()
        except ValueError as e:
            raise ValueError(f"{path}:{line}: {e}") from None
        records.append({"id": f"vicomte_{relation}-{i}", "object": sub, "answer": obj, "distractor": alt})
    if relation in ("color", "shape"):
        vocabulary = sorted({r["answer"] for r in records})
        return [{**r, "candidates": list(vocabulary)} for r in records]
    return [{**r, "candidates": [r["answer"], r["distractor"]]} for r in records]


# ----------------------------------------------------------------------------------------------
# Multiple-choice commonsense


@dataclass
class MCExample:
    """One multiple-choice question in two scoring protocols.

    * lm-evaluation-harness: option i is the request ``(contexts[i], choices[i])`` (see
      ``requests()``); ``choices`` carry the harness's leading-space target delimiter.
      WinoGrande uses partial evaluation: ``option_contexts`` hold the sentence up to the blank
      with each option filled in, and every option shares one continuation (the rest of the
      sentence); ``context`` is then the sentence up to the blank.
    * released ``commonsenseQA.py``: ``released_queries[i]`` is the whole string it scored for
      option i (exp of the mean token NLL, lowest wins).

    ``image_context`` is text shared by all options (the goal, question or sentence) for callers
    that derive one set of image prompts per question instead of per option.
    """

    id: str
    context: str
    choices: list[str]
    label: int
    released_queries: list[str]
    image_context: str
    option_contexts: list[str] | None = None

    def requests(self) -> list[tuple[str, str]]:
        """``(context, continuation)`` per option, as the harness scores them."""
        contexts = self.option_contexts or [self.context] * len(self.choices)
        return list(zip(contexts, self.choices))

    def norm_lengths(self) -> list[int]:
        """Character lengths for ``acc_norm``: each continuation without its leading delimiter
        (the harness divides by ``len`` of the undelimited choice string)."""
        return [len(c[1:] if c.startswith(" ") else c) for c in self.choices]


COMMONSENSE_TESTSETS = ("piqa", "siqa", "arc", "arc_easy", "arc_challenge", "obqa", "cqa", "hs",
                        "winogrande")

# Hub sources (parquet, loadable by datasets >= 4): (path, config, default split).
COMMONSENSE_HUB = {
    "piqa": ("baber/piqa", None, "validation"),
    "siqa": ("lighteval/siqa", None, "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "obqa": ("allenai/openbookqa", "main", "test"),
    "cqa": ("tau/commonsense_qa", None, "validation"),
    "hs": ("Rowan/hellaswag", None, "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
}
# Local default splits: those the released script evaluated (ARC and OBQA test, the rest dev).
_LOCAL_SPLIT = {"piqa": "valid", "siqa": "dev", "arc_easy": "test", "arc_challenge": "test",
                "obqa": "test", "cqa": "dev", "hs": "val", "winogrande": "dev"}


def _hs_preprocess(text: str) -> str:
    """The harness's HellaSwag clean-up of WikiHow artefacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _index_label(value, n: int, base: int = 0) -> int:
    """An integer label (or its digit string) counted from ``base``, as a 0-based option index."""
    try:
        label = int(str(value).strip()) - base
    except ValueError:
        raise ValueError(f"label {value!r} is not an integer") from None
    if not 0 <= label < n:
        raise ValueError(f"label {value!r} outside the {n} options")
    return label


def _choice_block(raw: dict) -> tuple[list[str], list[str]]:
    """Texts and labels of a hub-layout ``choices`` ({"text": [...], "label": [...]})."""
    choices = raw.get("choices")
    if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
        raise ValueError("missing field 'choices' with 'text' and 'label'")
    texts, labels = list(choices["text"]), [str(x).strip() for x in choices["label"]]
    if len(texts) < 2 or len(texts) != len(labels):
        raise ValueError(f"choices need >= 2 texts with one label each, got {len(texts)}/{len(labels)}")
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"empty choice text in {texts!r}")
    return texts, labels


def _answer_index(raw: dict, labels: list[str]) -> int:
    key = str(raw.get("answerKey", "")).strip()
    if key not in labels:
        raise ValueError(f"answerKey {key!r} not among the choice labels {labels}")
    return labels.index(key)


def _build_piqa(raw: dict, id_: str) -> MCExample:
    goal, sols = _text(raw, "goal"), [_text(raw, "sol1"), _text(raw, "sol2")]
    return MCExample(id_, f"Question: {goal}\nAnswer:", [f" {s}" for s in sols],
                     _index_label(raw.get("label"), 2), [f"{goal} {s}" for s in sols], goal)


def _build_siqa(raw: dict, id_: str) -> MCExample:
    ctx, question = _text(raw, "context"), _text(raw, "question")
    answers = [_text(raw, k) for k in ("answerA", "answerB", "answerC")]
    return MCExample(id_, f"Q: {ctx} {question}\nA:", [f" {a}" for a in answers],
                     _index_label(raw.get("label"), 3), [f"{ctx} {question} {a}" for a in answers],
                     f"{ctx} {question}")


def _build_arc(raw: dict, id_: str) -> MCExample:
    stem = _text(raw, "question")
    texts, labels = _choice_block(raw)
    return MCExample(id_, f"Question: {stem}\nAnswer:", [f" {t}" for t in texts],
                     _answer_index(raw, labels), [f"{stem} {t}" for t in texts], stem)


def _build_obqa(raw: dict, id_: str) -> MCExample:
    stem = _text(raw, "question_stem")
    texts, labels = _choice_block(raw)
    return MCExample(id_, stem, [f" {t}" for t in texts], _answer_index(raw, labels),
                     [f"{stem} {t}" for t in texts], stem)


def _build_cqa(raw: dict, id_: str) -> MCExample:
    stem = _text(raw, "question")
    texts, labels = _choice_block(raw)
    letters = [chr(ord("A") + i) for i in range(len(texts))]
    listing = "".join(f"\n{letter}. {t}" for letter, t in zip(letters, texts))
    return MCExample(id_, f"Question: {stem.strip()}{listing}\nAnswer:", [f" {x}" for x in letters],
                     _answer_index(raw, labels), [f"{stem} {t}" for t in texts], stem)


def _build_hs(raw: dict, id_: str) -> MCExample:
    ctx_a, ctx_b = _text(raw, "ctx_a", allow_empty=True), _text(raw, "ctx_b", allow_empty=True)
    query = _hs_preprocess(f"{_text(raw, 'activity_label')}: {ctx_a} {ctx_b.capitalize()}")
    endings = raw.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"field 'endings' must be a list of >= 2 strings, got {endings!r}")
    ctx = _text(raw, "ctx")
    return MCExample(id_, query, [f" {_hs_preprocess(e)}" for e in endings],
                     _index_label(raw.get("label"), len(endings)), [f"{ctx} {e}" for e in endings], ctx)


def _build_winogrande(raw: dict, id_: str) -> MCExample:
    sentence = _text(raw, "sentence")
    options = [_text(raw, "option1"), _text(raw, "option2")]
    if "_" not in sentence:
        raise ValueError("sentence has no '_' blank")
    blank = sentence.index("_")
    prefix, rest = sentence[:blank], sentence[blank + 1:].strip()
    return MCExample(id_, prefix, [f" {rest}"] * 2, _index_label(raw.get("label"), 2),
                     [sentence.replace("_", o) for o in options], sentence,
                     option_contexts=[prefix + o for o in options])


_BUILDERS: dict[str, Callable[[dict, str], MCExample]] = {
    "piqa": _build_piqa, "siqa": _build_siqa, "arc_easy": _build_arc, "arc_challenge": _build_arc,
    "obqa": _build_obqa, "cqa": _build_cqa, "hs": _build_hs, "winogrande": _build_winogrande,
}
_ID_FIELDS = ("id", "qID", "ind")


def _local_qa_to_hub(raw: dict, stem_key: str) -> dict:
    """ARC / OpenBookQA / CommonsenseQA original layout -> the hub layout the builders read."""
    question = raw.get("question")
    if not isinstance(question, dict):
        raise ValueError("missing field 'question' with 'stem' and 'choices'")
    choices = question.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise ValueError("field 'question.choices' must be a list of {text, label}")
    return {stem_key: question.get("stem"), "answerKey": raw.get("answerKey"),
            "choices": {"text": [c.get("text") for c in choices], "label": [c.get("label") for c in choices]}}


def _local_file(testset: str, folder: Path, split: str) -> Path:
    """The original file of ``testset``'s ``split`` in ``folder``."""
    if testset in ("arc_easy", "arc_challenge"):
        kind = "Easy" if testset == "arc_easy" else "Challenge"
        return _find_file([folder, folder / f"ARC-{kind}"], f"ARC-{kind}-{split.capitalize()}.jsonl", testset)
    filename = {"cqa": f"{split}_rand_split.jsonl", "hs": f"hellaswag_{split}.jsonl"}.get(testset, f"{split}.jsonl")
    return _require_file(folder / filename, testset)


def _local_rows(testset: str, path: Path) -> list[tuple[str, dict]]:
    """``(location, row in hub layout)`` from one of a benchmark's original files; PIQA, SIQA and
    WinoGrande labels come from the line-aligned ``{stem}-labels.lst`` beside it."""
    rows = _read_benchmark_jsonl(path)
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    labels = None
    if testset in ("piqa", "siqa") or (testset == "winogrande" and labels_path.is_file()):
        allowed = {"piqa": ("0", "1"), "siqa": ("1", "2", "3"), "winogrande": ("1", "2")}[testset]
        labels = _read_labels(_require_file(labels_path, testset), len(rows), path, allowed)
    out = []
    for k, (line, raw) in enumerate(rows):
        where = f"{path}:{line}"
        try:
            if testset in ("arc_easy", "arc_challenge", "obqa", "cqa"):
                stem_key = "question_stem" if testset == "obqa" else "question"
                raw = {**_local_qa_to_hub(raw, stem_key), "id": raw.get("id")}
            if labels is not None:
                raw = {**raw, "label": labels[k]}
            elif testset == "winogrande":  # no labels file: each row's "answer" ("1"/"2")
                if "answer" not in raw:
                    raise ValueError(f"no label: neither {labels_path.name} nor an 'answer' field")
                raw = {**raw, "label": _index_label(raw["answer"], 2, base=1)}
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        out.append((where, raw))
    return out


def _hub_rows_mc(testset: str, split: str | None) -> list[tuple[str, dict]]:
    path, name, default_split = COMMONSENSE_HUB[testset]
    split = split or default_split
    where = _hub_where(path, name, split)
    out = []
    for i, raw in enumerate(_hub_rows(path, name, split)):
        raw = dict(raw)
        if testset == "siqa":  # labels "1".."3"
            raw["label"] = _located(f"{where} row {i}", _index_label, raw.get("label"), 3, 1)
        elif testset == "winogrande":  # answers "1"/"2"
            raw["label"] = _located(f"{where} row {i}", _index_label, raw.get("answer"), 2, 1)
        out.append((f"{where} row {i}", raw))
    return out


def load_commonsense(testset: str, data_dir=None, split: str | None = None,
                     limit: int | None = None, data_file=None) -> list[MCExample]:
    """Multiple-choice commonsense questions as ``MCExample``s.

    ``testset``: piqa, siqa, arc (ARC-Easy followed by ARC-Challenge, as the released script
    evaluated), arc_easy, arc_challenge, obqa, cqa (CommonsenseQA), hs (HellaSwag), winogrande.

    With ``data_dir`` (the folder holding the original files; ARC files may also sit in its
    ``ARC-Easy/`` and ``ARC-Challenge/`` subfolders, as in the ARC release), ``split`` names the
    files: PIQA ``{split}.jsonl`` + ``{split}-labels.lst`` (default "valid"); SIQA the same
    (default "dev", labels 1-3); ARC ``ARC-{Easy,Challenge}-{Split}.jsonl`` (default "test");
    OBQA ``{split}.jsonl`` (default "test"); CommonsenseQA ``{split}_rand_split.jsonl`` (default
    "dev"); HellaSwag ``hellaswag_{split}.jsonl`` (default "val"); WinoGrande ``{split}.jsonl``
    with ``{split}-labels.lst`` if present, else each row's "answer" (default "dev").
    ``data_file`` names one such file instead (labels, where a set has them, from ``{stem}-labels.lst``
    beside it; ``arc`` reads two files, so it takes ``data_dir`` only).
    Without either, the hub ids of ``COMMONSENSE_HUB`` are read (``split`` names the hub
    split; default validation, test for ARC and OBQA).

    Ids come from the files (id / qID / ind) or are "{testset}-{row index}".
    """
    if testset not in COMMONSENSE_TESTSETS:
        raise ValueError(f"unknown testset {testset!r}; expected one of {COMMONSENSE_TESTSETS}")
    parts = ("arc_easy", "arc_challenge") if testset == "arc" else (testset,)
    if data_file is not None and len(parts) > 1:
        raise ValueError("testset arc reads ARC-Easy and ARC-Challenge: give --data_dir, or use arc_easy or "
                         "arc_challenge with --data_file")
    examples = []
    for part in parts:
        if data_file is not None:
            rows = _local_rows(part, _require_file(Path(data_file), part))
        elif data_dir is not None:
            rows = _local_rows(part, _local_file(part, Path(data_dir), split or _LOCAL_SPLIT[part]))
        else:
            rows = _hub_rows_mc(part, split)
        for i, (where, raw) in enumerate(rows):
            id_ = next((str(raw[k]) for k in _ID_FIELDS if raw.get(k) not in (None, "")), f"{part}-{i}")
            examples.append(_located(where, _BUILDERS[part], raw, id_))
    return _limit(examples, limit)


# ----------------------------------------------------------------------------------------------
# BoolQ

BOOLQ_HUB = ("google/boolq", None, "validation")
BOOLQ_CHOICES = (" no", " yes")  # harness continuations; label = int(answer)


def boolq_context(rec: dict) -> str:
    """The lm-evaluation-harness BoolQ context (continuations ``BOOLQ_CHOICES``)."""
    return f"{rec['passage']}\nQuestion: {rec['question']}?\nAnswer:"


def boolq_released_prompt(rec: dict) -> str:
    """The released BoolQ prompt, without its ``str.capitalize()`` bug: the passage keeps its case,
    and only the question's first letter is upper-cased."""
    q = rec["question"]
    return f"Context: {rec['passage']}. Question: {q[:1].upper()}{q[1:]}? Answer:"


def load_boolq(data_dir=None, limit: int | None = None, split: str | None = None, data_file=None) -> list[dict]:
    """BoolQ from ``data_file``, ``data_dir/{split}.jsonl`` (default "dev") or the hub (``google/boolq``,
    which has no title: "" then). Records ``id, passage, question, title, answer`` (bool). Text is kept
    verbatim (no lower-casing or capitalisation)."""
    if data_file is not None or data_dir is not None:
        path = _require_file(Path(data_file) if data_file is not None
                             else Path(data_dir) / f"{split or 'dev'}.jsonl", "BoolQ")
        rows = [(f"{path}:{line}", raw) for line, raw in _read_benchmark_jsonl(path)]
    else:
        hub, name, default = BOOLQ_HUB
        where = _hub_where(hub, name, split or default)
        rows = [(f"{where} row {i}", raw) for i, raw in enumerate(_hub_rows(hub, name, split or default))]
    records = []
    for i, (where, raw) in enumerate(rows):
        records.append(_located(where, _boolq_record, raw, f"boolq-{i}"))
    return _limit(records, limit)


def _boolq_record(raw: dict, id_: str) -> dict:
    passage, question = _text(raw, "passage"), _text(raw, "question")
    if not isinstance(raw.get("answer"), bool):
        raise ValueError(f"answer {raw.get('answer')!r} is not a boolean")
    return {"id": id_, "passage": passage, "question": question,
            "title": raw.get("title") or "", "answer": raw["answer"]}


# ----------------------------------------------------------------------------------------------
# SQuAD 2.0 and QuAC

SQUAD_HUB = ("rajpurkar/squad_v2", None, "validation")
# allenai/quac still ships a loading script; its parquet export lives on this revision.
QUAC_HUB = ("allenai/quac", "plain_text", "validation", "refs/convert/parquet")
QUAC_CANNOTANSWER = "CANNOTANSWER"
QA_INSTRUCTION = ("Answer each question using information in the preceding background paragraph. "
                  "If there is not enough information provided, answer with \"Not in background.\"")


def _link_articles(records: list[dict], example_answer: Callable[[dict], str | None]) -> list[dict]:
    """Adds ``index_in_article``, ``prev_question`` and ``prev_answer``.

    An article is a run of consecutive records with the same title. ``prev_*`` is the latest
    earlier answerable question of the same article (None for the first): the one-shot example
    of the released SQuAD/QuAC scripts, which skipped unanswerable questions and used each
    article's first answerable question only as the example.
    """
    title, index, prev = None, 0, (None, None)
    for rec in records:
        if rec["title"] != title:
            title, index, prev = rec["title"], 0, (None, None)
        rec.update(index_in_article=index, prev_question=prev[0], prev_answer=prev[1])
        index += 1
        if not rec["is_impossible"]:
            prev = (rec["question"], example_answer(rec))
    return records


def qa_one_shot_prompt(rec: dict) -> str:
    """The released one-shot SQuAD/QuAC prompt (QuAC records add the section title as
    "Paragraph"); needs ``prev_question``."""
    if rec.get("prev_question") is None:
        raise ValueError(f"{rec['id']}: no previous answered question in its article to use as the example")
    head = f"Title: {rec['title']}\n"
    if "section_title" in rec:
        head += f"Paragraph: {rec['section_title']}\n"
    return (f"{QA_INSTRUCTION}\n\n{head}\nBackground: {rec['context']}\n\n"
            f"Q: {rec['prev_question']}\n\nA: {rec['prev_answer']}\n\nQ: {rec['question']}\n\nA:")


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}:1: expected an object with a 'data' list")
    _nonempty(data["data"], path, "articles in its 'data' list")
    return data


def _json_list(parent: dict, key: str, where: str) -> list:
    value = parent.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"{where}: '{key}' must be a list of objects")
    return value


def _official_qas(file: Path, data: dict):
    """``(where, article, paragraph, turn index, qa)`` for every question of an official SQuAD/QuAC
    JSON file (``data`` > ``paragraphs`` > ``qas``); ``where`` is its JSON path, for error messages."""
    _json_list(data, "data", f"{file}")
    for a, article in enumerate(data["data"]):
        for p, par in enumerate(_json_list(article, "paragraphs", f"{file}: data[{a}]")):
            for q, qa in enumerate(_json_list(par, "qas", f"{file}: data[{a}].paragraphs[{p}]")):
                yield f"{file}: data[{a}].paragraphs[{p}].qas[{q}]", article, par, q, qa


def _answer_texts(answers, where: str) -> list[str]:
    if not isinstance(answers, list) or not all(isinstance(a, dict) and isinstance(a.get("text"), str) for a in answers):
        raise ValueError(f"{where}: 'answers' must be a list of {{text, answer_start}}")
    return [a["text"] for a in answers]


def load_squad(data_dir=None, path=None, split: str | None = None, limit: int | None = None) -> list[dict]:
    """SQuAD questions from ``path``, from ``data_dir`` (``{split}-v2.0.json``, else ``{split}-v1.1.json``;
    default split "dev") or from the hub (SQuAD 2.0).

    Records: ``id, title, article_id`` (= title), ``context`` (the paragraph), ``question``,
    ``answers`` (gold texts; [] when unanswerable), ``is_impossible``, ``index_in_article``, the
    one-shot example ``prev_question`` / ``prev_answer`` (its first gold answer) and ``squad_version``:
    "2.0", or "1.1" for a file of SQuAD 1.1, which has no unanswerable questions (no ``is_impossible``
    field; its ``version`` is "1.1"). JSON has no row numbers: errors name the file and the JSON path of
    the question.
    """
    records = []
    if path is not None or data_dir is not None:
        names = [f"{split or 'dev'}-v2.0.json", f"{split or 'dev'}-v1.1.json"]
        file = (_require_file(Path(path), "SQuAD") if path is not None
                else _find_file([Path(data_dir)], names, "SQuAD"))
        data = _load_json(file)
        version = "1.1" if str(data.get("version", "")).lstrip("v").startswith("1") else "2.0"
        for where, article, par, _, qa in _official_qas(file, data):
            answers = _answer_texts(qa.get("answers"), where)
            raw = {"id": qa.get("id"), "title": article.get("title"), "context": par.get("context"),
                   "question": qa.get("question"), "answers": answers,
                   "is_impossible": qa.get("is_impossible", not answers)}
            records.append({**_located(where, _squad_record, raw), "squad_version": version})
    else:
        hub, name, default = SQUAD_HUB
        where = _hub_where(hub, name, split or default)
        for i, row in enumerate(_hub_rows(hub, name, split or default)):
            answers = list((row.get("answers") or {}).get("text", []))
            raw = {**row, "answers": answers, "is_impossible": not answers}
            records.append({**_located(f"{where} row {i}", _squad_record, raw), "squad_version": "2.0"})
    return _limit(_link_articles(records, lambda r: r["answers"][0]), limit)


def _squad_record(raw: dict) -> dict:
    rec = {"id": _text(raw, "id"), "title": _text(raw, "title"), "context": _text(raw, "context"),
           "question": _text(raw, "question"), "answers": raw["answers"],
           "is_impossible": bool(raw["is_impossible"])}
    if not rec["is_impossible"] and not rec["answers"]:
        raise ValueError("answerable question without answers")
    rec["article_id"] = rec["title"]
    return rec


def load_quac(data_dir=None, path=None, split: str | None = None, limit: int | None = None) -> list[dict]:
    """QuAC questions from ``path``, ``data_dir/{split}_v0.2.json`` (default "val") or the hub.

    Records: ``id, dialog_id, title, article_id`` (= title), ``section_title``, ``context`` (the
    page background, which the released prompt shows), ``section_text`` (the dialog's section,
    without QuAC's trailing " CANNOTANSWER"), ``question``, ``answers`` (all reference texts, as
    the official scorer reads them), ``orig_answer``, ``is_impossible`` (orig_answer is
    CANNOTANSWER), ``followup``, ``yesno``, ``turn_index``, ``index_in_article`` and the one-shot
    example ``prev_question`` / ``prev_answer`` (its orig_answer).
    """
    records = []
    if path is not None or data_dir is not None:
        file = _require_file(Path(path) if path is not None else Path(data_dir) / f"{split or 'val'}_v0.2.json", "QuAC")
        for where, dialog, par, q, qa in _official_qas(file, _load_json(file)):
            orig = qa.get("orig_answer")
            raw = {"id": qa.get("id"), "dialog_id": par.get("id"), "title": dialog.get("title"),
                   "section_title": dialog.get("section_title"), "context": dialog.get("background"),
                   "section_text": par.get("context"), "question": qa.get("question"),
                   "answers": _answer_texts(qa.get("answers"), where),
                   "orig_answer": orig.get("text") if isinstance(orig, dict) else None,
                   "followup": qa.get("followup"), "yesno": qa.get("yesno"), "turn_index": q}
            records.append(_located(where, _quac_record, raw))
    else:
        hub, name, default, revision = QUAC_HUB
        where = _hub_where(hub, name, split or default)
        for i, row in enumerate(_hub_rows(hub, name, split or default, revision=revision)):
            for t, question in enumerate(row["questions"]):
                raw = {"id": row["turn_ids"][t], "dialog_id": row["dialogue_id"], "title": row["wikipedia_page_title"],
                       "section_title": row["section_title"], "context": row["background"],
                       "section_text": row["context"], "question": question,
                       "answers": list(row["answers"]["texts"][t]), "orig_answer": row["orig_answers"]["texts"][t],
                       "followup": row["followups"][t], "yesno": row["yesnos"][t], "turn_index": t}
                records.append(_located(f"{where} row {i} turn {t}", _quac_record, raw))
    return _limit(_link_articles(records, lambda r: r["orig_answer"]), limit)


def _quac_record(raw: dict) -> dict:
    rec = {k: _text(raw, k) for k in ("id", "dialog_id", "title", "context", "question", "orig_answer")}
    rec["section_title"] = _text(raw, "section_title", allow_empty=True)
    section = _text(raw, "section_text")
    rec["section_text"] = section.removesuffix(QUAC_CANNOTANSWER).rstrip()
    if not raw["answers"]:
        raise ValueError("no reference answers")
    rec.update(article_id=rec["title"], answers=raw["answers"], is_impossible=rec["orig_answer"] == QUAC_CANNOTANSWER,
               followup=raw.get("followup"), yesno=raw.get("yesno"), turn_index=raw["turn_index"])
    return rec
