//! Tiled (sliding-window) encoding and decoding of volumes too large to run whole.
//!
//! A 512 x 512 x 300 CT encoded whole by the paper's VAE holds several 64-channel f32
//! activations of the full volume (20 GB each); tiling bounds the working set by the tile
//! size. The catch is GroupNorm: its statistics are taken over the whole tensor, so an
//! encoder run on a tile normalises with the tile's statistics, not the volume's. Two
//! modes are offered ([`TileNorm`]):
//!
//! ## `TileNorm::Global` (exact; encoding only)
//!
//! The encoder is run level by level (a level ends with a Down block). Each level's input
//! is kept whole (on the volume's device, f32) and cut into disjoint cores plus a halo of
//! at least the level's receptive radius (6 voxels of that level for MAISI), with core
//! origins even so that the stride-2 grids of tiles and volume coincide. GroupNorm uses
//! **whole-volume statistics**: for the k-th GroupNorm of a level, one pass over all tiles
//! runs the level up to that layer (earlier layers using their already known statistics)
//! and accumulates mean and variance over the cores (Chan's update, f64). A last pass
//! writes the level's output cores.
//!
//! Equality: the result equals whole-volume [`AutoencoderKlMaisi::encode`] **everywhere**,
//! border voxels included, up to float rounding, for any tile size. The test
//! `tiled_global_equals_whole_volume` asserts `max|mu_tiled - mu_whole| <= 1e-5 *
//! max|mu_whole|` (and the same for sigma) on a 64 x 38 x 30 volume (not all multiples
//! of 4) that is 40% constant "air", tiled at every level (2-4 tiles per axis at levels 0
//! and 1); per-tile statistics give a relative error near 1 on the same input.
//!
//! Cost: a level is run once per GroupNorm layer it contains plus once, each pass only up
//! to the layer measured: about 2.6x the convolution FLOPs of one encode for MAISI (whose
//! levels hold 4, 4 and 5 GroupNorms), plus the halos (`(1 + 12 / core)^3`). Memory: the inputs of levels 1
//! and 2 (paper width: 64 channels at 1/8 of the voxels, then 128 at 1/64: 8x and 2x the
//! volume's f32 size) plus one tile's activations. Core sizes at deeper levels are
//! `tile * (C_0 / C_level)^(1/3)` so that a tile's working set stays about the same.
//!
//! ## `TileNorm::PerTile` (MAISI's sliding window; encoding and decoding)
//!
//! Tiles of `tile` voxels overlapping by at least `overlap` (origins multiples of the
//! downsampling factor, spread evenly, the last tile ending at the volume's end) are
//! encoded independently, each with its own GroupNorm statistics, and blended in latent
//! space (before `quant_conv_*`) with a separable crossfade over each overlap: weight ~0 on
//! the `min(R, overlap / 4)` latents next to a tile's inner edge (where its zero padding
//! shows most; `R` = the receptive radius, 9 latents for MAISI's encoder), then `sin^2`
//! over the rest of the overlap. Two neighbours' weights sum to one and are C1-smooth, so
//! there is no seam in the blending itself.
//!
//! Equality: a single tile covering the volume gives exactly the whole-volume result. With
//! several tiles, a latent farther than `R` from every inner tile edge is its tile's own
//! encoding and differs from whole-volume encoding only through GroupNorm statistics;
//! within `R` the tile's zero padding adds to that. Neither has a general bound. Measured
//! by `tiled_per_tile_is_close_and_seamless` (small VAE, statistically homogeneous random
//! volume, tiles of 96 overlapping by 32): max-norm relative error 0.05 away from tile
//! borders and 0.18 in the crossfade, while the steps between neighbouring latent slices
//! across the crossfade stay within 2% of the whole-volume ones (no seam). On CT, where
//! tiles of air and of body have very different statistics, use `Global`. Cost: one
//! encode of every tile (overlaps are computed twice).
//!
//! [`decode_tiled`] works this way in image space (receptive radius 11 latents), with
//! larger differences (max-norm relative error 0.31 in `tiled_decode_matches_whole_...`).
//! Exact decoding with global statistics is not offered: streaming the decoder level by
//! level would store its 256- and 128-channel activations at 1/8 and full resolution (32x
//! and 128x the output's size), and recomputing instead costs about 8 decodes plus halos of
//! 44 voxels.
//!
//! Tensors may live on the host while the network is on a GPU: tiles are moved to the
//! network's device and kind, results come back as f32 on the input's device.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::blocks::{self, Block, GroupStats, Halt, Moments, NormCtx, Stream};
use super::{AutoencoderKlMaisi, VaeError};

