#!/usr/bin/env python3
"""Convert a MONAI MAISI VAE checkpoint (``autoencoder.pt``) to float32 safetensors for meduet.

Usage (in the project venv, which has torch and safetensors):

    python scripts/convert_maisi.py autoencoder.pt maisi_vae.safetensors

The input is what ``torch.save`` wrote: either a plain state dict of ``AutoencoderKlMaisi``
(MONAI bundle ``maisi_ct_generative`` ``models/autoencoder.pt``, NV-Generate-CT
``autoencoder_v1.pt``) or a dict wrapping it under ``state_dict``, ``model``,
``model_state_dict``, ``autoencoder`` or ``net``. A ``module.`` prefix (DataParallel) is
removed. Checkpoints of the older MONAI-generative layout (for example
``autoencoder_epoch273.pt``), whose encoder/decoder convolutions are named ``...conv.weight``
where MONAI >= 1.4 has ``...conv.conv.weight``, are remapped as the MAISI tutorials do:
in every ``encoder.``/``decoder.`` key containing ``conv``, ``conv.weight`` becomes
``conv.conv.weight`` and ``conv.bias`` becomes ``conv.conv.bias``. The layout is detected
from ``encoder.blocks.0`` (the first convolution), never guessed per key.

Floating-point tensors are written as contiguous float32; any other entry is an error.
meduet's ``load_vae_safetensors`` then checks every key and shape against the network.
Only torch and safetensors are needed (no MONAI).
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict

import torch
from safetensors.torch import save_file

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "autoencoder", "net")
FORMAT = "meduet-maisi-vae-v1"


def unwrap(obj, source: str) -> dict:
    """Returns the state dict inside a checkpoint object."""
    if not isinstance(obj, dict):
        raise SystemExit(f"error: '{source}' holds a {type(obj).__name__}, expected a state dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for k in WRAPPER_KEYS:
        if k in obj and isinstance(obj[k], dict):
            return unwrap(obj[k], f"{source}['{k}']")
    raise SystemExit(
        f"error: '{source}' is a dict with keys {sorted(map(str, obj))[:10]} "
        f"but neither tensors only nor one of {WRAPPER_KEYS}"
    )


def strip_prefix(sd: dict) -> dict:
    if sd and all(k.startswith("module.") for k in sd):
        return OrderedDict((k[len("module.") :], v) for k, v in sd.items())
    return sd


def layout(sd: dict) -> str:
    """'new' (MONAI >= 1.4, conv.conv.weight) or 'old' (MONAI generative, conv.weight)."""
    if "encoder.blocks.0.conv.conv.weight" in sd:
        return "new"
    if "encoder.blocks.0.conv.weight" in sd:
        return "old"
    raise SystemExit(
        "error: no 'encoder.blocks.0.conv.conv.weight' nor 'encoder.blocks.0.conv.weight': "
        "this is not a MAISI AutoencoderKlMaisi state dict "
        f"(first keys: {list(sd)[:5]})"
    )


def remap_old(key: str) -> str:
    """The MAISI tutorials' remapping of old-layout keys."""
    if ("encoder" in key or "decoder" in key) and "conv" in key:
        if "conv.weight" in key:
            return key.replace("conv.weight", "conv.conv.weight")
        return key.replace("conv.bias", "conv.conv.bias")
    return key


def convert(sd: dict) -> tuple[OrderedDict, str]:
    sd = strip_prefix(sd)
    kind = layout(sd)
    out = OrderedDict()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise SystemExit(f"error: entry '{k}' is not a floating-point tensor ({type(v).__name__})")
        nk = remap_old(k) if kind == "old" else k
        if nk in out:
            raise SystemExit(f"error: two entries map to '{nk}'")
        out[nk] = v.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return out, kind


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="MONAI checkpoint (.pt), e.g. autoencoder.pt")
    ap.add_argument("output", help="safetensors file to write")
    ap.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load with weights_only=False (only for trusted files that hold non-tensor objects)",
    )
    args = ap.parse_args(argv)
    obj = torch.load(args.input, map_location="cpu", weights_only=not args.allow_pickle)
    sd, kind = convert(unwrap(obj, args.input))
    save_file(sd, args.output, metadata={"format": FORMAT, "source_layout": kind})
    n = sum(v.numel() for v in sd.values())
    print(f"{args.output}: {len(sd)} tensors, {n} parameters, float32 (source layout: {kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
