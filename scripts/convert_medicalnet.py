#!/usr/bin/env python3
"""Convert a Tencent MedicalNet checkpoint (``resnet_10_23dataset.pth``, ``resnet_50.pth``,
``resnet_50_23dataset.pth``, ...) to float32 safetensors for meduet's ``synthesis_metrics``.

Usage (in the project venv, which has torch and safetensors):

    python scripts/convert_medicalnet.py resnet_50_23dataset.pth medicalnet50.safetensors

The input is what MedicalNet's training script saved: a dict with ``state_dict`` (or a
plain state dict) whose keys carry DataParallel's ``module.`` prefix. The prefix is removed;
the segmentation head (``conv_seg.*``) and BatchNorm's ``num_batches_tracked`` counters are
dropped (meduet uses the global average of layer4 and evaluation-mode statistics). Every
other tensor is written as contiguous float32; ``VarStore::load`` in meduet then checks
every key and shape against ``torch/src/models/resnet3d.rs``.
"""

import argparse
import sys

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    a = ap.parse_args()
    obj = torch.load(a.input, map_location="cpu", weights_only=False)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        sys.exit(f"error: '{a.input}' holds no state dict")
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith("conv_seg.") or k.endswith("num_batches_tracked"):
            continue
        if not torch.is_tensor(v) or not v.is_floating_point():
            sys.exit(f"error: '{a.input}': entry '{k}' is not a floating-point tensor")
        out[k] = v.float().contiguous()
    if "conv1.weight" not in out or "layer4.0.conv1.weight" not in out:
        sys.exit(f"error: '{a.input}' does not look like a MedicalNet ResNet (no conv1/layer4)")
    save_file(out, a.output, metadata={"format": "meduet-medicalnet-v1", "source": a.input})
    print(f"wrote {len(out)} tensors to {a.output}")


if __name__ == "__main__":
    main()
