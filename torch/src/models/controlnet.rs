//! A ControlNet for meduet's 3-D DiT/SiT: segmentation masks steer a frozen, trained
//! diffusion model.
//!
//! Sources: ControlNet (Zhang, Rao and Agrawala, ICCV 2023: a trainable copy of the encoder,
//! joined to the frozen model through zero-initialised layers); MONAI's
//! `ControlNetConditioningEmbedding` and MAISI's ControlNet (the mask encoder); PixArt-delta's
//! ControlNet-Transformer (Chen et al. 2024: copy the first N transformer blocks, add each
//! copy's output through a zero-initialised linear layer to the matching frozen block).
//!
//! # Forward
//!
//! ```text
//! mask m [b, K, X*s, Y*s, Z*s] (one-hot, background included; all zeros = no mask)
//!   cond_embedding: conv_in 3^3 -> SiLU, then per width pair: 3^3 conv + SiLU,
//!                   3^3 stride-2 conv + SiLU (len(channels) - 1 halvings: s = 2^(len-1)),
//!                   patch_embed: Conv3d k = stride = patch to the DiT width, zero-initialised
//!                   -> tokens e [b, T, D]
//! h_0 = x_embedder(x) + pos_embed  (the frozen base);  c_0 = h_0 + e
//! for i in 0..depth_base:
//!     h_{i+1} = base.blocks[i](h_i, t, conds)
//!     if i < N:  c_{i+1} = blocks[i](c_i, t, conds);  h_{i+1} += zero_projs[i](c_{i+1}) * scale
//! out = base.final_layer(h, t, conds), unpatchified
//! ```
//!
//! The copies start as the base's first N blocks (weights copied) and see the base's time
//! and condition embeddings; every `zero_projs[i]` starts at zero, so before training the
//! controlled model's output is the base model's, exactly.
//!
//! # Variable names
//!
//! `cond_embedding.conv_in.conv.*`, `cond_embedding.blocks.{j}.conv.*` (MONAI's names),
//! `cond_embedding.patch_embed.proj.*`, `blocks.{i}.*` (the DiT block names),
//! `zero_projs.{i}.*`. `reference/controlnet_ref.py` loads a saved `VarStore` strictly.

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Kind, Tensor};

use super::conv::Conv3;
use super::dit::{Config as DitConfig, Dit, DitBlock, DitError};

/// The ControlNet's sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Channels of the one-hot mask: the background and each foreground class.
    pub mask_channels: i64,
    /// How many of the base's first blocks are copied.
    pub depth: i64,
    /// Widths of the mask encoder; `len - 1` stride-2 halvings bring the image grid to
    /// the latent grid.
    pub embedding_channels: Vec<i64>,
    /// Image voxels per latent voxel along each axis (the VAE's downsampling).
    pub scale: i64,
}

impl ControlConfig {
    /// Checks the sizes against the base DiT.
    pub fn validate(&self, base: &DitConfig) -> Result<(), String> {
        if self.mask_channels < 2 {
            return Err(format!(
                "mask_channels: {} must count the background and at least one class",
                self.mask_channels
            ));
        }
        if self.depth < 1 || self.depth > base.depth {
            return Err(format!(
                "depth: {} copied blocks, but the base DiT has {} (1..={} allowed)",
                self.depth, base.depth, base.depth
            ));
        }
        let c = &self.embedding_channels;
        if c.is_empty() || c.iter().any(|&w| w < 1) {
            return Err(format!(
                "embedding_channels: {c:?} must be one or more positive widths"
            ));
        }
        let halvings = c.len() as u32 - 1;
        if self.scale < 1 || 1i64 << halvings != self.scale {
            return Err(format!(
                "embedding_channels: {} widths halve the mask {halvings} time(s) (x{}), but the \
                 latents are {}x coarser than the masks: give {} widths",
                c.len(),
                1i64 << halvings,
                self.scale,
                (self.scale.max(1) as f64).log2() as i64 + 1
            ));
        }
        Ok(())
    }

    /// The mask grid of a latent grid.
    pub fn mask_size(&self, latent: [i64; 3]) -> [i64; 3] {
        latent.map(|n| n * self.scale)
    }
}

/// The mask encoder (MONAI's `ControlNetConditioningEmbedding`, ending in a zero-initialised
/// patch embedding to DiT tokens).
#[derive(Debug)]
pub struct ConditioningEmbedding {
    conv_in: Conv3,
    blocks: Vec<Conv3>,
    patch_embed: Conv3,
}

