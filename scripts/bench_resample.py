#!/usr/bin/env python3
"""Resampling benchmark: meduet vs SimpleITK `Resample` (linear) vs `scipy.ndimage.affine_transform(order=1)`.

The same 512 x 512 x 300 int16 CT-like volume at 0.7 x 0.7 x 2.5 mm (LPS header, as DICOM
converters write it) is resampled to 1.5 mm isotropic on the *same output grid* (meduet's:
reoriented to RAS, MONAI `Spacingd` convention) with the same number of threads. Only the
resampling is timed (the volume is already in memory as float32); meduet's time also
includes its reorientation to RAS. Outputs are compared voxel by voxel.

Then the phantom generation and the phantom -> ingest -> resample throughput on the same
thread count.

Usage (from the repository root, with the project venv):
    . scripts/env.sh && cargo build --release -p meduet-stages --example bench_resample
    python scripts/bench_resample.py --threads 2
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import scipy
import scipy.ndimage as ndi
import SimpleITK as sitk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "examples", "bench_resample")


def make_ct(path, shape=(512, 512, 300), spacing=(0.7, 0.7, 2.5), seed=0):
    """A CT-like int16 volume: air, an elliptic body with smooth structures, noise."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    coarse = rng.normal(size=(nx // 16 + 2, ny // 16 + 2, nz // 8 + 2)).astype(np.float32)
    smooth = ndi.zoom(coarse, (nx / (coarse.shape[0] - 1), ny / (coarse.shape[1] - 1), nz / (coarse.shape[2] - 1)), order=1)[:nx, :ny, :nz]
    x = (np.arange(nx, dtype=np.float32) - nx / 2) * spacing[0]
    y = (np.arange(ny, dtype=np.float32) - ny / 2) * spacing[1]
    r = np.sqrt((x[:, None] / 160.0) ** 2 + (y[None, :] / 115.0) ** 2)
    body = (r < 1.0)[:, :, None]
    hu = np.where(body, 40.0 + 60.0 * smooth, -1000.0).astype(np.float32)
    hu += rng.normal(scale=15.0, size=shape).astype(np.float32)
    data = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [nx / 2 * spacing[0], ny / 2 * spacing[1], -nz / 2 * spacing[2]]
    nib.save(nib.Nifti1Image(data, affine), path)
    return data, affine


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bin", default=BIN)
    args = ap.parse_args()
    if not os.path.exists(args.bin):
        sys.exit(f"{args.bin} not found: cargo build --release -p meduet-stages --example bench_resample")
    t = args.threads
    os.environ["RAYON_NUM_THREADS"] = str(t)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(t)
    report = {"threads": t, "load_average_before": os.getloadavg(), "versions": {
        "SimpleITK": sitk.Version_VersionString(), "scipy": scipy.__version__, "numpy": np.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        ct = os.path.join(tmp, "ct.nii")
        data, affine = make_ct(ct)
        ours_path = os.path.join(tmp, "ours.nii")
        out = subprocess.run([args.bin, "resample", ct, "--threads", str(t), "--repeats", str(args.repeats), "--out", ours_path],
                             check=True, capture_output=True, text=True).stdout
        ours = json.loads(out.strip().splitlines()[-1])
        o_img = nib.load(ours_path)
        o = np.asarray(o_img.dataobj, dtype=np.float32)
        o_aff = o_img.affine
        shape = tuple(int(s) for s in o.shape)
        # The output grid in ITK's LPS world: RAS (x, y) -> LPS (-x, -y).
        flip = np.diag([-1.0, -1.0, 1.0])
        direction = (flip @ (o_aff[:3, :3] / 1.5)).flatten().tolist()
        origin = (flip @ o_aff[:3, 3]).tolist()
        f32 = data.astype(np.float32)
        img = sitk.GetImageFromArray(np.ascontiguousarray(f32.transpose(2, 1, 0)))
        img.SetSpacing((0.7, 0.7, 2.5))
        img.SetOrigin((flip @ affine[:3, 3]).tolist())
        img.SetDirection((flip @ (affine[:3, :3] @ np.diag([1 / 0.7, 1 / 0.7, 1 / 2.5]))).flatten().tolist())

        def run_sitk(src):
            return sitk.Resample(src, shape, sitk.Transform(), sitk.sitkLinear, origin, (1.5, 1.5, 1.5), direction, 0.0, sitk.sitkFloat32)

        sitk_s, s_img = best_of(lambda: run_sitk(img), args.repeats)
        img16 = sitk.Cast(img, sitk.sitkInt16)
        sitk16_s, _ = best_of(lambda: run_sitk(img16), args.repeats)
        s = sitk.GetArrayFromImage(s_img).transpose(2, 1, 0)
        # scipy: output voxel o -> input voxel inv(A_in) A_out o (diagonal here).
        m = np.linalg.inv(affine) @ o_aff
        diag, offset = np.diag(m)[:3].copy(), m[:3, 3].copy()

        def run_scipy(n):
            out = np.empty(shape, np.float32)
            bounds = np.linspace(0, shape[0], n + 1).astype(int)

            def part(a, b):
                off = offset + diag * np.array([a, 0, 0])
                out[a:b] = ndi.affine_transform(f32, diag, offset=off, output_shape=(b - a,) + shape[1:], order=1, mode="nearest", prefilter=False)
            with ThreadPoolExecutor(n) as ex:
                list(ex.map(lambda ab: part(*ab), zip(bounds[:-1], bounds[1:])))
            return out

        scipy1_s, c = best_of(lambda: run_scipy(1), args.repeats)
        scipyt_s, _ = best_of(lambda: run_scipy(t), args.repeats)
        # Compare where every output voxel lies inside the input's voxel-centre hull.
        inside = np.ones(shape, bool)
        for ax in range(3):
            idx = np.arange(shape[ax]) * abs(diag[ax])
            ok = (idx <= data.shape[ax] - 1 + 1e-6)
            sl = [None, None, None]
            sl[ax] = slice(None)
            inside &= ok[tuple(sl)]
        report["resample"] = {
            "input": {"shape": list(data.shape), "dtype": "int16", "spacing": [0.7, 0.7, 2.5], "orientation": "LPS"},
            "output_shape": list(shape),
            "meduet_seconds": ours["resample_seconds_min"],
            "meduet_read_seconds": ours["read_seconds"],
            "sitk_float32_seconds": sitk_s,
            "sitk_int16_seconds": sitk16_s,
            "scipy_1_thread_seconds": scipy1_s,
            f"scipy_{t}_threads_seconds": scipyt_s,
            "max_abs_diff_vs_sitk": float(np.abs(o - s)[inside].max()),
            "max_abs_diff_vs_scipy": float(np.abs(o - c)[inside].max()),
            "ratio_sitk_over_meduet": sitk_s / ours["resample_seconds_min"],
            "ratio_scipy_over_meduet": min(scipy1_s, scipyt_s) / ours["resample_seconds_min"],
        }
    for mode in ["phantom", "pipeline"]:
        out = subprocess.run([args.bin, mode, "--threads", str(t)], check=True, capture_output=True, text=True).stdout
        report[mode] = json.loads(out.strip().splitlines()[-1])
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
