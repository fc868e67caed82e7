"""The judge cache: every judgement emq has made, across runs, kept under the judge's fingerprint (its identity,
a local judge's weights files, the knobs that shape a score: emq.judge.plan.fingerprint) and the run's score key (a
hash of the judge, the metric and the exact filled prompt), so a sweep, a rerun or any other run whose answers
repeat earlier ones gets those scores without a request. Greedy variants often answer alike; each judgement is paid
once.

One SQLite file in the data dir (`<paths.data_dir>/judge_cache.sqlite`): every write is one transaction (a killed
process leaves the file as it was before or after it, never half), concurrent runs of a sweep serialize on SQLite's
own lock, and a judgement that failed (an HTTP error, a timeout) is never stored, so it is asked again next time.
`python -m emq cache ls|du` show it, `python -m emq cache rm --judge` clears it. judge.cache=false: neither read
nor written.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE = "judge_cache.sqlite"
_CHUNK = 500  # keys per SELECT (SQLite's limit on bound parameters is 999 on old builds)


@dataclass(frozen=True)
class JudgeCacheStats:
    """What the cache holds: judgements per judge fingerprint, and the file's size."""

    path: Path
    judgements: dict[str, int]
    bytes: int


def _key(judge: str, key: str) -> str:
    return hashlib.sha256(json.dumps([judge, key]).encode()).hexdigest()[:32]


class JudgeCache:
    """Judgements by (judge fingerprint, score key: emq.judge.client.score_key), in `data_dir`/judge_cache.sqlite."""

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir).expanduser() / FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, judge TEXT NOT NULL, "
                         "metric TEXT NOT NULL, row TEXT NOT NULL, created REAL NOT NULL)")

    def get(self, judge: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The cached rows (as scores.jsonl holds them), by score key, of those of `keys` this judge has here."""
        by = {_key(judge, k): k for k in keys}
        ids = list(by)
        found: dict[str, dict[str, Any]] = {}
        for i in range(0, len(ids), _CHUNK):
            part = ids[i:i + _CHUNK]
            q = f"SELECT key, row FROM judgements WHERE key IN ({','.join('?' * len(part))})"
            found.update((by[k], json.loads(row)) for k, row in self._db.execute(q, part))
        return found

    def put(self, judge: str, rows: Iterable[dict[str, Any]]) -> int:
        """Store this judge's judgements (scores.jsonl rows: key, metric, score, …) in one transaction; a row with an
        error, or without a key, is skipped; one already there is kept as it is. Returns how many were new."""
        now = time.time()
        values = [(_key(judge, r["key"]), judge, r.get("metric", ""), json.dumps(r), now) for r in rows
                  if r.get("key") and r.get("error") is None]
        if not values:
            return 0
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO judgements VALUES (?, ?, ?, ?, ?)", values)
            return self._db.total_changes - before

    def stats(self) -> JudgeCacheStats:
        counts = dict(self._db.execute("SELECT judge, COUNT(*) FROM judgements GROUP BY judge ORDER BY judge"))
        size = sum(p.stat().st_size for p in self.path.parent.glob(FILE + "*") if p.is_file())
        return JudgeCacheStats(self.path, counts, size)

    def clear(self, judge: str | None = None) -> int:
        """Remove every judgement (or those of the judges whose fingerprint contains `judge`). Returns how many."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if judge:
                n = self._db.execute("DELETE FROM judgements WHERE instr(judge, ?) > 0", (judge,)).rowcount
            else:
                n = self._db.execute("DELETE FROM judgements").rowcount
        self._db.execute("VACUUM")
        return n

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(data_dir: str | Path | None, enabled: bool) -> JudgeCache | None:
    """The judge cache of `data_dir`, or None when judge.cache is off or there is no data dir."""
    return JudgeCache(data_dir) if enabled and data_dir is not None else None
