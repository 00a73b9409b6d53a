#!/usr/bin/env bash
# Creates or refreshes one of the project's two virtual environments.
#   scripts/install.sh serving   -> .venv        (vLLM, Ray Serve, the `serving` package)
#   scripts/install.sh quant     -> .venv-quant  (llmcompressor, for building the quantized demo variants)
# SERVING_ACCELERATOR=cpu (default) installs the CPU build of vLLM with the CPU torch;
# SERVING_ACCELERATOR=cuda installs the CUDA build for NVIDIA GPU machines.
# A stamp file holds the hash of everything that decides the install; when it matches, nothing is done,
# so running it again on an installed machine takes well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

which_env=${1:?usage: scripts/install.sh serving|quant}
PYTHON=${PYTHON:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
accelerator=${SERVING_ACCELERATOR:-cpu}
case "$accelerator" in
  cpu|cuda) ;;
  *) echo "SERVING_ACCELERATOR must be cpu or cuda, not '$accelerator'" >&2; exit 2 ;;
esac
case "$which_env" in
  serving) venv=.venv; reqs=requirements/serving-$accelerator.txt ;;
  quant) venv=.venv-quant; reqs=requirements/quant.txt ;;
  *) echo "unknown environment: $which_env (serving|quant)" >&2; exit 2 ;;
esac

stamp="$venv/.install-stamp"
want=$( (echo "$accelerator"; cat requirements/*.txt scripts/install.sh pyproject.toml) | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "==> installing the $which_env environment ($accelerator) into $venv (first time: 1-3 minutes)"
[[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
quiet_pip() {  # pip's notes about unreachable extra indexes of this machine's pip config are noise
  "${pip[@]}" install --quiet "$@" 2> >(grep -v -e "is ignored: it is neither" >&2)
}
quiet_pip --upgrade pip
if [[ "$accelerator" == cpu ]]; then
  # torch first, alone and pinned: any later requirement that names torch is then already satisfied,
  # and the resolver never reaches for the CUDA build. PIP_EXTRA_INDEX_URL may name the PyTorch CPU index.
  quiet_pip "$TORCH_SPEC"
fi
quiet_pip -r "$reqs"
if [[ "$accelerator" == cpu ]]; then
  # torchvision/torchaudio/torchcodec arrive built against the CUDA torch and break
  # `import transformers` with the CPU torch; text models need none of them.
  "${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
if [[ "$which_env" == serving ]]; then
  quiet_pip --no-deps -e .
fi
echo "$want" > "$stamp"
echo "==> $which_env environment ready"
