//! Building blocks of the MAISI VAE: convolutions, GroupNorm, residual blocks, down- and
//! upsampling, each named after its MONAI module so that tch paths equal state-dict keys.
//!
//! GroupNorm takes its statistics from a [`NormCtx`]: either from the tensor it normalises
//! (ordinary GroupNorm, [`NormCtx::Local`]) or from whole-volume statistics gathered
//! beforehand while the volume is processed tile by tile ([`NormCtx::Stream`], used by the
//! exact tiled encoder in [`super::tiled`]). In the latter mode the first GroupNorm whose
//! statistics are not known yet measures its input over the tile's core region and stops
//! the forward pass ([`Halt::Collected`]).

use tch::{nn, Kind, TchError, Tensor};

/// Why a forward pass over blocks stopped early.
#[derive(Debug)]
pub(crate) enum Halt {
    /// libtorch failed.
    Torch(TchError),
    /// A streaming GroupNorm measured its input (see [`Stream`]) and stopped the pass.
    Collected,
}

impl From<TchError> for Halt {
    fn from(e: TchError) -> Self {
        Halt::Torch(e)
    }
}

/// Where GroupNorm layers take their statistics from.
pub(crate) enum NormCtx<'a, 'k> {
    /// From the tensor being normalised (ordinary GroupNorm).
    Local,
    /// From whole-volume statistics (tiled streaming).
    Stream(&'a mut Stream<'k>),
}

/// First and second moments of a GroupNorm input per `(batch, group)`, accumulated over
/// disjoint regions with Chan's parallel update, in `f64` on the host.
#[derive(Debug)]
pub(crate) struct Moments {
    /// Elements per `(batch, group)` so far.
    pub n: f64,
    /// `[b, groups]`, f64.
    pub mean: Tensor,
    /// Sum of squared deviations from `mean`, `[b, groups]`, f64.
    pub m2: Tensor,
}

impl Moments {
    /// Moments of `x` (`[b, c, d, h, w]`) restricted to `core` (start, end per spatial
    /// axis, relative to `x`) with `groups` channel groups.
    fn measure(x: &Tensor, core: &[(i64, i64); 3], groups: i64) -> Result<Self, TchError> {
        let mut xc = x.shallow_clone();
        for (axis, &(a, b)) in core.iter().enumerate() {
            xc = xc.f_narrow(2 + axis as i64, a, b - a)?;
        }
        let s = xc.size();
        let xc = xc.f_to_kind(Kind::Float)?.f_reshape([s[0], groups, -1])?;
        let n = xc.size()[2] as f64;
        let (var, mean) = xc.f_var_mean_correction(Some(&[2i64][..]), 0, false)?;
        let to_host = |t: Tensor| t.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Double);
        let mean = to_host(mean)?;
        let m2 = to_host(var)? * n;
        Ok(Moments { n, mean, m2 })
    }

    /// Adds the moments of a disjoint region.
    pub fn merge(self, o: Moments) -> Moments {
        if self.n == 0.0 {
            return o;
        }
        let n = self.n + o.n;
        let delta = &o.mean - &self.mean;
        let mean = &self.mean + &delta * (o.n / n);
        let m2 = self.m2 + o.m2 + delta.square() * (self.n * o.n / n);
        Moments { n, mean, m2 }
    }

    /// The statistics GroupNorm uses: mean and biased variance.
    pub fn finish(self) -> GroupStats {
        GroupStats {
            var: &self.m2 / self.n,
            mean: self.mean,
        }
    }
}

/// Whole-volume statistics of one GroupNorm layer: `[b, groups]` mean and biased
/// variance, f64 on the host.
#[derive(Debug)]
pub(crate) struct GroupStats {
    pub mean: Tensor,
    pub var: Tensor,
}

/// State of one tile's forward pass in streaming mode.
pub(crate) struct Stream<'a> {
    /// Whole-volume statistics of the first `known.len()` GroupNorm layers of the network.
    pub known: &'a [GroupStats],
    /// Network-wide index of the next GroupNorm layer this pass meets.
    pub cursor: usize,
    /// The tile's core (start, end per spatial axis, relative to the tile tensor, at the
    /// resolution of the blocks being run): the region whose values this tile owns.
    pub core: [(i64, i64); 3],
    /// Moments measured by the first GroupNorm without known statistics.
    pub collected: Option<Moments>,
}

