"""MeDUET pretraining model and losses in plain PyTorch: the reference for meduet's tch engine.

Written for this project from ``shared/design/method.md`` sections 2-3 (the authors'
``pretrain/models_MeDUET.py``, ``MFTD.py``, ``SiQC.py``). It depends on torch only (no timm, no
MONAI) and mirrors the authors' module and attribute names, so ``state_dict()`` keys equal the
authors' checkpoint keys and the variable names of ``torch/src/models/meduet.rs``:

    embed_layer.proj.*, patch_embed.proj.* (unused 2-D), cls_token, mask_token, pos_embed,
    decoder_pos_embed, blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*, norm.*,
    decoder_embed.*, decoder_blocks.i.*, decoder_norm.*, decoder_pred.*,
    disentangled_factorizer.{proj_c,proj_s,smooth}.weight, latent_entanglement.proj.*,
    domain_classifier.domain_classifier_{c,s}.{0,2,4}.*

Randomness is injected: the mixing mask ``M`` ([B, L], 0 = token from x, 1 = from x.flip(0)) is
an argument everywhere, and weights are loaded from safetensors. The code follows the authors'
index logic (boolean ``masked_select`` demixing, cumsum/gather remixing), which the tch engine
implements differently (argsort/gather), so the equivalence test checks two independent
implementations of the same equations.

Configuration is a dict with the field names of the Rust ``Config`` (its serde JSON), including
the switches: ``disentangle``, ``demix``, ``rec_mask_pairing`` ("code" | "clean"),
``siqc_learnable_scale`` and the ``loss`` weights. ``forward_losses`` returns every term.

Usage (see ``reference/README.md``)::

    cfg = default_config("tiny")
    student, teacher = MeDUET(cfg), MeDUET(cfg)
    load_safetensors(student, "student.safetensors")
    losses = forward_losses(student, teacher, SiQCScales(cfg), x, domain, M, cfg, mftd_active=True)
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

_LOSS_DEFAULTS = dict(
    rec=1.0,
    domain_c=0.2,
    domain_s=0.2,
    mftd=0.5,
    siqc=0.3,
    mftd_lambda_c=0.5,
    mftd_start_fraction=0.2,
    grl_lambda=1.0,
    siqc_logit_scale_init=math.log(1 / 0.07),
)

_VIT_B = dict(
    in_chans=4,
    crop=24,
    patch=4,
    embed_dim=768,
    depth=12,
    num_heads=12,
    decoder_embed_dim=384,
    decoder_depth=8,
    decoder_num_heads=12,
    mlp_ratio=4.0,
    style_dim=192,
    domain_hidden_mult=2,
    n_domains=10,
    mask_ratio=0.5,
    disentangle=True,
    demix=True,
    rec_mask_pairing="code",
    siqc_learnable_scale=False,
)


def default_config(preset: str = "vit_b", **overrides) -> dict:
    """The Rust presets ``Config::vit_b()`` / ``Config::tiny()`` / ``Config::small()`` as a dict."""
    cfg = dict(_VIT_B)
    if preset == "tiny":
        cfg.update(embed_dim=96, depth=2, num_heads=4, decoder_embed_dim=48, decoder_depth=2,
                   decoder_num_heads=4, style_dim=24, n_domains=4)
    elif preset == "small":
        cfg.update(embed_dim=288, depth=2, num_heads=6, decoder_embed_dim=288, decoder_depth=2,
                   decoder_num_heads=6, style_dim=48, n_domains=4)
    elif preset != "vit_b":
        raise ValueError(f"unknown preset {preset!r}")
    cfg["loss"] = dict(_LOSS_DEFAULTS)
    loss = overrides.pop("loss", {})
    cfg.update(overrides)
    cfg["loss"].update(loss)
    return cfg


def complete_config(cfg: dict) -> dict:
    """Fills missing fields (as serde's defaults do) from the ViT-B preset."""
    out = default_config("vit_b")
    loss = dict(out["loss"])
    loss.update(cfg.get("loss", {}))
    out.update({k: v for k, v in cfg.items() if k != "loss"})
    out["loss"] = loss
    return out


# ---------------------------------------------------------------------------------------------
# Shared transformer blocks (timm 1.0 Block / Attention / Mlp, names identical)
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class PatchEmbed2D(nn.Module):
    """timm's 2-D PatchEmbed, present but unused in the authors' model."""

    def __init__(self, in_chans: int, embed_dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)


def sincos_3d(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """MAE's ``get_3d_sincos_pos_embed`` (f64 math, f32 result): [1, (1+)g^3, dim]."""
    assert dim % 6 == 0, "3-D sin-cos width must be divisible by 6"
    half = dim // 6
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    g = torch.arange(grid, dtype=torch.float64)
    gx, gy, gz = torch.meshgrid(g, g, g, indexing="ij")
    parts = []
    for p in (gx, gy, gz):
        out = p.reshape(-1, 1) * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    emb = torch.cat(parts, dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], 0)
    return emb.float()[None]


# ---------------------------------------------------------------------------------------------
# Factor modules
# ---------------------------------------------------------------------------------------------


class Disentanglement(nn.Module):
    def __init__(self, dim: int, style_dim: int):
        super().__init__()
        self.proj_c = nn.Conv1d(dim, dim, 1, bias=False)
        self.proj_s = nn.Conv1d(dim, style_dim, 1, bias=False)
        self.smooth = nn.Conv1d(style_dim, style_dim, 3, padding=1, groups=style_dim, bias=False)

    def forward(self, x):
        x_ = x.transpose(1, 2)
        content = self.proj_c(x_).transpose(1, 2)
        style = self.smooth(self.proj_s(x_)).transpose(1, 2)
        return content, style


class Entanglement(nn.Module):
    def __init__(self, dim: int, style_dim: int):
        super().__init__()
        self.proj = nn.Conv1d(dim + style_dim, dim, kernel_size=1, bias=True)

    def forward(self, c, s):
        return self.proj(torch.cat([c, s], dim=-1).transpose(1, 2)).transpose(1, 2)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.lam * g, None


def grad_reverse(x, lam: float):
    return _GradReverse.apply(x, lam)


def _mlp3(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o))


