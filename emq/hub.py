"""Resolve a model reference (local directory or hub id) to a local directory of metadata files.

Hub ids go through huggingface_hub: its cache is honoured, and so is offline mode
(HF_HUB_OFFLINE=1). Only small metadata files are fetched here, never weights.
"""
from __future__ import annotations

import logging
from pathlib import Path

from emq.errors import EmqError

log = logging.getLogger(__name__)

METADATA_PATTERNS = ["*.json", "*.yaml", "*.yml", "README.md", "*.jinja"]


def looks_local(ref: str) -> bool:
    """A reference that can only be a path (absolute, relative with ./, ~, or existing)."""
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).expanduser().exists()


def resolve(ref: str, *, revision: str | None, what: str, key: str, full: bool = False) -> Path:
    """Local directory holding at least the metadata files of `ref` (every file if `full`).

    Args:
        ref: local directory or hub repo id.
        revision: hub revision (branch, tag or commit); ignored for local paths.
        what: "base model" or "adapter", for messages.
        key: the config key the reference came from, for messages.
        full: fetch the weights too (merging needs them; detect and plan do not).

    Raises:
        EmqError: the path does not exist, or the hub cannot be reached and the repo is not cached.
    """
    if looks_local(ref):
        path = Path(ref).expanduser().resolve()
        if not path.is_dir():
            raise EmqError(f"{what} directory {path} ({key}) does not exist",
                           f"point {key} at a directory with the {what}'s files, or build the demo "
                           "with a demo model (model=demo_good_doctor)")
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = None if full else METADATA_PATTERNS
    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    if constants.HF_HUB_OFFLINE:
        raise EmqError(
            f"{what} {ref!r} ({key}) is not in the Hugging Face cache and HF_HUB_OFFLINE=1",
            "unset HF_HUB_OFFLINE on a machine with network, pre-fill the cache "
            "(huggingface-cli download), use a local path, or a demo model (model=demo_good_doctor)")
    try:
        if full:
            log.info("fetching %s %s from the hub (weights included)", what, ref)
        return Path(snapshot_download(ref, revision=revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise EmqError(f"{what} {ref!r} ({key}) is not on the hub or needs access: {type(e).__name__}",
                       "check the id, or log in with HF_TOKEN for gated repos") from None
    except RevisionNotFoundError:
        raise EmqError(f"revision {revision!r} of {what} {ref!r} does not exist",
                       "fix the revision in the model config") from None
    except Exception as e:  # connection errors come in many types (httpx, OSError, hub errors)
        raise EmqError(
            f"cannot reach the model hub and {what} {ref!r} ({key}) is not in cache "
            f"({type(e).__name__})",
            "use a local path or a demo model (model=demo_good_doctor), or pre-fill the "
            "Hugging Face cache on a machine with network") from None
