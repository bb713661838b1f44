//! MeDUET model and loss configuration: presets, switches, validation.
//!
//! Every paper/code mismatch of `method.md` section 9 that touches pretraining is a field here,
//! defaulting to the authors' code:
//!
//! | field                   | default (code)                         | switch (paper / clean)               |
//! |-------------------------|----------------------------------------|--------------------------------------|
//! | `rec_mask_pairing`      | `Code`: `x2rec.flip(0)` paired with `M` | `Clean`: each position scored once, on the hidden source |
//! | `siqc_learnable_scale`  | `false`: logit scales fixed at `ln(1/0.07)` | `true`: trainable `siqc.logit_scale_{c,s}` |
//!
//! Ablations of the paper's Table 5: `disentangle = false` (no Dis/Ent), `demix = false`
//! (MAE-style masked reconstruction, no mixing) and any loss weight set to 0 (the term is then
//! not computed and logged as 0).

use serde::{Deserialize, Serialize};

/// How the dual reconstruction loss pairs the second decoder's output with the mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecMaskPairing {
    /// The authors' code: `unmix = x1rec*M + x2rec.flip(0)*(1-M)` against `patchify(x)`. The
    /// flipped half was built with `M[B-1-i]` yet is selected with `M[i]`, so some terms score
    /// visible-token reconstructions.
    #[default]
    Code,
    /// Every position of every mixed sample is scored once, on the source that was hidden there,
    /// with its own decoder: `x1rec*M + x2rec*(1-M)` against `x*M + x.flip(0)*(1-M)`.
    Clean,
}

/// Loss weights and schedules. `total = rec*L_rec + domain_c*L_dc + domain_s*L_ds +
/// mftd*L_MFTD*[active] + siqc*L_SiQC`. A weight of 0 switches its term off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Weight of the dual reconstruction loss (1).
    pub rec: f64,
    /// Weight of the content domain loss (code `lambda1` = 0.2).
    pub domain_c: f64,
    /// Weight of the style domain loss (code `lambda1` = 0.2).
    pub domain_s: f64,
    /// Weight of MFTD (code `lambda2` = 0.5).
    pub mftd: f64,
    /// Weight of SiQC (code `lambda3` = 0.3).
    pub siqc: f64,
    /// MFTD's content weight `lambda_c` inside `L_MFTD = lambda_c*L_c + L_s` (0.5).
    pub mftd_lambda_c: f64,
    /// MFTD is active from `step >= mftd_start_fraction * total_steps` (code: epoch 1000 of
    /// 5000 = 0.2; paper: 40k of 200k steps).
    pub mftd_start_fraction: f64,
    /// Gradient-reversal strength on the content branch (1.0).
    pub grl_lambda: f64,
    /// Initial SiQC logit scale, `ln(1/0.07)`.
    pub siqc_logit_scale_init: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            rec: 1.0,
            domain_c: 0.2,
            domain_s: 0.2,
            mftd: 0.5,
            siqc: 0.3,
            mftd_lambda_c: 0.5,
            mftd_start_fraction: 0.2,
            grl_lambda: 1.0,
            siqc_logit_scale_init: (1.0f64 / 0.07).ln(),
        }
    }
}

impl LossConfig {
    /// Whether MFTD contributes at `step` (of `total_steps`).
    pub fn mftd_active(&self, step: u64, total_steps: u64) -> bool {
        self.mftd != 0.0 && step as f64 >= self.mftd_start_fraction * total_steps as f64
    }
}

