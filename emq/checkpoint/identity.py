"""Content identities: what a checkpoint, a reference or a run's numbers depend on, by hash."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def sha256_file(path: Path, limit: int | None = None) -> str:
    """sha256 of a file (or of its first `limit` bytes), read in 4 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        if limit is not None:
            h.update(f.read(limit))
        else:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def base_identity(base_dir: Path) -> dict[str, str]:
    """Identity of each base file for the cache key: small files by sha256; weight shards by size,
    mtime and a hash of their header (names, dtypes, shapes, offsets), so a 28 GB base is not read
    just to compute a key (a re-saved base gets a new mtime, hence a new key)."""
    ident = {}
    for p in sorted(base_dir.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name == "README.md":
            continue
        if p.suffix == ".safetensors":
            with p.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
            st = p.stat()
            ident[p.name] = f"size={st.st_size};mtime_ns={st.st_mtime_ns};header-sha256={sha256_file(p, 8 + n)}"
        else:
            ident[p.name] = sha256_file(p)
    return ident



def adapter_identity(adapter_dir: Path) -> dict[str, str]:
    """sha256 of each file that defines a PEFT adapter (config and weights)."""
    return {p.name: sha256_file(p) for p in sorted(Path(adapter_dir).iterdir()) if p.name in ADAPTER_FILES}


def inputs_record(det, checkpoint=None) -> dict[str, Any]:
    """What a run's numbers depend on, by content (inputs.json): base files (as `base_identity`), the
    adapter's files by sha256, and the served checkpoint's cache key and file hashes (its manifest).

    Args:
        det: the detect record.
        checkpoint: the cached checkpoint served (anything with `path` and `key`), or None.
    """
    base_dir = Path(det.base.path)
    rec: dict[str, Any] = {"base": {"ref": det.base.ref, "files": base_identity(base_dir) if base_dir.is_dir() else None}}
    if det.adapter is not None:
        adir = Path(det.adapter.path)
        rec["adapter"] = {"path": str(adir), "files_sha256": {p.name: sha256_file(p) for p in sorted(adir.iterdir())
                                                               if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")}}
    if checkpoint is not None:
        manifest = json.loads((Path(checkpoint.path) / "manifest.json").read_text())
        rec["merged"] = {"path": str(checkpoint.path), "key": checkpoint.key, "files_sha256": manifest.get("files_sha256")}
    return rec
