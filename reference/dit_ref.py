"""MeDUET's 3-D DiT/SiT in plain PyTorch: the reference for ``torch/src/models/dit.rs``.

Written for this project from ``shared/design/method.md`` section 4.2 (the authors'
``downstream/generation/{DiT,SiT}/models.py``). It depends on torch only (no timm, no einops)
and uses the authors' module names, so ``state_dict()`` keys equal their checkpoint keys and
the tch variable names:

    x_embedder.proj.*, pos_embed, t_embedder.mlp.{0,2}.*, y_embedder.embedding_table.weight,
    content_embedder.{tau,c_null,s_null,embedding_table.1.*}, style_embedder.*,
    blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2,mod_content.1,mod_style.1,mod_gate.1}.*,
    final_layer.{linear,mod_time.1,mod_content.1,mod_style.1}.*

Configuration is a dict with the field names of the Rust ``Config`` (serde JSON):
``in_chans, input_size, patch, hidden_size, depth, num_heads, mlp_ratio, learn_sigma,
condition ("factors" | "metadata" | "none"), adaln ("code" | "paper"), content_dim,
style_dim, metadata_dim, tau_init, learnable_tau, num_classes``.

Also here: the dual-CFG forward (``forward_with_cfg``), the DDPM / SiT training losses used by
the step benchmark (``training_loss``), and ``load_safetensors`` (strict).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_3d(dim, grid):
    """MAE's 3-D sin-cos table, x slowest, float64 then float32: [gx*gy*gz, dim]."""
    axis = dim // 3
    half = axis // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    gx, gy, gz = grid
    coords = torch.stack(torch.meshgrid(torch.arange(gx), torch.arange(gy), torch.arange(gz),
                                        indexing="ij"), 0).reshape(3, -1).double()
    parts = []
    for a in range(3):
        ang = coords[a][:, None] * omega[None]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, 1).float()


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None].to(t.device)
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], -1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.freq = freq

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq))


class FactorEmbedder(nn.Module):
    """CSEmbedder: null on drop, L2-normalise / clamp(tau, 1e-3), SiLU, Linear."""

    def __init__(self, in_dim, hidden, kind, tau=0.1, learnable=True):
        super().__init__()
        self.kind = kind
        if learnable:
            self.tau = nn.Parameter(torch.tensor(float(tau)))
        else:
            self.register_buffer("tau", torch.tensor(float(tau)), persistent=False)
        self.embedding_table = nn.Sequential(nn.SiLU(), nn.Linear(in_dim, hidden))
        self.c_null = nn.Parameter(torch.randn(in_dim) * 0.02)
        self.s_null = nn.Parameter(torch.randn(in_dim) * 0.02)

    def null(self):
        return self.c_null if self.kind == "content" else self.s_null

    def norm_temp(self, v):
        return F.normalize(v, p=2, dim=-1, eps=1e-6) / self.tau.clamp_min(1e-3)

    def forward(self, v, drop=None):
        if drop is not None:
            v = torch.where(drop[:, None], self.null()[None].expand_as(v), v)
        return self.embedding_table(self.norm_temp(v))

    def null_embedding(self, b):
        return self.embedding_table(self.norm_temp(self.null()[None].expand(b, -1)))


class MetaEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.null = nn.Parameter(torch.randn(in_dim) * 0.02)
        self.embedding_table = nn.Sequential(nn.SiLU(), nn.Linear(in_dim, hidden))

    def forward(self, m, drop=None):
        if drop is not None:
            m = torch.where(drop[:, None], self.null[None].expand_as(m), m)
        return self.embedding_table(m)

    def null_embedding(self, b):
        return self.embedding_table(self.null[None].expand(b, -1))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


BRANCHES = {"factors": ["mod_content", "mod_style"], "metadata": ["mod_meta"], "none": []}


def _mod(d, k):
    return nn.Sequential(nn.SiLU(), nn.Linear(d, k * d))


class DiTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["hidden_size"]
        self.adaln = cfg["adaln"]
        self.branches = BRANCHES[cfg["condition"]]
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, cfg["num_heads"])
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, int(d * cfg["mlp_ratio"]))
        k = 4 if self.adaln == "code" else 6
        for n in self.branches:
            setattr(self, n, _mod(d, k))
        self.mod_gate = _mod(d, 2)

    def forward(self, x, t, conds):
        g_msa, g_mlp = self.mod_gate(t).chunk(2, 1)
        if not self.branches:
            x = x + g_msa[:, None] * self.attn(self.norm1(x))
            return x + g_mlp[:, None] * self.mlp(self.norm2(x))
        m = sum(getattr(self, n)(c) for n, c in zip(self.branches, conds))
        if self.adaln == "code":
            sh1, sc1, sh2, sc2 = m.chunk(4, 1)
        else:
            sh1, sc1, ga, sh2, sc2, gb = m.chunk(6, 1)
            g_msa, g_mlp = g_msa + ga, g_mlp + gb
        x = x + g_msa[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g_mlp[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, cfg, out_ch):
        super().__init__()
        d = cfg["hidden_size"]
        self.branches = BRANCHES[cfg["condition"]]
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, cfg["patch"] ** 3 * out_ch)
        self.mod_time = _mod(d, 2)
        for n in self.branches:
            setattr(self, n, _mod(d, 2))

    def forward(self, x, t, conds):
        m = self.mod_time(t)
        for n, c in zip(self.branches, conds):
            m = m + getattr(self, n)(c)
        shift, scale = m.chunk(2, 1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, p = cfg["hidden_size"], cfg["patch"]
        self.grid = [s // p for s in cfg["input_size"]]
        self.out_ch = cfg["in_chans"] * (2 if cfg["learn_sigma"] else 1)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv3d(cfg["in_chans"], d, p, p)
        self.t_embedder = TimestepEmbedder(d)
        if cfg["num_classes"] > 0:
            self.y_embedder = nn.Module()
            self.y_embedder.embedding_table = nn.Embedding(cfg["num_classes"] + 1, d)
        if cfg["condition"] == "factors":
            self.content_embedder = FactorEmbedder(cfg["content_dim"], d, "content",
                                                   cfg["tau_init"], cfg["learnable_tau"])
            self.style_embedder = FactorEmbedder(cfg["style_dim"], d, "style",
                                                 cfg["tau_init"], cfg["learnable_tau"])
        elif cfg["condition"] == "metadata":
            self.meta_embedder = MetaEmbedder(cfg["metadata_dim"], d)
        self.pos_embed = nn.Parameter(sincos_3d(d, self.grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg["depth"])])
        self.final_layer = FinalLayer(cfg, self.out_ch)

    def embed(self, cond, drop=(None, None)):
        c = self.cfg["condition"]
        if c == "factors":
            return [self.content_embedder(cond[0], drop[0]), self.style_embedder(cond[1], drop[1])]
        if c == "metadata":
            return [self.meta_embedder(cond[0], drop[0])]
        return []

    def null_embed(self, b):
        c = self.cfg["condition"]
        if c == "factors":
            return [self.content_embedder.null_embedding(b), self.style_embedder.null_embedding(b)]
        if c == "metadata":
            return [self.meta_embedder.null_embedding(b)]
        return []

    def unpatchify(self, x):
        gx, gy, gz = self.grid
        p, c = self.cfg["patch"], self.out_ch
        x = x.reshape(x.shape[0], gx, gy, gz, p, p, p, c)
        x = torch.einsum("nxyzpqrc->ncxpyqzr", x)
        return x.reshape(x.shape[0], c, gx * p, gy * p, gz * p)

    def forward_emb(self, x, t, emb):
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        te = self.t_embedder(t)
        for blk in self.blocks:
            h = blk(h, te, emb)
        out = self.unpatchify(self.final_layer(h, te, emb))
        return out[:, : self.cfg["in_chans"]] if self.cfg["learn_sigma"] else out

    def forward(self, x, t, cond, drop=(None, None)):
        return self.forward_emb(x, t, self.embed(cond, drop))

    def forward_with_cfg(self, x, t, cond, w_c, w_s, naming="code"):
        """Batched guidance as the authors' ``forward_with_cfg`` (x holds the b samples)."""
        b = x.shape[0]
        emb, null = self.embed(cond), self.null_embed(b)
        if len(emb) == 0:
            return self.forward_emb(x, t, [])
        if len(emb) == 1:
            o = self.forward_emb(torch.cat([x, x]), torch.cat([t, t]),
                                 [torch.cat([null[0], emb[0]])])
            o0, o1 = o.chunk(2)
            return o0 + w_c * (o1 - o0)
        c_tot = torch.cat([null[0], null[0], emb[0]])
        s_tot = torch.cat([null[1], emb[1], null[1]])
        o = self.forward_emb(torch.cat([x, x, x]), torch.cat([t, t, t]), [c_tot, s_tot])
        o_nn, o_ns, o_cn = o.chunk(3)
        if naming == "code":
            return o_nn + w_c * (o_ns - o_nn) + w_s * (o_cn - o_nn)
        return o_nn + w_c * (o_cn - o_nn) + w_s * (o_ns - o_nn)


def initialize_weights(model):
    """The authors' ``initialize_weights`` (AdaLN-Zero)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    if hasattr(model, "y_embedder"):
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for name, m in model.named_modules():
        if name.split(".")[-1].startswith("mod_"):
            nn.init.zeros_(m[1].weight)
            nn.init.zeros_(m[1].bias)
    return model


def linear_betas(T, start=1e-4, end=0.02):
    s = 1000 / T
    return torch.linspace(s * start, s * end, T, dtype=torch.float64)


def noised(method, x1, alphas_cumprod=None, gen=None):
    """A training batch's noised input, time input and target: DiT draws t ~ U{0..T-1} and
    regresses the noise; SiT draws t ~ U[0, 1] and regresses the velocity x1 - x0."""
    b = x1.shape[0]
    if method == "dit":
        T = alphas_cumprod.shape[0]
        t = torch.randint(0, T, (b,), generator=gen)
        noise = torch.randn(x1.shape, generator=gen)
        ab = alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
        return ab.sqrt() * x1 + (1 - ab).sqrt() * noise, t.float(), noise
    t = torch.rand(b, generator=gen)
    x0 = torch.randn(x1.shape, generator=gen)
    te = t.view(-1, 1, 1, 1, 1)
    return te * x1 + (1 - te) * x0, t, x1 - x0


def training_loss(model, method, x1, cond, drop, alphas_cumprod=None, gen=None):
    """One DiT (epsilon, L_simple) or SiT (velocity) loss on a batch."""
    xt, t, target = noised(method, x1, alphas_cumprod, gen)
    return ((model(xt, t, cond, drop) - target) ** 2).mean()


def load_safetensors(model, path):
    from safetensors.torch import load_file
    model.load_state_dict(load_file(path), strict=True)
    return model


def save_safetensors(model, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
