#!/usr/bin/env bash
# ControlNet training-step benchmark: the tch engine (torch/examples/bench_controlnet_step.rs)
# against the PyTorch reference (reference/controlnet_ref.py), same threads. Arguments go to
# scripts/bench_controlnet_step.py (e.g. --threads 2 --runs tiny:2:10:2 --rounds 2).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo build --release -p meduet-torch --example bench_controlnet_step
exec "$MEDUET_VENV/bin/python" scripts/bench_controlnet_step.py "$@"
