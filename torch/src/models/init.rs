//! PyTorch's parameter-initialisation formulas, so that tch networks start from the same
//! distributions as their PyTorch originals.
//!
//! | PyTorch                                  | here                         | bound                          |
//! |------------------------------------------|------------------------------|--------------------------------|
//! | `nn.Linear` / `nn.ConvNd` default weight | [`torch_default`]            | `1/sqrt(fan_in)` (kaiming-uniform, a = sqrt 5) |
//! | `nn.Linear` / `nn.ConvNd` default bias   | [`torch_default`]            | `1/sqrt(fan_in)`               |
//! | `nn.init.xavier_uniform_(w)`             | [`xavier_uniform`]           | `sqrt(6/(fan_in+fan_out))`     |
//!
//! `fan_in = in_channels/groups * prod(kernel)`, `fan_out = out_channels * prod(kernel)`
//! (PyTorch's `_calculate_fan_in_and_fan_out`). tch's own `DEFAULT_KAIMING_UNIFORM` uses the
//! ReLU gain and is *not* PyTorch's default, hence these helpers.

use tch::nn::{self, Init};

/// How the weights of a linear layer are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearInit {
    /// `xavier_uniform_` weight and zero bias (timm ViT / MAE `_init_weights`).
    XavierZeroBias,
    /// PyTorch's default `nn.Linear` init: weight and bias `U(-1/sqrt(in), 1/sqrt(in))`.
    TorchDefault,
}

/// `U(-b, b)` with `b = 1/sqrt(fan_in)`: PyTorch's default for the weights
/// (`kaiming_uniform_(a=sqrt(5))`) and the biases of `nn.Linear` and `nn.ConvNd`.
pub fn torch_default(fan_in: i64) -> Init {
    let bound = if fan_in > 0 {
        1.0 / (fan_in as f64).sqrt()
    } else {
        0.0
    };
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `nn.init.xavier_uniform_` with gain 1: `U(-b, b)`, `b = sqrt(6/(fan_in+fan_out))`.
pub fn xavier_uniform(fan_in: i64, fan_out: i64) -> Init {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A linear layer `in_dim -> out_dim` named `weight` / `bias` under `vs`.
pub fn linear(
    vs: &nn::Path,
    in_dim: i64,
    out_dim: i64,
    bias: bool,
    init: LinearInit,
) -> nn::Linear {
    let (ws_init, bs_init) = match init {
        LinearInit::XavierZeroBias => (xavier_uniform(in_dim, out_dim), Init::Const(0.0)),
        LinearInit::TorchDefault => (torch_default(in_dim), torch_default(in_dim)),
    };
    nn::linear(
        vs,
        in_dim,
        out_dim,
        nn::LinearConfig {
            ws_init,
            bs_init: Some(bs_init),
            bias,
        },
    )
}

/// A convolution config with PyTorch's default init for a layer whose fan-in is
/// `in_dim / groups * kernel_volume`.
pub fn torch_conv_config(
    in_dim: i64,
    groups: i64,
    kernel_volume: i64,
    stride: i64,
    padding: i64,
    bias: bool,
) -> nn::ConvConfig {
    let fan_in = in_dim / groups * kernel_volume;
    nn::ConvConfig {
        stride,
        padding,
        groups,
        bias,
        ws_init: torch_default(fan_in),
        bs_init: torch_default(fan_in),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_match_pytorch_formulas() {
        match torch_default(64) {
            Init::Uniform { lo, up } => {
                assert!((up - 0.125).abs() < 1e-12 && (lo + 0.125).abs() < 1e-12)
            }
            other => panic!("unexpected {other:?}"),
        }
        match xavier_uniform(768, 2304) {
            Init::Uniform { up, .. } => assert!((up - (6.0f64 / 3072.0).sqrt()).abs() < 1e-12),
            other => panic!("unexpected {other:?}"),
        }
    }
}
