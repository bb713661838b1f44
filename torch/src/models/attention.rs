//! Multi-head self-attention, timm's `Attention` (fused SDPA path).
//!
//! Variables: `qkv.{weight,bias}` (`dim -> 3*dim`) and `proj.{weight,bias}`. The qkv output is
//! laid out `(B, N, 3, heads, head_dim)`, as timm reshapes it, so checkpoints convert both ways.
//! The softmax scale is `head_dim^-0.5`; there is no q/k norm and no dropout.

use tch::{nn, nn::Module, Tensor};

use super::init::{linear, LinearInit};

/// timm `Attention(dim, num_heads, qkv_bias)`.
#[derive(Debug)]
pub struct Attention {
    /// `qkv`: `dim -> 3*dim`.
    pub qkv: nn::Linear,
    /// `proj`: `dim -> dim`.
    pub proj: nn::Linear,
    num_heads: i64,
    head_dim: i64,
}

impl Attention {
    /// Builds the layer under `vs` (`vs / "qkv"`, `vs / "proj"`). Panics when `dim` is not
    /// divisible by `num_heads` (configs validate this first).
    pub fn new(vs: &nn::Path, dim: i64, num_heads: i64, qkv_bias: bool, init: LinearInit) -> Self {
        assert!(
            num_heads > 0 && dim % num_heads == 0,
            "attention dim {dim} is not divisible by {num_heads} heads"
        );
        Self {
            qkv: linear(&(vs / "qkv"), dim, 3 * dim, qkv_bias, init),
            proj: linear(&(vs / "proj"), dim, dim, true, init),
            num_heads,
            head_dim: dim / num_heads,
        }
    }

    /// Self-attention over a token sequence.
    ///
    /// # Shapes
    /// - `x`: `[b, n, dim]`
    /// - returns `[b, n, dim]`
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("attention input must be [b, n, dim]");
        // [b, n, 3*dim] -> [b, n, 3, h, hd] -> [3, b, h, n, hd]
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, n, 3, self.num_heads, self.head_dim])
            .permute([2, 0, 3, 1, 4]);
        let q = qkv.get(0);
        let k = qkv.get(1);
        let v = qkv.get(2);
        // [b, h, n, hd]
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            false,
            None,
            false,
        );
        self.proj.forward(&o.transpose(1, 2).reshape([b, n, c]))
    }
}