/// How GroupNorm layers are normalised when a volume is processed in tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TileNorm {
    /// Whole-volume statistics, streamed: equals whole-volume encoding (encoder only).
    Global,
    /// Each tile's own statistics, tiles blended (MAISI's sliding-window inference).
    PerTile,
}

/// Tiling of a volume for [`encode_tiled`] and [`decode_tiled`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TileConfig {
    /// Tile size in image voxels per spatial axis `[d, h, w]`, a multiple of the
    /// downsampling factor and at least twice it. With `Global` it is the core size at
    /// full resolution (halos come on top).
    pub tile: [i64; 3],
    /// Minimum overlap of neighbouring tiles in image voxels (`PerTile` only), a multiple
    /// of the downsampling factor, smaller than every tile size.
    pub overlap: i64,
    /// GroupNorm statistics.
    pub norm: TileNorm,
}

impl Default for TileConfig {
    fn default() -> Self {
        TileConfig {
            tile: [128; 3],
            overlap: 32,
            norm: TileNorm::Global,
        }
    }
}

impl TileConfig {
    fn validate(&self, factor: i64) -> Result<(), VaeError> {
        for &t in &self.tile {
            if t < 2 * factor || t % factor != 0 {
                return Err(VaeError::Config(format!(
                    "tile size {t} must be a multiple of the downsampling factor {factor} \
                     and at least {}",
                    2 * factor
                )));
            }
            if self.norm == TileNorm::PerTile && !(0..t).contains(&self.overlap) {
                return Err(VaeError::Config(format!(
                    "overlap {} must be at least 0 and smaller than the tile size {t}",
                    self.overlap
                )));
            }
        }
        if self.overlap % factor != 0 {
            return Err(VaeError::Config(format!(
                "overlap {} must be a multiple of the downsampling factor {factor}",
                self.overlap
            )));
        }
        Ok(())
    }
}

/// What [`encode_tiled_latent`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodeMode {
    /// The posterior mean `mu`.
    Mean,
    /// A posterior sample `mu + sigma * eps`, `eps` from ChaCha8 seeded with `seed`, drawn
    /// over the whole latent (independent of tiling, device and threads).
    Sample { seed: u64 },
}

/// Encodes `volume` tile by tile to the posterior's `(mu, sigma)`.
///
/// # Shapes
/// `volume`: `[b, in_channels, d, h, w]` on any device (often the host, with the network
/// on a GPU); `mu`, `sigma`: `[b, latent_channels, d/f, h/f, w/f]` (rounded down, as
/// whole-volume encoding), f32 on `volume`'s device.
pub fn encode_tiled(
    vae: &AutoencoderKlMaisi,
    volume: &Tensor,
    cfg: &TileConfig,
) -> Result<(Tensor, Tensor), VaeError> {
    let f = vae.config().downsample_factor();
    vae.check_input(volume, vae.config().in_channels, "image", f)?;
    cfg.validate(f)?;
    let _guard = tch::no_grad_guard();
    let h = match cfg.norm {
        TileNorm::Global => encoder_trunk_global(vae, volume, cfg)?,
        TileNorm::PerTile => encoder_trunk_per_tile(vae, volume, cfg)?,
    };
    let h = h.f_to_device(vae.device())?.f_to_kind(vae.kind())?;
    let (mu, sigma) = vae.moments(&h)?;
    let back = |t: Tensor| t.f_to_device(volume.device())?.f_to_kind(Kind::Float);
    Ok((back(mu)?, back(sigma)?))
}