class DomainClassifier(nn.Module):
    def __init__(self, dim: int, style_dim: int, mult: int, n_domains: int, grl: float):
        super().__init__()
        self.domain_classifier_c = _mlp3(dim, dim * mult, n_domains)
        self.domain_classifier_s = _mlp3(style_dim, style_dim * mult, n_domains)
        self.grl = grl

    def forward(self, zc, zs, domain):
        pc = zc.mean(dim=1)
        ps = zs.mean(dim=1)
        domain = domain.view(-1).long()
        lc = F.cross_entropy(self.domain_classifier_c(grad_reverse(pc, self.grl)), domain)
        ls = F.cross_entropy(self.domain_classifier_s(ps), domain)
        return lc, ls


class SiQCScales(nn.Module):
    """The SiQC module's two logit scales (``logit_scale_c``, ``logit_scale_s``)."""

    def __init__(self, cfg: dict):
        super().__init__()
        v = cfg["loss"]["siqc_logit_scale_init"]
        self.logit_scale_c = nn.Parameter(torch.tensor(v, dtype=torch.float32))
        self.logit_scale_s = nn.Parameter(torch.tensor(v, dtype=torch.float32))
        if not cfg["siqc_learnable_scale"]:
            self.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class MeDUET(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        cfg = complete_config(cfg)
        self.cfg = cfg
        D, Dd, p, C = cfg["embed_dim"], cfg["decoder_embed_dim"], cfg["patch"], cfg["in_chans"]
        assert cfg["crop"] % p == 0
        self.grid = cfg["crop"] // p
        self.L = self.grid ** 3
        self.patch_embed = PatchEmbed2D(C, D, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = nn.ModuleList(
            [Block(D, cfg["num_heads"], cfg["mlp_ratio"]) for _ in range(cfg["depth"])])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_blocks = nn.ModuleList(
            [Block(Dd, cfg["decoder_num_heads"], cfg["mlp_ratio"])
             for _ in range(cfg["decoder_depth"])])
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, p ** 3 * C)
        self.embed_layer = PatchEmbed3D(C, D, p)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.L + 1, D), requires_grad=False)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.L + 1, Dd), requires_grad=False)
        if cfg["disentangle"]:
            ds = cfg["style_dim"]
            self.disentangled_factorizer = Disentanglement(D, ds)
            self.latent_entanglement = Entanglement(D, ds)
            self.domain_classifier = DomainClassifier(
                D, ds, cfg["domain_hidden_mult"], cfg["n_domains"], cfg["loss"]["grl_lambda"])
        self.initialize_weights()

    def initialize_weights(self):
        """The authors' init: sin-cos tables, xavier Linear / zero bias, LN 1/0, tokens N(0,.02),
        xavier on the unused 2-D patch_embed; Conv3d and Conv1d keep PyTorch's default."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_3d(self.pos_embed.shape[-1], self.grid, True))
            self.decoder_pos_embed.copy_(sincos_3d(self.decoder_pos_embed.shape[-1], self.grid, True))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # --- patches -------------------------------------------------------------------------------

    def patchify(self, x):
        B, C = x.shape[:2]
        g, p = self.grid, self.cfg["patch"]
        x = x.reshape(B, C, g, p, g, p, g, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(B, g ** 3, p ** 3 * C)

    def unpatchify(self, x):
        g, p, c = self.grid, self.cfg["patch"], self.cfg["in_chans"]
        x = x.reshape(x.shape[0], g, g, g, p, p, p, c)
        x = torch.einsum("nxyzpqrc->ncxpyqzr", x)
        return x.reshape(x.shape[0], c, g * p, g * p, g * p)

    # --- factors -------------------------------------------------------------------------------

    def disentanglement(self, z):
        if not self.cfg["disentangle"]:
            return z, z
        return self.disentangled_factorizer(z)

    def entanglement(self, c, s):
        if not self.cfg["disentangle"]:
            return c
        return self.latent_entanglement(c, s)

    # --- mixing (authors' index logic) ---------------------------------------------------------

    @staticmethod
    def unmixing(patches, M):
        """(tokens at M==0, tokens at M==1), position order, via boolean masked_select."""
        N, L, D = patches.shape
        m = M.unsqueeze(-1)
        z1 = torch.masked_select(patches, (m == 0).expand(-1, -1, D)).view(N, -1, D)
        z2 = torch.masked_select(patches, (m == 1).expand(-1, -1, D)).view(N, -1, D)
        return z1, z2

    @staticmethod
    def remixing(z1, z2, M):
        """Inverse of ``unmixing`` (the authors' cumsum-rank gather + where)."""
        m0 = M == 0
        D = z1.shape[-1]
        rank0 = (torch.cumsum(m0.int(), dim=1) - 1).clamp(min=0)
        rank1 = (torch.cumsum((~m0).int(), dim=1) - 1).clamp(min=0)
        z1f = torch.gather(z1, 1, rank0.unsqueeze(-1).expand(-1, -1, D))
        z2f = torch.gather(z2, 1, rank1.unsqueeze(-1).expand(-1, -1, D))
        return torch.where(m0.unsqueeze(-1), z1f, z2f)

    # --- encoder / decoder ---------------------------------------------------------------------

    def embed(self, x):
        return self.embed_layer(x) + self.pos_embed[:, 1:, :]

    def encode_tokens(self, x):
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_encoder(self, x, M):
        t = self.embed(x)
        m = M.unsqueeze(-1)
        if self.cfg["demix"]:
            t = t * (1.0 - m) + t.flip(0) * m
        else:
            D = t.shape[-1]
            t = torch.masked_select(t, (m == 0).expand(-1, -1, D)).view(t.shape[0], -1, D)
        return self.encode_tokens(t)

    def encode_demix(self, x, M):
        h = self.forward_encoder(x, M)
        cls = h[:, :1, :]
        if self.cfg["demix"]:
            z1, z2 = self.unmixing(h[:, 1:, :], M)
            zc1, zs1 = self.disentanglement(z1)
            zc2, zs2 = self.disentanglement(z2)
        else:
            zc1, zs1 = self.disentanglement(h[:, 1:, :])
            zc2, zs2 = zc1.flip(0), zs1.flip(0)
        return zc1, zc2, zs1, zs2, cls

    def forward_decoder(self, z, cls, M):
        u = self.decoder_embed(torch.cat([cls, z], dim=1))
        B, _, C = u.shape
        ucls, patches = u[:, :1, :], u[:, 1:, :]
        m = M.unsqueeze(-1)
        mask_tokens = self.mask_token.expand(B, patches.shape[1], C)
        p1 = patches * (1 - m) + mask_tokens * m
        if self.cfg["demix"]:
            p2 = patches * m + mask_tokens * (1 - m)
            x = torch.cat([torch.cat([ucls, p1], 1), torch.cat([ucls, p2], 1)], 0)
        else:
            x = torch.cat([ucls, p1], 1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def reconstruct(self, zc1, zc2, zs1, zs2, cls, M):
        e1 = self.entanglement(zc1, zs1)
        if self.cfg["demix"]:
            e2 = self.entanglement(zc2, zs2)
        else:
            B, _, D = e1.shape
            e2 = e1.new_zeros(B, self.L - e1.shape[1], D)
        return self.forward_decoder(self.remixing(e1, e2, M), cls, M)

    def encode_full(self, x):
        h = self.encode_tokens(self.embed(x))
        zc, zs = self.disentanglement(h[:, 1:, :])
        return zc, zs, h[:, :1, :]

    def decode_full(self, zc, zs, cls):
        z = torch.cat([cls, self.entanglement(zc, zs)], dim=1)
        z = self.decoder_embed(z) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            z = blk(z)
        return self.unpatchify(self.decoder_pred(self.decoder_norm(z))[:, 1:, :])


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def rec_loss(model: MeDUET, x, xrec, M):
    target = model.patchify(x)
    m = M.unsqueeze(-1)
    if not model.cfg["demix"]:
        per_token = ((xrec - target) ** 2).mean(dim=-1)
        return (per_token * M).sum() / M.sum()
    B = x.shape[0]
    x1, x2 = xrec[:B], xrec[B:]
    if model.cfg["rec_mask_pairing"] == "code":
        unmix = x1 * m + x2.flip(0) * (1 - m)
        return ((unmix - target) ** 2).mean()
    pred = x1 * m + x2 * (1 - m)
    tgt = target * m + target.flip(0) * (1 - m)
    return ((pred - tgt) ** 2).mean()


def domain_losses(model: MeDUET, zc1, zc2, zs1, zs2, domain):
    lc1, ls1 = model.domain_classifier(zc1, zs1, domain)
    if not model.cfg["demix"]:
        return lc1, ls1
    lc2, ls2 = model.domain_classifier(zc2, zs2, domain.flip(0))
    return (lc1 + lc2) * 0.5, (ls1 + ls2) * 0.5


def _masked_mean_tokens(d, m):
    m = m.to(d.dtype)
    return (d * m).sum() / m.sum()


def _token_loss(a, b, m):
    return _masked_mean_tokens((a - b).pow(2).mean(dim=-1), m)


def mftd_loss(student: MeDUET, teacher: MeDUET, x, xrec, M):
    cfg = student.cfg
    B = x.shape[0]
    zcS, zsS, _ = student.encode_full(student.unpatchify(xrec))
    with torch.no_grad():
        zc1T, zs1T, _ = teacher.encode_full(x)
        if cfg["demix"]:
            zc2T, zs2T, _ = teacher.encode_full(x.flip(0))
    if cfg["demix"]:
        lc = _token_loss(zcS[:B], zc1T, M == 1) + _token_loss(zcS[B:], zc2T, M == 0)
        ls = _token_loss(zsS[:B], zs1T, M == 1) + _token_loss(zsS[B:], zs2T, M == 0)
    else:
        lc = _token_loss(zcS, zc1T, M == 1)
        ls = _token_loss(zsS, zs1T, M == 1)
    if not cfg["disentangle"]:
        return cfg["loss"]["mftd_lambda_c"] * lc
    return cfg["loss"]["mftd_lambda_c"] * lc + ls


def _l2norm(x, eps=1e-8):
    return x / (x.norm(p=2, dim=1, keepdim=True) + eps)


def _token_pool(f):
    return F.layer_norm(f, f.shape[-1:]).mean(dim=1)


def supcon_qk_loss(q, k, labels, logit_scale):
    q = _l2norm(q)
    with torch.no_grad():
        k = _l2norm(k)
    sim = q @ k.t()
    sim = sim * torch.clamp(logit_scale, min=math.log(1e-3), max=math.log(100.0)).exp()
    N = sim.size(0)
    labels = labels.view(-1, 1)
    eye = torch.eye(N, dtype=torch.bool, device=sim.device)
    pos = ((labels == labels.t()) & ~eye).float()
    sim = sim - torch.eye(N, device=sim.device) * 1e9
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    counts = pos.sum(dim=1).clamp_min(1e-6)
    return (-(log_prob * pos).sum(dim=1) / counts).mean()


def _quadruplet(model: MeDUET, a, b, swapped):
    B = a.shape[0]
    if model.cfg["demix"]:
        p12, p21 = _token_pool(swapped[:B]), _token_pool(swapped[B:])
    else:
        p12 = _token_pool(swapped)
        p21 = p12.flip(0)
    return torch.cat([_token_pool(a), _token_pool(b), p12, p21], dim=0)


def _siqc_views(model: MeDUET, zc1, zc2, zs1, zs2, cls, M):
    xs = model.reconstruct(zc1, zc2, zs2, zs1, cls, M)
    zcS, zsS, _ = model.encode_full(model.unpatchify(xs))
    return _quadruplet(model, zc1, zc2, zcS), _quadruplet(model, zs1, zs2, zsS)


def siqc_loss(student: MeDUET, teacher: MeDUET, scales: SiQCScales, x, M, z_S):
    B = x.shape[0]
    zc1, zc2, zs1, zs2, cls = z_S
    qc, qs = _siqc_views(student, zc1, zc2, zs1, zs2, cls, M)
    with torch.no_grad():
        MT = 1.0 - M
        kc, ks = _siqc_views(teacher, *teacher.encode_demix(x, MT), MT)
    ar = torch.arange(B, device=x.device)
    perm = torch.arange(B - 1, -1, -1, device=x.device)
    cid = torch.cat([ar, perm, ar, perm])
    sid = torch.cat([ar, perm, perm, ar])
    return (supcon_qk_loss(qc, kc, cid, scales.logit_scale_c)
            + supcon_qk_loss(qs, ks, sid, scales.logit_scale_s))


def mftd_active(cfg: dict, step: int, total_steps: int) -> bool:
    return cfg["loss"]["mftd"] != 0 and step >= cfg["loss"]["mftd_start_fraction"] * total_steps


def forward_losses(student: MeDUET, teacher: MeDUET, scales: SiQCScales, x, domain, M,
                   cfg: Optional[dict] = None, mftd_on: bool = True) -> Dict[str, torch.Tensor]:
    """Every loss term of one step. ``M``: [B, L] float 0/1. Returns a dict with ``total``,
    ``rec``, ``domain_c``, ``domain_s``, ``mftd``, ``siqc`` (0-dim tensors)."""
    cfg = student.cfg if cfg is None else complete_config(cfg)
    w = cfg["loss"]
    zero = x.new_zeros(())
    z_S = student.encode_demix(x, M)
    zc1, zc2, zs1, zs2, cls = z_S
    xrec = student.reconstruct(zc1, zc2, zs1, zs2, cls, M)
    out = {}
    out["rec"] = rec_loss(student, x, xrec, M) if w["rec"] != 0 else zero
    if cfg["disentangle"] and (w["domain_c"] != 0 or w["domain_s"] != 0):
        out["domain_c"], out["domain_s"] = domain_losses(student, zc1, zc2, zs1, zs2, domain)
    else:
        out["domain_c"], out["domain_s"] = zero, zero
    on = mftd_on and w["mftd"] != 0
    out["mftd"] = mftd_loss(student, teacher, x, xrec, M) if on else zero
    if cfg["disentangle"] and w["siqc"] != 0:
        out["siqc"] = siqc_loss(student, teacher, scales, x, M, z_S)
    else:
        out["siqc"] = zero
    total = out["rec"] * w["rec"]
    for key, wt in (("domain_c", w["domain_c"]), ("domain_s", w["domain_s"]),
                    ("mftd", w["mftd"] if on else 0.0), ("siqc", w["siqc"])):
        if wt != 0:
            total = total + out[key] * wt
    out["total"] = total
    return out


# ---------------------------------------------------------------------------------------------
# Masks, weights, EMA, optimizer groups
# ---------------------------------------------------------------------------------------------


def random_mixing(B: int, L: int, mask_ratio: float, generator: Optional[torch.Generator] = None):
    """The authors' ``random_mixing``: [B, L] float, int(L*(1-ratio)) zeros per row."""
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(B, L, generator=generator)
    ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    mask = torch.ones(B, L)
    mask[:, :len_keep] = 0
    return torch.gather(mask, 1, ids_restore)


def load_safetensors(model: nn.Module, path: str, scales: Optional[SiQCScales] = None):
    """Loads a tch ``VarStore`` file (or any file with the authors' names) strictly; the
    ``siqc.logit_scale_*`` entries, present with ``siqc_learnable_scale``, go to ``scales``."""
    from safetensors.torch import load_file

    sd = load_file(path)
    siqc = {k[len("siqc."):]: v for k, v in sd.items() if k.startswith("siqc.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("siqc.")}
    model.load_state_dict(sd, strict=True)
    if scales is not None and siqc:
        scales.load_state_dict(siqc, strict=True)


def save_safetensors(model: nn.Module, path: str):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)


def make_teacher(student: MeDUET) -> MeDUET:
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, m: float):
    """``update_ema`` of the authors (every named parameter, fixed tables included)."""
    tp = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        tp[name].mul_(m).add_(p.data, alpha=1 - m)


def ema_momentum(it: int, total: int, base: float = 0.997, final: float = 0.9997) -> float:
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * it / total))


def param_groups_weight_decay(model: nn.Module, weight_decay: float = 1e-2):
    """timm's rule: no decay for ndim <= 1 or names ending in '.bias'."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]
