//! The MONAI convolution blocks shared by UNETR and the nnU-Net-style U-Net
//! (`monai.networks.blocks.dynunet_block`), with MONAI's state-dict names.
//!
//! | MONAI                         | here            | variables                                        |
//! |-------------------------------|-----------------|--------------------------------------------------|
//! | `Convolution(conv_only=True)` | [`Conv3`]       | `conv.weight` (`[out, in, kx, ky, kz]`), `conv.bias` when biased |
//! | transposed `Convolution`      | [`ConvT3`]      | `conv.weight` (`[in, out, kx, ky, kz]`)          |
//! | `UnetResBlock`                | [`ResBlock`]    | `conv1.conv.*`, `conv2.conv.*`, `conv3.conv.*` (projection), `norm{1,2,3}.*` when affine |
//! | `UnetBasicBlock`              | [`BasicBlock`]  | `conv1.conv.*`, `conv2.conv.*`, `norm{1,2}.*`     |
//! | `UnetOutBlock`                | [`OutBlock`]    | `conv.conv.{weight,bias}`                        |
//!
//! Convolutions inside the blocks have no bias (MONAI's `get_conv_layer` default); padding
//! is `kernel / 2` per axis; activations are leaky ReLU (slope 0.01); normalisation is
//! instance norm (eps 1e-5), affine or not (UNETR: `"instance"`, not affine; DynUNet:
//! `("INSTANCE", {"affine": True})`). Weights start from PyTorch's default init.

use tch::{nn, Tensor};

use super::init::torch_default;

/// A 3-D convolution with per-axis kernel and stride.
#[derive(Debug)]
pub struct Conv3 {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: [i64; 3],
    padding: [i64; 3],
}

impl Conv3 {
    /// Variables `weight` (and `bias`) directly under `vs`.
    pub fn new(
        vs: &nn::Path,
        cin: i64,
        cout: i64,
        k: [i64; 3],
        stride: [i64; 3],
        bias: bool,
    ) -> Self {
        let fan_in = cin * k.iter().product::<i64>();
        let weight = vs.var(
            "weight",
            &[cout, cin, k[0], k[1], k[2]],
            torch_default(fan_in),
        );
        let bias = bias.then(|| vs.var("bias", &[cout], torch_default(fan_in)));
        Self {
            weight,
            bias,
            stride,
            padding: k.map(|x| x / 2),
        }
    }

    /// Without padding (patch embeddings: kernel = stride).
    pub fn unpadded(mut self) -> Self {
        self.padding = [0; 3];
        self
    }

    /// # Shapes
    /// `[b, cin, X, Y, Z]` -> `[b, cout, ceil(X / sx), ...]` (odd kernels, `k / 2` padding)
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv3d(
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
            [1, 1, 1],
            1,
        )
    }
}

/// A transposed 3-D convolution with kernel = stride (exact upsampling by the stride).
#[derive(Debug)]
pub struct ConvT3 {
    pub weight: Tensor,
    stride: [i64; 3],
}

impl ConvT3 {
    /// Variable `weight` (`[cin, cout, sx, sy, sz]`) under `vs`; no bias.
    pub fn new(vs: &nn::Path, cin: i64, cout: i64, stride: [i64; 3]) -> Self {
        // PyTorch computes a transposed convolution's fan-in from weight.size(1).
        let fan_in = cout * stride.iter().product::<i64>();
        let weight = vs.var(
            "weight",
            &[cin, cout, stride[0], stride[1], stride[2]],
            torch_default(fan_in),
        );
        Self { weight, stride }
    }

    /// # Shapes
    /// `[b, cin, X, Y, Z]` -> `[b, cout, X * sx, Y * sy, Z * sz]`
    ///
    /// With kernel = stride the output blocks do not overlap, so the transposed convolution
    /// is one matrix product `[b X Y Z, cin] x [cin, cout sx sy sz]` followed by a
    /// rearrangement (PyTorch's CPU `slow_conv_transpose3d` is several times slower);
    /// [`ConvT3::forward_reference`] is libtorch's own, for tests.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, cin, nx, ny, nz) = x.size5().expect("[b, c, X, Y, Z]");
        let [sx, sy, sz] = self.stride;
        let cout = self.weight.size()[1];
        x.permute([0, 2, 3, 4, 1])
            .reshape([-1, cin])
            .matmul(&self.weight.reshape([cin, -1]))
            .view([b, nx, ny, nz, cout, sx, sy, sz].as_slice())
            .permute([0i64, 4, 1, 5, 2, 6, 3, 7].as_slice())
            .reshape([b, cout, nx * sx, ny * sy, nz * sz])
    }

    /// `torch.nn.functional.conv_transpose3d(x, weight, stride=stride)`.
    pub fn forward_reference(&self, x: &Tensor) -> Tensor {
        x.conv_transpose3d(
            &self.weight,
            None::<&Tensor>,
            self.stride,
            [0, 0, 0],
            [0, 0, 0],
            1,
            [1, 1, 1],
        )
    }
}

