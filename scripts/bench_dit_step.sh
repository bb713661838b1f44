#!/usr/bin/env bash
# DiT/SiT training-step benchmark: the tch engine (torch/examples/bench_dit_step.rs) against the
# PyTorch reference (reference/dit_ref.py), same threads. Arguments go to
# scripts/bench_dit_step.py (e.g. --threads 2 --runs tiny:dit:4:10:2,b4:dit:1:3:1 --rounds 2).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo build --release -p meduet-torch --example bench_dit_step
exec "$MEDUET_VENV/bin/python" scripts/bench_dit_step.py "$@"
