#!/usr/bin/env bash
# Creates or refreshes one of the project's two virtual environments.
#   scripts/install.sh serving   -> .venv        (vLLM CPU build, Ray Serve, the `serving` package)
#   scripts/install.sh quant     -> .venv-quant  (llmcompressor, for building the quantized demo variants)
# A stamp file holds the hash of everything that decides the install; when it matches, nothing is done,
# so running it again on an installed machine takes well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

which_env=${1:?usage: scripts/install.sh serving|quant}
PYTHON=${PYTHON:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
case "$which_env" in
  serving) venv=.venv; reqs=requirements/serving.txt ;;
  quant) venv=.venv-quant; reqs=requirements/quant.txt ;;
  *) echo "unknown environment: $which_env (serving|quant)" >&2; exit 2 ;;
esac

stamp="$venv/.install-stamp"
want=$(cat "$reqs" scripts/install.sh pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "==> installing the $which_env environment into $venv (first time: 1-3 minutes)"
[[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
quiet_pip() {  # pip's notes about unreachable extra indexes of this machine's pip config are noise
  "${pip[@]}" install --quiet "$@" 2> >(grep -v -e "is ignored: it is neither" >&2)
}
quiet_pip --upgrade pip
# torch first, alone and pinned: any later requirement that names torch is then already satisfied,
# and the resolver never reaches for the CUDA build. PIP_EXTRA_INDEX_URL may point at the PyTorch CPU index.
quiet_pip "$TORCH_SPEC"
quiet_pip -r "$reqs"
# Quirk 1: torchvision/torchaudio/torchcodec arrive built against CUDA torch and break
# `import transformers` with the CPU torch; text models need none of them.
"${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
if [[ "$which_env" == serving ]]; then
  quiet_pip --no-deps -e .
fi
echo "$want" > "$stamp"
echo "==> $which_env environment ready"
