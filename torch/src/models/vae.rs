//! The MAISI VAE (`AutoencoderKlMaisi` of MONAI) in tch: the tokenizer that maps CT
//! volumes to 4-channel latents with 4x compression per axis (method.md section 7).
//!
//! # Topology (MONAI `monai.apps.generation.maisi.networks.autoencoderkl_maisi`)
//!
//! With `num_channels = [64, 128, 256]` and `num_res_blocks = [2, 2, 2]` (the paper):
//!
//! | `encoder.blocks.i` | module                                                        |
//! |--------------------|---------------------------------------------------------------|
//! | 0                  | conv_in 3x3x3, `in_channels` -> 64, pad 1                     |
//! | 1, 2               | ResBlock 64 -> 64                                             |
//! | 3                  | Down: zero pad (0, 1) on each spatial axis, 3x3x3 stride 2    |
//! | 4, 5               | ResBlock 64 -> 128 (with `nin_shortcut` 1x1x1), 128 -> 128    |
//! | 6                  | Down                                                          |
//! | 7, 8               | ResBlock 128 -> 256 (with `nin_shortcut`), 256 -> 256         |
//! | 9                  | GroupNorm(32, 256, eps 1e-6), **no activation after it**      |
//! | 10                 | conv_out 3x3x3, 256 -> `latent_channels`                      |
//!
//! then `quant_conv_mu` and `quant_conv_log_sigma` (1x1x1); `log_var` is clamped to
//! `[-30, 20]` and `sigma = exp(log_var / 2)`. The decoder is `post_quant_conv` (1x1x1)
//! followed by `decoder.blocks`: conv_in (latent -> 256), ResBlocks in reversed widths,
//! Up (trilinear x2, `align_corners = false`, then 3x3x3 conv) between levels, a final
//! GroupNorm and conv_out, again without activation in between.
//!
//! ResBlock: `h = conv1(silu(norm1(x))); h = conv2(silu(norm2(h))); nin_shortcut(x) + h`.
//!
//! MONAI's `norm_float16` (fp16 GroupNorm output) and `num_splits` (convolutions split
//! along one axis to save GPU memory) change neither the parameters nor, in exact
//! arithmetic, the result; this implementation computes the plain, unsplit network.
//!
//! # Variable names
//!
//! tch paths equal MONAI's state-dict keys one to one (130 tensors for the paper
//! configuration), verified against a real MONAI model:
//!
//! ```text
//! encoder.blocks.0.conv.conv.{weight,bias}            conv_in    (MaisiConvolution -> Convolution -> Conv3d)
//! encoder.blocks.1.norm1.{weight,bias}                 ResBlock GroupNorm
//! encoder.blocks.1.conv1.conv.conv.{weight,bias}       ResBlock conv
//! encoder.blocks.4.nin_shortcut.conv.conv.{weight,bias}
//! encoder.blocks.3.conv.conv.conv.{weight,bias}        Down (MaisiDownsample.conv = MaisiConvolution)
//! encoder.blocks.9.{weight,bias}                       final GroupNorm
//! quant_conv_mu.conv.{weight,bias}                     plain MONAI Convolution
//! decoder.blocks.3.conv.conv.conv.{weight,bias}        Up
//! ```
//!
//! Weights from MONAI are converted once with `scripts/convert_maisi.py` and loaded
//! with [`load_vae_safetensors`], which reports every missing or unexpected key and every
//! shape mismatch. Weights trained here (`VarStore::save` to `.safetensors`) load back
//! into MONAI with the same keys.
//!
//! # Large volumes
//!
//! [`encode_tiled`] encodes volumes of any size with bounded memory, either exactly
//! (whole-volume GroupNorm statistics, streamed level by level) or as MAISI's sliding
//! window does (per-tile statistics, blended); [`decode_tiled`] decodes with per-tile
//! statistics. See the [`tiled`] module for the equality each mode guarantees.

mod blocks;
pub mod tiled;
mod weights;

use std::path::Path;

use rand::{Rng, SeedableRng};
use tch::{nn, Device, Kind, TchError, Tensor};