/// A 3-D convolution with bias, MONAI `Convolution(conv_only=True)`; its variables are
/// `weight` and `bias` under the path it is given (`x.conv.conv` for a MONAI
/// `MaisiConvolution`, `x.conv` for a plain `Convolution`).
#[derive(Debug)]
pub(crate) struct Conv {
    ws: Tensor,
    bs: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv {
    /// Variables initialised as PyTorch's `Conv3d.reset_parameters`:
    /// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for weight and bias.
    pub fn new(vs: &nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> Self {
        let bound = 1.0 / ((cin * k * k * k) as f64).sqrt();
        let init = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Conv {
            ws: vs.var("weight", &[cout, cin, k, k, k], init),
            bs: vs.var("bias", &[cout], init),
            stride,
            padding,
        }
    }

    /// # Shapes
    /// `[b, cin, d, h, w]` -> `[b, cout, d', h', w']` (`d' = (d + 2p - k) / s + 1`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_conv3d(
            &self.ws,
            Some(&self.bs),
            [self.stride; 3],
            [self.padding; 3],
            [1; 3],
            1,
        )
    }

    /// Half the kernel extent: how far an output depends on inputs around it.
    fn radius(&self) -> i64 {
        self.ws.size()[2] / 2
    }

    pub fn kind(&self) -> Kind {
        self.ws.kind()
    }
}

/// Affine GroupNorm (`MaisiGroupNorm3D`, which normalises with the biased variance); its
/// variables are `weight` and `bias` under its path.
#[derive(Debug)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vs: &nn::Path, groups: i64, channels: i64, eps: f64) -> Self {
        GroupNorm {
            weight: vs.var("weight", &[channels], nn::Init::Const(1.0)),
            bias: vs.var("bias", &[channels], nn::Init::Const(0.0)),
            groups,
            eps,
        }
    }

    /// # Shapes
    /// `[b, c, d, h, w]` -> same.
    fn forward(&self, x: &Tensor, ctx: &mut NormCtx<'_, '_>) -> Result<Tensor, Halt> {
        let s = match ctx {
            NormCtx::Local => {
                return Ok(Tensor::f_group_norm(
                    x,
                    self.groups,
                    Some(&self.weight),
                    Some(&self.bias),
                    self.eps,
                    true,
                )?)
            }
            NormCtx::Stream(s) => s,
        };
        let i = s.cursor;
        s.cursor += 1;
        let Some(stats) = s.known.get(i) else {
            s.collected = Some(Moments::measure(x, &s.core, self.groups)?);
            return Err(Halt::Collected);
        };
        // y = (x - mean_g) * (w_c / sqrt(var_g + eps)) + b_c, per channel c in group g.
        let (b, c) = (x.size()[0], x.size()[1]);
        let per_channel = |t: &Tensor| -> Result<Tensor, TchError> {
            t.f_view([b, self.groups, 1])?
                .f_expand([b, self.groups, c / self.groups], false)?
                .f_reshape([b, c, 1, 1, 1])
        };
        let w = self
            .weight
            .f_to_device(tch::Device::Cpu)?
            .f_to_kind(Kind::Double)?
            .f_view([1, c, 1, 1, 1])?;
        let scale = per_channel(&(&stats.var + self.eps).f_rsqrt()?)? * w;
        let mean = per_channel(&stats.mean)?;
        let to_x = |t: Tensor| t.f_to_device(x.device())?.f_to_kind(x.kind());
        let mut y = x.f_sub(&to_x(mean)?)?;
        let _ = y.f_mul_(&to_x(scale)?)?;
        let _ = y.f_add_(&self.bias.f_view([1, c, 1, 1, 1])?)?;
        Ok(y)
    }
}

/// `MaisiResBlock`: `nin_shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`.
#[derive(Debug)]
pub(crate) struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl ResBlock {
    pub fn new(vs: &nn::Path, cin: i64, cout: i64, groups: i64, eps: f64) -> Self {
        let maisi_conv =
            |name: &str, cin, k, p| Conv::new(&(vs / name / "conv" / "conv"), cin, cout, k, 1, p);
        ResBlock {
            norm1: GroupNorm::new(&(vs / "norm1"), groups, cin, eps),
            conv1: maisi_conv("conv1", cin, 3, 1),
            norm2: GroupNorm::new(&(vs / "norm2"), groups, cout, eps),
            conv2: maisi_conv("conv2", cout, 3, 1),
            nin_shortcut: (cin != cout).then(|| maisi_conv("nin_shortcut", cin, 1, 0)),
        }
    }

    /// # Shapes
    /// `[b, cin, d, h, w]` -> `[b, cout, d, h, w]`.
    fn forward(&self, x: &Tensor, ctx: &mut NormCtx<'_, '_>) -> Result<Tensor, Halt> {
        let mut h = self.norm1.forward(x, ctx)?;
        h = silu(h)?;
        h = self.conv1.forward(&h)?;
        h = self.norm2.forward(&h, ctx)?;
        h = silu(h)?;
        h = self.conv2.forward(&h)?;
        let skip = match &self.nin_shortcut {
            Some(nin) => nin.forward(x)?,
            None => x.shallow_clone(),
        };
        Ok(add(h, &skip)?)
    }
}

