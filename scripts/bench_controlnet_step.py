"""ControlNet training-step benchmark: the tch engine against the PyTorch reference.

One step = the frozen DiT (``reference/dit_ref.py``) with a ControlNet copying half its blocks
(``reference/controlnet_ref.py``; mask encoder widths [8, 32, 64], 5-class one-hot mask at 4x
the latent grid), the DDPM epsilon loss with content/style dropout 0.2 and mask dropout 0.1,
backward through the ControlNet only, AdamW (lr 1e-4, wd 0) and the EMA update (0.9999), same
threads. tch side: the ``bench_controlnet_step`` example (built by
``scripts/bench_controlnet_step.sh``).

    python scripts/bench_controlnet_step.py [--threads 2] [--runs tiny:2:10:2] [--rounds 2]

Each run is ``size:batch:steps:warmup``; the best median of alternating rounds is kept.
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
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench_dit_step import SIZES  # noqa: E402  (same DiT sizes)


def bench_python(size, batch, steps, warmup, threads):
    import torch
    import dit_ref as D
    import controlnet_ref as C

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = SIZES[size]
    cfg = dict(in_chans=4, patch=4, mlp_ratio=4.0, learn_sigma=True, condition="factors",
               adaln="code", content_dim=s["hidden_size"], style_dim=s["hidden_size"] // 4,
               metadata_dim=0, tau_init=0.1, learnable_tau=True, **s)
    ccfg = dict(mask_channels=5, depth=max(cfg["depth"] // 2, 1), embedding_channels=[8, 32, 64],
                scale=4)
    base = D.initialize_weights(D.DiT(cfg))
    base.requires_grad_(False)
    control = C.ControlNet(cfg, ccfg)
    control.copy_base_blocks(base)
    ema = C.ControlNet(cfg, ccfg)
    ema.load_state_dict(control.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(control.parameters(), lr=1e-4, weight_decay=0)
    x1 = torch.randn(batch, 4, *cfg["input_size"])
    c = torch.randn(batch, cfg["content_dim"])
    st = torch.randn(batch, cfg["style_dim"])
    classes = torch.randint(0, 5, (batch, *[n * 4 for n in cfg["input_size"]]))
    onehot = torch.nn.functional.one_hot(classes, 5).permute(0, 4, 1, 2, 3).float()
    ac = torch.cumprod(1 - D.linear_betas(1000), 0)
    gen = torch.Generator().manual_seed(0)
    times, losses = [], []
    for it in range(warmup + steps):
        t0 = time.perf_counter()
        drop = (torch.rand(batch, generator=gen) < 0.2, torch.rand(batch, generator=gen) < 0.2)
        keep = (torch.rand(batch, generator=gen) >= 0.1).float().view(-1, 1, 1, 1, 1)
        loss = C.training_loss(base, control, "dit", x1, [c, st], drop, onehot * keep, ac, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            ep = dict(ema.named_parameters())
            for n, p in control.named_parameters():
                ep[n].mul_(0.9999).add_(p.data, alpha=1 - 0.9999)
        losses.append(loss.item())
        if it >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return {"impl": "pytorch", "ms_per_step": statistics.median(times), "ms_min": min(times),
            "loss_first": losses[0], "loss_last": losses[-1]}


def bench_rust(size, batch, steps, warmup, threads):
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    exe = os.path.join(target, "release", "examples", "bench_controlnet_step")
    if not os.path.exists(exe):
        sys.exit(f"{exe} is missing (hint: run scripts/bench_controlnet_step.sh, which builds it)")
    out = subprocess.run([exe, "--size", size, "--batch", str(batch), "--steps", str(steps),
                          "--warmup", str(warmup), "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="tiny:2:10:2")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    print(f"ControlNet training step (loss + bwd + AdamW + EMA), {args.threads} threads")
    print(f"{'size':5} {'batch':>5} {'pytorch ms':>11} {'tch ms':>9} {'tch/pytorch':>12}")
    for run in args.runs.split(","):
        size, batch, steps, warmup = run.split(":")
        batch, steps, warmup = int(batch), int(steps), int(warmup)
        py = rs = None
        for _ in range(args.rounds):
            p = bench_python(size, batch, steps, warmup, args.threads)
            r = bench_rust(size, batch, steps, warmup, args.threads)
            py = p if py is None or p["ms_per_step"] < py["ms_per_step"] else py
            rs = r if rs is None or r["ms_per_step"] < rs["ms_per_step"] else rs
        print(f"{size:5} {batch:5d} {py['ms_per_step']:11.1f} {rs['ms_per_step']:9.1f} "
              f"{rs['ms_per_step'] / py['ms_per_step']:12.3f}", flush=True)


if __name__ == "__main__":
    main()
