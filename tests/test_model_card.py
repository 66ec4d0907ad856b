"""Model cards in every saved output, and publishing to the Hub (with huggingface_hub's
calls replaced at the boundary: the Hub cannot be reached from the tests)."""

from __future__ import annotations

import json
import logging
import uuid
import zipfile
from dataclasses import fields
from pathlib import Path

import gradio as gr
import httpx
import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

from conftest import request_for
from tailor_ui.cli import _settings, build_parser, main
from tailor_ui.errors import UserError
from tailor_ui.settings import method_knobs
from tailor_ui.hub import check_repo_id
from tailor_ui.model_card import Artifact, Scores, model_card, tailor_command
from tailor_ui.settings import Settings

TOKEN = "hf_TestSecretToken0123456789"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding org/base-vlm (a model) and org/ft-vlm (a LoRA adapter), as
    loading them from the Hub leaves it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    for repo, file in (("org/base-vlm", "config.json"), ("org/ft-vlm", "adapter_config.json")):
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (folder / "snapshots" / ("0" * 40) / file).write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def report_of(settings: Settings, **extra) -> dict:
    return {"settings": settings.to_dict(), "base": "org/base-vlm", "finetuned": ["org/ft-vlm"],
            "patch_entries": 1234, "model_fraction": 0.0125, "linear_fraction": 0.1,
            "selected_linears": 14, **extra}


# -- the card ---------------------------------------------------------------------------------

def test_the_card_holds_hub_metadata_every_setting_the_command_and_the_scores(tmp_path, hub_cache):
    settings = Settings(keep=0.2, compensation="anchored", hessians="one-pass")
    quick = [{"model": "Pre-trained", "caption": 0.51, "vqa": 0.4, "original retention": 1.0,
              "target retention": 0.25},
             {"model": "This merge", "caption": 0.5, "vqa": 0.9, "original retention": 0.98,
              "target retention": 0.93}]
    local = tmp_path / "my-finetune"
    local.mkdir()
    report = report_of(settings, finetuned=["org/ft-vlm", str(local), "demo/finetuned"], quick_check=quick,
                       quick_examples=8)
    sweep = Scores("Forgetting sweep (sets: caption, vqa)", [{"setting": "Model Tailor keep=0.2",
                                                             "h_score": 0.875}])
    text = model_card(Artifact.MODEL, report, command="python -m tailor_ui tailor --keep 0.2", scores=[sweep])
    card = ModelCard(text)
    # a local folder, or a name no model was loaded from the Hub by, is no Hub repository: the
    # Hub refuses it in base_model, so only the text names it
    assert card.data.base_model == ["org/base-vlm", "org/ft-vlm"]
    assert "| fine-tuned | `demo/finetuned` |" in card.text
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "image-text-to-text")
    assert {"model-tailor-studio", "merge", "model-tailor"} <= set(card.data.tags)
    assert f"`{local}`" in card.text
    for f in fields(Settings):  # every setting, with its value
        assert f"| `{f.name}` | {_cell(getattr(settings, f.name))} |" in card.text, f.name
    assert "| `compensation` | anchored | yes |" in card.text and "| `lam` | — | no |" in card.text
    assert "```bash\npython -m tailor_ui tailor --keep 0.2\n```" in card.text
    assert "1,234 entries, 1.25% of the model" in card.text
    assert "### Quick check on 8 examples per set (sets: caption, vqa)" in card.text
    assert "| This merge | 0.5 | 0.9 | 0.98 | 0.93 |" in card.text
    assert "### Forgetting sweep (sets: caption, vqa)" in card.text
    assert "| Model Tailor keep=0.2 | 0.875 |" in card.text
    adapter = ModelCard(model_card(Artifact.ADAPTER, report_of(settings)))
    assert adapter.data.library_name == "peft" and "No scores were measured" in adapter.text
    assert ModelCard(model_card(Artifact.PATCH, report_of(settings))).data.library_name == "tailor_ui"


