"""`python -m tailor_ui compare` on the demo pair: the same answers as the dashboard's Compare
for the same image and question, JSON lines, --limit, and bad input refused cleanly."""

import json

import pandas as pd
import pytest

from conftest import DEMO
from tailor_ui.cli import main

BASE, FINETUNED = str(DEMO / "base"), str(DEMO / "finetuned")
EVAL = DEMO / "target_eval.jsonl"
TOKENS = "6"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A Model Tailor patch of the demo pair, made by the CLI's `tailor`."""
    out = tmp_path_factory.mktemp("compare") / "run"
    assert main(["tailor", "--base", BASE, "--finetuned", FINETUNED, "--calib", str(DEMO / "target_calib.jsonl"),
                 "--calib-limit", "8", "--batch-size", "4", "--keep", "0.1", "--out", str(out)]) == 0
    return out


def compare(capsys, *args) -> list[dict]:
    capsys.readouterr()
    assert main(["compare", "--base", BASE, "--finetuned", FINETUNED, "--max-new-tokens", TOKENS,
                 "--json", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def dashboard_answers(patch_file, prompts):
    """What the dashboard's Compare function answers for each (image path, question)."""
    from tailor_ui.control import no_progress
    from tailor_ui.data import load_image
    from tailor_ui.pair import load_pair
    from tailor_ui.patch import load_patch
    from tailor_ui.app.service.compare import answers
    from tailor_ui.app.session import PairHandle, TailorRun

    handle = PairHandle(pair=load_pair(BASE, FINETUNED), label="demo", shared=False, lane="cpu",
                        summary=pd.DataFrame())
    run = TailorRun(job_id="cli", label="Model Tailor", settings={"method": "tailor"},
                    patch=load_patch(patch_file), report={}, handle=handle)
    return [[a for _, a in answers(handle, [run], [], load_image(image), question, int(TOKENS), no_progress)]
            for image, question in prompts]


def test_answers_equal_the_dashboards_for_a_data_set_and_a_caption(run_dir, capsys):
    patch = run_dir / "patch.safetensors"
    rows = compare(capsys, "--patch", str(patch), "--data", str(EVAL), "--limit", "2")
    assert len(rows) == 2  # --limit
    first = [json.loads(line) for line in EVAL.read_text().splitlines()[:2]]
    assert [r["question"] for r in rows] == [f["question"] for f in first]
    assert [r["references"] for r in rows] == [f["answers"] for f in first]
    image = DEMO / rows[0]["image"]
    caption = compare(capsys, "--patch", str(patch), "--image", str(image))
    assert caption[0]["question"] == "" and caption[0]["references"] == []
    expected = dashboard_answers(patch, [(DEMO / r["image"], r["question"]) for r in rows] + [(image, "")])
    got = [[r["base"], r["finetuned"], r["tailored"]] for r in rows + caption]
    assert got == expected
    assert len(caption[0]["base"].split()) > 2  # a caption, not an answer
    assert any(r["finetuned"] != r["base"] for r in rows + caption)  # the columns are different models


def test_tailoring_on_the_fly_gives_the_patch_of_tailor(run_dir, capsys):
    args = ["--data", str(EVAL), "--limit", "3"]
    with_patch = compare(capsys, "--patch", str(run_dir / "patch.safetensors"), *args)
    on_the_fly = compare(capsys, "--calib", str(DEMO / "target_calib.jsonl"), "--calib-limit", "8",
                         "--batch-size", "4", "--keep", "0.1", *args)
    assert on_the_fly == with_patch
    untailored = compare(capsys, *args)  # neither: base and fine-tuned only
    assert [{k: v for k, v in r.items() if k != "tailored"} for r in with_patch] == untailored
    assert all("tailored" not in r for r in untailored)


def test_the_table_shows_every_column(run_dir, capsys):
    capsys.readouterr()
    assert main(["compare", "--base", BASE, "--finetuned", FINETUNED, "--max-new-tokens", "3",
                 "--patch", str(run_dir / "patch.safetensors"), "--data", str(EVAL), "--limit", "1"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["image", "question", "references", "base", "finetuned", "tailored"]
    assert len(lines) == 1 and "images/target_eval/0000.png" in lines[0]


def bad_patch(folder, run_dir):
    (folder / "patch.safetensors").write_text("not a patch")
    return ["--patch", str(folder / "patch.safetensors"), "--data", str(EVAL)]


def foreign_patch(folder, run_dir, rename: bool = True):
    """The demo patch with one tensor renamed to one the model lacks, or given another shape."""
    from tailor_ui.patch import Patch, TensorPatch, load_patch, save_patch

    patch = load_patch(run_dir / "patch.safetensors")
    name, tp = next(iter(patch.tensors.items()))
    shape = tp.shape if rename else (tp.numel,) + (1,) * len(tp.shape)
    tensors = {**patch.tensors, ("no.such.tensor" if rename else name): TensorPatch(
        index=tp.index.clone(), values=tp.values.clone(), shape=shape)}
    save_patch(Patch(tensors=tensors, metadata=patch.metadata), folder / "foreign.safetensors")
    return ["--patch", str(folder / "foreign.safetensors"), "--data", str(EVAL)]


def bad_lines(folder, run_dir):
    (folder / "0.png").write_bytes((DEMO / "images" / "target_eval" / "0000.png").read_bytes())
    (folder / "data.jsonl").write_text('{"image": "0.png", "question": "what shape?"}\n{oops\n')
    return ["--data", str(folder / "data.jsonl")]


def empty_calibration_row(folder, run_dir):
    (folder / "0.png").write_bytes((DEMO / "images" / "target_eval" / "0000.png").read_bytes())
    (folder / "calib.jsonl").write_text('{"image": "0.png", "question": "", "answers": []}\n')
    return ["--data", str(EVAL), "--calib", str(folder / "calib.jsonl")]


BAD = [
    pytest.param(lambda f, r: ["--image", str(f / "nope.png")], ("image not found", "nope.png"), id="missing-image"),
    pytest.param(bad_patch, ("patch.safetensors is not a readable safetensors file",), id="unreadable-patch"),
    pytest.param(foreign_patch, ("the patch names tensors the model lacks: no.such.tensor",), id="foreign-patch"),
    pytest.param(lambda f, r: foreign_patch(f, r, rename=False), ("has shape", "model has"), id="patch-of-other-shapes"),
    pytest.param(bad_lines, ("data.jsonl line 2: not valid JSON",), id="bad-jsonl-line"),
    pytest.param(lambda f, r: ["--data", str(EVAL), "--question", "why?"], ("--question goes with --image",),
                 id="question-with-data"),
    pytest.param(lambda f, r: ["--data", str(EVAL), "--limit", "0"], ("must be positive",), id="limit-0"),
    pytest.param(lambda f, r: ["--data", str(EVAL), "--patch", "p", "--calib", "c"], ("not allowed with",),
                 id="patch-and-calib"),
    pytest.param(empty_calibration_row, ("calib.jsonl line 1: a calibration row needs a question or answers",),
                 id="calibration-row-without-question-or-answers"),
]


@pytest.mark.parametrize("make, words", BAD)
def test_bad_input_is_one_line_and_no_output(make, words, run_dir, tmp_path, capsys):
    args = make(tmp_path, run_dir)
    capsys.readouterr()
    try:
        code = main(["compare", "--base", BASE, "--finetuned", FINETUNED, "--max-new-tokens", "2", *args])
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and captured.out == "", captured
    assert len(lines) == 1 and all(word in lines[0] for word in words), lines