impl ConditioningEmbedding {
    fn new(vs: &nn::Path, cfg: &ControlConfig, hidden: i64, patch: i64) -> Self {
        let ch = &cfg.embedding_channels;
        let conv_in = Conv3::new(
            &(vs / "conv_in" / "conv"),
            cfg.mask_channels,
            ch[0],
            [3; 3],
            [1; 3],
            true,
        );
        let mut blocks = Vec::new();
        for w in ch.windows(2) {
            let j = blocks.len();
            blocks.push(Conv3::new(
                &(vs / "blocks" / j / "conv"),
                w[0],
                w[0],
                [3; 3],
                [1; 3],
                true,
            ));
            blocks.push(Conv3::new(
                &(vs / "blocks" / (j + 1) / "conv"),
                w[0],
                w[1],
                [3; 3],
                [2; 3],
                true,
            ));
        }
        let last = *ch.last().expect("validated");
        let mut patch_embed = Conv3::new(
            &(vs / "patch_embed" / "proj"),
            last,
            hidden,
            [patch; 3],
            [patch; 3],
            true,
        )
        .unpadded();
        tch::no_grad(|| {
            let _ = patch_embed.weight.zero_();
            if let Some(b) = patch_embed.bias.as_mut() {
                let _ = b.zero_();
            }
        });
        Self {
            conv_in,
            blocks,
            patch_embed,
        }
    }

    /// # Shapes
    /// `[b, K, X*s, Y*s, Z*s]` -> tokens `[b, T, D]` (T = the DiT's token grid)
    pub fn forward(&self, mask: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(mask).silu();
        for b in &self.blocks {
            h = b.forward(&h).silu();
        }
        self.patch_embed.forward(&h).flatten(2, -1).transpose(1, 2)
    }
}

/// The trainable side: the mask encoder, the copied blocks and the zero projections.
#[derive(Debug)]
pub struct ControlNet {
    cfg: ControlConfig,
    cond_embedding: ConditioningEmbedding,
    blocks: Vec<DitBlock>,
    zero_projs: Vec<nn::Linear>,
}