def _cell(value) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize("settings", [
    Settings(keep=0.05, alpha=0.5, compensation="anchored", anchor_weight=2.0, hessians="one-pass"),
    Settings(compensation="greedy", order="sparsegpt", damp=0.1, modules=r"\.q_proj$"),
    Settings(compensate=False, scope="row", others="base"),
    Settings(method="magnitude", keep=0.3, scope="tensor"),
    Settings(method="dare", keep=0.4, seed=3),
    Settings(method="wise_ft", lam=0.25),
])
def test_the_command_on_the_card_parses_back_to_the_same_settings(settings):
    command = tailor_command(settings, "org/base", ["org/ft"], calib=["t.jsonl"], anchor=["a b.jsonl"])
    words = command.split(" ", 3)
    assert words[:3] == ["python", "-m", "tailor_ui"]
    import shlex

    args = build_parser().parse_args(shlex.split(words[3]))
    parsed = _settings(args, args.method)
    read = {"method", *method_knobs(settings.method)}
    assert {k: getattr(parsed, k) for k in read} == {k: getattr(settings, k) for k in read}
    assert (args.anchor == [Path("a b.jsonl")]) == settings.anchored


@pytest.mark.parametrize("repo_id", ["", "name-only", "a/b/c", "me/bad name", "me/" + "x" * 100])
def test_a_bad_repository_id_is_refused_in_words(repo_id):
    with pytest.raises(UserError, match="is not a Hub repository id"):
        check_repo_id(repo_id)
    assert check_repo_id(" me/tailored-model ") == "me/tailored-model"


# -- the command line ---------------------------------------------------------------------

def _tailor_args(disk_pair, out, *extra):
    return ["tailor", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
            "--calib", str(disk_pair / "calib.jsonl"), "--out", str(out), "--keep", "0.1",
            "--batch-size", "4", *extra]


def test_every_cli_output_carries_its_card(disk_pair, tmp_path):
    out, adapter, applied = tmp_path / "run", tmp_path / "adapter", tmp_path / "applied"
    args = _tailor_args(disk_pair, out, "--save-model", "--adapter-out", str(adapter), "--adapter-rank", "2")
    assert main(args) == 0
    command = "python -m tailor_ui " + " ".join(args)
    for folder, library in ((out, "tailor_ui"), (out / "model", "transformers"), (adapter, "peft")):
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == library and card.data.pipeline_tag == "image-text-to-text"
        assert command in card.text and "| `keep` | 0.1 |" in card.text
        assert str(disk_pair / "base") in card.text  # a local folder: named in the text only
    # streamed (a data-free method) and apply write theirs too
    streamed = tmp_path / "streamed"
    assert main(["tailor", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
                 "--method", "magnitude", "--keep", "0.2", "--out", str(streamed), "--save-model"]) == 0
    for folder in (streamed, streamed / "model"):
        card = ModelCard.load(folder / "README.md").text
        assert "**Magnitude patch**" in card and "--method magnitude" in card
    assert main(["apply", "--base", str(disk_pair / "base"), "--patch", str(streamed / "patch.safetensors"),
                 "--out", str(applied)]) == 0
    card = ModelCard.load(applied / "README.md")
    assert card.data.library_name == "transformers" and "python -m tailor_ui apply" in card.text
    assert "| `method` | magnitude | yes |" in card.text and "| `keep` | 0.2 |" in card.text


