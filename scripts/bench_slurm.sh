#!/usr/bin/env bash
# Benchmarks of the Slurm executor against a local single-node Slurm (scripts/slurm-local):
#
# 1. Overhead per stage: a chain of N trivial stages (text -> concat -> concat ...), run by
#    the local executor and by the Slurm executor on fresh caches; the difference per
#    stage is what Slurm adds from submission to the manifest being seen.
# 2. Scheduler load: 100 independent `wait` stages (60-70 s each) all running at once,
#    with the default poll_interval (5 s); the driver counts its scheduler calls.
#
#   scripts/bench_slurm.sh [MEDUET_BIN]     (as root; restarts the local cluster with 128 CPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-${CARGO_TARGET_DIR:-target}/release/meduet}"
BIN="$(realpath "$BIN")"
WORK="$(realpath "${BENCH_DIR:-bench-data}")/slurm"
CHAIN="${CHAIN:-10}"
WIDE="${WIDE:-100}"
rm -rf "$WORK" && mkdir -p "$WORK"

was_running=0
status="$(scripts/slurm-local status 2>/dev/null || true)"
grep -q '^slurmctld running' <<<"$status" && was_running=1
scripts/slurm-local stop >/dev/null 2>&1 || true
SLURM_LOCAL_CPUS=128 scripts/slurm-local start
restore() {
    scripts/slurm-local stop
    if [ "$was_running" = 1 ]; then scripts/slurm-local start; fi
}
trap restore EXIT

secs() { date +%s.%N; }

# 1. Chain of trivial stages.
{
    echo "[stages.s0]"; echo 'kind = "text"'; echo 'text = "x"'
    for i in $(seq 1 $((CHAIN - 1))); do
        echo "[stages.s$i]"; echo 'kind = "concat"'
        echo "inputs = { parts = [\"s$((i - 1)).text\", \"s0.text\"] }"
        echo "separator = \"$i\""
    done
} >"$WORK/chain.toml"
for round in 1 2 3; do
    rm -rf "$WORK/local" "$WORK/slurm-cache"
    t0=$(secs); "$BIN" -q run "$WORK/chain.toml" --cache "$WORK/local" >/dev/null 2>&1; t1=$(secs)
    "$BIN" run "$WORK/chain.toml" --cache "$WORK/slurm-cache" --executor slurm \
        >/dev/null 2>"$WORK/chain-slurm.log"; t2=$(secs)
    python3 - "$t0" "$t1" "$t2" "$CHAIN" "$WORK/chain-slurm.log" <<'EOF'
import re, statistics, sys
t0, t1, t2, n = map(float, sys.argv[1:5])
log = open(sys.argv[5]).read()
per = [float(x) for x in re.findall(r"✓ s\d+\s+([0-9.]+)s \(job", log)]
calls = re.search(r"(\d+) scheduler call", log).group(1)
print(f"chain of {int(n)}: local {t1-t0:.2f} s, slurm {t2-t1:.2f} s -> "
      f"+{(t2-t1-(t1-t0))/n:.2f} s per stage; submit-to-manifest median {statistics.median(per):.2f} s "
      f"(min {min(per):.2f}, max {max(per):.2f}); {calls} scheduler calls")
EOF
done

# 2. 100 running jobs, default poll interval (distinct keys: 600+i steps of 100 ms).
{
    echo "[executor.slurm]"; echo "max_jobs = $WIDE"
    for i in $(seq 1 "$WIDE"); do
        echo "[stages.w$i]"; echo 'kind = "wait"'
        echo "steps = $((600 + i))"; echo "step_ms = 100"
        echo "resources = { threads = 1, memory_gb = 0.05 }"
    done
} >"$WORK/wide.toml"
t0=$(secs)
"$BIN" run "$WORK/wide.toml" --cache "$WORK/wide-cache" --executor slurm >/dev/null 2>"$WORK/wide.log"
t1=$(secs)
python3 - "$t0" "$t1" "$WIDE" "$WORK/wide.log" <<'EOF'
import re, sys
t0, t1, n = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
log = open(sys.argv[4]).read()
m = re.search(r"(\d+) job\(s\) submitted .* (\d+) scheduler call", log)
jobs, calls = int(m.group(1)), int(m.group(2))
minutes = (t1 - t0) / 60
print(f"{n} jobs running ~60 s each: run {t1-t0:.1f} s, {calls} scheduler calls "
      f"({jobs} sbatch + {calls-jobs} queries): {(calls-jobs)/minutes:.1f} queries/min, "
      f"{calls/minutes:.1f} calls/min in all")
EOF
