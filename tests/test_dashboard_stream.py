"""The dashboard's data-free merges pay only for what was asked: the patch is written to the
run's folder tensor by tensor (tailor_ui.pair_stream) and read back lazily, equal bit for
bit to the command line's streamed patch and the in-memory engine's; a patch file is
applied to the shared base and reverted tensor by tensor; the Export tab's model is
streamed from the base's checkpoint."""

from __future__ import annotations

import json
import zipfile

import pandas as pd
import pytest
import torch
from transformers import AutoModelForImageTextToText

from families import finetune_like
from tailor_ui.checkpoint import Checkpoint, key_map
from tailor_ui.cli import main
from tailor_ui.control import never_stop, no_progress
from tailor_ui.engine import run_method
from tailor_ui.errors import UserError
from tailor_ui.pair import load_pair
from tailor_ui.patch import Patch, PatchFile, applied, bits_differ, save_patch
from tailor_ui.app.service import export
from tailor_ui.app.service.tailor import tailor_run
from tailor_ui.app.session import PairHandle, Session, TailorRun
from tailor_ui.settings import Settings, method_knobs

CASES = [
    (1, Settings(method="task_arithmetic", lam=0.7)),
    (1, Settings(method="ties", keep=0.3, lam=0.9)),
    (1, Settings(method="dare", keep=0.5, seed=3)),
    (2, Settings(method="task_arithmetic", lam=0.5)),
    (2, Settings(method="ties", keep=0.3, others="linear")),
    (2, Settings(method="dare", keep=0.5, overlap="sum")),
]


@pytest.fixture(scope="module")
def folders(disk_pair, tmp_path_factory):
    """The shared tiny pair (base with its processor, ft moving layer 1) and a second
    fine-tune moving every MLP (overlapping ft on layer 1's)."""
    root = tmp_path_factory.mktemp("dashboard-stream")
    base = AutoModelForImageTextToText.from_pretrained(disk_pair / "base")
    finetune_like(base, r"\.mlp\.", seed=5).save_pretrained(root / "ft2")
    return {"base": str(disk_pair / "base"), "ft": [str(disk_pair / "ft"), str(root / "ft2")]}


@pytest.fixture(scope="module")
def handles(folders):
    return {n: PairHandle(pair=load_pair(folders["base"], folders["ft"][:n]), label=f"{n}x",
                          shared=False, lane="cpu", summary=pd.DataFrame()) for n in (1, 2)}


def _dashboard(handle: PairHandle, settings: Settings, session: Session | None) -> TailorRun:
    return tailor_run(handle, settings, [], "builtin", settings.method, session, batch_size=1,
                      quick_examples=0, progress=no_progress, should_stop=never_stop)


def _cli(folders, n: int, settings: Settings, out) -> PatchFile:
    # every knob the method reads, as flags (the CLI refuses the others)
    flags = [word for name in method_knobs(settings.method) if getattr(settings, name) is not None
             for word in ("--" + name.replace("_", "-"), str(getattr(settings, name)))]
    tuned = [arg for ft in folders["ft"][:n] for arg in ("--finetuned", ft)]
    assert main(["tailor", "--base", folders["base"], *tuned,
                 "--method", settings.method, *flags, "--out", str(out)]) == 0
    return PatchFile(out / "patch.safetensors")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _assert_same_patch(expected: Patch | PatchFile, got: Patch | PatchFile) -> None:
    assert expected.counts() == got.counts() and expected.num_entries > 0
    for name in expected.shapes:
        a, b = expected.read(name), got.read(name)
        assert a.shape == b.shape and a.values.dtype == b.values.dtype, name
        assert torch.equal(a.index, b.index) and torch.equal(_bits(a.values), _bits(b.values)), name


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(_bits(a[n]), _bits(b[n])) for n in a)


@pytest.mark.parametrize("n,settings", CASES, ids=[f"{n}x-{s.method}" for n, s in CASES])
def test_the_dashboards_patch_equals_the_cli_stream_and_the_engine_bit_for_bit(
        folders, handles, tmp_path, n, settings):
    handle = handles[n]
    run = _dashboard(handle, settings, Session(id="s", folder=tmp_path / "session"))
    assert run.patch is None  # never held: the run reads its file when it is used
    patch = run.get_patch()
    assert isinstance(patch, PatchFile) and patch.path == run.patch_file
    _assert_same_patch(run_method(handle.pair, settings).patch, patch)
    _assert_same_patch(_cli(folders, n, settings, tmp_path / "cli"), patch)
    assert patch.metadata["settings"] == settings.to_dict()
    assert patch.metadata["base"] == folders["base"] and patch.metadata["finetuned"] == folders["ft"][:n]


def test_the_merge_holds_no_patch_and_reports_as_the_engine(handles, tmp_path, monkeypatch):
    """The dashboard's data-free merge never builds the patch in memory (neither the
    engine's path nor a collected Patch): each tensor's entries go to the file. The file
    counts exactly the entries the merge changes, and the Tailor tab's report is the
    in-memory engine's."""
    handle, settings = handles[2], Settings(method="ties", keep=0.2)
    engine = run_method(handle.pair, settings)
    with monkeypatch.context() as m:
        m.setattr("tailor_ui.engine.run_method", lambda *a, **k: pytest.fail("merged in memory"))
        m.setattr(Patch, "add", lambda *a, **k: pytest.fail("a patch was collected"))
        run = _dashboard(handle, settings, Session(id="s", folder=tmp_path / "session"))
    assert run.patch is None and isinstance(run.get_patch(), PatchFile)
    base, merged = _params(handle.pair.base), _merged_params(handle, engine.patch)
    change = {n: int(torch.count_nonzero(bits_differ(base[n], merged[n]))) for n in base}
    assert run.get_patch().counts() == {n: c for n, c in change.items() if c} != {}
    saved = json.loads(run.report_file.read_text())
    for key in ("patch_entries", "linear_fraction", "model_fraction", "selected_linears", "tensors"):
        assert run.report[key] == engine.report[key] == saved[key], key
    assert run.report["streamed"] and run.report["memory"]["cpu_peak_rss_mb"] > 0