/// Instance normalisation (eps 1e-5), optionally with a per-channel affine.
#[derive(Debug)]
pub struct InstanceNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
}

impl InstanceNorm {
    pub fn new(vs: &nn::Path, channels: i64, affine: bool) -> Self {
        if affine {
            Self {
                weight: Some(vs.var("weight", &[channels], nn::Init::Const(1.0))),
                bias: Some(vs.var("bias", &[channels], nn::Init::Const(0.0))),
            }
        } else {
            Self {
                weight: None,
                bias: None,
            }
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        Tensor::instance_norm(
            x,
            self.weight.as_ref(),
            self.bias.as_ref(),
            None::<&Tensor>,
            None::<&Tensor>,
            true,
            0.1,
            1e-5,
            false,
        )
    }
}

/// MONAI `UnetResBlock`: `lrelu(norm2(conv2(lrelu(norm1(conv1 x)))) + proj(x))`, the
/// projection (`conv3` 1x1x1 + `norm3`) only when the width or stride changes.
#[derive(Debug)]
pub struct ResBlock {
    conv1: Conv3,
    conv2: Conv3,
    norm1: InstanceNorm,
    norm2: InstanceNorm,
    proj: Option<(Conv3, InstanceNorm)>,
}

impl ResBlock {
    pub fn new(
        vs: &nn::Path,
        cin: i64,
        cout: i64,
        k: [i64; 3],
        stride: [i64; 3],
        affine: bool,
    ) -> Self {
        let proj = (cin != cout || stride != [1, 1, 1]).then(|| {
            (
                Conv3::new(
                    &(vs / "conv3" / "conv"),
                    cin,
                    cout,
                    [1, 1, 1],
                    stride,
                    false,
                ),
                InstanceNorm::new(&(vs / "norm3"), cout, affine),
            )
        });
        Self {
            conv1: Conv3::new(&(vs / "conv1" / "conv"), cin, cout, k, stride, false),
            conv2: Conv3::new(&(vs / "conv2" / "conv"), cout, cout, k, [1, 1, 1], false),
            norm1: InstanceNorm::new(&(vs / "norm1"), cout, affine),
            norm2: InstanceNorm::new(&(vs / "norm2"), cout, affine),
            proj,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.norm1.forward(&self.conv1.forward(x)).leaky_relu();
        let h = self.norm2.forward(&self.conv2.forward(&h));
        let r = match &self.proj {
            Some((c, n)) => n.forward(&c.forward(x)),
            None => x.shallow_clone(),
        };
        (h + r).leaky_relu()
    }
}

/// MONAI `UnetBasicBlock`: `lrelu(norm2(conv2(lrelu(norm1(conv1 x)))))`.
#[derive(Debug)]
pub struct BasicBlock {
    conv1: Conv3,
    conv2: Conv3,
    norm1: InstanceNorm,
    norm2: InstanceNorm,
}

impl BasicBlock {
    pub fn new(
        vs: &nn::Path,
        cin: i64,
        cout: i64,
        k: [i64; 3],
        stride: [i64; 3],
        affine: bool,
    ) -> Self {
        Self {
            conv1: Conv3::new(&(vs / "conv1" / "conv"), cin, cout, k, stride, false),
            conv2: Conv3::new(&(vs / "conv2" / "conv"), cout, cout, k, [1, 1, 1], false),
            norm1: InstanceNorm::new(&(vs / "norm1"), cout, affine),
            norm2: InstanceNorm::new(&(vs / "norm2"), cout, affine),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.norm1.forward(&self.conv1.forward(x)).leaky_relu();
        self.norm2.forward(&self.conv2.forward(&h)).leaky_relu()
    }
}

/// MONAI `UnetOutBlock`: a biased 1x1x1 convolution, `conv.conv.{weight,bias}`.
#[derive(Debug)]
pub struct OutBlock {
    conv: Conv3,
}

impl OutBlock {
    pub fn new(vs: &nn::Path, cin: i64, cout: i64) -> Self {
        Self {
            conv: Conv3::new(
                &(vs / "conv" / "conv"),
                cin,
                cout,
                [1, 1, 1],
                [1, 1, 1],
                true,
            ),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.conv.forward(x)
    }
}