class FakeHub:
    """HfApi's create_repo and upload_folder, recording what they were given and the files
    of the folder at upload time (`refuse`: the HTTP status to answer with)."""

    def __init__(self, monkeypatch, refuse: int | None = None):
        self.created, self.uploaded, self.tokens = [], [], []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.tokens.append(api.token)
            if refuse is not None:
                request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
                response = httpx.Response(refuse, request=request)
                raise HfHubHTTPError(f"{refuse} Client Error", response=response)
            hub.created.append({"repo_id": repo_id, **kwargs})
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            folder = Path(folder_path)
            files = {p.relative_to(folder).as_posix(): p.read_bytes()
                     for p in folder.rglob("*") if p.is_file()}
            hub.uploaded.append({"repo_id": repo_id, "files": files, **kwargs})

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_cli_push_to_hub_uploads_the_saved_model_with_its_card(disk_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = FakeHub(monkeypatch)
    out = tmp_path / "run"
    args = _tailor_args(disk_pair, out, "--save-model", "--push-to-hub", "me/tailored", "--private")
    assert main(args) == 0
    printed = capsys.readouterr()
    assert hub.created == [{"repo_id": "me/tailored", "repo_type": "model", "private": True,
                            "exist_ok": True}]
    assert hub.tokens == [TOKEN]
    (upload,) = hub.uploaded
    on_disk = {p.relative_to(out / "model").as_posix(): p.read_bytes()
               for p in (out / "model").rglob("*") if p.is_file()}
    assert upload["files"] == on_disk and "README.md" in on_disk and "model.safetensors" in on_disk
    assert upload["repo_id"] == "me/tailored" and upload["repo_type"] == "model"
    assert "published" in printed.out and "https://huggingface.co/me/tailored" in printed.out
    assert TOKEN not in printed.out + printed.err
    card = on_disk["README.md"].decode()
    assert "--save-model" in card and "--push-to-hub" not in card and "--private" not in card

    # without --save-model: the patch folder alone
    hub.uploaded.clear()
    assert main(_tailor_args(disk_pair, tmp_path / "patch-only", "--push-to-hub", "me/patch")) == 0
    assert set(hub.uploaded[0]["files"]) == {"patch.safetensors", "report.json", "README.md"}


@pytest.mark.parametrize("case, message", [
    ("missing", "publishing needs a Hugging Face token with write access: set HF_TOKEN"),
    ("refused", "the Hub refused the token for me/tailored (HTTP 401)"),
    ("forbidden", "the Hub refused the token for me/tailored (HTTP 403)"),
    ("bad-id", "'me/a b' is not a Hub repository id"),
])
def test_cli_push_errors_are_one_line_without_the_token(disk_pair, tmp_path, monkeypatch, capsys, case,
                                                        message):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login
    if case == "missing":
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = FakeHub(monkeypatch, refuse={"refused": 401, "forbidden": 403}.get(case))
    repo = "me/a b" if case == "bad-id" else "me/tailored"
    out = tmp_path / "run"
    assert main(_tailor_args(disk_pair, out, "--save-model", "--push-to-hub", repo)) == 2
    err = capsys.readouterr()
    assert err.err.startswith("error: ") and message in err.err and err.err.count("\n") == 1
    assert TOKEN not in err.out + err.err and not hub.uploaded
    # refused before any model loads, or after the outputs are complete on disk
    assert out.exists() == (case in ("refused", "forbidden"))


def test_private_goes_with_push_to_hub(disk_pair, tmp_path, capsys):
    assert main(_tailor_args(disk_pair, tmp_path / "run", "--private")) == 2
    assert "--private goes with --push-to-hub" in capsys.readouterr().err


# -- the dashboard ----------------------------------------------------------------------------

def fresh():
    return request_for(f"card-{uuid.uuid4().hex[:8]}")


def test_export_offers_the_start_up_merge_in_a_fresh_session(handlers, tmp_path):
    studio, request = handlers.studio, fresh()
    session = studio.session(request.session_hash)
    handle = studio.handle_for(session)
    choices, info = handlers.export.poll(session, handle)
    ((label, value),) = choices["choices"]
    assert value == choices["value"] == "start-up"
    assert label.startswith("start-up · start-up merge with the default settings: Model Tailor keep=0.1")
    assert f"{handle.default_run.report['patch_entries']:,} entries" in info
    from tailor_ui.patch import load_patch

    patch = load_patch(handlers.export.patch("", request=request))
    assert patch.num_entries == handle.default_run.report["patch_entries"] > 0
    report = json.loads(Path(handlers.export.report("start-up", request=request)).read_text())
    assert report["settings"] == handle.default_run.settings
    with zipfile.ZipFile(handlers.export.model("start-up", request=request)) as archive:
        card = ModelCard(archive.read("tailored-model/README.md").decode())
    assert card.data.library_name == "transformers"
    assert card.data.base_model is None  # the demo pair's names are no Hub repositories
    assert "## Reproduce" in card.text and "--calib TARGET.jsonl" in card.text
    assert "### Quick check on" in card.text  # the start-up merge's own quick check
    with zipfile.ZipFile(handlers.export.adapter("start-up", request=request)) as archive:
        assert ModelCard(archive.read("tailored-adapter/README.md").decode()).data.library_name == "peft"


def test_export_push_publishes_the_patch_or_the_model_with_its_card(handlers, monkeypatch, caplog):
    hub = FakeHub(monkeypatch)
    request = fresh()
    caplog.set_level(logging.DEBUG)
    message = handlers.export.push("start-up", "patch", "me/demo-patch", True, TOKEN, request=request)
    assert "me/demo-patch" in message and TOKEN not in message
    (upload,) = hub.uploaded
    assert set(upload["files"]) == {"patch.safetensors", "report.json", "README.md"}
    run = handlers.studio.handle_for(handlers.studio.session(request.session_hash)).default_run
    assert upload["files"]["patch.safetensors"] == run.patch_file.read_bytes()
    assert ModelCard(upload["files"]["README.md"].decode()).data.library_name == "tailor_ui"
    assert hub.created[0]["private"] is True and hub.tokens == [TOKEN]
    # the model: exactly the export zip's files
    handlers.export.push("", "model", "me/demo-model", False, TOKEN, request=request)
    with zipfile.ZipFile(handlers.export.model("", request=request)) as archive:
        zipped = {n.removeprefix("tailored-model/"): archive.read(n) for n in archive.namelist()}
    assert hub.uploaded[1]["files"] == zipped and "README.md" in zipped
    # signed in on a Space: the OAuth token, whatever the field holds
    handlers.export.push("", "patch", "me/demo-patch", False, "", request=request,
                    oauth_token=gr.OAuthToken(token=TOKEN + "-oauth", scope="write-repos", expires_at=0))
    assert hub.tokens[-1] == TOKEN + "-oauth"
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("token, repo, refuse, message", [
    ("", "me/demo", None, "publishing needs a Hugging Face token with write access: paste a token"),
    (TOKEN, "demo", None, "'demo' is not a Hub repository id"),
    (TOKEN, "me/demo", 401, r"the Hub refused the token for me/demo \(HTTP 401\)"),
    (TOKEN, "me/demo", 403, r"the Hub refused the token for me/demo \(HTTP 403\)"),
])
def test_export_push_errors_are_shown_in_words(handlers, monkeypatch, caplog, token, repo, refuse, message):
    hub = FakeHub(monkeypatch, refuse=refuse)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(gr.Error, match=message) as raised:
        handlers.export.push("", "patch", repo, False, token, request=fresh())
    assert TOKEN not in str(raised.value) and TOKEN not in caplog.text and not hub.uploaded


def test_the_sweep_row_of_a_merge_goes_on_its_card():
    import pandas as pd

    from tailor_ui.evaluation.sweep import setting_label
    from tailor_ui.model_card import sweep_scores

    ran, other = Settings(keep=0.05, compensation="exact"), Settings(keep=0.5)
    table = pd.DataFrame([
        {"kind": "base", "setting": "base", "h_score": 0.5, "score:caption": 0.6},
        {"kind": "merged", "setting": setting_label(ran), "original_retention": 0.97, "target_retention": 0.8,
         "target_gain": 0.7, "h_score": 0.81, "patch_fraction": 0.004, "score:caption": 0.58},
        {"kind": "merged", "setting": setting_label(other), "h_score": 0.7, "score:caption": 0.4}])
    (scores,) = sweep_scores(table, ran, ["caption"])
    assert scores.title == "Forgetting sweep (sets: caption)"
    assert [row["h_score"] for row in scores.rows] == [0.81] and scores.rows[0]["score:caption"] == 0.58
    assert sweep_scores(table, Settings(keep=0.3), ["caption"]) == []
    card = model_card(Artifact.MODEL, report_of(ran), scores=[scores])
    row = "| Model Tailor keep=0.05 alpha=0.8 compensation=exact | 0.97 | 0.8 | 0.7 | 0.81 | 0.004 | 0.58 |"
    assert row in card


def test_without_any_merge_export_says_to_run_one():
    from tailor_ui.app.service.export import find_run
    from tailor_ui.app.session import Session

    with pytest.raises(UserError, match=r"run a merge first \(Tailor tab\)"):
        find_run(Session(id="empty", folder=Path("unused")), None, "")


def test_export_push_through_the_api(client, monkeypatch):
    """The endpoint as a client calls it: no sign-in outside a Space, the token as an input."""
    hub = FakeHub(monkeypatch)
    message = client.predict("start-up", "patch", "me/api-patch", False, TOKEN, api_name="/export_push")
    assert "me/api-patch" in message and TOKEN not in message
    assert hub.tokens == [TOKEN] and set(hub.uploaded[0]["files"]) == {"patch.safetensors", "report.json",
                                                                        "README.md"}


def test_the_export_tab_signs_in_on_a_space_and_takes_a_token_elsewhere(studio, monkeypatch):
    import importlib.util

    from tailor_ui.app.ui.blocks import App
    from tailor_ui.app.ui.export import signs_in_on_the_hub

    monkeypatch.delenv("SYSTEM", raising=False)
    assert not signs_in_on_the_hub()
    # a Space without sign-in configured (no hf_oauth in its README), or without Gradio's
    # OAuth extra, keeps the token field: a LoginButton could not start there
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "me/model-tailor-studio")
    assert not signs_in_on_the_hub()
    monkeypatch.setenv("OAUTH_CLIENT_ID", "client-id")
    find_spec = importlib.util.find_spec

    def authlib(installed: bool):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if installed else None)
                            if name == "authlib" else find_spec(name, *a))

    authlib(False)
    assert not signs_in_on_the_hub()
    tab = App(studio)
    assert not tab.build().expects_oauth and tab.export.token.visible
    authlib(True)
    assert signs_in_on_the_hub()


