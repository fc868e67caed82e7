"""The checkpoint cache: one directory per key, published atomically, built once under a file lock.

Layout under the cache root:
    <key>/                  a complete entry: weights, config, tokenizer, manifest.json
    .<key>.tmp-XXXX/        an entry being built (or debris of a crash: removed by the next builder)
    .locks/<key>.lock       the per-key file lock (released by the OS if its holder dies)
    .locks/<key>.use        "in use": every process that got the entry holds a shared lock on it until it exits

A directory without manifest.json is never used. Every producer of checkpoints (the merge, and any
later one) goes through `get_or_build`: it hands over a key, its inputs and a function that writes the
checkpoint into a temp dir; the cache does the locking, the disk check, the manifest and the publish.
`python -m emq cache ls|du|rm|verify` manages it; removal (`remove_entry`) skips an entry that a build or a
live process holds, so nothing is pulled from under a run that is serving it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from emq.checkpoint.identity import sha256_file
from emq.errors import EmqError
from emq.records import write_json
from emq.version import __version__

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
LAST_USED = ".last_used"


def default_root() -> Path:
    """EMQ_CACHE, else <EMQ_HOME or ~/.cache/emq>/merged (the same default as conf/config.yaml)."""
    if os.environ.get("EMQ_CACHE"):
        return Path(os.environ["EMQ_CACHE"]).expanduser()
    return Path(os.environ.get("EMQ_HOME", "~/.cache/emq")).expanduser() / "merged"


def key_of(identity: dict) -> str:
    """Cache key: the hash of everything the merged bytes depend on."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def is_complete(entry: Path) -> bool:
    """A published entry: its manifest, and a model's config.json or (a LoRA emq built) an adapter_config.json."""
    return (entry / MANIFEST).is_file() and ((entry / "config.json").is_file()
                                             or (entry / "adapter_config.json").is_file())


@contextmanager
def locked(root: Path, key: str, timeout_s: float = 6 * 3600) -> Iterator[None]:
    """Hold the per-key lock; concurrent builders of the same key wait here."""
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / ".locks" / f"{key}.lock"), timeout=timeout_s)
    if lock.is_locked:
        log.info("cache: another process is building %s; waiting for it", key)
    with lock:
        yield


# entry path -> the open file whose shared lock says "this process uses it" (released when the process exits)
_HOLDS: dict[str, int] = {}


