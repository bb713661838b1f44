//! DiT / SiT configuration (method.md section 4.2): sizes, conditioning, paper/code switches.
//!
//! DiT and SiT share the network (the authors' `DiT/models.py` and `SiT/models.py` are
//! identical); they differ in the time input (integer DDPM steps vs continuous `t` in
//! `[0, 1]`) and in the training objective, which the training stage chooses.
//!
//! | field          | default (code)                                   | switch                                |
//! |----------------|--------------------------------------------------|---------------------------------------|
//! | `adaln`        | `code`: shift/scale from content + style, gates from time only | `paper`: every condition branch also predicts gates (Eq. 18-19, see [`AdaLn`]) |
//! | `learn_sigma`  | `true`: the final layer predicts `2C` channels, the forward keeps the first `C` | `false`: `C` channels |
//! | `condition`    | `factors` (content + style)                      | `metadata` (the paper's baseline), `none` |
//!
//! `content_dim`, `style_dim` and `metadata_dim` come from the data (the factor bank or the
//! metadata vectors); a preset leaves them at 0 until the training stage fills them in.

use serde::{Deserialize, Serialize};

/// What the network is conditioned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConditionMode {
    /// MeDUET content and style vectors (two embedders, dual classifier-free guidance).
    #[default]
    Factors,
    /// A metadata vector per volume (domain one-hot and spacing): the paper's baseline.
    Metadata,
    /// Unconditional.
    None,
}

/// How the AdaLN-Zero parameters of a block are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdaLn {
    /// The authors' code: `shift, scale = mod_content(c) + mod_style(s)` (4 chunks each),
    /// `gate = mod_gate(t)` (time only).
    #[default]
    Code,
    /// The paper's Eq. 18-19 as read from its text ("for each block we predict affine/gate
    /// parameters from content/style and combine them"; the equations themselves were lost
    /// in extraction, so this reading is a documented guess): `mod_content` and `mod_style`
    /// each predict shift, scale and gate (6 chunks, DiT's order); the gates are summed with
    /// the time gate `mod_gate(t)`, so that time still enters every block.
    Paper,
}

/// The DiT/SiT network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Latent channels (4).
    pub in_chans: i64,
    /// Latent crop `[X, Y, Z]` the position table is built for (`[64, 64, 32]`).
    pub input_size: [i64; 3],
    /// Patch edge in latent voxels (4).
    pub patch: i64,
    /// Token width (768 for B).
    pub hidden_size: i64,
    /// Blocks (12 for B).
    pub depth: i64,
    /// Attention heads (12 for B).
    pub num_heads: i64,
    /// MLP ratio (4).
    pub mlp_ratio: f64,
    /// Predict `2C` output channels and keep the first `C` (the authors' setting).
    pub learn_sigma: bool,
    pub condition: ConditionMode,
    pub adaln: AdaLn,
    /// Content vector width (from the factor bank; MeDUET: D).
    pub content_dim: i64,
    /// Style vector width (from the factor bank; MeDUET: D/4).
    pub style_dim: i64,
    /// Metadata vector width (from the data).
    pub metadata_dim: i64,
    /// Initial learnable temperature of the content/style embedders (0.1).
    pub tau_init: f64,
    /// Train the temperatures (the authors: true).
    pub learnable_tau: bool,
    /// Classes of the authors' unused `y_embedder` (1000), kept so checkpoints interchange;
    /// 0 leaves it out.
    pub num_classes: i64,
}

impl Default for Config {
    fn default() -> Self {
        Self::b4()
    }
}

/// An invalid [`Config`] value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("dit config: {field} = {value} is invalid: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

impl Config {
    /// DiT-B/4 / SiT-B/4 of the paper: 768 x 12, 12 heads, patch 4 on a 4 x 64 x 64 x 32
    /// latent (2048 tokens).
    pub fn b4() -> Self {
        Self {
            in_chans: 4,
            input_size: [64, 64, 32],
            patch: 4,
            hidden_size: 768,
            depth: 12,
            num_heads: 12,
            mlp_ratio: 4.0,
            learn_sigma: true,
            condition: ConditionMode::Factors,
            adaln: AdaLn::Code,
            content_dim: 0,
            style_dim: 0,
            metadata_dim: 0,
            tau_init: 0.1,
            learnable_tau: true,
            num_classes: 1000,
        }
    }

    /// DiT-S/4: 384 x 12, 6 heads.
    pub fn s4() -> Self {
        Self {
            hidden_size: 384,
            num_heads: 6,
            ..Self::b4()
        }
    }

    /// CPU-sized: 96 x 2, 4 heads (the width of the tiny MeDUET, so `meduet` init applies),
    /// on a 16^3 latent crop; no dead label table.
    pub fn tiny() -> Self {
        Self {
            input_size: [16, 16, 16],
            hidden_size: 96,
            depth: 2,
            num_heads: 4,
            num_classes: 0,
            ..Self::b4()
        }
    }

