"""Evaluation sets from a JSONL, a zip or a `datasets` data set: what is read, and every
refusal naming its line or row."""

from __future__ import annotations

import json
import zipfile

import pytest
from PIL import Image

from tailor_ui.data import write_examples
from tailor_ui.errors import UserError
from tailor_ui.evaluation.sets import (MAX_EVAL_EXAMPLES, parse_columns, parse_set_spec,
                                       read_dataset_set, read_jsonl_set, read_set, read_upload_set)

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
ROWS = [{"image": f"img/{i}.png", "question": "what colour is it?", "answers": [name]}
        for i, name in enumerate(["red", "green", "blue"])]


@pytest.fixture
def jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (8, 8), colour).save(tmp_path / "img" / f"{i}.png")
    write_examples(tmp_path / "colours.jsonl", ROWS)
    return tmp_path / "colours.jsonl"


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" if r is not None else "\n" for r in rows))
    return path


def test_a_jsonl_set_reads_with_its_role_task_and_name(jsonl):
    spec = read_jsonl_set(jsonl, role="target", task="vqa")
    assert (spec.name, spec.role, spec.task, spec.source) == ("colours", "target", "vqa", "colours.jsonl")
    assert [e.answers for e in spec.examples] == [("red",), ("green",), ("blue",)]
    assert spec.examples[1].image == (jsonl.parent / "img" / "1.png").resolve()
    assert spec.cut(2).examples == list(spec.examples[:2]) and spec.cut(2).task == "vqa"
    # without a stated task the first row decides: a question makes it vqa, none a caption set
    assert read_jsonl_set(jsonl, role="original").task == "vqa"
    captions = write_rows(jsonl.parent / "captions.jsonl",
                          [{"image": r["image"], "answers": ["a square"]} for r in ROWS])
    assert read_jsonl_set(captions, role="original").task == "caption"