/// [`encode_tiled`] followed by the mean or a seeded posterior sample.
///
/// # Shapes
/// As [`encode_tiled`]'s `mu`.
pub fn encode_tiled_latent(
    vae: &AutoencoderKlMaisi,
    volume: &Tensor,
    cfg: &TileConfig,
    mode: EncodeMode,
) -> Result<Tensor, VaeError> {
    let (mu, sigma) = encode_tiled(vae, volume, cfg)?;
    match mode {
        EncodeMode::Mean => Ok(mu),
        EncodeMode::Sample { seed } => {
            let _guard = tch::no_grad_guard();
            AutoencoderKlMaisi::sample_seeded(&mu, &sigma, seed)
        }
    }
}

/// Decodes latents tile by tile (per-tile GroupNorm statistics, blended in image space
/// with the `sin^2` crossfade); `cfg.tile` and `cfg.overlap` are in image voxels and
/// `cfg.norm` must be [`TileNorm::PerTile`].
///
/// # Shapes
/// `z`: `[b, latent_channels, d, h, w]` on any device -> `[b, out_channels, d*f, h*f,
/// w*f]`, f32 on `z`'s device.
pub fn decode_tiled(
    vae: &AutoencoderKlMaisi,
    z: &Tensor,
    cfg: &TileConfig,
) -> Result<Tensor, VaeError> {
    let f = vae.config().downsample_factor();
    vae.check_input(z, vae.config().latent_channels, "latent", 1)?;
    cfg.validate(f)?;
    if cfg.norm != TileNorm::PerTile {
        return Err(VaeError::Config(
            "tiled decoding supports only norm = per_tile (hint: exact global statistics \
             would keep full-resolution decoder activations; decode whole volumes with \
             AutoencoderKlMaisi::decode when they fit)"
                .into(),
        ));
    }
    let _guard = tch::no_grad_guard();
    let margin = receptive_radius_latents(vae.decoder.blocks(), f, false) * f;
    let s = z.size();
    let spans: Vec<Vec<(i64, i64)>> = (0..3)
        .map(|a| overlapping_spans(s[2 + a], cfg.tile[a] / f, cfg.overlap / f, 1))
        .collect();
    let out_dims = [s[2] * f, s[3] * f, s[4] * f];
    let mut blend = Blend::new(
        [
            s[0],
            vae.config().out_channels,
            out_dims[0],
            out_dims[1],
            out_dims[2],
        ],
        z.device(),
    )?;
    for_each_tile(&spans, |i, r| {
        let zt = slice3(z, r)?
            .f_to_device(vae.device())?
            .f_to_kind(vae.kind())?;
        let y = vae.decode(&zt)?;
        let img: Vec<Vec<(i64, i64)>> = (0..3)
            .map(|a| spans[a].iter().map(|&(p, q)| (p * f, q * f)).collect())
            .collect();
        blend.add(&y, &img, i, margin)
    })?;
    blend.finish()
}

/// Per-tile encoder trunk (before `quant_conv_*`), blended in latent space.
fn encoder_trunk_per_tile(
    vae: &AutoencoderKlMaisi,
    volume: &Tensor,
    cfg: &TileConfig,
) -> Result<Tensor, VaeError> {
    let f = vae.config().downsample_factor();
    let margin = receptive_radius_latents(vae.encoder.blocks(), f, true);
    let s = volume.size();
    let spans: Vec<Vec<(i64, i64)>> = (0..3)
        .map(|a| overlapping_spans(s[2 + a], cfg.tile[a], cfg.overlap, f))
        .collect();
    // Tile origins are multiples of f, so tile latents sit at origin / f, and a tile
    // [a, b) yields floor(b / f) - a / f latents, as whole-volume encoding.
    let latent: Vec<Vec<(i64, i64)>> = spans
        .iter()
        .map(|v| v.iter().map(|&(a, b)| (a / f, b / f)).collect())
        .collect();
    let mut blend = Blend::new(
        [
            s[0],
            vae.config().latent_channels,
            s[2] / f,
            s[3] / f,
            s[4] / f,
        ],
        volume.device(),
    )?;
    for_each_tile(&spans, |i, r| {
        let xt = slice3(volume, r)?
            .f_to_device(vae.device())?
            .f_to_kind(vae.kind())?;
        let h = vae.encoder.forward(&xt)?;
        blend.add(&h, &latent, i, margin)
    })?;
    blend.finish()
}