def test_a_session_merge_card_takes_its_sweep_row_and_the_shared_start_up_merge_none(handlers, tmp_path):
    from dataclasses import replace

    import pandas as pd

    from tailor_ui.evaluation.sweep import setting_label
    from tailor_ui.app.service.export import known_scores
    from tailor_ui.app.session import Session, SweepRun

    studio = handlers.studio
    startup = studio.demo.default_run
    session = Session(id="sweeper", folder=tmp_path)
    mine = replace(startup, job_id="job-mine")
    session.runs[mine.job_id] = mine
    label = setting_label(Settings(**mine.settings))
    table = pd.DataFrame([{"kind": "merged", "setting": label, "h_score": 0.8, "score:caption_eval": 0.5}])
    session.sweeps["job-sweep"] = SweepRun(job_id="job-sweep", table=table, csv_file=tmp_path / "t.csv")
    (scores,) = known_scores(session, mine)
    assert scores.title == "Forgetting sweep (sets: caption_eval)" and scores.rows[0]["h_score"] == 0.8
    assert known_scores(session, startup) == []


def test_the_space_asks_for_the_scopes_that_publishing_needs():
    """Sign-in on the Space (README's metadata): uploading needs write-repos, creating the
    repository manage-repos."""
    from huggingface_hub import SpaceCard

    from conftest import ROOT

    data = SpaceCard.load(ROOT / "README.md").data
    assert data.hf_oauth is True and {"write-repos", "manage-repos"} <= set(data.hf_oauth_scopes)


def test_a_card_without_recorded_settings_says_so_instead_of_guessing():
    text = model_card(Artifact.MODEL, {"base": "b", "finetuned": [], "patch_entries": 3})
    assert "The settings that made this output are not recorded with it." in text
    assert "| `keep` |" not in text and "**Model Tailor**" not in text
