#!/usr/bin/env bash
# On the GPU machine: install the vLLM 0.34 / torch 2.14 wheelhouse (build-wheelhouse-latest.sh) stashed by
# earlier device calls, then run the given command with it first on PYTHONPATH.
#   earlier calls, one per part:  mkdir -p /root/stash34 && cp .gpu/wh34/pNN /root/stash34/   (carry .gpu/wh34/pNN)
#   then:  bash scripts/gpu/with_wheelhouse_latest.sh python3 -c 'import torch, vllm; print(vllm.__version__)'
# A prefix of the parts is enough for what it holds (p00–p08: torch): the wheels complete so far are installed,
# the rest on a later call once their parts are there (parts.txt: which part completes each wheel).
# torch 2.14 in /root/site34 shadows the image's torch 2.11 and loads the image's CUDA 13 libraries (below).
set -euo pipefail
site=${SITE34:-/root/site34} stash=${STASH34:-/root/stash34} tmp=${SITE34:-/root/site34}.wh
wh=$tmp/wheelhouse
mkdir -p "$site" && touch "$site/.emq-installed"
if [ ! -f "$site/.emq-complete" ]; then
  t0=$(date +%s)
  mkdir -p "$tmp"
  cat "$stash"/p?? | tar xf - -C "$tmp" 2>/dev/null || true  # a prefix of the parts ends mid-member
  cp "$wh/MANIFEST" "$site/.emq-manifest"
  todo=$(while read -r f n; do
           [ "$(stat -c %s "$wh/$f" 2>/dev/null)" = "$n" ] && ! grep -qxF "$f" "$site/.emq-installed" && echo "$f"
         done < "$site/.emq-manifest"; true)
  if [ -n "$todo" ]; then
    (cd "$wh" && python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" $todo) \
      > "$tmp/pip.log" 2>&1 || { cat "$tmp/pip.log"; exit 1; }
    printf '%s\n' $todo >> "$site/.emq-installed"
  fi
  left=$(( $(wc -l < "$site/.emq-manifest") - $(sort -u "$site/.emq-installed" | wc -l) ))
  echo "wheelhouse: $(echo $todo | wc -w) wheels installed in $(( $(date +%s) - t0 )) s, $left to come" >&2
  if [ "$left" = 0 ]; then touch "$site/.emq-complete"; rm -rf "$tmp"; fi
fi
# Without torch's own CUDA wheels (the default build): point its RPATH $ORIGIN/../../nvidia/… at the image's
# nvidia/ (cu13/lib, cudnn/lib, nccl/lib, …), and bind lazily: libtorch_cuda calls 11 NCCL functions that the
# image's NCCL 2.28.9 lacks (ncclCommGrow, ncclSignal, …; only used by features that need NCCL 2.30).
# With some of them (WITH_CUDA_LIBS), torch's own fallback preloads each library from the first sys.path entry.
if ! grep -q '^nvidia_\(cublas\|cudnn_cu\|nccl\|cusparselt\)' "$site/.emq-manifest"; then
  [ -e "$site/nvidia" ] || ln -s "$(env -u PYTHONPATH python3 -c 'import nvidia, os
print(next(p for p in nvidia.__path__ if os.path.isdir(p + "/cu13/lib")))')" "$site/nvidia"
  export TORCH_USE_RTLD_GLOBAL=${TORCH_USE_RTLD_GLOBAL-1}  # torch then dlopens libtorch with RTLD_LAZY
fi
# the image's cuDNN 9.19 is older than the 9.24 torch 2.14 was built with; torch refuses it unless told
export PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK=${PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK-1}
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
exec "$@"
