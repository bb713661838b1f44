//! The transformer MLP, timm's `Mlp`: `fc1 -> GELU -> fc2`.
//!
//! Variables: `fc1.{weight,bias}`, `fc2.{weight,bias}`. The GELU is exact (erf) for ViT/MAE
//! blocks and tanh-approximated for DiT blocks.

use tch::{nn, nn::Module, Tensor};

use super::init::{linear, LinearInit};

/// Which GELU the MLP uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// `nn.GELU()`: `x * Phi(x)` with the exact normal CDF.
    Erf,
    /// `nn.GELU(approximate="tanh")`.
    Tanh,
}

impl Gelu {
    fn approximate(self) -> &'static str {
        match self {
            Gelu::Erf => "none",
            Gelu::Tanh => "tanh",
        }
    }
}

/// timm `Mlp(in, hidden, out)`.
#[derive(Debug)]
pub struct Mlp {
    /// `fc1`: `in -> hidden`.
    pub fc1: nn::Linear,
    /// `fc2`: `hidden -> out`.
    pub fc2: nn::Linear,
    gelu: Gelu,
}

impl Mlp {
    /// Builds `fc1` and `fc2` under `vs`.
    pub fn new(
        vs: &nn::Path,
        in_dim: i64,
        hidden_dim: i64,
        out_dim: i64,
        gelu: Gelu,
        init: LinearInit,
    ) -> Self {
        Self {
            fc1: linear(&(vs / "fc1"), in_dim, hidden_dim, true, init),
            fc2: linear(&(vs / "fc2"), hidden_dim, out_dim, true, init),
            gelu,
        }
    }

    /// # Shapes
    /// - `x`: `[.., in]`
    /// - returns `[.., out]`
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2
            .forward(&self.fc1.forward(x).gelu(self.gelu.approximate()))
    }
}
