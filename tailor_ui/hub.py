"""Publishing a saved output (model, patch or adapter folder, with its card) to the Hugging
Face Hub. The token is passed to huggingface_hub and nowhere else: no message, log or
report holds it."""

from __future__ import annotations

from pathlib import Path

from tailor_ui.errors import UserError
from tailor_ui.model_card import CARD_NAME


def check_repo_id(repo_id: str | None) -> str:
    """An OWNER/NAME Hub model id, or a `UserError` saying what is wrong with it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = (repo_id or "").strip()
    problem = "" if repo_id.count("/") == 1 else "it must be OWNER/NAME"
    if not problem:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            problem = "use letters, digits, '-', '_' and '.', at most 96 characters"
    if problem:
        raise UserError(f"{repo_id!r} is not a Hub repository id: {problem} (e.g. your-name/tailored-model)")
    return repo_id


def require_token(token: str | None, how: str) -> str:
    """The token, or a `UserError` saying `how` to give one."""
    token = (token or "").strip()
    if not token:
        raise UserError(f"publishing needs a Hugging Face token with write access: {how}")
    return token


def push_folder(folder: Path, repo_id: str, token: str, *, private: bool = False,
                message: str = "Upload with Model Tailor Studio") -> str:
    """Create the model repository `repo_id` (kept if it exists) and upload every file of
    `folder`, which must hold its card; the repository's URL. A refused token, a missing
    permission or an unreachable Hub is a one-line `UserError`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = check_repo_id(repo_id)
    if not (Path(folder) / CARD_NAME).is_file():
        raise UserError(f"{folder} has no model card ({CARD_NAME}): save the output again")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=message)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise UserError(f"the Hub refused the token for {repo_id} (HTTP {status}): it needs write "
                            f"access to {repo_id.split('/')[0]}'s repositories") from None
        raise UserError(f"the Hub refused the upload to {repo_id} (HTTP {status}): "
                        f"{_first_line(str(exc), token)}") from None
    except (OSError, _client_error(HfHubHTTPError)) as exc:  # no connection, DNS, timeouts
        raise UserError(f"could not reach the Hub to publish {repo_id}: "
                        f"{_first_line(str(exc), token)}") from None
    return str(url)


def _client_error(hub_error: type) -> type:
    """The HTTP client's own error class (httpx or httpx2, by huggingface_hub's version):
    the Hub's HTTP errors derive from it, and so do its connection errors."""
    return next(c for c in hub_error.__mro__[1:] if c.__name__ == "HTTPError")


def _first_line(message: str, token: str) -> str:
    return (message.strip().splitlines() or ["no details"])[0].replace(token, "***")
