//! Factor modules: disentanglement into content and style, re-entanglement, the domain
//! classifiers and the gradient-reversal layer.
//!
//! | module                        | variables (PyTorch names)                           |
//! |-------------------------------|-----------------------------------------------------|
//! | `disentangled_factorizer`     | `proj_c.weight [D,D,1]`, `proj_s.weight [ds,D,1]`, `smooth.weight [ds,1,3]` |
//! | `latent_entanglement`         | `proj.weight [D,D+ds,1]`, `proj.bias [D]`           |
//! | `domain_classifier`           | `domain_classifier_{c,s}.{0,2,4}.{weight,bias}`    |
//!
//! The 1x1 Conv1d layers are applied as matrix products on `[N, T, C]` token sequences
//! (the same numbers as PyTorch's transpose-conv-transpose); the depthwise `smooth` conv runs
//! along the token axis, so for a demixed subset its neighbours are consecutive subset tokens.

use tch::{nn, nn::Module, Kind, Tensor};

use crate::models::init::{linear, torch_default, LinearInit};

/// Gradient reversal: identity in the forward pass, gradient times `-lambda` backward.
///
/// Implemented as `x.detach() + (a - a.detach())` with `a = -lambda * x`: the forward value is
/// exactly `x` (the bracket is exactly zero), and the only path to `x` for autograd is `a`,
/// whose derivative is `-lambda`.
pub fn grad_reverse(x: &Tensor, lambda: f64) -> Tensor {
    let a = x * (-lambda);
    x.detach() + (&a - a.detach())
}

/// `Disentanglement(D, s_ratio)`: content = `proj_c(z)` (1x1, D -> D, no bias), style =
/// `smooth(proj_s(z))` (1x1 D -> ds, then depthwise k=3 pad 1 along tokens, no bias).
#[derive(Debug)]
pub struct Disentanglement {
    proj_c: Tensor,
    proj_s: Tensor,
    smooth: Tensor,
    style_dim: i64,
}

impl Disentanglement {
    /// Builds `proj_c`, `proj_s`, `smooth` under `vs` with PyTorch's default Conv1d init.
    pub fn new(vs: &nn::Path, dim: i64, style_dim: i64) -> Self {
        Self {
            proj_c: (vs / "proj_c").var("weight", &[dim, dim, 1], torch_default(dim)),
            proj_s: (vs / "proj_s").var("weight", &[style_dim, dim, 1], torch_default(dim)),
            smooth: (vs / "smooth").var("weight", &[style_dim, 1, 3], torch_default(3)),
            style_dim,
        }
    }

    /// # Shapes
    /// - `z`: `[n, t, D]`
    /// - returns `(content [n, t, D], style [n, t, ds])`
    pub fn forward(&self, z: &Tensor) -> (Tensor, Tensor) {
        let content = z.linear(&self.proj_c.squeeze_dim(-1), None::<&Tensor>);
        // [n, t, ds] -> [n, ds, t] -> depthwise conv along t -> [n, t, ds]
        let style = z
            .linear(&self.proj_s.squeeze_dim(-1), None::<&Tensor>)
            .transpose(1, 2)
            .conv1d(&self.smooth, None::<&Tensor>, 1, 1, 1, self.style_dim)
            .transpose(1, 2);
        (content, style)
    }
}

/// `Entanglement(D, s_ratio)`: `proj(cat[content, style])`, a 1x1 Conv1d D+ds -> D with bias.
#[derive(Debug)]
pub struct Entanglement {
    weight: Tensor,
    bias: Tensor,
}

impl Entanglement {
    /// Builds `proj.{weight,bias}` under `vs` with PyTorch's default Conv1d init.
    pub fn new(vs: &nn::Path, dim: i64, style_dim: i64) -> Self {
        let fan_in = dim + style_dim;
        let p = vs / "proj";
        Self {
            weight: p.var("weight", &[dim, fan_in, 1], torch_default(fan_in)),
            bias: p.var("bias", &[dim], torch_default(fan_in)),
        }
    }

    /// # Shapes
    /// - `content`: `[n, t, D]`, `style`: `[n, t, ds]`
    /// - returns `[n, t, D]`
    pub fn forward(&self, content: &Tensor, style: &Tensor) -> Tensor {
        Tensor::cat(&[content, style], -1).linear(&self.weight.squeeze_dim(-1), Some(&self.bias))
    }
}

/// A 3-layer MLP `Linear - ReLU - Linear - ReLU - Linear` named like `nn.Sequential`
/// (`0`, `2`, `4`), xavier-initialised with zero biases.
#[derive(Debug)]
pub struct Mlp3 {
    l0: nn::Linear,
    l2: nn::Linear,
    l4: nn::Linear,
}

impl Mlp3 {
    /// `in -> hidden -> hidden -> out` under `vs`.
    pub fn new(vs: &nn::Path, in_dim: i64, hidden: i64, out: i64) -> Self {
        Self {
            l0: linear(
                &(vs / "0"),
                in_dim,
                hidden,
                true,
                LinearInit::XavierZeroBias,
            ),
            l2: linear(
                &(vs / "2"),
                hidden,
                hidden,
                true,
                LinearInit::XavierZeroBias,
            ),
            l4: linear(&(vs / "4"), hidden, out, true, LinearInit::XavierZeroBias),
        }
    }

    /// # Shapes
    /// - `x`: `[n, in]`
    /// - returns `[n, out]`
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.l4
            .forward(&self.l2.forward(&self.l0.forward(x).relu()).relu())
    }
}

/// `Domain_classifier(D, ds, n_domains)`: one MLP per factor; the content branch sees the
/// pooled content through a gradient-reversal layer.
#[derive(Debug)]
pub struct DomainClassifier {
    /// `domain_classifier_c`: D -> mult*D -> mult*D -> n_domains.
    pub content: Mlp3,
    /// `domain_classifier_s`: ds -> mult*ds -> mult*ds -> n_domains.
    pub style: Mlp3,
    grl_lambda: f64,
}

impl DomainClassifier {
    /// Builds both MLPs under `vs`.
    pub fn new(
        vs: &nn::Path,
        dim: i64,
        style_dim: i64,
        hidden_mult: i64,
        n_domains: i64,
        grl_lambda: f64,
    ) -> Self {
        Self {
            content: Mlp3::new(
                &(vs / "domain_classifier_c"),
                dim,
                dim * hidden_mult,
                n_domains,
            ),
            style: Mlp3::new(
                &(vs / "domain_classifier_s"),
                style_dim,
                style_dim * hidden_mult,
                n_domains,
            ),
            grl_lambda,
        }
    }

    /// Cross-entropy of both classifiers on token-mean-pooled factors:
    /// `(CE(Cls_c(GRL(mean_t content)), domain), CE(Cls_s(mean_t style), domain))`.
    ///
    /// # Shapes
    /// - `content`: `[n, t, D]`, `style`: `[n, t, ds]`, `domain`: `[n]` i64
    /// - returns two scalars
    pub fn losses(&self, content: &Tensor, style: &Tensor, domain: &Tensor) -> (Tensor, Tensor) {
        let pc = content.mean_dim(1, false, None::<Kind>);
        let ps = style.mean_dim(1, false, None::<Kind>);
        let lc = self
            .content
            .forward(&grad_reverse(&pc, self.grl_lambda))
            .cross_entropy_for_logits(domain);
        let ls = self.style.forward(&ps).cross_entropy_for_logits(domain);
        (lc, ls)
    }
}
