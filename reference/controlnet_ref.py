"""meduet's DiT ControlNet in plain PyTorch: the reference for ``torch/src/models/controlnet.rs``.

Written for this project (the MeDUET authors released no ControlNet). The mask encoder is
MONAI's ``ControlNetConditioningEmbedding`` (conv_in 3^3 + SiLU; per width pair a 3^3 conv +
SiLU and a stride-2 3^3 conv + SiLU) ending in a zero-initialised patch embedding to DiT
tokens; the trainable copy of the first N DiT blocks and the zero-initialised linear
projections follow PixArt-delta's ControlNet-Transformer. Module names equal the tch
variable names, so a ``VarStore`` saved by meduet loads here with ``strict=True``:

    cond_embedding.conv_in.conv.*, cond_embedding.blocks.{j}.conv.*,
    cond_embedding.patch_embed.proj.*, blocks.{i}.*, zero_projs.{i}.*

Configuration: the base DiT's dict (see ``dit_ref``) and the ControlNet's dict with the
field names of the Rust ``ControlConfig``: ``mask_channels, depth, embedding_channels, scale``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import dit_ref as D


class Conv(nn.Module):
    """MONAI's ``Convolution(conv_only=True)``: the convolution lives in ``.conv``."""

    def __init__(self, cin, cout, k, stride, padding):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, k, stride, padding)

    def forward(self, x):
        return self.conv(x)


class ConditioningEmbedding(nn.Module):
    def __init__(self, ccfg, hidden, patch):
        super().__init__()
        ch = ccfg["embedding_channels"]
        self.conv_in = Conv(ccfg["mask_channels"], ch[0], 3, 1, 1)
        blocks = []
        for a, b in zip(ch[:-1], ch[1:]):
            blocks.append(Conv(a, a, 3, 1, 1))
            blocks.append(Conv(a, b, 3, 2, 1))
        self.blocks = nn.ModuleList(blocks)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(ch[-1], hidden, patch, patch)
        nn.init.zeros_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward(self, mask):
        h = F.silu(self.conv_in(mask))
        for b in self.blocks:
            h = F.silu(b(h))
        return self.patch_embed.proj(h).flatten(2).transpose(1, 2)


class ControlNet(nn.Module):
    def __init__(self, cfg, ccfg):
        super().__init__()
        d = cfg["hidden_size"]
        self.ccfg = ccfg
        self.cond_embedding = ConditioningEmbedding(ccfg, d, cfg["patch"])
        self.blocks = nn.ModuleList([D.DiTBlock(cfg) for _ in range(ccfg["depth"])])
        self.zero_projs = nn.ModuleList([nn.Linear(d, d) for _ in range(ccfg["depth"])])
        for p in self.zero_projs:
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)

    def copy_base_blocks(self, base):
        for i, blk in enumerate(self.blocks):
            blk.load_state_dict(base.blocks[i].state_dict())


def controlled_forward_emb(base, control, x, t, emb, mask, scale=1.0):
    """The frozen ``base`` DiT (``dit_ref.DiT``) with the ControlNet's residuals."""
    h = base.x_embedder.proj(x).flatten(2).transpose(1, 2) + base.pos_embed
    te = base.t_embedder(t)
    c = h + control.cond_embedding(mask)
    for i, blk in enumerate(base.blocks):
        h = blk(h, te, emb)
        if i < len(control.blocks):
            c = control.blocks[i](c, te, emb)
            h = h + control.zero_projs[i](c) * scale
    out = base.unpatchify(base.final_layer(h, te, emb))
    return out[:, : base.cfg["in_chans"]] if base.cfg["learn_sigma"] else out


def forward_with_guidance(base, control, x, t, cond, mask, w_c, w_s, w_m, naming="code"):
    """Dual CFG with the mask on every branch, plus mask guidance (one branch without it):

    o = o_00(no mask) + w_m (o_00(m) - o_00(no mask)) + w_c (o_0s(m) - o_00(m))
        + w_s (o_c0(m) - o_00(m))                      (code naming; metadata: one term)
    Written branch by branch (no batching), as an independent check of the Rust batching.
    """
    b = x.shape[0]
    emb, null = base.embed(cond), base.null_embed(b)
    zero = torch.zeros_like(mask)

    def o(e, m):
        return controlled_forward_emb(base, control, x, t, e, m)

    o_unmasked = o(null, zero)
    o00 = o(null, mask)
    out = o_unmasked + w_m * (o00 - o_unmasked)
    if len(emb) == 1:
        out = out + w_c * (o([emb[0]], mask) - o00)
    elif len(emb) == 2:
        o0s = o([null[0], emb[1]], mask)
        oc0 = o([emb[0], null[1]], mask)
        a, bb = (o0s, oc0) if naming == "code" else (oc0, o0s)
        out = out + w_c * (a - o00) + w_s * (bb - o00)
    return out


def training_loss(base, control, method, x1, cond, drop, mask, alphas_cumprod=None, gen=None):
    """One ControlNet training loss (DiT epsilon or SiT velocity), base frozen."""
    xt, t, target = D.noised(method, x1, alphas_cumprod, gen)
    pred = controlled_forward_emb(base, control, xt, t, base.embed(cond, drop), mask)
    return ((pred - target) ** 2).mean()


def load_safetensors(model, path):
    from safetensors.torch import load_file
    model.load_state_dict(load_file(path), strict=True)
    return model