def _merged_params(handle: PairHandle, patch) -> dict[str, torch.Tensor]:
    with handle.patched(patch) as model:
        return _params(model)


def test_a_failed_or_cancelled_merge_leaves_no_folder(handles, tmp_path):
    session = Session(id="s", folder=tmp_path / "session")
    with pytest.raises(UserError, match="no changed linear layer matches"):
        _dashboard(handles[1], Settings(method="ties", modules=r"no\.such"), session)
    assert not list(session.folder.iterdir())


def test_without_a_session_the_merge_stays_in_memory(handles):
    run = _dashboard(handles[1], Settings(method="task_arithmetic"), None)
    assert isinstance(run.patch, Patch) and run.patch_file is None


@pytest.mark.parametrize("damaged", [False, True])
def test_a_patch_file_is_applied_and_reverted_tensor_by_tensor(handles, tmp_path, damaged):
    """The shared base with a patch file written in equals base + patch; afterwards it is
    the base again bit for bit, even when a tensor of the file cannot be read."""
    handle = handles[2]
    patch = run_method(handle.pair, Settings(method="ties", keep=0.3)).patch
    save_patch(patch, tmp_path / "patch.safetensors")
    before = _params(handle.pair.base)
    expected = {n: before[n].reshape(-1).clone() for n in before}
    for name, tp in patch.tensors.items():
        expected[name][tp.index] = tp.values
    file = PatchFile(tmp_path / "patch.safetensors")
    if damaged:  # the last tensor cannot be read: the ones written before it go back
        last, read = list(file.entries)[-1], file.read
        file.read = lambda name: (_ for _ in ()).throw(UserError("damaged")) if name == last else read(name)
        with pytest.raises(UserError, match="damaged"):
            with handle.patched(file):
                pass
    else:
        with handle.patched(file) as model:
            got = _params(model)
        assert _same_params({n: t.reshape(before[n].shape) for n, t in expected.items()}, got)
    assert _same_params(before, _params(handle.pair.base))


def test_the_model_export_streams_from_the_base_checkpoint(handles, tmp_path, monkeypatch):
    """A pair whose base is a local safetensors folder in its stored dtype: the zip's
    model is the checkpoint streamed with the patch file (save_pretrained is not called)
    and equals base + patch; with the processor and the report."""
    handle = handles[2]
    run = _dashboard(handle, Settings(method="dare", keep=0.4), Session(id="s", folder=tmp_path / "s"))
    assert export.streamable_base(handle.pair.base) is not None
    monkeypatch.setattr(type(handle.pair.base), "save_pretrained",
                        lambda *a, **k: pytest.fail("the model was saved from memory"))
    zipped = export.model_zip(run, no_progress, never_stop)
    with zipfile.ZipFile(zipped) as archive:
        archive.extractall(tmp_path / "out")
    folder = tmp_path / "out" / "tailored-model"
    assert (folder / "processor_config.json").is_file() and (folder / "tokenizer.json").is_file()
    report = json.loads((folder / "tailor_report.json").read_text())
    base_keys = Checkpoint(handle.pair.base.config._name_or_path).keys
    assert report["tensors_checked"] == len(base_keys) and report["patch_entries"] == run.report["patch_entries"]
    saved = Checkpoint(folder)
    names = key_map(folder, saved.keys)
    with saved:
        got = {names.param_of[k]: saved.read(k) for k in saved.keys if k in names.param_of}
    assert _same_params(_merged_params(handle, run.get_patch()), got)


def test_the_model_export_keeps_the_in_memory_path_for_a_converted_dtype(disk_pair, tmp_path):
    """A base loaded in another dtype than its checkpoint's is saved from memory, as before."""
    pair = load_pair(str(disk_pair / "base"), [str(disk_pair / "ft")], dtype="bfloat16")
    assert export.streamable_base(pair.base) is None
    patch = run_method(pair, Settings(method="task_arithmetic")).patch
    before = _params(pair.base)
    assert export.write_tailored(pair, patch, tmp_path / "model", no_progress, never_stop) > 0
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    with applied(pair.base, patch) as model:
        assert _same_params(_params(model), _params(saved))
    assert _same_params(before, _params(pair.base))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_pair_on_the_gpu_streams_the_engines_patch(folders, tmp_path):
    """On the device the pair computes on, the dashboard's patch is still the engine's."""
    handle = PairHandle(pair=load_pair(folders["base"], folders["ft"], device="cuda"), label="gpu",
                        shared=False, lane="cuda", summary=pd.DataFrame())
    for settings in (Settings(method="ties", keep=0.3), Settings(method="dare", keep=0.5)):
        run = _dashboard(handle, settings, Session(id="s", folder=tmp_path / settings.method))
        _assert_same_patch(run_method(handle.pair, settings).patch, run.get_patch())
