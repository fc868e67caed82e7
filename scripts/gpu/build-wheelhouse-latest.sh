#!/usr/bin/env bash
# Build a wheelhouse of vLLM 0.34.0 + torch 2.14.0 + vllm-bnb-plugin + bitsandbytes (+ hydra) for the offline
# x86_64 CPython 3.12 GPU image (torch 2.11.0+cu130 and its CUDA 13 libraries), from scripts/gpu/wheels-latest.txt,
# as one tar split into parts of at most 59 MiB.
# Usage: build-wheelhouse-latest.sh OUTDIR   → OUTDIR/p00, p01, …, OUTDIR/SHA256 (of all parts in order),
#        OUTDIR/parts.txt (part, bytes, sha256), OUTDIR/MANIFEST (wheel, bytes; also the tar's first member).
#   WITH_CUDA_LIBS=1 also packs torch 2.14's own CUDA wheels (the '#cuda' lines: cuBLAS, cuDNN, NCCL, cuSPARSELt);
#   WITH_CUDA_LIBS=nccl (a regex) only those lines that match.
# Tar order: MANIFEST, torch, triton, torchvision, the small wheels, flashinfer, vllm — so a prefix of the parts
# (p00–p08 hold torch; parts.txt says which part completes each wheel) tests torch 2.14 on the image's CUDA libs.
# On the target: scripts/gpu/with_wheelhouse_latest.sh.
set -euo pipefail
out=${1:?usage: build-wheelhouse-latest.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wh="$work/wheelhouse"
mkdir -p "$wh" "$out"
grep -v '^#' "$here/wheels-latest.txt" | grep -v '^antlr4' > "$work/req.txt"
cuda=${WITH_CUDA_LIBS:-0}; [ "$cuda" = 1 ] && cuda=.
[ "$cuda" != 0 ] && sed -n 's/^#cuda //p' "$here/wheels-latest.txt" | grep -E "$cuda" >> "$work/req.txt"
quiet() { "$@" >"$work/log" 2>&1 || { grep -v 'is ignored: it is neither' "$work/log" >&2; return 1; }; }
plats=$(for n in $(seq 5 39); do echo --platform manylinux_2_${n}_x86_64; done)
quiet env PIP_CONSTRAINT= python3 -m pip download --no-deps --only-binary=:all: -d "$wh" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none $plats \
  --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform any \
  -r "$work/req.txt"
# antlr4 4.9.3 (needed by omegaconf/hydra) exists only as an sdist: build its pure-Python wheel
quiet env PIP_CONSTRAINT= python3 -m pip wheel --no-deps -w "$wh" antlr4-python3-runtime==4.9.3

python3 - "$wh" "$work/req.txt" <<'EOF'
# Checks: one wheel per pin, nothing else; torch is the CUDA 13 build; print torch's CUDA pins.
import re, sys, zipfile, pathlib
wh, req = pathlib.Path(sys.argv[1]), sys.argv[2]
canon = lambda s: re.sub(r"[-_.]+", "-", s).lower()
want = {canon(l.split("==")[0]) for l in open(req) if l.strip()} | {"antlr4-python3-runtime"}
have = {}
for w in wh.glob("*.whl"):
    have.setdefault(canon(w.name.split("-")[0]), []).append(w.name)
bad = {k: v for k, v in have.items() if len(v) > 1} or None
missing, extra = want - set(have), set(have) - want
if bad or missing or extra:
    sys.exit(f"wheelhouse mismatch: duplicates={bad} missing={sorted(missing)} extra={sorted(extra)}")
t = zipfile.ZipFile(next(wh.glob("torch-*.whl")))
meta = t.read(next(n for n in t.namelist() if n.endswith(".dist-info/METADATA"))).decode()
pins = [l.split(":", 1)[1].strip() for l in meta.splitlines()
        if l.startswith("Requires-Dist:") and re.search(r"nvidia|cuda|triton", l)]
ver = t.read("torch/version.py").decode()
if "cuda: Optional[str] = '13." not in ver or not any("nvidia-nccl-cu13" in p for p in pins):
    sys.exit("torch wheel is not the CUDA 13 build:\n" + ver)
print("torch 2.14.0 (%s) requires:" % re.search(r"__version__ = '([^']+)'", ver)[1])
for p in pins:
    print("   ", p)
EOF

cd "$work/wheelhouse"
first="$(echo torch-*.whl triton-*.whl torchvision-*.whl)" last="$(echo flashinfer_python-*.whl vllm-*.whl)"
rest=$(ls *.whl | grep -vxF -f <(printf '%s\n' $first $last))
for f in $first $rest $last; do echo "$f $(stat -c %s "$f")"; done > MANIFEST
cd "$work"
rm -f "$out"/p?? "$out"/parts.txt
tar cf - wheelhouse/MANIFEST $(for f in $first $rest $last; do echo wheelhouse/$f; done) \
  | split -b 59m -d -a 2 - "$out/p"
cp wheelhouse/MANIFEST "$out/MANIFEST"
(cd "$out" && for p in p??; do echo "$p $(stat -c %s $p) $(sha256sum $p | cut -c1-64)"; done) > "$out/parts.txt"
# the last part each wheel needs (GNU tar: 512-byte header, a LongLink header + name blocks for names of 100+
# characters, data padded to 512; MANIFEST is the first member)
awk -v m="$(stat -c %s wheelhouse/MANIFEST)" -v part=$((59 * 1048576)) '
  function pad(n) { return 512 + int((n + 511) / 512) * 512 }
  BEGIN { off = pad(m) }
  { p = "wheelhouse/" $1; if (length(p) >= 100) off += pad(length(p) + 1); off += pad($2); printf "# %s complete with p00-p%02d\n", $1, int((off - 1) / part) }' \
  wheelhouse/MANIFEST >> "$out/parts.txt"
grep -E '^# (torch|triton)-' "$out/parts.txt"
cat "$out"/p?? | sha256sum | cut -c1-64 > "$out/SHA256"
n=$(ls wheelhouse/*.whl | wc -l)
echo "$n wheels, $(( $(du -cb "$out"/p?? | tail -1 | cut -f1) / 1048576 )) MiB, $(ls "$out"/p?? | wc -l) parts in $out"