/// One level of the streamed encoder: a run of blocks ending with a Down (or the end).
struct Level<'a> {
    blocks: &'a [Block],
    /// Halo in this level's voxels: at least the receptive radius, even.
    halo: i64,
    /// Whether the level halves the resolution (ends with a Down).
    down: bool,
    /// Widest activation of the level, for tile sizing.
    channels: i64,
}

fn levels(blocks: &[Block]) -> Vec<Level<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, b) in blocks.iter().enumerate() {
        if b.is_down() || i + 1 == blocks.len() {
            let bl = &blocks[start..=i];
            let radius: i64 = bl.iter().map(Block::radius).sum();
            out.push(Level {
                blocks: bl,
                halo: radius + radius % 2,
                down: b.is_down(),
                channels: bl.iter().filter_map(Block::out_channels).max().unwrap_or(1),
            });
            start = i + 1;
        }
    }
    out
}

/// Encoder trunk with whole-volume GroupNorm statistics, streamed level by level.
fn encoder_trunk_global(
    vae: &AutoencoderKlMaisi,
    volume: &Tensor,
    cfg: &TileConfig,
) -> Result<Tensor, VaeError> {
    let store = volume.device();
    let levels = levels(vae.encoder.blocks());
    let c0 = levels[0].channels as f64;
    let mut known: Vec<GroupStats> = Vec::new();
    let mut x = volume.shallow_clone();
    for level in &levels {
        let s = x.size();
        let shrink = (c0 / level.channels as f64).cbrt().min(1.0);
        let spans: Vec<Vec<Span>> = (0..3)
            .map(|a| {
                let t = cfg.tile[a] as f64 * shrink;
                core_spans(s[2 + a], ((t as i64) / 2 * 2).max(8), level.halo)
            })
            .collect();
        let ext: Vec<Vec<(i64, i64)>> = spans
            .iter()
            .map(|v| v.iter().map(|s| s.ext).collect())
            .collect();
        let core_rel = |i: [usize; 3]| -> [(i64, i64); 3] {
            std::array::from_fn(|a| {
                let sp = spans[a][i[a]];
                (sp.core.0 - sp.ext.0, sp.core.1 - sp.ext.0)
            })
        };
        let tile_input = |r: [(i64, i64); 3]| -> Result<Tensor, VaeError> {
            Ok(slice3(&x, r)?
                .f_to_device(vae.device())?
                .f_to_kind(vae.kind())?)
        };
        let first_gn = known.len();
        let n_gn: usize = level.blocks.iter().map(Block::group_norms).sum();
        for _ in 0..n_gn {
            let mut acc: Option<Moments> = None;
            for_each_tile(&ext, |i, r| {
                let mut st = Stream {
                    known: &known,
                    cursor: first_gn,
                    core: core_rel(i),
                    collected: None,
                };
                match blocks::run(level.blocks, &tile_input(r)?, &mut NormCtx::Stream(&mut st)) {
                    Err(Halt::Collected) => {}
                    Err(Halt::Torch(e)) => return Err(e.into()),
                    Ok(_) => unreachable!("a level with an unmeasured GroupNorm ran to its end"),
                }
                let m = st.collected.take().expect("a halted pass has measured");
                acc = Some(match acc.take() {
                    None => m,
                    Some(a) => a.merge(m),
                });
                Ok(())
            })?;
            known.push(acc.expect("at least one tile").finish());
        }
        let half = |v: i64| if level.down { v / 2 } else { v };
        let mut out: Option<Tensor> = None;
        for_each_tile(&ext, |i, r| {
            let mut st = Stream {
                known: &known,
                cursor: first_gn,
                core: core_rel(i),
                collected: None,
            };
            let y = match blocks::run(level.blocks, &tile_input(r)?, &mut NormCtx::Stream(&mut st))
            {
                Ok(y) => y,
                Err(Halt::Torch(e)) => return Err(e.into()),
                Err(Halt::Collected) => unreachable!("all statistics of the level are known"),
            };
            let o = out.get_or_insert_with(|| {
                let ys = y.size();
                Tensor::zeros(
                    [ys[0], ys[1], half(s[2]), half(s[3]), half(s[4])],
                    (Kind::Float, store),
                )
            });
            // Core [c0, c1) of this level maps to [c0 / 2, floor(c1 / 2)) after a Down
            // (c0 and the tile origin are even).
            let dst: [(i64, i64); 3] = std::array::from_fn(|a| {
                let c = spans[a][i[a]].core;
                (half(c.0), half(c.1))
            });
            let src: [(i64, i64); 3] = std::array::from_fn(|a| {
                let e0 = half(spans[a][i[a]].ext.0);
                (dst[a].0 - e0, dst[a].1 - e0)
            });
            slice3(o, dst)?.f_copy_(&slice3(&y, src)?)?;
            Ok(())
        })?;
        x = out.expect("at least one tile");
    }
    Ok(x)
}