/// `MaisiDownsample`: zero pad (0, 1) on each spatial axis, then a 3x3x3 stride-2 conv
/// without padding (`n -> floor(n / 2)`); its conv is the MaisiConvolution `conv`.
#[derive(Debug)]
pub(crate) struct Downsample {
    conv: Conv,
}

impl Downsample {
    pub fn new(vs: &nn::Path, channels: i64) -> Self {
        Downsample {
            conv: Conv::new(
                &(vs / "conv" / "conv" / "conv"),
                channels,
                channels,
                3,
                2,
                0,
            ),
        }
    }

    /// # Shapes
    /// `[b, c, d, h, w]` -> `[b, c, d/2, h/2, w/2]` (rounded down).
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let x = x.f_constant_pad_nd([0, 1, 0, 1, 0, 1])?;
        self.conv.forward(&x)
    }
}

/// `MaisiUpsample` (`use_convtranspose=False`): trilinear x2 (`align_corners=False`),
/// then a 3x3x3 conv with padding 1.
#[derive(Debug)]
pub(crate) struct Upsample {
    conv: Conv,
}

impl Upsample {
    pub fn new(vs: &nn::Path, channels: i64) -> Self {
        Upsample {
            conv: Conv::new(
                &(vs / "conv" / "conv" / "conv"),
                channels,
                channels,
                3,
                1,
                1,
            ),
        }
    }

    /// # Shapes
    /// `[b, c, d, h, w]` -> `[b, c, 2d, 2h, 2w]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let s = x.size();
        let x = x.f_upsample_trilinear3d([2 * s[2], 2 * s[3], 2 * s[4]], false, 2.0, 2.0, 2.0)?;
        self.conv.forward(&x)
    }
}

/// One entry of MONAI's `encoder.blocks` / `decoder.blocks`.
#[derive(Debug)]
pub(crate) enum Block {
    Conv(Conv),
    Res(ResBlock),
    Down(Downsample),
    Up(Upsample),
    Norm(GroupNorm),
}

impl Block {
    fn forward(&self, x: &Tensor, ctx: &mut NormCtx<'_, '_>) -> Result<Tensor, Halt> {
        Ok(match self {
            Block::Conv(c) => c.forward(x)?,
            Block::Res(r) => r.forward(x, ctx)?,
            Block::Down(d) => d.forward(x)?,
            Block::Up(u) => u.forward(x)?,
            Block::Norm(n) => n.forward(x, ctx)?,
        })
    }

    /// GroupNorm layers in this block.
    pub fn group_norms(&self) -> usize {
        match self {
            Block::Res(_) => 2,
            Block::Norm(_) => 1,
            _ => 0,
        }
    }

    /// How far (in voxels of this block's input, on each side) an output of this block
    /// depends on its input around the same position, assuming GroupNorm statistics are
    /// fixed. A Down output `i` reads inputs `2i ..= 2i + 2`, counted as 1 beyond the core;
    /// for an Up, the radius of its conv (at the output resolution).
    pub fn radius(&self) -> i64 {
        match self {
            Block::Conv(c) => c.radius(),
            Block::Res(r) => r.conv1.radius() + r.conv2.radius(),
            Block::Down(_) => 1,
            Block::Up(u) => u.conv.radius(),
            Block::Norm(_) => 0,
        }
    }

    pub fn is_down(&self) -> bool {
        matches!(self, Block::Down(_))
    }

    pub fn is_up(&self) -> bool {
        matches!(self, Block::Up(_))
    }

    /// Channels this block outputs, if it changes them (for tile sizing).
    pub fn out_channels(&self) -> Option<i64> {
        match self {
            Block::Conv(c) => Some(c.ws.size()[0]),
            Block::Res(r) => Some(r.conv2.ws.size()[0]),
            _ => None,
        }
    }
}

/// Runs `blocks` in order.
pub(crate) fn run(blocks: &[Block], x: &Tensor, ctx: &mut NormCtx<'_, '_>) -> Result<Tensor, Halt> {
    let mut iter = blocks.iter();
    let Some(first) = iter.next() else {
        return Ok(x.shallow_clone());
    };
    let mut h = first.forward(x, ctx)?;
    for b in iter {
        h = b.forward(&h, ctx)?;
    }
    Ok(h)
}

/// Without gradients, activations are computed in place (MONAI keeps two copies).
fn in_place(t: &Tensor) -> bool {
    !t.requires_grad()
}

fn silu(mut t: Tensor) -> Result<Tensor, TchError> {
    if in_place(&t) {
        let _ = t.f_silu_()?;
        Ok(t)
    } else {
        t.f_silu()
    }
}

fn add(mut h: Tensor, skip: &Tensor) -> Result<Tensor, TchError> {
    if in_place(&h) && in_place(skip) {
        let _ = h.f_add_(skip)?;
        Ok(h)
    } else {
        h.f_add(skip)
    }
}
