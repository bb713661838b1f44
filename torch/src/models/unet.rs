//! The nnU-Net-style 3-D U-Net in image space (MONAI `DynUNet`, MONAI's nnU-Net
//! implementation, with its state-dict names), built from a planner's stages
//! ([`meduet_stages::segmentation::planner::UnetPlan`]).
//!
//! ```text
//! input_block      UnetBasicBlock(in -> f0, k0, stride 1)
//! downsamples.i    UnetBasicBlock(f_i -> f_{i+1}, k_{i+1}, stride_{i+1})   (strided conv, no pooling)
//! bottleneck       UnetBasicBlock(f_{S-2} -> f_{S-1}, k_{S-1}, stride_{S-1})
//! upsamples.j      UnetUpBlock: transposed conv (kernel = stride) f -> f', concat the skip,
//!                  UnetBasicBlock(2f' -> f')
//! output_block     1x1x1 conv f0 -> K
//! deep_supervision_heads.j   1x1x1 conv on the outputs of upsamples S-3-j (lower resolutions)
//! ```
//!
//! Every block is conv -> instance norm (affine) -> leaky ReLU (0.01), twice. With deep
//! supervision, [`Unet::forward`] returns the full-resolution logits first, then one logit
//! map per lower decoder resolution (half, quarter, ...), as nnU-Net's decoder does.

use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use super::conv::{BasicBlock, ConvT3, OutBlock};

/// The U-Net's sizes (a planner's output plus channels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Per stage: kernel, stride of the first conv (stage 0: 1), features.
    pub kernels: Vec<[i64; 3]>,
    pub strides: Vec<[i64; 3]>,
    pub features: Vec<i64>,
    /// Deep-supervision heads (at most stages - 2).
    pub deep_supervision: usize,
}

impl UnetConfig {
    pub fn validate(&self) -> Result<(), String> {
        let s = self.strides.len();
        if s < 2 || self.kernels.len() != s || self.features.len() != s {
            return Err(format!(
                "unet: needs at least 2 stages with one kernel, stride and width each (got {} / {} / {})",
                self.kernels.len(),
                s,
                self.features.len()
            ));
        }
        if self.strides[0] != [1, 1, 1] {
            return Err(format!(
                "unet: the first stage's stride must be 1, got {:?}",
                self.strides[0]
            ));
        }
        if self.deep_supervision > s - 2 {
            return Err(format!(
                "unet: deep_supervision {} exceeds stages - 2 = {}",
                self.deep_supervision,
                s - 2
            ));
        }
        Ok(())
    }

    /// The input must be a multiple of this per axis.
    pub fn divisor(&self) -> [i64; 3] {
        std::array::from_fn(|a| self.strides.iter().map(|s| s[a]).product())
    }
}

struct UpBlock {
    transp: ConvT3,
    block: BasicBlock,
}

/// The U-Net (see the module documentation).
pub struct Unet {
    cfg: UnetConfig,
    input_block: BasicBlock,
    downsamples: Vec<BasicBlock>,
    bottleneck: BasicBlock,
    upsamples: Vec<UpBlock>,
    output_block: OutBlock,
    heads: Vec<OutBlock>,
}

impl std::fmt::Debug for Unet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unet").field("cfg", &self.cfg).finish()
    }
}

impl Unet {
    pub fn new(vs: &nn::Path, cfg: &UnetConfig) -> Result<Self, String> {
        cfg.validate()?;
        let s = cfg.strides.len();
        let f = &cfg.features;
        let input_block = BasicBlock::new(
            &(vs / "input_block"),
            cfg.in_channels,
            f[0],
            cfg.kernels[0],
            [1; 3],
            true,
        );
        let downsamples = (1..s - 1)
            .map(|i| {
                BasicBlock::new(
                    &(vs / "downsamples" / (i - 1)),
                    f[i - 1],
                    f[i],
                    cfg.kernels[i],
                    cfg.strides[i],
                    true,
                )
            })
            .collect();
        let bottleneck = BasicBlock::new(
            &(vs / "bottleneck"),
            f[s - 2],
            f[s - 1],
            cfg.kernels[s - 1],
            cfg.strides[s - 1],
            true,
        );
        // upsamples.j goes from stage s-1-j to stage s-2-j.
        let upsamples = (0..s - 1)
            .map(|j| {
                let (hi, lo) = (s - 1 - j, s - 2 - j);
                let p = vs / "upsamples" / j;
                UpBlock {
                    transp: ConvT3::new(
                        &(&p / "transp_conv" / "conv"),
                        f[hi],
                        f[lo],
                        cfg.strides[hi],
                    ),
                    block: BasicBlock::new(
                        &(&p / "conv_block"),
                        2 * f[lo],
                        f[lo],
                        cfg.kernels[lo],
                        [1; 3],
                        true,
                    ),
                }
            })
            .collect();
        let output_block = OutBlock::new(&(vs / "output_block"), f[0], cfg.out_channels);
        // Head j sits on the decoder output at stage j + 1.
        let heads = (0..cfg.deep_supervision)
            .map(|j| {
                OutBlock::new(
                    &(vs / "deep_supervision_heads" / j),
                    f[j + 1],
                    cfg.out_channels,
                )
            })
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            input_block,
            downsamples,
            bottleneck,
            upsamples,
            output_block,
            heads,
        })
    }

    pub fn config(&self) -> &UnetConfig {
        &self.cfg
    }

    /// # Shapes
    /// `x`: `[b, in, X, Y, Z]` (multiples of [`UnetConfig::divisor`]) -> the logits
    /// `[b, K, X, Y, Z]`, then (deep supervision) `[b, K, X/s1, ...]` for each head.
    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        let mut skips = vec![self.input_block.forward(x)];
        for d in &self.downsamples {
            let h = d.forward(skips.last().expect("one"));
            skips.push(h);
        }
        let mut h = self.bottleneck.forward(skips.last().expect("one"));
        let s = self.cfg.strides.len();
        // decoder output at stage `lo` for lo = s-2 .. 0
        let mut dec: Vec<Tensor> = Vec::with_capacity(s - 1);
        for (j, up) in self.upsamples.iter().enumerate() {
            let lo = s - 2 - j;
            let u = up.transp.forward(&h);
            h = up
                .block
                .forward(&Tensor::cat(&[u, skips[lo].shallow_clone()], 1));
            dec.push(h.shallow_clone());
        }
        // dec[j] is stage s-2-j; stage t is dec[s-2-t].
        let mut out = vec![self.output_block.forward(&dec[s - 2])];
        for (j, head) in self.heads.iter().enumerate() {
            out.push(head.forward(&dec[s - 2 - (j + 1)]));
        }
        out
    }

    /// Full-resolution logits only (inference).
    pub fn logits(&self, x: &Tensor) -> Tensor {
        self.forward(x).swap_remove(0)
    }
}
