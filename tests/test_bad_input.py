"""Bad input, one table, two front doors: each case goes through the CLI (one line on
stderr, exit 2, no output written) and through the launched dashboard's API (a Gradio
error naming the problem, no server path in it, the visitor's session unchanged).

A case makes its bad input in a fresh folder inside an allowed model root (so the
dashboard's allowed-folders rule is not what refuses it, unless that is the case) and
says which words the message must hold.
"""

from __future__ import annotations

import itertools
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import MAX_UPLOAD_MB, ROOT, tailor, wait
from tailor_ui.cli import main


@dataclass(frozen=True)
class Models:
    """A pair to load: CLI `tailor` (Model Tailor, good calibration data), dashboard /load_pair."""

    base: str
    finetuned: str


@dataclass(frozen=True)
class Merge:
    """A merge of the good pair: CLI `tailor`, dashboard /tailor. `calib` is a JSONL whose
    images lie beside it (the dashboard uploads it with them); `uploads` replaces what
    the dashboard uploads."""

    keep: float = 0.1
    alpha: float = 0.8
    method: str = "tailor"
    calib: Path | None = None
    uploads: tuple[Path, ...] | None = None


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path, Path], Models | Merge]  # (empty folder, the good pair) -> input
    words: tuple[str, ...]  # all in the message
    only: str | None = None  # "cli" or "ui" where the rule belongs to one front door


# -- making bad inputs ---------------------------------------------------------------------

def copy_model(pair: Path, folder: Path, name: str = "model") -> Path:
    shutil.copytree(pair / "base", folder / name)
    return folder / name


def damaged(pair: Path, folder: Path, damage: Callable[[bytes], bytes]) -> Models:
    model = copy_model(pair, folder)
    weights = model / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    return Models(str(pair / "base"), str(model))


def pickle_only(pair: Path, folder: Path) -> Models:
    model = folder / "pickled"
    model.mkdir()
    shutil.copy(pair / "base" / "config.json", model)
    (model / "pytorch_model.bin").write_bytes(b"a pickle would run code when loaded")
    return Models(str(pair / "base"), str(model))


def bad_config(pair: Path, folder: Path) -> Models:
    model = copy_model(pair, folder)
    (model / "config.json").write_text('{"model_type": "llava",')
    return Models(str(pair / "base"), str(model))


def other_shapes(pair: Path, folder: Path) -> Models:
    from transformers import AutoProcessor

    from families import tiny_llava

    processor = AutoProcessor.from_pretrained(pair / "base")
    tiny_llava(processor, 1, intermediate=96).save_pretrained(folder / "narrow")
    return Models(str(pair / "base"), str(folder / "narrow"))


def other_architecture(pair: Path, folder: Path) -> Models:
    from families import build_qwen2_vl

    build_qwen2_vl(0).save_pretrained(folder / "qwen")
    return Models(str(pair / "base"), str(folder / "qwen"))


def symlink_out(pair: Path, folder: Path) -> Models:
    (folder / "models").symlink_to(ROOT / "tailor_ui", target_is_directory=True)
    return Models(str(folder / "models"), str(pair / "ft"))


def png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG that declares its size and holds no pixels: image readers see the size
    before any pixel, so a huge one costs nothing to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def calib(pair: Path, folder: Path, lines: list[str], images: dict[str, bytes] | None = None) -> Merge:
    """calib.jsonl with these lines; `images` (name -> bytes) beside it, else the good ones."""
    if images is None:
        shutil.copytree(pair / "img", folder / "img")
    else:
        (folder / "img").mkdir()
        for name, data in images.items():
            (folder / "img" / name).write_bytes(data)
    (folder / "calib.jsonl").write_text("".join(line + "\n" for line in lines))
    return Merge(calib=folder / "calib.jsonl")


def row(image: str = "img/0.png", **extra) -> str:
    return json.dumps({"image": image, "question": "how many shapes are there?", "answers": ["two"],
                       **extra})


def zip_bomb(pair: Path, folder: Path) -> Merge:
    archive = folder / "calib.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("calib.jsonl", row() + "\n")
        z.writestr("img/0.png", b"\0" * (MAX_UPLOAD_MB * 2**20 + 1))  # a few kB packed
    return Merge(uploads=(archive,))