use blocks::{Block, Conv, Downsample, GroupNorm, Halt, NormCtx, ResBlock, Upsample};
pub use tiled::{
    decode_tiled, encode_tiled, encode_tiled_latent, EncodeMode, TileConfig, TileNorm,
};
pub use weights::{load_vae_safetensors, KeyReport, ShapeMismatch};

/// Errors of the VAE: bad configuration, bad input, weights that do not fit, libtorch.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    /// A [`Config`] or [`TileConfig`] value that cannot build a network or a tiling.
    #[error("invalid vae config: {0}")]
    Config(String),
    /// An input tensor of the wrong rank, channel count, kind or size.
    #[error("invalid vae input: {0}")]
    Input(String),
    /// A weight file whose tensors do not match the network's variables.
    #[error("weights '{path}' do not fit the vae:\n{report}")]
    Weights { path: String, report: KeyReport },
    /// A weight file that cannot be read.
    #[error("cannot read vae weights '{path}': {source}")]
    Read { path: String, source: TchError },
    /// An error raised by libtorch (out of memory, unsupported kind on a device, ...).
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
}

pub use meduet_stages::configs::vae::Config;

/// Encoder: `blocks` exactly as MONAI's `MaisiEncoder.blocks`.
#[derive(Debug)]
pub struct Encoder {
    blocks: Vec<Block>,
}

/// Decoder: `blocks` exactly as MONAI's `MaisiDecoder.blocks`.
#[derive(Debug)]
pub struct Decoder {
    blocks: Vec<Block>,
}

impl Encoder {
    fn new(vs: &nn::Path, cfg: &Config) -> Self {
        let mut block = numbered(vs / "blocks");
        let ch = &cfg.num_channels;
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let mut blocks = vec![Block::Conv(Conv::new(
            &(block() / "conv" / "conv"),
            cfg.in_channels,
            ch[0],
            3,
            1,
            1,
        ))];
        let mut out_ch = ch[0];
        for (level, (&c, &n_res)) in ch.iter().zip(&cfg.num_res_blocks).enumerate() {
            let mut in_ch = out_ch;
            out_ch = c;
            for _ in 0..n_res {
                blocks.push(Block::Res(ResBlock::new(&block(), in_ch, out_ch, g, eps)));
                in_ch = out_ch;
            }
            if level + 1 < ch.len() {
                blocks.push(Block::Down(Downsample::new(&block(), in_ch)));
            }
        }
        let last = *ch.last().expect("validated: num_channels is not empty");
        blocks.push(Block::Norm(GroupNorm::new(&block(), g, last, eps)));
        blocks.push(Block::Conv(Conv::new(
            &(block() / "conv" / "conv"),
            last,
            cfg.latent_channels,
            3,
            1,
            1,
        )));
        Encoder { blocks }
    }

    /// The encoder trunk, without the `quant_conv_*` heads.
    ///
    /// # Shapes
    /// `x`: `[b, in_channels, d, h, w]` -> `[b, latent_channels, d/f, h/f, w/f]`
    /// (`f` = [`Config::downsample_factor`], sizes rounded down at each level as MONAI).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        run_local(&self.blocks, x)
    }

    pub(crate) fn blocks(&self) -> &[Block] {
        &self.blocks
    }
}

impl Decoder {
    pub(crate) fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    fn new(vs: &nn::Path, cfg: &Config) -> Self {
        let mut block = numbered(vs / "blocks");
        let rev: Vec<i64> = cfg.num_channels.iter().rev().copied().collect();
        let rev_res: Vec<i64> = cfg.num_res_blocks.iter().rev().copied().collect();
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let mut blocks = vec![Block::Conv(Conv::new(
            &(block() / "conv" / "conv"),
            cfg.latent_channels,
            rev[0],
            3,
            1,
            1,
        ))];
        let mut out_ch = rev[0];
        let mut in_ch = out_ch;
        for (level, (&c, &n_res)) in rev.iter().zip(&rev_res).enumerate() {
            in_ch = out_ch;
            out_ch = c;
            for _ in 0..n_res {
                blocks.push(Block::Res(ResBlock::new(&block(), in_ch, out_ch, g, eps)));
                in_ch = out_ch;
            }
            if level + 1 < rev.len() {
                blocks.push(Block::Up(Upsample::new(&block(), in_ch)));
            }
        }
        blocks.push(Block::Norm(GroupNorm::new(&block(), g, in_ch, eps)));
        blocks.push(Block::Conv(Conv::new(
            &(block() / "conv" / "conv"),
            in_ch,
            cfg.out_channels,
            3,
            1,
            1,
        )));
        Decoder { blocks }
    }