/// A tile along one axis in streaming mode: computed extent and owned core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    ext: (i64, i64),
    core: (i64, i64),
}

/// Disjoint cores of `core` voxels covering `[0, n)` (a remainder shorter than half a
/// core joins the last core), each with `halo` voxels on both sides, clipped to `[0, n)`.
fn core_spans(n: i64, core: i64, halo: i64) -> Vec<Span> {
    let mut starts: Vec<i64> = (0..n).step_by(core as usize).collect();
    if starts.len() > 1 && n - starts[starts.len() - 1] < core / 2 {
        starts.pop();
    }
    starts
        .iter()
        .enumerate()
        .map(|(i, &c0)| {
            let c1 = starts.get(i + 1).copied().unwrap_or(n);
            Span {
                ext: ((c0 - halo).max(0), (c1 + halo).min(n)),
                core: (c0, c1),
            }
        })
        .collect()
}

/// Tiles `[a, b)` of length `tile` covering `[0, n)`, overlapping by at least `overlap`,
/// origins multiples of `align` and spread evenly between 0 and the last origin
/// `floor((n - tile) / align) * align`; the last tile ends at `n` (so it may exceed
/// `tile` by less than `align`).
fn overlapping_spans(n: i64, tile: i64, overlap: i64, align: i64) -> Vec<(i64, i64)> {
    if n <= tile {
        return vec![(0, n)];
    }
    let units = (n - tile) / align; // last origin, in units of `align`
    let stride = (tile - overlap) / align; // at least 1 (validated)
    let k = (units + stride - 1) / stride + 1;
    if k == 1 {
        return vec![(0, n)];
    }
    (0..k)
        .map(|i| {
            // round(i * units / (k - 1)): consecutive origins differ by at most `stride`
            let s = (2 * i * units + (k - 1)) / (2 * (k - 1)) * align;
            (s, if i + 1 == k { n } else { s + tile })
        })
        .collect()
}

/// `sin^2(pi t / 2)`: rises from 0 to 1 on `[0, 1]`, and `w(t) + w(1 - t) = 1`.
fn ramp(t: f64) -> f64 {
    (std::f64::consts::FRAC_PI_2 * t).sin().powi(2)
}

/// Blend weights of tile `i` along one axis: 1 inside; over an overlap of `ov` with a
/// neighbour, 0 (1e-6) on the `m = min(max_margin, ov / 4)` positions next to the tile's
/// edge, where its zero padding shows most, then a `sin^2` crossfade over the central
/// `ov - 2m` positions. The weights of two neighbours sum to one.
fn axis_weights(spans: &[(i64, i64)], i: usize, max_margin: i64) -> Vec<f32> {
    let (a, b) = spans[i];
    let left = if i > 0 {
        (spans[i - 1].1 - a).max(0)
    } else {
        0
    };
    let right = if i + 1 < spans.len() {
        (b - spans[i + 1].0).max(0)
    } else {
        0
    };
    // weight at distance `dist` (0 = the edge voxel) inside an overlap of `ov`
    let side = |dist: i64, ov: i64| -> f64 {
        let m = max_margin.min(ov / 4);
        let t = (dist - m) as f64 + 0.5;
        if t <= 0.0 {
            1e-6
        } else {
            ramp((t / (ov - 2 * m) as f64).min(1.0)).max(1e-6)
        }
    };
    (a..b)
        .map(|p| {
            let mut w = 1.0;
            if p < a + left {
                w *= side(p - a, left);
            }
            if p >= b - right {
                w *= side(b - 1 - p, right);
            }
            w as f32
        })
        .collect()
}

