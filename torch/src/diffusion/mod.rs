//! Diffusion math, apart from the networks: DDPM ([`gaussian`]), SiT's linear interpolant
//! ([`transport`]) and dual classifier-free guidance ([`guided_output`], [`dual_cfg`]).
//!
//! # Dual classifier-free guidance (method.md 4.3, the authors' `forward_with_cfg`)
//!
//! The batch is evaluated three times in one forward pass:
//!
//! ```text
//! x_tot = [x, x, x];  c_tot = [c_0, c_0, c];  s_tot = [s_0, s, s_0]      (0 = null embedding)
//! (o_00, o_0s, o_c0) = split(model(x_tot, t_tot, c_tot, s_tot), 3)
//! code : o = o_00 + w_c (o_0s - o_00) + w_s (o_c0 - o_00)
//! paper: o = o_00 + w_c (o_c0 - o_00) + w_s (o_0s - o_00)
//! ```
//!
//! The metadata baseline uses two evaluations (`o = o_0 + w_c (o_m - o_0)`), the
//! unconditional model one.

pub mod gaussian;
pub mod transport;

use tch::Tensor;

use crate::models::dit::{Dit, DitError};
pub use meduet_stages::kinds::diffusion::{GuidanceNaming, GuidanceParams};

/// The dual-CFG combination of the three branch outputs.
pub fn dual_cfg(
    o_nn: &Tensor,
    o_ns: &Tensor,
    o_cn: &Tensor,
    w_c: f64,
    w_s: f64,
    naming: GuidanceNaming,
) -> Tensor {
    let (a, b) = match naming {
        GuidanceNaming::Code => (o_ns, o_cn),
        GuidanceNaming::Paper => (o_cn, o_ns),
    };
    o_nn + (a - o_nn) * w_c + (b - o_nn) * w_s
}

/// The guided network output for a batch: one batched forward over `[x, x, x]` (factors),
/// `[x, x]` (metadata) or `x` (unconditional). `emb` are the embedded conditions of the
/// batch (one per branch), `null` the null embeddings (same rows).
///
/// # Shapes
/// - `x`: `[b, C, X, Y, Z]`; `t`: `[b]`; `emb`, `null`: `[b, D]` each
/// - returns `[b, C, X, Y, Z]`
pub fn guided_output(
    model: &Dit,
    x: &Tensor,
    t: &Tensor,
    emb: &[Tensor],
    null: &[Tensor],
    g: &GuidanceParams,
) -> Result<Tensor, DitError> {
    match emb.len() {
        0 => model.forward_emb(x, t, &[]),
        1 => {
            let xx = Tensor::cat(&[x, x], 0);
            let tt = Tensor::cat(&[t, t], 0);
            let m = Tensor::cat(&[&null[0], &emb[0]], 0);
            let o = model.forward_emb(&xx, &tt, &[m])?.chunk(2, 0);
            Ok(&o[0] + (&o[1] - &o[0]) * g.content)
        }
        2 => {
            let xx = Tensor::cat(&[x, x, x], 0);
            let tt = Tensor::cat(&[t, t, t], 0);
            let c = Tensor::cat(&[&null[0], &null[0], &emb[0]], 0);
            let s = Tensor::cat(&[&null[1], &emb[1], &null[1]], 0);
            let o = model.forward_emb(&xx, &tt, &[c, s])?.chunk(3, 0);
            Ok(dual_cfg(&o[0], &o[1], &o[2], g.content, g.style, g.naming))
        }
        n => Err(DitError::Input(format!("{n} condition branches"))),
    }
}