@pytest.mark.parametrize("rows, task, message", [
    ([ROWS[0], None, {**ROWS[1], "answers": []}], "vqa", "bad.jsonl line 3: no reference answers"),
    ([ROWS[0], {**ROWS[1], "answers": ["  "]}], "vqa", "bad.jsonl line 2: no reference answers"),
    ([ROWS[0], ROWS[1], {**ROWS[2], "question": ""}], "vqa", "bad.jsonl line 3: a vqa row needs a question"),
    ([ROWS[0], {**ROWS[1], "question": ""}], None, "bad.jsonl line 2: a vqa row needs a question"),
    ([ROWS[0], {**ROWS[1], "image": "img/9.png"}], "vqa", "bad.jsonl line 2: image not found: img/9.png"),
    ([ROWS[0], {**ROWS[1], "image": "fake.png"}], "vqa", "bad.jsonl line 2: not a readable image"),
    ([ROWS[0], {**ROWS[1], "answers": "red"}], "vqa", "bad.jsonl line 2: 'answers' must be a list"),
])
def test_every_bad_jsonl_row_is_named_by_its_line(jsonl, rows, task, message):
    (jsonl.parent / "fake.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match=message):
        read_jsonl_set(write_rows(jsonl.parent / "bad.jsonl", rows), role="original", task=task)


def test_role_and_task_are_checked(jsonl):
    with pytest.raises(UserError, match="unknown role 'source'"):
        read_jsonl_set(jsonl, role="source")
    with pytest.raises(UserError, match="unknown task 'count'"):
        read_jsonl_set(jsonl, role="target", task="count")


def test_a_set_larger_than_the_cap_is_refused_saying_the_cap(jsonl):
    big = write_rows(jsonl.parent / "big.jsonl", [ROWS[0]] * (MAX_EVAL_EXAMPLES + 1))
    with pytest.raises(UserError, match=f"more than {MAX_EVAL_EXAMPLES} examples"):
        read_jsonl_set(big, role="original")
    assert len(read_jsonl_set(big, role="original", max_examples=None).examples) == MAX_EVAL_EXAMPLES + 1


def test_an_upload_of_jsonl_and_images_and_a_zip_read_alike(jsonl, tmp_path):
    files = [str(jsonl), *(str(p) for p in sorted((jsonl.parent / "img").iterdir()))]
    uploaded = read_upload_set(files, tmp_path / "up", role="original", task="vqa")
    archive = tmp_path / "colours-set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(jsonl, "set/colours.jsonl")
        for p in (jsonl.parent / "img").iterdir():
            z.write(p, f"set/img/{p.name}")
    zipped = read_set(str(archive), tmp_path / "unzipped", role="original", task="vqa")
    assert zipped.name == "colours-set" and uploaded.name == "colours"
    for spec in (uploaded, zipped):
        assert [e.image.read_bytes() for e in spec.examples] == \
            [(jsonl.parent / r["image"]).read_bytes() for r in ROWS]
        assert [e.answers for e in spec.examples] == [tuple(r["answers"]) for r in ROWS]


def test_a_bad_row_in_a_zip_is_named_by_its_line(jsonl, tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("bad.jsonl", json.dumps(ROWS[0]) + "\n" + json.dumps({**ROWS[1], "answers": []}) + "\n")
        z.write(jsonl.parent / "img" / "0.png", "img/0.png")
        z.write(jsonl.parent / "img" / "1.png", "img/1.png")
    with pytest.raises(UserError, match="bad.jsonl line 2: no reference answers"):
        read_set(str(archive), tmp_path / "unzipped", role="target")


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    """A `datasets` data set written locally: an Image column, a question, answers as a
    string in one row and a list in the others, saved with two splits."""
    import datasets

    root = tmp_path_factory.mktemp("hfdata")
    images = [Image.new("RGB", (8, 8), c) for c in COLOURS]
    data = datasets.Dataset.from_dict({
        "picture": images, "prompt": ["colour?", "colour?", "colour?"],
        "refs": [["red", "crimson"], ["green"], ["blue"]], "caption": ["a red square", "green", "blue"],
    }).cast_column("picture", datasets.Image())
    datasets.DatasetDict({"validation": data, "train": data.select([0])}).save_to_disk(root / "dict")
    data.save_to_disk(root / "single")
    data.to_parquet(str(root / "files" / "validation.parquet"))
    return root


def test_a_saved_dataset_reads_with_its_columns(saved_dataset, tmp_path):
    spec = read_dataset_set(str(saved_dataset / "dict"), tmp_path / "out", role="original",
                            split="validation", columns="image=picture, question=prompt, answers=refs")
    assert (spec.name, spec.task, len(spec.examples)) == ("dict", "vqa", 3)
    assert spec.examples[0].answers == ("red", "crimson") and spec.examples[0].question == "colour?"
    for example, colour in zip(spec.examples, COLOURS):
        assert example.image.parent == tmp_path / "out"
        assert Image.open(example.image).convert("RGB").getpixel((0, 0)) == colour
    # a caption set: no question column, answers as one string per row; a slice of the split
    captions = read_dataset_set(str(saved_dataset / "single"), tmp_path / "c", role="target",
                                split="test[1:3]", columns={"image": "picture", "answers": "caption"},
                                name="captions")
    assert captions.task == "caption" and [e.answers for e in captions.examples] == [("green",), ("blue",)]
    assert [e.question for e in captions.examples] == ["", ""]
    files = read_dataset_set(str(saved_dataset / "files"), tmp_path / "f", role="original",
                             split="validation", columns="image=picture,question=prompt,answers=refs")
    assert [e.answers for e in files.examples] == [e.answers for e in spec.examples]


@pytest.mark.parametrize("columns, split, task, message", [
    ("image=photo,question=prompt,answers=refs", "validation", None, "unknown image column 'photo'"),
    ("image=picture,question=ask,answers=refs", "validation", None, "unknown question column 'ask' "
     r"\(the data set has: picture, prompt, refs, caption\)"),
    ("image=picture,answers=refs", "validation", "vqa", "a vqa set needs a question column"),
    ("image=picture,question=prompt,answers=refs", "dev", None, r"no split 'dev' \(it has: validation, train\)"),
    ("image=picture,question=prompt,answers=refs", "validation[", None, "split 'validation\\['"),
    ("colour=picture", "validation", None, "unknown role 'colour'"),
    ("image=prompt,question=prompt,answers=refs", "validation", None, "dict row 0: image file not found in the data set's folder: colour"),
    ("image=refs,question=prompt,answers=refs", "validation", None, "dict row 0: column 'refs' holds no image"),
    ("image=picture,question=prompt,answers=picture", "validation", None,
     "dict row 0: column 'picture' must hold a string or a list of strings"),
])
def test_every_bad_dataset_request_is_named(saved_dataset, tmp_path, columns, split, task, message):
    with pytest.raises(UserError, match=message):
        read_dataset_set(str(saved_dataset / "dict"), tmp_path / "out", role="original", split=split,
                         columns=columns, task=task)


def test_bad_dataset_rows_are_named_by_their_index(tmp_path):
    import datasets

    images = [Image.new("RGB", (8, 8), c) for c in COLOURS]
    rows = {"image": images, "question": ["q", "q", ""], "answers": [["a"], ["b"], ["c"]]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "noq")
    with pytest.raises(UserError, match="noq row 2: a vqa row needs a question"):
        read_dataset_set(str(tmp_path / "noq"), tmp_path / "o1", role="target")
    empty = {**rows, "question": ["q"] * 3, "answers": [["a"], [], ["c"]]}
    datasets.Dataset.from_dict(empty).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "noa")
    with pytest.raises(UserError, match="noa row 1: no reference answers"):
        read_dataset_set(str(tmp_path / "noa"), tmp_path / "o2", role="target")
    broken = {**rows, "question": ["q"] * 3, "image": [{"bytes": b"png?", "path": None}] * 3}
    datasets.Dataset.from_dict(broken).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "bad")
    with pytest.raises(UserError, match="bad row 0: not a readable image"):
        read_dataset_set(str(tmp_path / "bad"), tmp_path / "o3", role="target")
    big = datasets.Dataset.from_dict({"image": ["x.png"] * 5, "answers": ["a"] * 5})
    big.save_to_disk(tmp_path / "big")
    with pytest.raises(UserError, match=r"5 rows; an evaluation set holds at most 4 .*test\[:4\]"):
        read_dataset_set(str(tmp_path / "big"), tmp_path / "o4", role="target", max_examples=4)
    with pytest.raises(UserError, match="big row 0: image file not found in the data set's folder: x.png"):
        read_dataset_set(str(tmp_path / "big"), tmp_path / "o5", role="target")


