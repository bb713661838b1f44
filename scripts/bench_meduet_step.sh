#!/usr/bin/env bash
# MeDUET training-step benchmark: the tch engine (torch/examples/bench_meduet_step.rs) against
# the PyTorch reference (reference/meduet_ref.py), same threads. Arguments go to
# scripts/bench_meduet_step.py (e.g. --threads 2 --runs tiny:4:20:3,vit_b:2:3:1).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo build --release -p meduet-torch --example bench_meduet_step
exec "$MEDUET_VENV/bin/python" scripts/bench_meduet_step.py "$@"