/// The MeDUET network and its losses. Build it with [`Config::vit_b`] (the paper) or
/// [`Config::tiny`] (CPU tests, quickstart) and adjust fields; [`Config::validate`] runs before
/// a model is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Latent channels of the input crop (MAISI VAE: 4).
    pub in_chans: i64,
    /// Edge of the cubic latent crop (24 = 96 voxels / 4).
    pub crop: i64,
    /// Patch edge in latent voxels (4 -> 6^3 = 216 tokens for a 24^3 crop).
    pub patch: i64,
    /// Encoder width D (768).
    pub embed_dim: i64,
    /// Encoder blocks (12).
    pub depth: i64,
    /// Encoder attention heads (12).
    pub num_heads: i64,
    /// Decoder width (384).
    pub decoder_embed_dim: i64,
    /// Decoder blocks (8).
    pub decoder_depth: i64,
    /// Decoder attention heads (12).
    pub decoder_num_heads: i64,
    /// MLP ratio of every block (4).
    pub mlp_ratio: f64,
    /// Style width d_s (192 = int(768 * s_ratio 0.25)); the content width d_c equals D.
    pub style_dim: i64,
    /// Hidden width multiplier of the 3-layer domain MLPs (2: 768->1536->1536->n, 192->384->384->n).
    pub domain_hidden_mult: i64,
    /// Number of domains (datasets); comes from the data (VoCo-10k: 10).
    pub n_domains: i64,
    /// Mixing ("mask") ratio: `int(L*(1-ratio))` tokens come from the sample itself (0.5).
    pub mask_ratio: f64,
    /// Factor disentanglement (Dis/Ent). `false` is the "w/o Disent." ablation: encoder tokens
    /// pass straight (content = style = the tokens, Ent = identity); the domain losses and SiQC,
    /// which need two factors, are off, and `L_MFTD = lambda_c * L_c` on the raw tokens.
    pub disentangle: bool,
    /// Token demixing. `false` is the "w/o Demix." ablation: plain MAE-style masked
    /// reconstruction (the encoder sees only the `M == 0` tokens of each sample, one decoder
    /// pass, loss on the masked tokens); pairs for SiQC are still `i <-> B-1-i`.
    pub demix: bool,
    /// Pairing of the dual reconstruction loss (see [`RecMaskPairing`]).
    pub rec_mask_pairing: RecMaskPairing,
    /// `false` (code): the SiQC logit scales stay at their init, because the authors' optimizer
    /// never sees them. `true` (paper: "learnable scale"): they are trainable variables
    /// `siqc.logit_scale_c` / `siqc.logit_scale_s` in the model's var store.
    pub siqc_learnable_scale: bool,
    /// Loss weights and schedules.
    pub loss: LossConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self::vit_b()
    }
}

/// An invalid [`Config`] value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A field out of its valid range.
    #[error("meduet config: {field} = {value} is invalid: {reason}")]
    Invalid {
        /// The field name.
        field: &'static str,
        /// The offending value, printed.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
}

fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

impl Config {
    /// The paper's model: ViT-B encoder 768x12 (12 heads), decoder 384x8 (12 heads),
    /// d_s = 192, patch 4 on a 4x24^3 latent crop, 10 domains.
    pub fn vit_b() -> Self {
        Self {
            in_chans: 4,
            crop: 24,
            patch: 4,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            decoder_embed_dim: 384,
            decoder_depth: 8,
            decoder_num_heads: 12,
            mlp_ratio: 4.0,
            style_dim: 192,
            domain_hidden_mult: 2,
            n_domains: 10,
            mask_ratio: 0.5,
            disentangle: true,
            demix: true,
            rec_mask_pairing: RecMaskPairing::Code,
            siqc_learnable_scale: false,
            loss: LossConfig::default(),
        }
    }

    /// A CPU-sized model with the same structure: encoder 96x2 (4 heads), decoder 48x2
    /// (4 heads), d_s = 24, same crop and patch, 4 domains. Widths are multiples of 6 because
    /// the sin-cos position embedding needs it.
    pub fn tiny() -> Self {
        Self {
            embed_dim: 96,
            depth: 2,
            num_heads: 4,
            decoder_embed_dim: 48,
            decoder_depth: 2,
            decoder_num_heads: 4,
            style_dim: 24,
            n_domains: 4,
            ..Self::vit_b()
        }
    }

    /// The smallest CPU size whose tokens can carry a patch: encoder 288x2 (6 heads; 288 >=
    /// the 256 values of a 4^3 x 4 patch, which `tiny` cannot pass through), decoder 288x2
    /// (6 heads), d_s = 48, same crop and patch, 4 domains. Its DiT twin is
    /// `dit::Config::small`.
    pub fn small() -> Self {
        Self {
            embed_dim: 288,
            depth: 2,
            num_heads: 6,
            decoder_embed_dim: 288,
            decoder_depth: 2,
            decoder_num_heads: 6,
            style_dim: 48,
            n_domains: 4,
            ..Self::vit_b()
        }
    }

    /// Tokens per side of the crop.
    pub fn grid(&self) -> i64 {
        self.crop / self.patch
    }

    /// Tokens per crop, L = (crop/patch)^3.
    pub fn num_tokens(&self) -> i64 {
        self.grid().pow(3)
    }

    /// Values per patch token, `patch^3 * in_chans` (256).
    pub fn patch_values(&self) -> i64 {
        self.patch.pow(3) * self.in_chans
    }

    /// Tokens each sample keeps from itself, `int(L * (1 - mask_ratio))` (108).
    pub fn num_keep(&self) -> i64 {
        (self.num_tokens() as f64 * (1.0 - self.mask_ratio)) as i64
    }

    /// Width of the content factor (D).
    pub fn content_dim(&self) -> i64 {
        self.embed_dim
    }