    /// The decoder trunk, after `post_quant_conv`.
    ///
    /// # Shapes
    /// `z`: `[b, latent_channels, d, h, w]` -> `[b, out_channels, d*f, h*f, w*f]`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor, TchError> {
        run_local(&self.blocks, z)
    }
}

/// Paths `vs.0`, `vs.1`, ... in call order (MONAI's `nn.ModuleList` numbering).
fn numbered<'a>(vs: nn::Path<'a>) -> impl FnMut() -> nn::Path<'a> {
    let mut i = 0usize;
    move || {
        let p = &vs / i;
        i += 1;
        p
    }
}

/// Runs blocks with ordinary (per-tensor) GroupNorm statistics.
fn run_local(blocks: &[Block], x: &Tensor) -> Result<Tensor, TchError> {
    match blocks::run(blocks, x, &mut NormCtx::Local) {
        Ok(t) => Ok(t),
        Err(Halt::Torch(e)) => Err(e),
        Err(Halt::Collected) => unreachable!("local GroupNorm never halts to collect statistics"),
    }
}

/// MONAI's `AutoencoderKlMaisi`: a KL-regularised convolutional autoencoder.
///
/// Build it with [`AutoencoderKlMaisi::new`] on a `VarStore` path (the root, so that
/// variable names equal MONAI's keys), then load weights with [`load_vae_safetensors`]
/// or train it. All methods are differentiable unless run under `tch::no_grad`; without
/// gradients they use in-place activations to save memory.
#[derive(Debug)]
pub struct AutoencoderKlMaisi {
    /// `encoder.blocks.*`.
    pub encoder: Encoder,
    /// `decoder.blocks.*`.
    pub decoder: Decoder,
    quant_conv_mu: Conv,
    quant_conv_log_sigma: Conv,
    post_quant_conv: Conv,
    cfg: Config,
    device: Device,
}

impl AutoencoderKlMaisi {
    /// Creates the variables under `vs` (use the store's root for MONAI-compatible names),
    /// initialised as PyTorch initialises `Conv3d` and `GroupNorm`.
    pub fn new(vs: nn::Path, cfg: &Config) -> Result<Self, VaeError> {
        cfg.validate().map_err(VaeError::Config)?;
        let lc = cfg.latent_channels;
        Ok(AutoencoderKlMaisi {
            encoder: Encoder::new(&(&vs / "encoder"), cfg),
            decoder: Decoder::new(&(&vs / "decoder"), cfg),
            quant_conv_mu: Conv::new(&(&vs / "quant_conv_mu" / "conv"), lc, lc, 1, 1, 0),
            quant_conv_log_sigma: Conv::new(
                &(&vs / "quant_conv_log_sigma" / "conv"),
                lc,
                lc,
                1,
                1,
                0,
            ),
            post_quant_conv: Conv::new(&(&vs / "post_quant_conv" / "conv"), lc, lc, 1, 1, 0),
            cfg: cfg.clone(),
            device: vs.device(),
        })
    }

    /// Builds the network on `device` and loads converted MONAI weights (see
    /// [`load_vae_safetensors`]). Returns the store that owns the variables.
    pub fn from_safetensors(
        path: &Path,
        cfg: &Config,
        device: Device,
    ) -> Result<(nn::VarStore, Self), VaeError> {
        let mut vs = nn::VarStore::new(device);
        let vae = Self::new(vs.root(), cfg)?;
        load_vae_safetensors(path, &mut vs)?;
        Ok((vs, vae))
    }