MODEL_CASES = [
    Case("missing-folder", lambda p, f: Models(str(f / "nope"), str(p / "ft")), ("nope", "no such model folder")),
    Case("not-a-model-folder", lambda p, f: Models(str(f), str(p / "ft")), ("not a model folder",)),
    Case("absolute-path-outside", lambda p, f: Models("/etc", str(p / "ft")), ("outside the allowed folders",),
         only="ui"),
    Case("dotdot-escape", lambda p, f: Models(f"{f}/../../../../../../../etc", str(p / "ft")),
         ("outside the allowed folders",), only="ui"),
    Case("symlink-escape", symlink_out, ("outside the allowed folders",), only="ui"),
    Case("a-folder-of-the-server", lambda p, f: Models("tailor_ui", str(p / "ft")),  # it exists in the
         ("neither an existing folder nor a hub id",), only="ui"),  # cwd: the answer must not tell
    Case("malformed-hub-id", lambda p, f: Models("not a hub id!", str(p / "ft")),
         ("neither an existing folder nor a hub id",)),
    Case("hub-id-escape", lambda p, f: Models("owner/../../etc", str(p / "ft")),
         ("neither an existing folder nor a hub id",)),
    Case("name-too-long", lambda p, f: Models("x" * 5000, str(p / "ft")), ("not a usable folder name",)),
    Case("no-finetuned-model", lambda p, f: Models(str(p / "base"), ""), ("model given",)),
    Case("other-architecture", other_architecture, ("differ in architecture", "qwen2_vl")),
    Case("other-shapes", other_shapes, ("do not match", "base (128, 64) vs fine-tuned (96, 64)")),
    Case("pickle-only", pickle_only, ("only pickle checkpoints",)),
    Case("truncated-safetensors", lambda p, f: damaged(p, f, lambda b: b[: len(b) // 2]),
         ("model/model.safetensors is damaged or truncated",)),
    Case("corrupted-safetensors", lambda p, f: damaged(p, f, lambda b: b[:8] + b"#" * 32 + b[40:]),
         ("model/model.safetensors is damaged or truncated",)),
    Case("config-not-json", bad_config, ("model/config.json is not valid JSON",)),
]
SETTINGS_AND_DATA_CASES = [
    # -- the settings
    Case("keep-above-1", lambda p, f: Merge(keep=1.5), ("keep", "1.5")),
    Case("keep-negative", lambda p, f: Merge(keep=-0.1), ("keep", "-0.1")),
    Case("alpha-above-1", lambda p, f: Merge(alpha=1.5), ("alpha", "1.5")),
    Case("unknown-method", lambda p, f: Merge(method="nope", calib=p / "calib.jsonl"), ("nope", "magnitude")),
    Case("no-calibration-data", lambda p, f: Merge(uploads=()), ("calibration",)),
    # -- the calibration data
    Case("empty-jsonl", lambda p, f: calib(p, f, []), ("calib.jsonl: no examples",)),
    Case("malformed-jsonl", lambda p, f: calib(p, f, [row(), "{oops"]), ("calib.jsonl line 2: not valid JSON",)),
    Case("bad-field-after-a-blank-line", lambda p, f: calib(p, f, [row(), "", row(answers="two")]),
         ("calib.jsonl line 3: 'answers' must be a list of strings",)),
    Case("row-with-neither-question-nor-answers", lambda p, f: calib(p, f, [row(), row(), row(question="", answers=[])]),
         ("calib.jsonl line 3: a calibration row needs a question or answers",)),
    Case("missing-image", lambda p, f: calib(p, f, [row("img/0.png")], images={"1.png": b""}),
         ("calib.jsonl line 1: image not found: img/0.png",)),
    Case("not-an-image", lambda p, f: calib(p, f, [row("img/0.png")], images={"0.png": b"plain text"}),
         ("calib.jsonl line 1: not a readable image: 0.png",)),
    Case("huge-image", lambda p, f: calib(p, f, [row("img/0.png")], images={"0.png": png_header(4097, 4097)}),
         ("calib.jsonl line 1: image too large (4097x4097 pixels)",)),
    Case("decompression-bomb", lambda p, f: calib(p, f, [row("img/0.png")],
                                                  images={"0.png": png_header(20000, 20000)}),
         ("calib.jsonl line 1: image too large",)),
    Case("zip-unpacking-past-the-limit", zip_bomb, (f"unpacks to more than {MAX_UPLOAD_MB} MB",), only="ui"),
]
CASES = MODEL_CASES + SETTINGS_AND_DATA_CASES
_serial = itertools.count()


def cases_for(door: str) -> list:
    return [pytest.param(c, id=c.id) for c in CASES if c.only in (None, door)]


def cli_cases() -> list:
    """Every case through Model Tailor (the fine-tuned model read lazily), and the model
    cases once more through a data-free method (both models streamed)."""
    return [pytest.param(c, "tailor", id=c.id) for c in CASES if c.only in (None, "cli")] + \
        [pytest.param(c, "task_arithmetic", id=f"{c.id}-streamed") for c in MODEL_CASES
         if c.only in (None, "cli")]


@pytest.fixture
def folder(model_root) -> Path:
    """A fresh folder inside an allowed model root."""
    path = model_root / f"bad-{next(_serial)}"
    path.mkdir()
    return path


# -- the CLI -----------------------------------------------------------------------------------

def cli_args(bad: Models | Merge, pair: Path, out: Path, method: str = "tailor") -> list[str]:
    if isinstance(bad, Models):  # Model Tailor reads the fine-tuned model lazily; the others stream
        calib = ["--calib", str(pair / "calib.jsonl")] if method == "tailor" else []
        return ["tailor", "--base", bad.base, "--finetuned", bad.finetuned, *calib, "--out", str(out),
                "--method", method]
    args = ["tailor", "--base", str(pair / "base"), "--finetuned", str(pair / "ft"), "--out", str(out),
            f"--keep={bad.keep}", f"--alpha={bad.alpha}", "--method", bad.method]
    if bad.calib is not None:
        args += ["--calib", str(bad.calib)]
    elif bad.uploads is None:
        args += ["--calib", str(pair / "calib.jsonl")]
    return args


@pytest.mark.parametrize("case, method", cli_cases())
def test_cli(case, method, disk_pair, folder, tmp_path, capsys):
    bad = case.make(disk_pair, folder)
    out = tmp_path / "out"
    args = cli_args(bad, disk_pair, out, method)
    capsys.readouterr()  # what making the input printed (transformers' saving progress)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own checks (--keep range)
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and captured.out == "", captured
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert all(word in lines[0] for word in case.words), lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, not even a temp


def test_a_real_process_says_one_line(disk_pair, folder, tmp_path):
    """Nothing but the message on stderr (no library warnings or progress bars)."""
    bad = other_shapes(disk_pair, folder)
    result = subprocess.run([sys.executable, "-m", "tailor_ui", *cli_args(bad, disk_pair, tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "do not match" in result.stderr, result.stderr


# -- the dashboard -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def visitor(app, studio, disk_pair):
    """An API client whose session holds its own pair (the good one), so a refused load can
    be seen to leave it alone."""
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    job_id, _ = client.predict(str(disk_pair / "base"), str(disk_pair / "ft"), "float32", "cpu",
                               api_name="/load_pair")
    wait(client, job_id)
    yield client
    client.predict(api_name="/load_demo")  # let go of the pair: visitors' pairs are limited


def state(studio, session_id: str) -> tuple:
    """What a refused request must not change: the pair, the merges, the jobs, the files."""
    session = studio.sessions.peek(session_id)
    files = sorted(str(p.relative_to(session.folder)) for p in session.folder.rglob("*")) \
        if session.folder.exists() else []
    return (id(session.own), session.use_demo, tuple(session.runs),
            tuple(j.id for j in studio.runner.history(session_id)), tuple(files))


def call(client, bad: Models | Merge) -> None:
    from gradio_client import handle_file

    if isinstance(bad, Models):
        client.predict(bad.base, bad.finetuned, "float32", "cpu", api_name="/load_pair")
        return
    uploads = bad.uploads
    if uploads is None and bad.calib is not None:
        uploads = (bad.calib, *sorted((bad.calib.parent / "img").iterdir()))
    tailor(client, keep=bad.keep, method=bad.method, alpha=bad.alpha, calib_examples=8,
           calib_source="builtin" if uploads is None else "upload",
           calib_files=[handle_file(str(p)) for p in uploads] if uploads else None)


@pytest.mark.parametrize("case", cases_for("ui"))
def test_dashboard(case, visitor, studio, disk_pair, folder, model_root):
    from gradio_client.exceptions import AppError

    bad = case.make(disk_pair, folder)
    before = state(studio, visitor.session_hash)
    with pytest.raises(AppError) as refused:
        call(visitor, bad)
    message = str(refused.value)
    assert all(word in message for word in case.words), message
    assert "\n" not in message and "Traceback" not in message
    for server_path in (str(ROOT), str(model_root), tempfile.gettempdir() + "/", sys.prefix):
        assert server_path not in message, message
    assert state(studio, visitor.session_hash) == before


def test_relative_names_mean_folders_under_the_allowed_roots(disk_pair, model_root):
    from tailor_ui.pair import resolve_source

    assert resolve_source("pair/base", allowed_roots=[model_root]) == str((disk_pair / "base").resolve())
    # not under a root: a hub id of that name, never the server's own folder of that name
    assert resolve_source("tailor_ui/ui", allowed_roots=[model_root]) == "tailor_ui/ui"


def test_a_hub_model_that_cannot_be_reached_leaves_the_visitors_pair(visitor, studio, disk_pair):
    """Refused in the load job (the hub is asked for config.json only; offline here), before
    the visitor's current pair is let go."""
    session = studio.sessions.peek(visitor.session_hash)
    own = session.own
    job_id, _ = visitor.predict("nobody/no-such-model", str(disk_pair / "ft"), "float32", "cpu",
                                api_name="/load_pair")
    info = visitor.predict(job_id, 60, api_name="/wait_job")
    assert info["status"] == "failed" and "could not load nobody/no-such-model" in info["error"], info
    assert session.own is own and own is not None and not session.use_demo
