//! MONAI's `PatchDiscriminator` (3-D), as MAISI trains its VAE with: a strided conv,
//! then `num_layers_d - 1` strided conv + instance norm + leaky ReLU blocks doubling the
//! channels, one stride-1 block, and a final 4x4x4 conv to one channel (a patch map of
//! real/fake logits). Variable names follow MONAI (`initial_conv`, `{i}`, `final_conv`).

use tch::nn::{self, ModuleT};
use tch::Tensor;

/// A 3-D patch discriminator.
#[derive(Debug)]
pub struct PatchDiscriminator {
    convs: Vec<(nn::Conv3D, bool)>,
    last: nn::Conv3D,
}

impl PatchDiscriminator {
    /// `channels` in the first layer, `layers` downsampling layers.
    pub fn new(vs: &nn::Path, in_channels: i64, channels: i64, layers: i64) -> Self {
        let conv = |p: nn::Path, cin, cout, stride, bias| {
            nn::conv3d(
                p,
                cin,
                cout,
                4,
                nn::ConvConfig {
                    stride,
                    padding: 1,
                    bias,
                    ..Default::default()
                },
            )
        };
        let mut convs = vec![(
            conv(vs / "initial_conv", in_channels, channels, 2, true),
            false,
        )];
        let mut c = channels;
        for l in 0..layers {
            let stride = if l == layers - 1 { 1 } else { 2 };
            let nc = channels * 2i64.pow((l + 1).min(3) as u32);
            convs.push((conv(vs / format!("{l}"), c, nc, stride, false), true));
            c = nc;
        }
        let last = conv(vs / "final_conv", c, 1, 1, true);
        Self { convs, last }
    }

    /// # Shapes
    /// `[b, c, d, h, w]` -> `[b, 1, d', h', w']` logits.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for (c, norm) in &self.convs {
            h = c.forward_t(&h, true);
            if *norm {
                h = h.instance_norm(
                    None::<Tensor>,
                    None::<Tensor>,
                    None::<Tensor>,
                    None::<Tensor>,
                    true,
                    0.1,
                    1e-5,
                    false,
                );
            }
            h = h.maximum(&(&h * 0.2)); // LeakyReLU(0.2)
        }
        self.last.forward_t(&h, true)
    }
}
