//! The MAISI VAE's architecture (MONAI `AutoencoderKlMaisi` constructor arguments). Plain
//! data: stage parameters embed it and the `meduet-torch` worker builds the network from it.

use serde::{Deserialize, Serialize};

/// Architecture hyperparameters of the MAISI VAE (`AutoencoderKlMaisi` in `meduet-torch`), named as MONAI's constructor
/// arguments. Unknown keys are rejected when deserialised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Image channels in (1 for CT).
    pub in_channels: i64,
    /// Image channels out (1 for CT).
    pub out_channels: i64,
    /// Latent channels (4 in MAISI).
    pub latent_channels: i64,
    /// Channels of each resolution level; there are `len - 1` downsamplings.
    pub num_channels: Vec<i64>,
    /// Residual blocks per level (same length as `num_channels`).
    pub num_res_blocks: Vec<i64>,
    /// GroupNorm groups; every entry of `num_channels` must be divisible by it.
    pub norm_num_groups: i64,
    /// GroupNorm epsilon.
    pub norm_eps: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self::maisi()
    }
}

impl Config {
    /// The paper's VAE (MONAI bundle `config_maisi.json`): 64/128/256 channels, two
    /// residual blocks per level, GroupNorm(32, eps 1e-6), 4 latent channels; 20.9 M
    /// parameters.
    pub fn maisi() -> Self {
        Config {
            in_channels: 1,
            out_channels: 1,
            latent_channels: 4,
            num_channels: vec![64, 128, 256],
            num_res_blocks: vec![2, 2, 2],
            norm_num_groups: 32,
            norm_eps: 1e-6,
        }
    }

    /// A narrow VAE of the same topology for the CPU quickstart and tests: 16/32/64
    /// channels, GroupNorm(8); 1.3 M parameters, about 16x cheaper than [`Config::maisi`].
    pub fn small() -> Self {
        Config {
            num_channels: vec![16, 32, 64],
            norm_num_groups: 8,
            ..Self::maisi()
        }
    }

    /// Checks the invariants MONAI checks (and a few more) before a network is built.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |m: String| Err(m);
        for (name, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if v < 1 {
                return bad(format!("{name} = {v} must be at least 1"));
            }
        }
        if self.num_channels.is_empty() {
            return bad("num_channels is empty".into());
        }
        if self.num_res_blocks.len() != self.num_channels.len() {
            return bad(format!(
                "num_res_blocks {:?} and num_channels {:?} must have the same length",
                self.num_res_blocks, self.num_channels
            ));
        }
        if self.num_channels.len() > 6 {
            return bad(format!(
                "num_channels {:?} has more than 6 levels",
                self.num_channels
            ));
        }
        if let Some(c) = self
            .num_channels
            .iter()
            .find(|&&c| c < 1 || c % self.norm_num_groups != 0)
        {
            return bad(format!(
                "num_channels entry {c} is not a positive multiple of norm_num_groups = {}",
                self.norm_num_groups
            ));
        }
        if let Some(r) = self.num_res_blocks.iter().find(|&&r| r < 0) {
            return bad(format!("num_res_blocks entry {r} is negative"));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return bad(format!("norm_eps = {} must be positive", self.norm_eps));
        }
        Ok(())
    }

    /// Spatial downsampling factor per axis: `2^(levels - 1)` (4 for MAISI).
    pub fn downsample_factor(&self) -> i64 {
        1 << (self.num_channels.len().saturating_sub(1))
    }
}