impl ControlNet {
    /// Builds the ControlNet of `base` under `vs`: the mask encoder with PyTorch's default
    /// init (its patch embedding at zero), the copied blocks (call
    /// [`ControlNet::copy_base_blocks`] to load the base's weights) and zero projections.
    pub fn new(vs: &nn::Path, base: &DitConfig, cfg: &ControlConfig) -> Result<Self, DitError> {
        cfg.validate(base).map_err(DitError::Input)?;
        let d = base.hidden_size;
        let cond_embedding =
            ConditioningEmbedding::new(&(vs / "cond_embedding"), cfg, d, base.patch);
        let blocks = (0..cfg.depth)
            .map(|i| DitBlock::new(&(vs / "blocks" / i), base))
            .collect();
        let zero_projs = (0..cfg.depth)
            .map(|i| {
                nn::linear(
                    vs / "zero_projs" / i,
                    d,
                    d,
                    nn::LinearConfig {
                        ws_init: nn::Init::Const(0.0),
                        bs_init: Some(nn::Init::Const(0.0)),
                        bias: true,
                    },
                )
            })
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            cond_embedding,
            blocks,
            zero_projs,
        })
    }

    pub fn config(&self) -> &ControlConfig {
        &self.cfg
    }

    /// Copies the base's first `depth` blocks (`blocks.i.*` of `base_vs`) into this
    /// ControlNet's store. Returns how many tensors were copied.
    pub fn copy_base_blocks(
        &self,
        vs: &nn::VarStore,
        base_vs: &nn::VarStore,
    ) -> Result<usize, DitError> {
        let src = base_vs.variables();
        let mut n = 0;
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                let Some(rest) = name.strip_prefix("blocks.") else {
                    continue;
                };
                let i: i64 = rest
                    .split('.')
                    .next()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(-1);
                if i < 0 || i >= self.cfg.depth {
                    continue;
                }
                let s = src
                    .get(&name)
                    .ok_or_else(|| DitError::Input(format!("the base model has no '{name}'")))?;
                v.copy_(&s.to_kind(v.kind()).to_device(v.device()));
                n += 1;
            }
            Ok::<_, DitError>(())
        })?;
        Ok(n)
    }

    /// The mask's tokens `[b, T, D]` (the conditioning embedding): what the copied branch
    /// adds to its input. Constant over a sampling run, so computed once per batch.
    pub fn mask_tokens(&self, base: &Dit, mask: &Tensor) -> Result<Tensor, DitError> {
        let cfg = base.config();
        let want = [
            self.cfg.mask_channels,
            cfg.input_size[0] * self.cfg.scale,
            cfg.input_size[1] * self.cfg.scale,
            cfg.input_size[2] * self.cfg.scale,
        ];
        let s = mask.size();
        if s.len() != 5 || s[1..] != want {
            return Err(DitError::Input(format!(
                "mask has shape {s:?}, expected [b, {}, {}, {}, {}]",
                want[0], want[1], want[2], want[3]
            )));
        }
        Ok(self.cond_embedding.forward(mask))
    }

    /// The controlled model's full output (all `out_channels`): the frozen `base` with
    /// this ControlNet's residuals times `scale`.
    ///
    /// # Shapes
    /// - `x`: `[b, C, X, Y, Z]`; `t`: `[b]`; `emb`: `[b, D]` per branch;
    ///   `mask`: `[b, K, X*s, Y*s, Z*s]` (one-hot or zeros)
    /// - returns `[b, out_channels, X, Y, Z]`
    pub fn forward_full(
        &self,
        base: &Dit,
        x: &Tensor,
        t: &Tensor,
        emb: &[Tensor],
        mask: &Tensor,
        scale: f64,
    ) -> Result<Tensor, DitError> {
        let tokens = self.mask_tokens(base, mask)?;
        self.forward_tokens(base, x, t, emb, &tokens, scale)
    }

    /// [`ControlNet::forward_full`] on the mask's tokens ([`ControlNet::mask_tokens`]).
    pub fn forward_tokens(
        &self,
        base: &Dit,
        x: &Tensor,
        t: &Tensor,
        emb: &[Tensor],
        tokens: &Tensor,
        scale: f64,
    ) -> Result<Tensor, DitError> {
        base.check_inputs(x, t, emb)?;
        let (mut h, t_act, acts) = base.prepare(x, t, emb);
        if tokens.size() != h.size() {
            return Err(DitError::Input(format!(
                "mask tokens have shape {:?}, the DiT's tokens {:?}",
                tokens.size(),
                h.size()
            )));
        }
        let mut c = &h + tokens;
        for (i, blk) in base.blocks().iter().enumerate() {
            h = blk.forward(&h, &t_act, &acts);
            if let (Some(copy), Some(proj)) = (self.blocks.get(i), self.zero_projs.get(i)) {
                c = copy.forward(&c, &t_act, &acts);
                h = h + proj.forward(&c) * scale;
            }
        }
        Ok(base.head(&h, &t_act, &acts))
    }

    /// The controlled prediction: the first `C` channels (as [`Dit::forward_emb`]).
    pub fn forward_emb(
        &self,
        base: &Dit,
        x: &Tensor,
        t: &Tensor,
        emb: &[Tensor],
        mask: &Tensor,
    ) -> Result<Tensor, DitError> {
        let out = self.forward_full(base, x, t, emb, mask, 1.0)?;
        Ok(base.keep_prediction(out))
    }
}

/// One-hot masks: class indices `[b, X, Y, Z]` (any integer kind, values `0..k`) ->
/// `[b, k, X, Y, Z]` float, in the channels-last 3-D layout (NDHWC strides) that
/// PyTorch's `F.one_hot(m, k).permute(0, 4, 1, 2, 3).float()` gives. The mask encoder's
/// convolutions then take oneDNN's channels-last path, which measured about 1.6x faster
/// per ControlNet training step than the NCDHW one (BENCHMARKS.md, "ControlNet").
pub fn one_hot(classes: &Tensor, k: i64) -> Tensor {
    classes
        .to_kind(Kind::Int64)
        .one_hot(k)
        .to_kind(Kind::Float)
        .permute([0, 4, 1, 2, 3])
}

/// Replaces the masks of the rows where `drop` (bool `[b]`) is set by zeros (no mask).
pub fn drop_masks(mask: &Tensor, drop: &Tensor) -> Tensor {
    let keep = drop
        .logical_not()
        .to_kind(mask.kind())
        .view([-1, 1, 1, 1, 1]);
    mask * keep
}
