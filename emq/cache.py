"""The merge cache: one directory per key, published atomically, built once under a file lock.

Layout under the cache root:
    <key>/                  a complete entry: weights, config, tokenizer, manifest.json
    .<key>.tmp-XXXX/        an entry being built (or debris of a crash: removed by the next builder)
    .locks/<key>.lock       the per-key file lock (released by the OS if its holder dies)

A directory without manifest.json is never used. `python -m emq.cache ls|du|rm|verify` manages it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from emq.errors import EmqError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
LAST_USED = ".last_used"


def default_root() -> Path:
    """EMQ_CACHE, else <EMQ_HOME or ~/.cache/emq>/merged (the same default as conf/config.yaml)."""
    if os.environ.get("EMQ_CACHE"):
        return Path(os.environ["EMQ_CACHE"]).expanduser()
    return Path(os.environ.get("EMQ_HOME", "~/.cache/emq")).expanduser() / "merged"


def sha256_file(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        if limit is not None:
            h.update(f.read(limit))
        else:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def key_of(identity: dict) -> str:
    """Cache key: the hash of everything the merged bytes depend on."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def is_complete(entry: Path) -> bool:
    return (entry / MANIFEST).is_file() and (entry / "config.json").is_file()


@contextmanager
def locked(root: Path, key: str, timeout_s: float = 6 * 3600) -> Iterator[None]:
    """Hold the per-key lock; concurrent builders of the same key wait here."""
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / ".locks" / f"{key}.lock"), timeout=timeout_s)
    if lock.is_locked:
        log.info("cache: another process is building %s; waiting for it", key)
    with lock:
        yield


def remove_debris(root: Path, key: str) -> list[str]:
    """Delete half-built temp dirs of `key` (call only while holding its lock)."""
    gone = []
    for tmp in root.glob(f".{key}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
        gone.append(tmp.name)
    if gone:
        log.info("cache: removed debris of an interrupted build: %s", gone)
    return gone


def new_tmp(root: Path, key: str) -> Path:
    """A fresh temp dir on the same filesystem as the entry, so publishing is a rename."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    return tmp


def check_disk(root: Path, needed_bytes: int) -> None:
    """Refuse to start writing when the cache's filesystem lacks the room."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < needed_bytes:
        raise EmqError(f"the merged checkpoint needs ~{needed_bytes / 1024**3:.2f} GiB at {root}, only "
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
class Entry:
    key: str
    path: Path
    bytes: int
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
        lu = d / LAST_USED
        out.append(Entry(d.name, d, sum(p.stat().st_size for p in d.iterdir() if p.is_file()),
                         m["inputs"]["base"]["path"], m["inputs"]["adapter"]["path"], m["inputs"]["settings"],
                         m.get("created_unix", 0.0), float(lu.read_text()) if lu.is_file() else None))
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


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emq.cache", description="Manage emq's merged-model cache.")
    parser.add_argument("--root", type=Path, default=None, help="cache root (default: EMQ_CACHE or ~/.cache/emq/merged)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ls", help="entries with size, inputs and last use")
    sub.add_parser("du", help="total size")
    rm = sub.add_parser("rm", help="remove entries")
    rm.add_argument("keys", nargs="*", help="entry keys (prefixes work)")
    rm.add_argument("--model", help="remove entries whose adapter or base path contains this")
    rm.add_argument("--all", action="store_true")
    ver = sub.add_parser("verify", help="re-hash entries against their manifests")
    ver.add_argument("keys", nargs="*")
    args = parser.parse_args(argv)
    root = (args.root or default_root()).expanduser()
    found = entries(root)
    if args.cmd == "ls":
        for e in found:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "never"
            print(f"{e.key}  {_gib(e.bytes):>10}  last used {used}  {e.settings.get('method')}/"
                  f"{e.settings.get('merge_base')}  base={e.base}  adapter={e.adapter}")
        print(f"{len(found)} entries in {root}")
    elif args.cmd == "du":
        print(f"{_gib(sum(e.bytes for e in found))} in {len(found)} entries at {root}")
    elif args.cmd == "rm":
        pick = [e for e in found if args.all or any(e.key.startswith(k) for k in args.keys)
                or (args.model and (args.model in e.adapter or args.model in e.base))]
        if not pick:
            print("nothing matched; see `python -m emq.cache ls`", file=sys.stderr)
            return 1
        for e in pick:
            with locked(root, e.key):
                shutil.rmtree(e.path)
            print(f"removed {e.key} ({_gib(e.bytes)})")
    elif args.cmd == "verify":
        bad = 0
        for e in found:
            if args.keys and not any(e.key.startswith(k) for k in args.keys):
                continue
            problems = verify(e.path)
            bad += bool(problems)
            print(f"{e.key}  {'ok' if not problems else 'BAD: ' + '; '.join(problems)}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
