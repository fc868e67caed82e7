"""`python -m emq cache ls|du|rm|verify`: manage emq's checkpoint cache (merged and quantized models) and the judge
cache (every judgement made, in the data dir: `rm --judge` clears it).

Output is for people (one line per entry); the exit code says whether the command did what was asked.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from emq.checkpoint.cache import debris, default_root, entries, remove_all_debris, remove_entry, verify
from emq.judge.cache import FILE as JUDGE_CACHE_FILE
from emq.judge.cache import JudgeCache


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _size(n: int) -> str:
    return _gib(n) if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    """Run the cache command; 1 when nothing matched or an entry fails verification."""
    parser = argparse.ArgumentParser(prog="python -m emq cache", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="cache root (default: EMQ_CACHE or ~/.cache/emq/merged)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the judge cache is (default: EMQ_HOME or ~/.cache/emq, as paths.data_dir)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ls", help="entries with size, inputs and last use")
    sub.add_parser("du", help="total size")
    rm = sub.add_parser("rm", help="remove entries")
    rm.add_argument("keys", nargs="*", help="entry keys (prefixes work)")
    rm.add_argument("--model", help="remove entries whose adapter or base path contains this")
    rm.add_argument("--all", action="store_true")
    rm.add_argument("--debris", action="store_true",
                    help="remove the temp dirs of interrupted builds that no running build holds")
    rm.add_argument("--judge", nargs="?", const="", default=None, metavar="IDENTITY",
                    help="clear the judge cache (only the judges whose identity contains IDENTITY, if given)")
    ver = sub.add_parser("verify", help="re-hash entries against their manifests")
    ver.add_argument("keys", nargs="*")
    args = parser.parse_args(argv)
    root = (args.root or default_root()).expanduser()
    data_dir = (args.data_dir or Path(os.environ.get("EMQ_HOME", "~/.cache/emq"))).expanduser()
    judged = data_dir / JUDGE_CACHE_FILE
    if args.cmd == "rm" and args.judge is not None:
        if not judged.is_file():
            print(f"no judge cache at {judged}", file=sys.stderr)
            return 1
        with JudgeCache(data_dir) as jc:
            n = jc.clear(args.judge or None)
        print(f"removed {n} judgement(s) from {judged}" + (f" (judges matching {args.judge!r})" if args.judge else ""))
        return 0 if n or not args.judge else 1
    if args.cmd in ("ls", "du") and judged.is_file():
        with JudgeCache(data_dir) as jc:
            st = jc.stats()
        if args.cmd == "ls":
            for ident, n in st.judgements.items():
                print(f"judge cache  {n:>8} judgements  {ident}")
        print(f"judge cache: {sum(st.judgements.values())} judgements of {len(st.judgements)} judge(s), "
              f"{_size(st.bytes)} at {st.path}; clear with `python -m emq cache rm --judge`")
    found = entries(root)
    left = debris(root) if root.is_dir() else []
    if args.cmd in ("ls", "du", "verify") and left:
        for d in left:
            print(f"debris  {d.path.name}  {_size(d.bytes):>10}  "
                  + ("a build in progress holds it" if d.held else "left by an interrupted build"))
        print(f"{len(left)} temp dir(s), {_size(sum(d.bytes for d in left))}; remove with `python -m emq cache rm --debris`")
    if args.cmd == "ls":
        for e in found:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "never"
            print(f"{e.key}  {_gib(e.bytes):>10}  last used {used}  {e.kind}: {e.settings.get('method')}/"
                  f"{e.settings.get('merge_base')}  base={e.base}  adapter={e.adapter}")
        print(f"{len(found)} entries in {root}")
    elif args.cmd == "du":
        print(f"{_gib(sum(e.bytes for e in found))} in {len(found)} entries at {root}"
              + (f" (+ {_size(sum(d.bytes for d in left))} of debris)" if left else ""))
    elif args.cmd == "rm" and args.debris:
        gone = remove_all_debris(root)
        for d in gone:
            print(f"removed {d.path.name} ({_size(d.bytes)})")
        print(f"removed {len(gone)} temp dir(s), {_size(sum(d.bytes for d in gone))}"
              + (f"; {len(left) - len(gone)} held by a running build" if len(left) > len(gone) else ""))
    elif args.cmd == "rm":
        pick = [e for e in found if args.all or any(e.key.startswith(k) for k in args.keys)
                or (args.model and (args.model in e.adapter or args.model in e.base))]
        if not pick:
            print("nothing matched; see `python -m emq cache ls`", file=sys.stderr)
            return 1
        kept = 0
        for e in pick:
            if remove_entry(root, e.key):
                print(f"removed {e.key} ({_gib(e.bytes)})")
            else:
                kept += 1
                print(f"kept {e.key}: a running build or run holds it; retry when it has finished", file=sys.stderr)
        return 1 if kept else 0
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

