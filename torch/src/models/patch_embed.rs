//! Patch embeddings: a strided convolution (kernel = stride = patch) that turns a volume into a
//! token sequence.
//!
//! [`PatchEmbed3d`] is MeDUET's `embed_layer` and DiT's `x_embedder`: `[B, C, X, Y, Z]` ->
//! `[B, (X/p)(Y/p)(Z/p), D]`, flattened token index `x*(gy*gz) + y*gz + z` (x slowest), as
//! PyTorch's `proj(x).flatten(2).transpose(1, 2)` orders them. [`PatchEmbed2d`] is timm's 2-D
//! `PatchEmbed`, present (unused) in the MAE/MeDUET state dict as `patch_embed.proj`.

use tch::{nn, nn::Module, Tensor};

use super::init::{torch_default, xavier_uniform};

/// How a patch-embedding convolution is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchInit {
    /// PyTorch's default conv init (weight and bias `U(+-1/sqrt(fan_in))`).
    TorchDefault,
    /// `xavier_uniform_` on the weight viewed as `[out, in*k^d]` (MAE's patch embed, DiT's
    /// `x_embedder`); the bias is zero when `zero_bias`, else PyTorch's default.
    XavierFlat {
        /// Zero the bias (DiT) instead of keeping PyTorch's default (MAE).
        zero_bias: bool,
    },
}

fn conv_config(in_chans: i64, out: i64, patch: i64, ndim: u32, init: PatchInit) -> nn::ConvConfig {
    let fan_in = in_chans * patch.pow(ndim);
    let (ws_init, bs_init) = match init {
        PatchInit::TorchDefault => (torch_default(fan_in), torch_default(fan_in)),
        PatchInit::XavierFlat { zero_bias } => (
            xavier_uniform(fan_in, out),
            if zero_bias {
                nn::Init::Const(0.0)
            } else {
                torch_default(fan_in)
            },
        ),
    };
    nn::ConvConfig {
        stride: patch,
        ws_init,
        bs_init,
        ..Default::default()
    }
}

/// `Conv3d(in_chans, embed_dim, k=patch, s=patch)` + flatten, variables `proj.{weight,bias}`.
#[derive(Debug)]
pub struct PatchEmbed3d {
    /// `proj`: the strided Conv3d.
    pub proj: nn::Conv3D,
    patch: i64,
}

impl PatchEmbed3d {
    /// Builds `vs / "proj"`.
    pub fn new(vs: &nn::Path, in_chans: i64, embed_dim: i64, patch: i64, init: PatchInit) -> Self {
        let cfg = conv_config(in_chans, embed_dim, patch, 3, init);
        Self {
            proj: nn::conv3d(vs / "proj", in_chans, embed_dim, patch, cfg),
            patch,
        }
    }

    /// The patch edge length.
    pub fn patch(&self) -> i64 {
        self.patch
    }

    /// # Shapes
    /// - `x`: `[b, c, X, Y, Z]` with every spatial size divisible by the patch
    /// - returns `[b, (X/p)*(Y/p)*(Z/p), embed_dim]`
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // [b, d, gx, gy, gz] -> [b, d, L] -> [b, L, d]
        self.proj.forward(x).flatten(2, -1).transpose(1, 2)
    }
}

/// timm's 2-D `PatchEmbed`: `Conv2d(in_chans, embed_dim, k=patch, s=patch)`, variables
/// `proj.{weight,bias}`.
#[derive(Debug)]
pub struct PatchEmbed2d {
    /// `proj`: the strided Conv2d.
    pub proj: nn::Conv2D,
}

impl PatchEmbed2d {
    /// Builds `vs / "proj"`.
    pub fn new(vs: &nn::Path, in_chans: i64, embed_dim: i64, patch: i64, init: PatchInit) -> Self {
        let cfg = conv_config(in_chans, embed_dim, patch, 2, init);
        Self {
            proj: nn::conv2d(vs / "proj", in_chans, embed_dim, patch, cfg),
        }
    }

    /// # Shapes
    /// - `x`: `[b, c, H, W]`
    /// - returns `[b, (H/p)*(W/p), embed_dim]`
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.proj.forward(x).flatten(2, -1).transpose(1, 2)
    }
}
