"""DiT/SiT training-step benchmark: the tch engine against the PyTorch reference.

One step = DDPM epsilon loss (or SiT velocity loss) with content/style dropout p = 0.2,
backward, AdamW (lr 5e-5, wd 0) and the EMA update (0.9999, the authors' mul_/add_), same
threads. PyTorch side: ``reference/dit_ref.py`` (eager); tch side: the ``bench_dit_step``
example (``scripts/bench_dit_step.sh`` builds it first).

    python scripts/bench_dit_step.py [--threads 2] [--runs tiny:dit:4:10:2,b4:dit:1:3:1] [--rounds 2]

Each run is ``size:method:batch:steps:warmup``; the best median of alternating rounds is kept.
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

SIZES = {
    "tiny": dict(input_size=[16, 16, 16], hidden_size=96, depth=2, num_heads=4, num_classes=0),
    "small": dict(input_size=[16, 16, 16], hidden_size=288, depth=2, num_heads=6, num_classes=0),
    "b4": dict(input_size=[64, 64, 32], hidden_size=768, depth=12, num_heads=12, num_classes=1000),
}


def bench_python(size, method, batch, steps, warmup, threads):
    import torch
    import dit_ref as R

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = SIZES[size]
    cfg = dict(in_chans=4, patch=4, mlp_ratio=4.0, learn_sigma=True, condition="factors",
               adaln="code", content_dim=s["hidden_size"], style_dim=s["hidden_size"] // 4,
               metadata_dim=0, tau_init=0.1, learnable_tau=True, **s)
    model = R.initialize_weights(R.DiT(cfg))
    ema = R.DiT(cfg)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0)
    x1 = torch.randn(batch, 4, *cfg["input_size"])
    c = torch.randn(batch, cfg["content_dim"])
    st = torch.randn(batch, cfg["style_dim"])
    ac = torch.cumprod(1 - R.linear_betas(1000), 0)
    gen = torch.Generator().manual_seed(0)
    times, losses = [], []
    for it in range(warmup + steps):
        t0 = time.perf_counter()
        drop = (torch.rand(batch, generator=gen) < 0.2, torch.rand(batch, generator=gen) < 0.2)
        loss = R.training_loss(model, method, x1, [c, st], drop, ac, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            ep = dict(ema.named_parameters())
            for n, p in model.named_parameters():
                ep[n].mul_(0.9999).add_(p.data, alpha=1 - 0.9999)
        losses.append(loss.item())
        if it >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return {"impl": "pytorch", "ms_per_step": statistics.median(times), "ms_min": min(times),
            "loss_first": losses[0], "loss_last": losses[-1]}


def bench_rust(size, method, batch, steps, warmup, threads):
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    exe = os.path.join(target, "release", "examples", "bench_dit_step")
    if not os.path.exists(exe):
        sys.exit(f"{exe} is missing (hint: run scripts/bench_dit_step.sh, which builds it)")
    out = subprocess.run([exe, "--size", size, "--method", method, "--batch", str(batch),
                          "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="tiny:dit:4:10:2,tiny:sit:4:10:2,b4:dit:1:3:1")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    print(f"DiT/SiT training step (loss + bwd + AdamW + EMA), {args.threads} threads")
    print(f"{'size':5} {'method':6} {'batch':>5} {'pytorch ms':>11} {'tch ms':>9} {'tch/pytorch':>12}")
    for run in args.runs.split(","):
        size, method, batch, steps, warmup = run.split(":")
        batch, steps, warmup = int(batch), int(steps), int(warmup)
        py = rs = None
        for _ in range(args.rounds):
            p = bench_python(size, method, batch, steps, warmup, args.threads)
            r = bench_rust(size, method, batch, steps, warmup, args.threads)
            py = p if py is None or p["ms_per_step"] < py["ms_per_step"] else py
            rs = r if rs is None or r["ms_per_step"] < rs["ms_per_step"] else rs
        print(f"{size:5} {method:6} {batch:5d} {py['ms_per_step']:11.1f} {rs['ms_per_step']:9.1f} "
              f"{rs['ms_per_step'] / py['ms_per_step']:12.3f}", flush=True)


if __name__ == "__main__":
    main()
