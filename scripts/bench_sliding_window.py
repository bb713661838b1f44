#!/usr/bin/env python3
"""Sliding-window inference throughput: meduet (tch) vs MONAI's `sliding_window_inference`.

Both run the same network with the same weights on the same volume: MONAI's `DynUNet`
(kernels 3, strides 1/2/2/2, filters 16/32/64/128, instance norm with affine, leaky ReLU;
meduet's `Unet` has its topology and parameter names), roi 48^3, overlap 0.5, Gaussian
blending (sigma 0.125 roi), sw_batch 4, fp32, CPU, no grad. The weights are random
(throughput only) and exported to safetensors for the tch side; the outputs' checksums are
compared too.

    python3 scripts/bench_sliding_window.py --threads 2 --volume 96,96,96 --runs 3 --rounds 3
"""
import argparse, json, os, subprocess, sys, tempfile, time

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet
from safetensors.torch import save_file

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--volume", default="96,96,96")
ap.add_argument("--roi", type=int, default=48)
ap.add_argument("--overlap", type=float, default=0.5)
ap.add_argument("--sw-batch", type=int, default=4)
ap.add_argument("--runs", type=int, default=3)
ap.add_argument("--rounds", type=int, default=3, help="alternate the two implementations this many times; best of all")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.set_num_interop_threads(1)
vol = [int(v) for v in a.volume.split(",")]
torch.manual_seed(0)
net = DynUNet(3, 1, 3, kernel_size=[3] * 4, strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2],
              filters=[16, 32, 64, 128], norm_name=("INSTANCE", {"affine": True}), deep_supervision=False,
              res_block=False).eval()
x = torch.rand(1, 1, *vol)
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with tempfile.TemporaryDirectory() as d:
    w = os.path.join(d, "w.safetensors")
    save_file({k: v.contiguous().clone() for k, v in net.state_dict().items() if not k.startswith("skip_layers.")}, w)
    inp = os.path.join(d, "x.safetensors")
    save_file({"x": x}, inp)
    exe = os.path.join(root, "target", "release", "examples", "bench_sliding_window")
    times, ours = [], None
    for _ in range(a.rounds):
        with torch.no_grad():
            for r in range(a.runs + 1):
                t0 = time.perf_counter()
                out = sliding_window_inference(x, (a.roi,) * 3, a.sw_batch, net, overlap=a.overlap, mode="gaussian",
                                               sigma_scale=0.125)
                dt = time.perf_counter() - t0
                if r > 0:
                    times.append(dt)
        res = subprocess.run([exe, "--weights", w, "--input", inp, "--roi", str(a.roi), "--overlap", str(a.overlap),
                              "--sw-batch", str(a.sw_batch), "--runs", str(a.runs), "--threads", str(a.threads)],
                             capture_output=True, text=True, check=True)
        o = json.loads(res.stdout.strip().splitlines()[-1])
        if ours is None or o["best_s"] < ours["best_s"]:
            ours = o
    times.sort()
    vox = vol[0] * vol[1] * vol[2]
    monai = {"impl": "MONAI sliding_window_inference (PyTorch eager)", "best_s": times[0],
             "median_s": times[len(times) // 2], "voxels_per_s": vox / times[0],
             "checksum": float(out.double().sum())}
print(json.dumps(monai))
print(json.dumps(ours))
print(json.dumps({"tch_over_monai_time": ours["best_s"] / monai["best_s"],
                  "checksum_rel_diff": abs(ours["checksum"] - monai["checksum"]) / max(abs(monai["checksum"]), 1e-12),
                  "load_average": os.getloadavg()}))
