//! The pre-norm transformer block, timm's `Block` (1.0.x) without layer-scale or drop-path:
//! `x += attn(norm1(x)); x += mlp(norm2(x))`.
//!
//! Variables: `norm1.{weight,bias}`, `attn.qkv.*`, `attn.proj.*`, `norm2.*`, `mlp.fc1.*`,
//! `mlp.fc2.*`, exactly the PyTorch state-dict names.

use tch::{nn, nn::Module, Tensor};

use super::attention::Attention;
use super::init::LinearInit;
use super::mlp::{Gelu, Mlp};

/// Sizes and options of one [`Block`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockConfig {
    /// Token width.
    pub dim: i64,
    /// Attention heads (`dim` must be divisible by it).
    pub num_heads: i64,
    /// MLP hidden width = `int(dim * mlp_ratio)`, as timm computes it.
    pub mlp_ratio: f64,
    /// Bias on the qkv projection.
    pub qkv_bias: bool,
    /// LayerNorm epsilon (1e-6 in MAE/MeDUET/DiT).
    pub norm_eps: f64,
    /// GELU flavour of the MLP.
    pub gelu: Gelu,
    /// Init of every linear layer in the block.
    pub init: LinearInit,
}

impl BlockConfig {
    /// The ViT/MAE block used by MeDUET: qkv bias, LN eps 1e-6, exact GELU, xavier init.
    pub fn vit(dim: i64, num_heads: i64, mlp_ratio: f64) -> Self {
        Self {
            dim,
            num_heads,
            mlp_ratio,
            qkv_bias: true,
            norm_eps: 1e-6,
            gelu: Gelu::Erf,
            init: LinearInit::XavierZeroBias,
        }
    }

    /// The MLP hidden width (`int(dim * mlp_ratio)`).
    pub fn mlp_hidden(&self) -> i64 {
        (self.dim as f64 * self.mlp_ratio) as i64
    }
}

/// A LayerNorm with weight 1 and bias 0 at init, named `weight` / `bias` under `vs`.
pub fn layer_norm(vs: &nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        vs,
        vec![dim],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// timm `Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm(eps))`.
#[derive(Debug)]
pub struct Block {
    /// `norm1`.
    pub norm1: nn::LayerNorm,
    /// `attn`.
    pub attn: Attention,
    /// `norm2`.
    pub norm2: nn::LayerNorm,
    /// `mlp`.
    pub mlp: Mlp,
}

impl Block {
    /// Builds the block under `vs`.
    pub fn new(vs: &nn::Path, cfg: &BlockConfig) -> Self {
        Self {
            norm1: layer_norm(&(vs / "norm1"), cfg.dim, cfg.norm_eps),
            attn: Attention::new(
                &(vs / "attn"),
                cfg.dim,
                cfg.num_heads,
                cfg.qkv_bias,
                cfg.init,
            ),
            norm2: layer_norm(&(vs / "norm2"), cfg.dim, cfg.norm_eps),
            mlp: Mlp::new(
                &(vs / "mlp"),
                cfg.dim,
                cfg.mlp_hidden(),
                cfg.dim,
                cfg.gelu,
                cfg.init,
            ),
        }
    }

    /// # Shapes
    /// - `x`: `[b, n, dim]`
    /// - returns `[b, n, dim]`
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attn.forward(&self.norm1.forward(x));
        &x + self.mlp.forward(&self.norm2.forward(&x))
    }
}
