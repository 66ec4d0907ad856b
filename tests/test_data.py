"""The JSONL reader: every malformed line is reported with its number, valid files round-trip."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tailor_ui.data import MAX_IMAGE_PIXELS, read_calibration, read_examples, write_examples
from tailor_ui.errors import UserError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    Image.new("RGB", (8, 8), "red").save(root / "ok.png")
    (root / "fake.png").write_bytes(b"definitely not a png")
    return root


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
rows = st.lists(st.fixed_dictionaries({"image": st.just("ok.png"), "question": texts,
                                       "answers": st.lists(texts, max_size=4)}), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows)
def test_valid_files_round_trip(folder, rows):
    path = folder / "round.jsonl"
    write_examples(path, rows)
    examples = read_examples(path)
    assert [(e.question, list(e.answers)) for e in examples] == [(r["question"], r["answers"]) for r in rows]
    assert all(e.image == (folder / "ok.png").resolve() for e in examples)


bad_values = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(),
                       st.lists(st.integers(), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(good=st.integers(0, 5), field=st.sampled_from(["image", "question", "answers"]), value=bad_values)
def test_a_bad_field_is_reported_with_its_line_number(folder, good, field, value):
    row = {"image": "ok.png", "question": "q", "answers": ["a"]}
    lines = [json.dumps(row)] * good + [json.dumps({**row, field: value})]
    path = folder / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    if field == "answers" and isinstance(value, list) and not value:
        assert len(read_examples(path)) == good + 1  # an empty answer list is allowed
        return
    with pytest.raises(UserError, match=f"bad.jsonl line {good + 1}: '{field}'"):
        read_examples(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.text(min_size=1, max_size=40).filter(lambda t: t.strip() and "\n" not in t and "\r" not in t))
def test_arbitrary_lines_never_escape_as_anything_but_a_user_error(folder, garbage):
    path = folder / "junk.jsonl"
    path.write_text(json.dumps({"image": "ok.png"}) + "\n" + garbage + "\n")
    try:
        examples = read_examples(path)
    except UserError as exc:
        assert "junk.jsonl line" in str(exc)
    else:  # the garbage happened to be a valid example
        assert len(examples) == 2


@pytest.mark.parametrize("content, message", [
    ("", "no examples"),
    ("\n\n", "no examples"),
    ('{"image": "missing.png"}\n', "line 1: image not found: missing.png"),
    ('{"image": "fake.png"}\n', "line 1: not a readable image"),
    ('{"image": "../outside.png"}\n', "line 1: image path leaves the data folder"),
    ('{"image": "ok.png"}\n[1, 2]\n', "line 2: expected a JSON object"),
    ('{"image": "ok.png"}\n{"image": \n', "line 2: not valid JSON"),
])
def test_malformed_files(folder, content, message):
    path = folder / "case.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_examples(path)


def test_missing_file_and_non_utf8(folder):
    with pytest.raises(UserError, match="data file not found"):
        read_examples(folder / "none.jsonl")
    (folder / "latin.jsonl").write_bytes(b'{"image": "ok.png", "question": "caf\xe9"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        read_examples(folder / "latin.jsonl")


def test_huge_images_are_refused_without_decoding(folder):
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    Image.new("1", (side, side)).save(folder / "huge.png")  # 1-bit: small on disk, huge decoded
    (folder / "huge.jsonl").write_text('{"image": "huge.png"}\n')
    with pytest.raises(UserError, match="image too large"):
        read_examples(folder / "huge.jsonl")


def test_a_calibration_row_needs_a_question_or_answers(folder):
    path = folder / "calib.jsonl"
    captioning = {"image": "ok.png", "question": "", "answers": ["a red square"]}
    vqa = {"image": "ok.png", "question": "what colour?", "answers": []}
    write_examples(path, [captioning, vqa])
    assert [e.answers for e in read_calibration(path)] == [("a red square",), ()]
    path.write_text(json.dumps(vqa) + "\n\n" + json.dumps({"image": "ok.png", "question": " ", "answers": [""]}) + "\n")
    with pytest.raises(UserError, match="calib.jsonl line 3: a calibration row needs a question or answers"):
        read_calibration(path)
    assert len(read_examples(path)) == 2  # evaluation data may hold such rows: they score nothing
