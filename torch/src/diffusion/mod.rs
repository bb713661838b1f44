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

use crate::models::controlnet::ControlNet;
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

/// The mask tokens a guided ControlNet evaluation needs, computed once per batch of
/// samples ([`ControlNet::mask_tokens`]): with the mask, and without it (zeros).
pub struct MaskTokens {
    pub masked: Tensor,
    pub unmasked: Tensor,
}

impl MaskTokens {
    /// The tokens of `mask` `[b, K, X*s, Y*s, Z*s]` and of an all-zero mask.
    pub fn new(base: &Dit, control: &ControlNet, mask: &Tensor) -> Result<Self, DitError> {
        Ok(Self {
            masked: control.mask_tokens(base, mask)?,
            unmasked: control.mask_tokens(base, &mask.zeros_like())?,
        })
    }
}

/// The guided output of a ControlNet-controlled model: dual classifier-free guidance with
/// every branch seeing the mask, plus mask guidance against the unconditional output
/// without a mask (`w_m = mask_weight`):
///
/// ```text
/// o = o_00(no mask) + w_m (o_00(m) - o_00(no mask)) + [dual-CFG terms relative to o_00(m)]
/// factors : + w_c (o_0s(m) - o_00(m)) + w_s (o_c0(m) - o_00(m))    (naming = code)
/// metadata: + w_c (o_m(m)  - o_0(m))
/// ```
///
/// At `w_m = 1` the branch without a mask cancels and is not evaluated (plain mask
/// conditioning with dual CFG: 3 / 2 / 1 evaluations); otherwise one more. All branches go
/// through one batched forward pass.
///
/// # Shapes
/// - `x`: `[b, C, X, Y, Z]`; `t`: `[b]`; `emb`, `null`: `[b, D]` each; `tokens`: `[b, T, D]`
/// - returns `[b, C, X, Y, Z]`
#[allow(clippy::too_many_arguments)]
pub fn controlled_guided_output(
    base: &Dit,
    control: &ControlNet,
    x: &Tensor,
    t: &Tensor,
    emb: &[Tensor],
    null: &[Tensor],
    tokens: &MaskTokens,
    g: &GuidanceParams,
    mask_weight: f64,
) -> Result<Tensor, DitError> {
    let with_unmasked = mask_weight != 1.0;
    // Branches: the condition rows of each embedding, and whether the mask is on.
    let nulls: Vec<&Tensor> = null.iter().collect();
    let mut branches: Vec<(Vec<&Tensor>, bool)> = Vec::new();
    if with_unmasked {
        branches.push((nulls.clone(), false));
    }
    branches.push((nulls, true));
    match emb.len() {
        0 => {}
        1 => branches.push((vec![&emb[0]], true)),
        2 => {
            branches.push((vec![&null[0], &emb[1]], true));
            branches.push((vec![&emb[0], &null[1]], true));
        }
        n => return Err(DitError::Input(format!("{n} condition branches"))),
    }
    let n = branches.len();
    let conds: Vec<Tensor> = (0..emb.len())
        .map(|i| Tensor::cat(&branches.iter().map(|b| b.0[i]).collect::<Vec<_>>(), 0))
        .collect();
    let tt: Vec<&Tensor> = branches
        .iter()
        .map(|b| {
            if b.1 {
                &tokens.masked
            } else {
                &tokens.unmasked
            }
        })
        .collect();
    let xx = Tensor::cat(&vec![x; n], 0);
    let ts = Tensor::cat(&vec![t; n], 0);
    let out = control.forward_tokens(base, &xx, &ts, &conds, &Tensor::cat(&tt, 0), 1.0)?;
    let o = base.keep_prediction(out).chunk(n as i64, 0);
    let (o_unmasked, o) = if with_unmasked {
        (Some(&o[0]), &o[1..])
    } else {
        (None, &o[..])
    };
    let guided = match emb.len() {
        0 => o[0].shallow_clone(),
        1 => &o[0] + (&o[1] - &o[0]) * g.content,
        _ => dual_cfg(&o[0], &o[1], &o[2], g.content, g.style, g.naming),
    };
    Ok(match o_unmasked {
        Some(u) => guided + (&o[0] - u) * (mask_weight - 1.0),
        None => guided,
    })
}