    /// Width of the style factor: `style_dim`, or D without disentanglement (style = tokens).
    pub fn style_out_dim(&self) -> i64 {
        if self.disentangle {
            self.style_dim
        } else {
            self.embed_dim
        }
    }

    /// Checks every invariant the model relies on; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("in_chans", self.in_chans),
            ("crop", self.crop),
            ("patch", self.patch),
            ("embed_dim", self.embed_dim),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
            ("decoder_embed_dim", self.decoder_embed_dim),
            ("decoder_depth", self.decoder_depth),
            ("decoder_num_heads", self.decoder_num_heads),
            ("style_dim", self.style_dim),
            ("domain_hidden_mult", self.domain_hidden_mult),
            ("n_domains", self.n_domains),
        ];
        for (field, v) in positive {
            if v <= 0 {
                return Err(invalid(field, v, "must be positive"));
            }
        }
        if self.crop % self.patch != 0 {
            return Err(invalid(
                "crop",
                self.crop,
                format!("must be divisible by patch = {}", self.patch),
            ));
        }
        for (field, dim, heads) in [
            ("embed_dim", self.embed_dim, self.num_heads),
            (
                "decoder_embed_dim",
                self.decoder_embed_dim,
                self.decoder_num_heads,
            ),
        ] {
            if dim % heads != 0 {
                return Err(invalid(
                    field,
                    dim,
                    format!("must be divisible by its {heads} heads"),
                ));
            }
            if dim % 6 != 0 {
                return Err(invalid(
                    field,
                    dim,
                    "must be divisible by 6 (3-D sin-cos position embedding)",
                ));
            }
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 {
            return Err(invalid("mlp_ratio", self.mlp_ratio, "must be positive"));
        }
        if !(self.mask_ratio > 0.0 && self.mask_ratio < 1.0) {
            return Err(invalid("mask_ratio", self.mask_ratio, "must be in (0, 1)"));
        }
        let (l, keep) = (self.num_tokens(), self.num_keep());
        if keep == 0 || keep == l {
            return Err(invalid(
                "mask_ratio",
                self.mask_ratio,
                format!("keeps {keep} of {l} tokens; both subsets must be non-empty"),
            ));
        }
        if self.demix && self.disentangle && self.loss.siqc != 0.0 && 2 * keep != l {
            return Err(invalid(
                "mask_ratio",
                self.mask_ratio,
                format!(
                    "SiQC swaps factors of the two subsets, which needs equal halves; \
                     it keeps {keep} of {l} (hint: use 0.5 or set loss.siqc = 0)"
                ),
            ));
        }
        let l = &self.loss;
        for (field, v) in [
            ("loss.rec", l.rec),
            ("loss.domain_c", l.domain_c),
            ("loss.domain_s", l.domain_s),
            ("loss.mftd", l.mftd),
            ("loss.siqc", l.siqc),
            ("loss.mftd_lambda_c", l.mftd_lambda_c),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(field, v, "must be finite and >= 0"));
            }
        }
        if !(l.mftd_start_fraction.is_finite() && l.mftd_start_fraction >= 0.0) {
            return Err(invalid(
                "loss.mftd_start_fraction",
                l.mftd_start_fraction,
                "must be finite and >= 0",
            ));
        }
        if !l.grl_lambda.is_finite() || !l.siqc_logit_scale_init.is_finite() {
            return Err(invalid(
                "loss.grl_lambda / loss.siqc_logit_scale_init",
                format!("{} / {}", l.grl_lambda, l.siqc_logit_scale_init),
                "must be finite",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_sized() {
        let b = Config::vit_b();
        b.validate().unwrap();
        assert_eq!(
            (b.num_tokens(), b.num_keep(), b.patch_values()),
            (216, 108, 256)
        );
        Config::tiny().validate().unwrap();
        let s = Config::small();
        s.validate().unwrap();
        assert!(s.embed_dim.min(s.decoder_embed_dim) >= s.patch_values());
        assert!(Config::tiny().embed_dim < s.patch_values());
    }

    #[test]
    fn rejects_crop_not_divisible_by_patch() {
        let c = Config {
            crop: 22,
            ..Config::tiny()
        };
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("crop = 22"), "{e}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = serde_json::from_str::<Config>(r#"{"embed_dm": 96}"#).unwrap_err();
        assert!(e.to_string().contains("embed_dm"), "{e}");
        let c: Config = serde_json::from_str(r#"{"loss": {"siqc": 0.0}}"#).unwrap();
        assert_eq!(c.loss.siqc, 0.0);
        assert_eq!(c.embed_dim, 768);
    }
}