/// How far (in latent voxels, rounded up) an output of the encoder or an input of the
/// decoder reaches: the receptive radius of `blocks` with GroupNorm statistics fixed.
fn receptive_radius_latents(blocks: &[Block], factor: i64, encoder: bool) -> i64 {
    // in units of the blocks' input voxels
    let mut scale = 1.0;
    let mut r = 0.0;
    for b in blocks {
        if encoder {
            r += b.radius() as f64 * scale;
            if b.is_down() {
                scale *= 2.0;
            }
        } else if b.is_up() {
            // trilinear reads one input voxel either side, then the conv at twice the resolution
            r += scale;
            scale /= 2.0;
            r += b.radius() as f64 * scale;
        } else {
            r += b.radius() as f64 * scale;
        }
    }
    if encoder {
        (r / factor as f64).ceil() as i64
    } else {
        r.ceil() as i64
    }
}

/// Weighted accumulation of overlapping tile outputs.
struct Blend {
    acc: Tensor,
    wsum: Tensor,
}

impl Blend {
    fn new(shape: [i64; 5], device: Device) -> Result<Self, VaeError> {
        Ok(Blend {
            acc: Tensor::f_zeros(shape, (Kind::Float, device))?,
            wsum: Tensor::f_zeros([1, 1, shape[2], shape[3], shape[4]], (Kind::Float, device))?,
        })
    }

    /// Adds tile `i` (its output `y` covers `spans[a][i[a]]` on each axis).
    fn add(
        &mut self,
        y: &Tensor,
        spans: &[Vec<(i64, i64)>],
        i: [usize; 3],
        margin: i64,
    ) -> Result<(), VaeError> {
        let dev = self.acc.device();
        let w: Vec<Tensor> = (0..3)
            .map(|a| Tensor::from_slice(&axis_weights(&spans[a], i[a], margin)))
            .collect();
        let w = (w[0].view([-1, 1, 1]) * w[1].view([1, -1, 1]) * w[2].view([1, 1, -1]))
            .f_unsqueeze(0)?
            .f_unsqueeze(0)?
            .f_to_device(dev)?;
        let r: [(i64, i64); 3] = std::array::from_fn(|a| spans[a][i[a]]);
        let y = y.f_to_device(dev)?.f_to_kind(Kind::Float)?;
        let _ = slice3(&self.acc, r)?.f_add_(&y.f_mul(&w)?)?;
        let _ = slice3(&self.wsum, r)?.f_add_(&w)?;
        Ok(())
    }

    fn finish(self) -> Result<Tensor, VaeError> {
        Ok(self.acc.f_div(&self.wsum)?)
    }
}

/// Calls `f(index, ranges)` for every combination of per-axis ranges, in C order.
fn for_each_tile<T: Copy>(
    spans: &[Vec<T>],
    mut f: impl FnMut([usize; 3], [T; 3]) -> Result<(), VaeError>,
) -> Result<(), VaeError> {
    for i in 0..spans[0].len() {
        for j in 0..spans[1].len() {
            for k in 0..spans[2].len() {
                f([i, j, k], [spans[0][i], spans[1][j], spans[2][k]])?;
            }
        }
    }
    Ok(())
}

