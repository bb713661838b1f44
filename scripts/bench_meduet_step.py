"""MeDUET training-step benchmark: the tch engine against the PyTorch reference.

One step = forward, every loss with MFTD on, backward, clip_grad_norm(1.0), AdamW step (timm
weight-decay groups, betas 0.9/0.95, wd 1e-2) and the EMA-teacher update, on the same threads.
The PyTorch side is ``reference/meduet_ref.py`` (eager); the tch side is the
``bench_meduet_step`` example (run ``scripts/bench_meduet_step.sh``, which builds it first).

    python scripts/bench_meduet_step.py [--threads 2] [--runs tiny:4:20:3,vit_b:2:3:1] [--rounds 2]

Each run is ``size:batch:steps:warmup``; the median step time is reported (with ``--rounds``,
the best median of alternating rounds). ``$CARGO_TARGET_DIR`` locates the tch example.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "reference"))


def bench_python(size, batch, steps, warmup, threads):
    import torch
    import meduet_ref as R

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = R.default_config(size)
    student = R.MeDUET(cfg)
    teacher = R.make_teacher(student)
    scales = R.SiQCScales(cfg)
    opt = torch.optim.AdamW(R.param_groups_weight_decay(student, 1e-2), lr=1e-4, betas=(0.9, 0.95))
    x = torch.randn(batch, cfg["in_chans"], cfg["crop"], cfg["crop"], cfg["crop"])
    domain = torch.arange(batch) % cfg["n_domains"]
    gen = torch.Generator().manual_seed(0)
    L = (cfg["crop"] // cfg["patch"]) ** 3
    total = warmup + steps
    times, losses = [], []
    for it in range(total):
        M = R.random_mixing(batch, L, cfg["mask_ratio"], gen)
        t0 = time.perf_counter()
        out = R.forward_losses(student, teacher, scales, x, domain, M, cfg, mftd_on=True)
        loss = out["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm=1.0)
        opt.step()
        R.update_ema(teacher, student, R.ema_momentum(it, total))
        losses.append(loss.item())
        dt = (time.perf_counter() - t0) * 1e3
        if it >= warmup:
            times.append(dt)
    return {"impl": "pytorch", "size": size, "batch": batch, "threads": threads,
            "ms_per_step": statistics.median(times), "ms_min": min(times), "steps": len(times),
            "loss_first": losses[0], "loss_last": losses[-1]}


def bench_rust(size, batch, steps, warmup, threads):
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    exe = os.path.join(target, "release", "examples", "bench_meduet_step")
    if not os.path.exists(exe):
        sys.exit(f"{exe} is missing (hint: run scripts/bench_meduet_step.sh, which builds it)")
    out = subprocess.run([exe, "--size", size, "--batch", str(batch), "--steps", str(steps),
                          "--warmup", str(warmup), "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="tiny:4:20:3,vit_b:2:3:1",
                    help="comma-separated size:batch:steps:warmup")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate python/tch this many times, keep each one's best median")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    results = []
    print(f"MeDUET training step (fwd + all losses incl. MFTD + bwd + clip + AdamW + EMA), "
          f"{args.threads} threads")
    print(f"{'size':6} {'batch':>5} {'pytorch ms':>11} {'tch ms':>9} {'tch/pytorch':>12}")
    for run in args.runs.split(","):
        size, batch, steps, warmup = run.split(":")
        batch, steps, warmup = int(batch), int(steps), int(warmup)
        # alternate the two implementations; keep each one's best median (shared machines)
        py = rs = None
        for _ in range(args.rounds):
            p = bench_python(size, batch, steps, warmup, args.threads)
            r = bench_rust(size, batch, steps, warmup, args.threads)
            py = p if py is None or p["ms_per_step"] < py["ms_per_step"] else py
            rs = r if rs is None or r["ms_per_step"] < rs["ms_per_step"] else rs
        ratio = rs["ms_per_step"] / py["ms_per_step"]
        print(f"{size:6} {batch:5d} {py['ms_per_step']:11.1f} {rs['ms_per_step']:9.1f} "
              f"{ratio:12.3f}", flush=True)
        results.append({"size": size, "batch": batch, "pytorch": py, "tch": rs, "ratio": ratio})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