    /// CPU-sized and wide enough to carry a 4^3 x 4 patch (256 values): 288 x 2, 6 heads,
    /// 16^3 latent crop; the width and depth of the `small` MeDUET, so `meduet` init applies.
    pub fn small() -> Self {
        Self {
            hidden_size: 288,
            num_heads: 6,
            ..Self::tiny()
        }
    }

    /// Tokens per axis.
    pub fn grid(&self) -> [i64; 3] {
        self.input_size.map(|s| s / self.patch)
    }

    /// Values per patch token, `patch^3 * in_chans` (256 for B/4 on 4-channel latents).
    pub fn patch_values(&self) -> i64 {
        self.patch.pow(3) * self.in_chans
    }

    /// Tokens per crop.
    pub fn num_tokens(&self) -> i64 {
        self.grid().iter().product()
    }

    /// Channels the final layer predicts (`2C` with `learn_sigma`).
    pub fn out_channels(&self) -> i64 {
        if self.learn_sigma {
            2 * self.in_chans
        } else {
            self.in_chans
        }
    }

    /// MLP hidden width, `int(hidden * mlp_ratio)`.
    pub fn mlp_hidden(&self) -> i64 {
        (self.hidden_size as f64 * self.mlp_ratio) as i64
    }

    /// The condition widths the network needs filled in, by name.
    pub fn needed_dims(&self) -> Vec<(&'static str, i64)> {
        match self.condition {
            ConditionMode::Factors => vec![
                ("content_dim", self.content_dim),
                ("style_dim", self.style_dim),
            ],
            ConditionMode::Metadata => vec![("metadata_dim", self.metadata_dim)],
            ConditionMode::None => vec![],
        }
    }

    /// Checks the sizes (not the data-given widths: see [`Config::validate_complete`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("in_chans", self.in_chans),
            ("patch", self.patch),
            ("hidden_size", self.hidden_size),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
        ] {
            if v <= 0 {
                return Err(invalid(field, v, "must be positive"));
            }
        }
        if self
            .input_size
            .iter()
            .any(|&s| s <= 0 || s % self.patch != 0)
        {
            return Err(invalid(
                "input_size",
                format!("{:?}", self.input_size),
                format!(
                    "every axis must be a positive multiple of patch {}",
                    self.patch
                ),
            ));
        }
        if self.hidden_size % self.num_heads != 0 {
            return Err(invalid(
                "hidden_size",
                self.hidden_size,
                format!("must be divisible by num_heads {}", self.num_heads),
            ));
        }
        if self.hidden_size % 6 != 0 {
            return Err(invalid(
                "hidden_size",
                self.hidden_size,
                "must be divisible by 6 (3-D sin-cos position embedding)",
            ));
        }
        if !(self.mlp_ratio > 0.0) {
            return Err(invalid("mlp_ratio", self.mlp_ratio, "must be positive"));
        }
        if !(self.tau_init > 0.0) {
            return Err(invalid("tau_init", self.tau_init, "must be positive"));
        }
        if self.num_classes < 0 {
            return Err(invalid("num_classes", self.num_classes, "must be >= 0"));
        }
        for (field, v) in [
            ("content_dim", self.content_dim),
            ("style_dim", self.style_dim),
            ("metadata_dim", self.metadata_dim),
        ] {
            if v < 0 {
                return Err(invalid(field, v, "must be >= 0"));
            }
        }
        Ok(())
    }

    /// [`Config::validate`] plus the condition widths the mode needs (positive).
    pub fn validate_complete(&self) -> Result<(), ConfigError> {
        self.validate()?;
        for (field, v) in self.needed_dims() {
            if v <= 0 {
                return Err(invalid(
                    field,
                    v,
                    format!(
                        "condition '{}' needs it positive (it comes from the data)",
                        serde_json::to_value(self.condition).expect("json")
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_validation() {
        let b = Config::b4();
        assert_eq!(b.grid(), [16, 16, 8]);
        assert_eq!(b.num_tokens(), 2048);
        assert_eq!(b.out_channels(), 8);
        b.validate().unwrap();
        assert!(b.validate_complete().unwrap_err().field == "content_dim");
        let t = Config {
            content_dim: 96,
            style_dim: 24,
            ..Config::tiny()
        };
        t.validate_complete().unwrap();
        let bad = Config {
            input_size: [16, 18, 16],
            ..Config::tiny()
        };
        assert_eq!(bad.validate().unwrap_err().field, "input_size");
        let none = Config {
            condition: ConditionMode::None,
            ..Config::tiny()
        };
        none.validate_complete().unwrap();
    }
}