/// A view of `x` (`[b, c, d, h, w]`) restricted to `[start, end)` on each spatial axis.
fn slice3(x: &Tensor, r: [(i64, i64); 3]) -> Result<Tensor, tch::TchError> {
    let mut t = x.shallow_clone();
    for (a, (s, e)) in r.into_iter().enumerate() {
        t = t.f_narrow(2 + a as i64, s, e - s)?;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_spans_cover_with_aligned_origins() {
        assert_eq!(overlapping_spans(40, 64, 16, 4), vec![(0, 40)]);
        assert_eq!(
            overlapping_spans(100, 32, 8, 4),
            vec![(0, 32), (24, 56), (44, 76), (68, 100)]
        );
        for (n, tile, ov) in [
            (100, 32, 8),
            (97, 32, 8),
            (130, 48, 16),
            (64, 32, 0),
            (33, 32, 8),
            (300, 128, 32),
            (101, 32, 28),
        ] {
            let v = overlapping_spans(n, tile, ov, 4);
            assert_eq!(v[0].0, 0);
            assert_eq!(v.last().unwrap().1, n, "{v:?}");
            for w in v.windows(2) {
                assert!(w[1].0 % 4 == 0 && w[1].0 > w[0].0, "{v:?}");
                assert!(w[0].1 - w[1].0 >= ov, "overlap below {ov}: {v:?}");
            }
            for &(a, b) in &v {
                assert!(b - a <= tile + 3 && b - a >= tile.min(n), "{v:?}");
            }
        }
    }

    #[test]
    fn core_spans_partition_with_halo() {
        let v = core_spans(50, 16, 6);
        assert_eq!(
            v.iter().map(|s| s.core).collect::<Vec<_>>(),
            vec![(0, 16), (16, 32), (32, 50)]
        );
        assert_eq!(v[1].ext, (10, 38));
        assert_eq!(v[2].ext, (26, 50));
        let v = core_spans(60, 16, 6);
        assert_eq!(v.last().unwrap().core, (48, 60));
    }

    #[test]
    fn crossfade_weights_sum_to_one() {
        for (ov, margin) in [(8, 3), (16, 3), (12, 0), (16, 9), (24, 2)] {
            let spans = overlapping_spans(100, 32, ov, 4);
            let mut sum = vec![0.0f64; 100];
            let mut cover = vec![0; 100];
            for i in 0..spans.len() {
                for (p, w) in (spans[i].0..spans[i].1).zip(axis_weights(&spans, i, margin)) {
                    sum[p as usize] += w as f64;
                    cover[p as usize] += 1;
                    assert!(w > 0.0 && w <= 1.0);
                }
            }
            for p in 0..100 {
                // where two tiles meet, the crossfade is a partition of unity; where three
                // do (large overlaps), the blend divides by the sum
                if cover[p] <= 2 {
                    assert!(
                        (sum[p] - 1.0).abs() < 1e-5,
                        "overlap {ov}, position {p}: {}",
                        sum[p]
                    );
                } else {
                    assert!(sum[p] > 0.5, "overlap {ov}, position {p}: {}", sum[p]);
                }
            }
        }
    }

    #[test]
    fn level_halos_cover_receptive_radius() {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let vae = AutoencoderKlMaisi::new(vs.root(), &super::super::Config::maisi()).unwrap();
        let l = levels(vae.encoder.blocks());
        // conv_in (1) + 2 ResBlocks (2 each) + Down (1); 2 x 2 + 1; 2 x 2 + conv_out (1).
        assert_eq!(l.iter().map(|l| l.halo).collect::<Vec<_>>(), vec![6, 6, 6]);
        assert_eq!(
            l.iter().map(|l| l.down).collect::<Vec<_>>(),
            vec![true, true, false]
        );
        assert_eq!(
            l.iter().map(|l| l.channels).collect::<Vec<_>>(),
            vec![64, 128, 256]
        );
        let gn: Vec<usize> = l
            .iter()
            .map(|l| l.blocks.iter().map(Block::group_norms).sum())
            .collect();
        assert_eq!(gn, vec![4, 4, 5]);
        // 6 + 2 * (4 + 1) + 4 * (4 + 1) = 36 image voxels; decoder 10.5 latent voxels
        assert_eq!(receptive_radius_latents(vae.encoder.blocks(), 4, true), 9);
        assert_eq!(receptive_radius_latents(vae.decoder.blocks(), 4, false), 11);
    }
}