    /// The configuration the network was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device holding the variables.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The kind of the variables (`Float` unless the store was converted).
    pub fn kind(&self) -> Kind {
        self.post_quant_conv.kind()
    }

    /// Encodes to the posterior's mean and standard deviation.
    ///
    /// # Shapes
    /// `x`: `[b, in_channels, d, h, w]`, each of `d, h, w` at least the downsampling
    /// factor `f`; `mu`, `sigma`: `[b, latent_channels, d/f, h/f, w/f]` (rounded down).
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor), VaeError> {
        self.check_input(
            x,
            self.cfg.in_channels,
            "image",
            self.cfg.downsample_factor(),
        )?;
        let h = self.encoder.forward(x)?; // [b, lc, d/f, h/f, w/f]
        Ok(self.moments(&h)?)
    }

    /// The `quant_conv_*` heads on the encoder trunk's output `h`: `(mu, sigma)`.
    pub(crate) fn moments(&self, h: &Tensor) -> Result<(Tensor, Tensor), TchError> {
        let mu = self.quant_conv_mu.forward(h)?;
        let log_var = self.quant_conv_log_sigma.forward(h)?.f_clamp(-30.0, 20.0)?;
        let sigma = (log_var / 2.0).f_exp()?;
        Ok((mu, sigma))
    }

    /// `mu + sigma * eps` with `eps ~ N(0, 1)` drawn from `rng` (see [`gaussian_like`]).
    pub fn sampling(mu: &Tensor, sigma: &Tensor, rng: &mut impl Rng) -> Result<Tensor, VaeError> {
        if mu.size() != sigma.size() {
            return Err(VaeError::Input(format!(
                "mu {:?} and sigma {:?} differ in shape",
                mu.size(),
                sigma.size()
            )));
        }
        let eps = gaussian_like(sigma, rng)?;
        Ok(mu.f_add(&sigma.f_mul(&eps)?)?)
    }

    /// [`AutoencoderKlMaisi::sampling`] with `eps` from ChaCha8 seeded with `seed`: the
    /// same noise for the same seed and latent shape, whether the latent was encoded whole
    /// or tiled ([`EncodeMode::Sample`]).
    pub fn sample_seeded(mu: &Tensor, sigma: &Tensor, seed: u64) -> Result<Tensor, VaeError> {
        Self::sampling(mu, sigma, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }

    /// MONAI's `encode_stage_2_inputs`: a sample of the posterior (`mu + sigma * eps`).
    ///
    /// # Shapes
    /// As [`AutoencoderKlMaisi::encode`].
    pub fn encode_stage_2_inputs(
        &self,
        x: &Tensor,
        rng: &mut impl Rng,
    ) -> Result<Tensor, VaeError> {
        let (mu, sigma) = self.encode(x)?;
        Self::sampling(&mu, &sigma, rng)
    }

    /// Decodes latents: `decoder(post_quant_conv(z))`.
    ///
    /// # Shapes
    /// `z`: `[b, latent_channels, d, h, w]` -> `[b, out_channels, d*f, h*f, w*f]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor, VaeError> {
        self.check_input(z, self.cfg.latent_channels, "latent", 1)?;
        let z = self.post_quant_conv.forward(z)?;
        Ok(self.decoder.forward(&z)?)
    }

    /// Deterministic reconstruction through the posterior mean, as MONAI's `reconstruct`
    /// (MONAI's `forward` samples instead: that is [`AutoencoderKlMaisi::forward_sampled`]).
    ///
    /// # Shapes
    /// `x`: `[b, in_channels, d, h, w]` (each size a multiple of `f` to get the same size
    /// back) -> `[b, out_channels, d, h, w]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, VaeError> {
        let (mu, _) = self.encode(x)?;
        self.decode(&mu)
    }

    /// MONAI's `forward`, used in training: `(reconstruction, mu, sigma)` where the
    /// reconstruction decodes a posterior sample.
    ///
    /// # Shapes
    /// `x`: `[b, in_channels, d, h, w]`; reconstruction as `x` (with `out_channels`),
    /// `mu`, `sigma`: `[b, latent_channels, d/f, h/f, w/f]`.
    pub fn forward_sampled(
        &self,
        x: &Tensor,
        rng: &mut impl Rng,
    ) -> Result<(Tensor, Tensor, Tensor), VaeError> {
        let (mu, sigma) = self.encode(x)?;
        let z = Self::sampling(&mu, &sigma, rng)?;
        let recon = self.decode(&z)?;
        Ok((recon, mu, sigma))
    }

    pub(crate) fn check_input(
        &self,
        x: &Tensor,
        channels: i64,
        what: &str,
        min_size: i64,
    ) -> Result<(), VaeError> {
        let s = x.size();
        if s.len() != 5 {
            return Err(VaeError::Input(format!(
                "{what} tensor of shape {s:?} must be [b, c, d, h, w]"
            )));
        }
        if s[1] != channels {
            return Err(VaeError::Input(format!(
                "{what} tensor of shape {s:?} has {} channels, the vae expects {channels}",
                s[1]
            )));
        }
        if let Some(n) = s[2..].iter().find(|&&n| n < min_size) {
            return Err(VaeError::Input(format!(
                "{what} tensor of shape {s:?} has a spatial size {n} below {min_size}"
            )));
        }
        if !x.is_floating_point() {
            return Err(VaeError::Input(format!(
                "{what} tensor has kind {:?}, expected a floating-point kind",
                x.kind()
            )));
        }
        Ok(())
    }
}