def test_sources_outside_the_allowed_folders_and_unreachable_hub_ids_are_refused(saved_dataset, tmp_path):
    with pytest.raises(UserError, match="outside the allowed folders"):
        read_dataset_set(str(saved_dataset / "dict"), tmp_path / "o", role="original",
                         allowed_roots=[tmp_path])
    spec = read_dataset_set("dict", tmp_path / "o", role="original", split="validation",
                            columns="image=picture,question=prompt,answers=refs",
                            allowed_roots=[saved_dataset])  # a name under an allowed folder
    assert len(spec.examples) == 3
    with pytest.raises(UserError, match="neither an existing folder nor a hub id"):
        read_dataset_set("no such data set", tmp_path / "o", role="original")
    with pytest.raises(UserError, match="nobody/nothing-here: cannot load split 'test'"):
        read_dataset_set("nobody/nothing-here", tmp_path / "o", role="original")  # offline in tests


def test_the_command_line_form_of_a_set():
    assert parse_set_spec("data/val.jsonl:caption") == ("data/val.jsonl", "caption")
    assert parse_set_spec("owner/name:vqa") == ("owner/name", "vqa")
    assert parse_set_spec("data/val.jsonl") == ("data/val.jsonl", None)
    assert parse_columns("image=img, question=, answers=refs") == {"image": "img", "question": "",
                                                                   "answers": "refs"}
    with pytest.raises(UserError, match="not ROLE=COLUMN"):
        parse_columns("img")
