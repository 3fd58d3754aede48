"""The Hugging Face Hub, read with one-line errors: a model's files (the cache answers offline) and the token."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from llm_atc.errors import UserError, first_line
from llm_atc.logfile import to_log_file

_FIX_HUB = "pass HF_TOKEN or a local folder"


class HubUnreachable(UserError):
    """The Hugging Face Hub could not be asked (offline, HF_HUB_OFFLINE=1) and its cache has no answer."""


def hub_file(repo_id: str, filename: str, *, missing_ok: bool = False) -> str | None:
    """``hf_hub_download`` with one-line errors (the cache answers offline). ``missing_ok``: None where
    the repository has no such file (or, offline, the cache does not have it)."""
    from huggingface_hub import errors, hf_hub_download

    to_log_file("huggingface_hub")  # its retry lines ("Retrying in 1s [Retry 1/5]") are not for the terminal
    try:
        return hf_hub_download(repo_id, filename, token=os.environ.get("HF_TOKEN") or None)
    except errors.LocalEntryNotFoundError:
        if missing_ok:
            return None
        reason = (
            f"{filename} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1)"
        )
    except errors.GatedRepoError:
        reason = "the repository is gated and this token has no access (accept its license on huggingface.co)"
    except errors.RepositoryNotFoundError:
        reason = "no such repository on the Hugging Face Hub, or it is private"
    except errors.RevisionNotFoundError:
        reason = "the revision does not exist"
    except errors.EntryNotFoundError:
        if missing_ok:
            return None
        reason = f"the repository has no {filename}"
    except errors.HfHubHTTPError as exc:
        reason = f"the Hub answered {first_line(exc)}"
    except (errors.HFValidationError, ValueError) as exc:
        reason = first_line(exc)
    except Exception as exc:  # a network or client error (the library's own wording, logged, is not for users)
        from llm_atc.logfile import log_exception

        reason = f"the Hugging Face Hub cannot be reached (details in {log_exception(exc)})"
    what = "config for" if filename == "config.json" else f"{filename} of"
    error = HubUnreachable if "cannot be reached" in reason else UserError
    raise error(f"cannot read {what} {repo_id}: {reason}; {_FIX_HUB}")


@contextmanager
def hub_token(secrets: Mapping[str, str]) -> Iterator[None]:
    """HF_TOKEN given with --secret/--envs (not in this process's environment), for reading a gated model."""
    token, before = secrets.get("HF_TOKEN"), os.environ.get("HF_TOKEN")
    if token:
        os.environ["HF_TOKEN"] = token
    try:
        yield
    finally:
        if token and before is None:
            os.environ.pop("HF_TOKEN", None)
        elif token:
            os.environ["HF_TOKEN"] = before