/// Standard normal noise shaped as `like`, drawn as `f32` in C (row-major) order from
/// `rng` on the host and moved to `like`'s device and kind. A sample therefore depends
/// only on the generator's state and the shape: not on device, threads or tiling.
pub fn gaussian_like(like: &Tensor, rng: &mut impl Rng) -> Result<Tensor, TchError> {
    let n = like.numel();
    let data: Vec<f32> = (0..n)
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect();
    Tensor::from_slice(&data)
        .f_view(like.size().as_slice())?
        .f_to_device(like.device())?
        .f_to_kind(like.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(cfg: &Config) -> Vec<(String, Vec<i64>)> {
        let vs = nn::VarStore::new(Device::Cpu);
        AutoencoderKlMaisi::new(vs.root(), cfg).unwrap();
        let mut v: Vec<_> = vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.size()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn paper_config_has_monai_keys_and_parameter_count() {
        let v = names(&Config::maisi());
        assert_eq!(v.len(), 130);
        let params: i64 = v.iter().map(|(_, s)| s.iter().product::<i64>()).sum();
        // MONAI: sum(p.numel() for p in AutoencoderKlMaisi(...paper...).parameters())
        assert_eq!(params, 20_944_897);
        let get = |k: &str| v.iter().find(|(n, _)| n == k).map(|(_, s)| s.clone());
        assert_eq!(
            get("encoder.blocks.0.conv.conv.weight"),
            Some(vec![64, 1, 3, 3, 3])
        );
        assert_eq!(
            get("encoder.blocks.3.conv.conv.conv.weight"),
            Some(vec![64, 64, 3, 3, 3])
        );
        assert_eq!(
            get("encoder.blocks.4.nin_shortcut.conv.conv.weight"),
            Some(vec![128, 64, 1, 1, 1])
        );
        assert_eq!(get("encoder.blocks.9.weight"), Some(vec![256]));
        assert_eq!(
            get("decoder.blocks.6.conv.conv.conv.weight"),
            Some(vec![128, 128, 3, 3, 3])
        );
        assert_eq!(
            get("decoder.blocks.10.conv.conv.weight"),
            Some(vec![1, 64, 3, 3, 3])
        );
        assert_eq!(get("quant_conv_mu.conv.weight"), Some(vec![4, 4, 1, 1, 1]));
        assert_eq!(get("post_quant_conv.conv.bias"), Some(vec![4]));
    }

    #[test]
    fn invalid_configs_are_rejected_with_the_value() {
        let mut c = Config::small();
        c.num_channels = vec![16, 30, 64];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("30") && e.contains("norm_num_groups"), "{e}");
        let mut c = Config::small();
        c.num_res_blocks = vec![2, 2];
        assert!(c.validate().is_err());
        let mut c = Config::small();
        c.norm_eps = 0.0;
        assert!(c.validate().is_err());
        let e = serde_json::from_str::<Config>(r#"{"num_chanels": [8]}"#).unwrap_err();
        assert!(e.to_string().contains("num_chanels"), "{e}");
        assert_eq!(Config::maisi().downsample_factor(), 4);
    }

    #[test]
    fn shapes_follow_monai_rounding() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = Config {
            num_channels: vec![8, 16, 16],
            num_res_blocks: vec![1, 1, 1],
            norm_num_groups: 4,
            ..Config::maisi()
        };
        let vae = AutoencoderKlMaisi::new(vs.root(), &cfg).unwrap();
        let x = Tensor::randn([2, 1, 16, 13, 10], (Kind::Float, Device::Cpu));
        let (mu, sigma) = tch::no_grad(|| vae.encode(&x)).unwrap();
        // MONAI: each Down maps n -> floor(n / 2).
        assert_eq!(mu.size(), vec![2, 4, 4, 3, 2]);
        assert_eq!(sigma.size(), mu.size());
        assert!(sigma.min().double_value(&[]) > 0.0);
        let y = tch::no_grad(|| vae.decode(&mu)).unwrap();
        assert_eq!(y.size(), vec![2, 1, 16, 12, 8]);
        let e = vae.encode(&Tensor::zeros([1, 2, 8, 8, 8], (Kind::Float, Device::Cpu)));
        assert!(e.unwrap_err().to_string().contains("2 channels"));
        let e = vae.encode(&Tensor::zeros([1, 1, 8, 3, 8], (Kind::Float, Device::Cpu)));
        assert!(e.unwrap_err().to_string().contains("below 4"));
    }

    #[test]
    fn sampling_is_seeded_and_standard_normal() {
        let mu = Tensor::zeros([1, 4, 16, 16, 16], (Kind::Float, Device::Cpu));
        let sigma = Tensor::ones([1, 4, 16, 16, 16], (Kind::Float, Device::Cpu)) * 2.0;
        let a = AutoencoderKlMaisi::sampling(
            &mu,
            &sigma,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(7),
        )
        .unwrap();
        let b = AutoencoderKlMaisi::sampling(
            &mu,
            &sigma,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(7),
        )
        .unwrap();
        let c = AutoencoderKlMaisi::sampling(
            &mu,
            &sigma,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(8),
        )
        .unwrap();
        assert!(a.equal(&b));
        assert!(!a.equal(&c));
        assert!(AutoencoderKlMaisi::sample_seeded(&mu, &sigma, 7)
            .unwrap()
            .equal(&a));
        let (m, s) = (
            a.mean(Kind::Double).double_value(&[]),
            a.std(true).double_value(&[]),
        );
        assert!(m.abs() < 0.05 && (s - 2.0).abs() < 0.05, "mean {m} std {s}");
    }

    #[test]
    fn gradients_flow_through_forward_sampled() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = Config {
            num_channels: vec![8, 8],
            num_res_blocks: vec![1, 1],
            norm_num_groups: 4,
            ..Config::maisi()
        };
        let vae = AutoencoderKlMaisi::new(vs.root(), &cfg).unwrap();
        let x = Tensor::rand([1, 1, 8, 8, 8], (Kind::Float, Device::Cpu));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let (recon, mu, sigma) = vae.forward_sampled(&x, &mut rng).unwrap();
        let loss =
            (recon - &x).abs().mean(Kind::Float) + (mu.square() + sigma.square()).mean(Kind::Float);
        loss.backward();
        let vars = vs.variables();
        for (name, v) in &vars {
            let g = v.grad();
            assert!(g.defined(), "{name} has no gradient");
            assert!(
                g.abs().sum(Kind::Double).double_value(&[]) > 0.0,
                "{name}: zero gradient"
            );
        }
    }
}
