#!/usr/bin/env bash
# On the GPU machine: install the wheelhouse stashed by earlier device calls (once per machine), put the demo GGUF
# together, then run the given command with vLLM 0.23 + bitsandbytes + hydra importable.
#   earlier calls, one per part: mkdir -p /root/stash && cp .gpu/wh/pNN /root/stash/   (carry .gpu/wh/pNN)
#                                mkdir -p /root/stash && cp .gpu/gguf/gNN /root/stash/ (carry .gpu/gguf/gNN)
#   then:  bash scripts/gpu/with_wheelhouse.sh python3 scripts/gpu/w4a16_check.py demo /root/demo/SmolLM2-135M-Instruct.Q4_1.gguf .gpu/adapter a
set -euo pipefail
if [ ! -f /root/site/.emq-installed ]; then
  t0=$(date +%s)
  cat /root/stash/p?? > /root/wh.tar && tar xf /root/wh.tar -C /root && rm /root/wh.tar
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site /root/wheelhouse/*.whl
  touch /root/site/.emq-installed
  echo "wheelhouse installed in $(( $(date +%s) - t0 )) s"
fi
if ls /root/stash/g?? >/dev/null 2>&1 && [ ! -f /root/demo/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /root/demo && cat /root/stash/g?? > /root/demo/SmolLM2-135M-Instruct.Q4_1.gguf
fi
export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
exec "$@"