def hold(entry: Path) -> None:
    """Mark `entry` as used by this process until it exits (or `release`): removal skips it meanwhile."""
    entry = Path(entry)
    if str(entry) in _HOLDS:
        return
    (entry.parent / ".locks").mkdir(parents=True, exist_ok=True)
    fd = os.open(entry.parent / ".locks" / f"{entry.name}.use", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _HOLDS[str(entry)] = fd


def release(entry: Path | None = None) -> None:
    """Drop this process's use mark on `entry` (every entry when None)."""
    for path in [str(entry)] if entry is not None else list(_HOLDS):
        fd = _HOLDS.pop(path, None)
        if fd is not None:
            os.close(fd)


def remove_entry(root: Path, key: str) -> bool:
    """Delete the entry `key` unless a build holds its lock or a live process uses it (see `hold`).

    This process's own mark on it is dropped first: a process removes what it is done with.

    Returns:
        True when the entry was removed, False when it was kept because another process holds it.
    """
    root = Path(root)
    release(root / key)
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(root / ".locks" / f"{key}.lock"), timeout=0):
            fd = os.open(root / ".locks" / f"{key}.use", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                shutil.rmtree(root / key, ignore_errors=True)
            finally:
                os.close(fd)
            return True
    except Timeout:
        return False


def remove_debris(root: Path, key: str) -> list[str]:
    """Delete half-built temp dirs of `key` (call only while holding its lock)."""
    gone = []
    for tmp in root.glob(f".{key}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
        gone.append(tmp.name)
    if gone:
        log.info("cache: removed debris of an interrupted build: %s", gone)
    return gone


@dataclass(frozen=True)
class Debris:
    """A temp dir of a build that has not finished: in progress (its key's lock is held) or left by a kill."""

    path: Path
    key: str
    bytes: int
    held: bool  # a live process holds the key's lock: a build in progress, not debris yet


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def debris(root: Path) -> list[Debris]:
    """Temp dirs of interrupted (or running) builds under `root`, with their size and whether a build holds them."""
    out = []
    for tmp in sorted(Path(root).glob(".*.tmp-*")):
        if not tmp.is_dir():
            continue
        (Path(root) / ".locks").mkdir(exist_ok=True)
        key = tmp.name[1:].split(".tmp-")[0]
        lock = FileLock(str(Path(root) / ".locks" / f"{key}.lock"), timeout=0)
        try:
            with lock:
                held = False
        except Timeout:
            held = True
        out.append(Debris(tmp, key, _tree_bytes(tmp), held))
    return out


def remove_all_debris(root: Path) -> list[Debris]:
    """Remove every temp dir no live build holds (under its key's lock, so a build cannot start meanwhile)."""
    gone = []
    for d in debris(root):
        if d.held:
            continue
        try:
            with FileLock(str(Path(root) / ".locks" / f"{d.key}.lock"), timeout=0):
                shutil.rmtree(d.path, ignore_errors=True)
                gone.append(d)
        except Timeout:
            continue
    return gone


def new_tmp(root: Path, key: str) -> Path:
    """A fresh temp dir on the same filesystem as the entry, so publishing is a rename."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    return tmp


def check_disk(root: Path, needed_bytes: int, what: str = "the merged checkpoint") -> None:
    """Refuse to start writing when the cache's filesystem lacks the room."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < needed_bytes:
        raise EmqError(f"{what} needs ~{needed_bytes / 1024**3:.2f} GiB at {root}, only "
                       f"{free / 1024**3:.2f} GiB free", "free disk space or point EMQ_CACHE / paths.cache_dir elsewhere")


def publish(tmp: Path, entry: Path) -> None:
    """fsync every file and the dir, then rename into place (replacing an older entry)."""
    for p in tmp.iterdir():
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if entry.exists():
        shutil.rmtree(entry)
    os.replace(tmp, entry)
    fd = os.open(entry.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def touch(entry: Path) -> None:
    (entry / LAST_USED).write_text(str(time.time()))


@dataclass(frozen=True)
class Built:
    """A cache entry as `get_or_build` returns it."""

    path: Path
    key: str
    cached: bool  # found complete (nothing was built)
    manifest: dict[str, Any]


def get_or_build(root: Path, key: str, *, inputs: dict[str, Any], build: Callable[[Path], dict[str, Any]],
                 needed_bytes: int | None = None, force: bool = False, what: str = "the merged checkpoint",
                 kind: str = "merge") -> Built:
    """The complete entry `key` under `root`, built once if it is missing (or `force`).

    Under the key's lock: debris of an interrupted build is removed; a complete entry is reused; else the
    disk is checked, `build(tmp)` writes the checkpoint into a temp dir on the same filesystem and returns
    the manifest fields it knows (`files_sha256` for files it hashed while writing), the cache hashes the
    rest, writes manifest.json and renames the dir into place. Whatever `build` raises propagates and
    nothing is published.

    Raises:
        EmqError: not enough disk before the build, or the disk filled up during it (nothing published).
    """
    root = Path(root).expanduser()
    entry = root / key
    with locked(root, key):
        remove_debris(root, key)
        if is_complete(entry) and not force:
            log.info("cache: hit %s", entry)
            touch(entry)
            hold(entry)  # under the build lock: no remover can slip in between
            return Built(entry, key, True, json.loads((entry / MANIFEST).read_text()))
        if needed_bytes:
            check_disk(root, needed_bytes, what)
        tmp = new_tmp(root, key)
        try:
            fields = dict(build(tmp))
            known = fields.pop("files_sha256", None) or {}
            files = {p.name: known.get(p.name) or sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"key": key, "kind": kind, "emq_version": __version__, **fields, "inputs": inputs,
                        "created_unix": time.time(), "files_sha256": files}
            write_json(tmp / MANIFEST, manifest)
            publish(tmp, entry)
            touch(entry)
            hold(entry)
            return Built(entry, key, False, manifest)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk filled up after the check
                raise EmqError(f"the disk at {root} filled up while writing {what} ({e.strerror}); nothing was "
                               "published", "free disk space or point EMQ_CACHE / paths.cache_dir elsewhere") from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    bytes: int
    kind: str  # what produced it: merge, ...
    base: str
    adapter: str
    settings: dict
    created: float
    last_used: float | None


def entries(root: Path) -> list[Entry]:
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not is_complete(d):
            continue
        m = json.loads((d / MANIFEST).read_text())
        inputs = m.get("inputs") or {}
        lu = d / LAST_USED
        out.append(Entry(d.name, d, sum(p.stat().st_size for p in d.iterdir() if p.is_file()), m.get("kind", "merge"),
                         (inputs.get("base") or {}).get("path", "?"), (inputs.get("adapter") or {}).get("path", "?"),
                         inputs.get("settings") or {}, m.get("created_unix", 0.0),
                         float(lu.read_text()) if lu.is_file() else None))
    return out


def verify(entry: Path) -> list[str]:
    """Problems found re-hashing the entry against its manifest (empty: verified)."""
    if not is_complete(entry):
        return [f"{entry} is incomplete (no manifest.json)"]
    m = json.loads((entry / MANIFEST).read_text())
    problems = []
    for name, digest in m["files_sha256"].items():
        p = entry / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems
