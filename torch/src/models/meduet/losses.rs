//! MeDUET's training losses: dual reconstruction (Eq. 1), domain classification with gradient
//! reversal (Eqs. 2-3), MFTD (Eqs. 4-6) and SiQC (Eqs. 7-12), and their weighted sum (Eq. 13),
//! as the authors' code computes them (`method.md` sections 2.3-3.5).
//!
//! | term     | demix (default)                                                     | MAE mode (`demix = false`)                 |
//! |----------|---------------------------------------------------------------------|--------------------------------------------|
//! | L_rec    | `mean((x1rec*M + x2rec.flip(0)*(1-M) - patchify(x))^2)`              | mean of the per-token MSE over `M == 1`    |
//! | L_dc/ds  | `(CE(subset 1, d) + CE(subset 2, d.flip(0))) / 2`                     | `CE(visible tokens, d)`                    |
//! | L_MFTD   | `lc*(mm(zc1S,zc1T,M) + mm(zc2S,zc2T,1-M)) + (style alike)`           | `lc*mm(zcS,zcT,M) + mm(zsS,zsT,M)`         |
//! | L_SiQC   | quadruplet supervised contrast, teacher with `1-M`                  | same, partner views by flipping the batch  |
//!
//! `mm(a, b, m) = sum(mean_feat((a-b)^2) * m) / sum(m)`. The teacher passes run under
//! `no_grad`. A term whose weight is 0 (or MFTD before its start) is not computed and is
//! reported as 0; the two domain terms are computed together when either weight is non-zero.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{Demixed, Masks, MeDuet, MeduetError, RecMaskPairing};

/// Where a step is in training (decides whether MFTD is on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepInfo {
    /// The 0-based optimizer step.
    pub step: u64,
    /// All steps of the run (epochs x iterations per epoch).
    pub total_steps: u64,
}

impl StepInfo {
    /// Step `step` of `total_steps`.
    pub fn new(step: u64, total_steps: u64) -> Self {
        Self { step, total_steps }
    }
}

/// Every loss term of one step, as 0-dim f32 tensors (the weighted `total` carries the graph).
#[derive(Debug)]
pub struct Losses {
    /// The weighted sum to back-propagate.
    pub total: Tensor,
    /// L_rec.
    pub rec: Tensor,
    /// L_dc (content domain CE, through the gradient-reversal layer).
    pub domain_c: Tensor,
    /// L_ds (style domain CE).
    pub domain_s: Tensor,
    /// L_MFTD (0 while inactive).
    pub mftd: Tensor,
    /// L_SiQC.
    pub siqc: Tensor,
    /// Whether MFTD was active at this step.
    pub mftd_active: bool,
}

/// The loss terms as plain numbers, for logs (JSONL) and tests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossValues {
    /// Weighted total.
    pub total: f64,
    /// L_rec.
    pub rec: f64,
    /// L_dc.
    pub domain_c: f64,
    /// L_ds.
    pub domain_s: f64,
    /// L_MFTD.
    pub mftd: f64,
    /// L_SiQC.
    pub siqc: f64,
    /// Whether MFTD was active.
    pub mftd_active: bool,
}

impl Losses {
    /// Copies every term to the host (one sync per term).
    pub fn values(&self) -> LossValues {
        let v = |t: &Tensor| t.double_value(&[]);
        LossValues {
            total: v(&self.total),
            rec: v(&self.rec),
            domain_c: v(&self.domain_c),
            domain_s: v(&self.domain_s),
            mftd: v(&self.mftd),
            siqc: v(&self.siqc),
            mftd_active: self.mftd_active,
        }
    }
}

/// Per-token squared distance averaged over the feature axis: `[n, L, c]` -> `[n, L]`.
fn token_dist(a: &Tensor, b: &Tensor) -> Tensor {
    (a - b)
        .pow_tensor_scalar(2)
        .mean_dim(-1, false, None::<Kind>)
}

/// `sum(d * m) / sum(m)` over the whole batch.
fn masked_mean(d: &Tensor, m: &Tensor) -> Tensor {
    (d * m).sum(None::<Kind>) / m.sum(None::<Kind>)
}

/// SiQC's token pooling: LayerNorm without affine (eps 1e-5) over features, then the token mean.
fn token_pool(f: &Tensor) -> Tensor {
    let c = *f.size().last().expect("features");
    f.layer_norm([c], None::<&Tensor>, None::<&Tensor>, 1e-5, true)
        .mean_dim(1, false, None::<Kind>)
}

/// `x / (||x||_2 + 1e-8)` along dim 1.
fn l2norm(x: &Tensor) -> Tensor {
    x / (x.norm_scalaropt_dim(2, [1], true) + 1e-8)
}

/// The supervised query-key contrast of SiQC (`supcon_qk_loss`): cosine similarities times
/// `exp(clamp(logit_scale, ln 1e-3, ln 100))`, self pairs removed (-1e9), positives = same
/// identity label, loss = mean over anchors of the mean negative log-probability of positives.
///
/// # Shapes
/// - `q`, `k`: `[4B, c]`; `labels`: `[4B]` i64; `logit_scale`: 0-dim
/// - returns a scalar
pub fn supcon_qk_loss(q: &Tensor, k: &Tensor, labels: &Tensor, logit_scale: &Tensor) -> Tensor {
    let q = l2norm(q);
    let k = l2norm(&k.detach());
    let scale = logit_scale.clamp(1e-3f64.ln(), 100f64.ln()).exp();
    // f32 from here on, as PyTorch's promotion makes it under autocast in the authors' code
    // (an f16 `1e9` would overflow to inf and turn the masked diagonal into NaN).
    let sim = (q.matmul(&k.tr()) * scale).to_kind(Kind::Float);
    let n = sim.size()[0];
    let eye = Tensor::eye(n, (Kind::Float, sim.device()));
    let pos = labels
        .view([-1, 1])
        .eq_tensor(&labels.view([1, -1]))
        .logical_and(&eye.eq(0.0))
        .to_kind(Kind::Float);
    let sim = sim - &eye * 1e9;
    let log_prob = &sim - sim.logsumexp([1], true);
    let counts = pos.sum_dim_intlist(1, false, None::<Kind>).clamp_min(1e-6);
    (-(log_prob * &pos).sum_dim_intlist(1, false, None::<Kind>) / counts).mean(None::<Kind>)
}

/// SiQC identities of the quadruplet `[x, x.flip(0), x12, x21]`: content ids
/// `[0..B, perm, 0..B, perm]` and style ids `[0..B, perm, perm, 0..B]` with `perm = B-1..0`.
pub fn siqc_identities(b: i64, device: tch::Device) -> (Tensor, Tensor) {
    let ar = Tensor::arange(b, (Kind::Int64, device));
    let perm = ar.flip([0]);
    let cid = Tensor::cat(&[&ar, &perm, &ar, &perm], 0);
    let sid = Tensor::cat(&[&ar, &perm, &perm, &ar], 0);
    (cid, sid)
}

impl MeDuet {
    /// One step's forward pass and every loss term.
    ///
    /// `self` is the student; `teacher` (same [`Config`](super::Config)) supplies the MFTD and SiQC targets
    /// without gradients. `domains` are the domain ids of the samples, `masks` the mixing mask
    /// (see [`Masks::random`] / [`Masks::from_tensor`]), `step` decides whether MFTD is on.
    /// Wrap the call in `tch::autocast(true, ..)` on CUDA for mixed precision.
    ///
    /// # Shapes
    /// - `x`: `[B, C, crop, crop, crop]` with B even; `domains`: `[B]` integer
    /// - `masks`: `[B, L]` with `num_keep` zeros per row
    pub fn forward_losses(
        &self,
        teacher: &MeDuet,
        x: &Tensor,
        domains: &Tensor,
        masks: &Masks,
        step: StepInfo,
    ) -> Result<Losses, MeduetError> {
        self.check_inputs(x, domains, masks)?;
        if teacher.cfg != self.cfg {
            return Err(MeduetError::Input(
                "the teacher was built with a different config than the student".into(),
            ));
        }
        let w = &self.cfg.loss;
        let domains = domains.to_kind(Kind::Int64);
        let zero = || Tensor::zeros([], (Kind::Float, x.device()));

        let d = self.encode_demix(x, masks);
        let xrec = self.reconstruct(&d.zc1, &d.zc2, &d.zs1, &d.zs2, &d.cls, masks);

        let rec = if w.rec != 0.0 {
            self.rec_loss(x, &xrec, masks)
        } else {
            zero()
        };
        let (domain_c, domain_s) =
            if self.cfg.disentangle && (w.domain_c != 0.0 || w.domain_s != 0.0) {
                self.domain_losses(&d, &domains)
            } else {
                (zero(), zero())
            };
        let mftd_active = w.mftd_active(step.step, step.total_steps);
        let mftd = if mftd_active {
            self.mftd_loss(teacher, x, &xrec, masks)
        } else {
            zero()
        };
        let siqc = if self.cfg.disentangle && w.siqc != 0.0 {
            self.siqc_loss(teacher, x, masks, &d)
        } else {
            zero()
        };
        let mut total = &rec * w.rec;
        for (t, wt) in [
            (&domain_c, w.domain_c),
            (&domain_s, w.domain_s),
            (&mftd, if mftd_active { w.mftd } else { 0.0 }),
            (&siqc, w.siqc),
        ] {
            if wt != 0.0 {
                total = total.g_add(&(t * wt));
            }
        }
        Ok(Losses {
            total,
            rec,
            domain_c,
            domain_s,
            mftd,
            siqc,
            mftd_active,
        })
    }

    /// The dual reconstruction loss (Eq. 1; see [`RecMaskPairing`]), or the MAE loss on the
    /// masked tokens without demixing.
    ///
    /// # Shapes
    /// - `x`: `[B, C, crop^3]`; `xrec`: `[2B, L, P]` (demix) or `[B, L, P]`
    pub fn rec_loss(&self, x: &Tensor, xrec: &Tensor, masks: &Masks) -> Tensor {
        let target = self.patchify(x);
        if !self.cfg.demix {
            let per_token = (xrec - &target)
                .pow_tensor_scalar(2)
                .mean_dim(-1, false, None::<Kind>);
            return masked_mean(&per_token, masks.tensor());
        }
        let b = x.size()[0];
        let x1 = xrec.narrow(0, 0, b);
        let x2 = xrec.narrow(0, b, b);
        match self.cfg.rec_mask_pairing {
            RecMaskPairing::Code => {
                let unmix = &x1 * masks.take() + x2.flip([0]) * masks.keep();
                (unmix - &target).pow_tensor_scalar(2).mean(None::<Kind>)
            }
            RecMaskPairing::Clean => {
                let pred = &x1 * masks.take() + &x2 * masks.keep();
                let tgt = &target * masks.take() + target.flip([0]) * masks.keep();
                (pred - tgt).pow_tensor_scalar(2).mean(None::<Kind>)
            }
        }
    }

    /// `(L_dc, L_ds)` on the demixed factors (Eqs. 2-3).
    pub fn domain_losses(&self, d: &Demixed, domains: &Tensor) -> (Tensor, Tensor) {
        let cls = self
            .domain_classifier
            .as_ref()
            .expect("domain losses need disentanglement");
        let (lc1, ls1) = cls.losses(&d.zc1, &d.zs1, domains);
        if !self.cfg.demix {
            return (lc1, ls1);
        }
        let (lc2, ls2) = cls.losses(&d.zc2, &d.zs2, &domains.flip([0]));
        ((lc1 + lc2) * 0.5, (ls1 + ls2) * 0.5)
    }

    /// MFTD (Eqs. 4-6): the student re-encodes its reconstructions without mixing and matches
    /// the teacher's encoding of the clean inputs on the tokens each source did *not* supply.
    ///
    /// # Shapes
    /// - `xrec`: the output of [`MeDuet::reconstruct`] for this batch
    pub fn mftd_loss(&self, teacher: &MeDuet, x: &Tensor, xrec: &Tensor, masks: &Masks) -> Tensor {
        let b = x.size()[0];
        let lambda_c = self.cfg.loss.mftd_lambda_c;
        let m = masks.tensor();
        let fs = self.encode_full(&self.unpatchify(xrec));
        let (lc, ls) = if self.cfg.demix {
            let ft = tch::no_grad(|| teacher.encode_full(&Tensor::cat(&[x, &x.flip([0])], 0)));
            let m2 = 1.0 - m;
            let pair = |s: &Tensor, t: &Tensor| {
                masked_mean(&token_dist(&s.narrow(0, 0, b), &t.narrow(0, 0, b)), m)
                    + masked_mean(&token_dist(&s.narrow(0, b, b), &t.narrow(0, b, b)), &m2)
            };
            (
                pair(&fs.content, &ft.content),
                self.cfg.disentangle.then(|| pair(&fs.style, &ft.style)),
            )
        } else {
            let ft = tch::no_grad(|| teacher.encode_full(x));
            (
                masked_mean(&token_dist(&fs.content, &ft.content), m),
                self.cfg
                    .disentangle
                    .then(|| masked_mean(&token_dist(&fs.style, &ft.style), m)),
            )
        };
        match ls {
            Some(ls) => lc * lambda_c + ls,
            None => lc * lambda_c,
        }
    }

    /// The pooled quadruplet `[v1, v2, v12, v21]` of one factor: `a`/`b` the demixed factor
    /// tokens of the two sources, `swapped` the re-encoded swapped views (`[2B, ..]` with
    /// demixing, `[B, ..]` = x12 only in MAE mode, x21 being its batch flip).
    fn quadruplet(&self, a: &Tensor, b: &Tensor, swapped: &Tensor) -> Tensor {
        let n = a.size()[0];
        let pa = token_pool(a);
        let pb = token_pool(b);
        let (p12, p21) = if self.cfg.demix {
            (
                token_pool(&swapped.narrow(0, 0, n)),
                token_pool(&swapped.narrow(0, n, n)),
            )
        } else {
            let p = token_pool(swapped);
            let f = p.flip([0]);
            (p, f)
        };
        Tensor::cat(&[pa, pb, p12, p21], 0)
    }

    /// Content and style quadruplets of one network for `x` under `masks`, given its demixed
    /// factors: swap styles between the pair (`Ent(zc1, zs2)`, `Ent(zc2, zs1)`), decode,
    /// re-encode without mixing, pool.
    fn siqc_views(&self, d: &Demixed, masks: &Masks) -> (Tensor, Tensor) {
        let xs = self.reconstruct(&d.zc1, &d.zc2, &d.zs2, &d.zs1, &d.cls, masks);
        let fs = self.encode_full(&self.unpatchify(&xs));
        (
            self.quadruplet(&d.zc1, &d.zc2, &fs.content),
            self.quadruplet(&d.zs1, &d.zs2, &fs.style),
        )
    }

    /// SiQC (Eqs. 7-12): student queries from the step's demixed factors and their swapped
    /// re-encodings; teacher keys from the complementary mask `1 - M`.
    pub fn siqc_loss(&self, teacher: &MeDuet, x: &Tensor, masks: &Masks, d: &Demixed) -> Tensor {
        let b = x.size()[0];
        let (qc, qs) = self.siqc_views(d, masks);
        let (kc, ks) = tch::no_grad(|| {
            let mt = masks.complement();
            let dt = teacher.encode_demix(x, &mt);
            teacher.siqc_views(&dt, &mt)
        });
        let (cid, sid) = siqc_identities(b, x.device());
        supcon_qk_loss(&qc, &kc, &cid, &self.logit_scale_c)
            + supcon_qk_loss(&qs, &ks, &sid, &self.logit_scale_s)
    }
}
