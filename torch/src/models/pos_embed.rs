//! Fixed 3-D sine-cosine position embeddings (MAE's `get_3d_sincos_pos_embed`) and trilinear
//! resizing of a position-embedding grid (the MeDUET -> DiT/UNETR transfer).
//!
//! For a token at grid coordinates `(gx, gy, gz)` and width `D` (divisible by 6), with
//! `D' = D/3` and `w_k = 1 / 10000^(k / (D'/2))` for `k < D'/2`:
//!
//! ```text
//! emb = [sin(gx w), cos(gx w), sin(gy w), cos(gy w), sin(gz w), cos(gz w)]
//! ```
//!
//! Tokens are ordered with x slowest (`meshgrid(indexing="ij")`), matching the patch
//! embedding's flattening. The values are computed in f64, as NumPy does, and rounded to f32.
//! With a cls row, row 0 is all zeros.

use tch::{Device, Kind, Tensor};

/// Errors of the position-embedding builders.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PosEmbedError {
    /// The width cannot be split into 3 axes x (sin, cos).
    #[error("3-D sin-cos position embedding width {0} is not divisible by 6")]
    WidthNotDivisibleBy6(i64),
    /// A grid with a non-positive extent.
    #[error("position-embedding grid {0:?} has a non-positive extent")]
    BadGrid([i64; 3]),
}

/// The sin-cos embedding of one grid coordinate along one axis (`width` values:
/// `width/2` sines then `width/2` cosines), in f64.
pub fn sincos_1d(width: i64, pos: f64) -> Vec<f64> {
    let half = width / 2;
    let omega = (0..half).map(|k| 1.0 / 10000f64.powf(k as f64 / half as f64));
    let angles: Vec<f64> = omega.map(|w| pos * w).collect();
    angles
        .iter()
        .map(|a| a.sin())
        .chain(angles.iter().map(|a| a.cos()))
        .collect()
}

/// The fixed 3-D sin-cos table as f32 values, row-major `[rows, dim]` with
/// `rows = gx*gy*gz (+1 with cls_token)`.
pub fn sincos_3d_values(
    dim: i64,
    grid: [i64; 3],
    cls_token: bool,
) -> Result<Vec<f32>, PosEmbedError> {
    if dim <= 0 || dim % 6 != 0 {
        return Err(PosEmbedError::WidthNotDivisibleBy6(dim));
    }
    if grid.iter().any(|&g| g <= 0) {
        return Err(PosEmbedError::BadGrid(grid));
    }
    let axis = dim / 3;
    let n = (grid[0] * grid[1] * grid[2]) as usize;
    let mut out = Vec::with_capacity((n + usize::from(cls_token)) * dim as usize);
    if cls_token {
        out.extend(std::iter::repeat_n(0f32, dim as usize));
    }
    for x in 0..grid[0] {
        for y in 0..grid[1] {
            for z in 0..grid[2] {
                for p in [x, y, z] {
                    out.extend(sincos_1d(axis, p as f64).into_iter().map(|v| v as f32));
                }
            }
        }
    }
    Ok(out)
}

/// The fixed 3-D sin-cos position embedding as a `[1, rows, dim]` f32 tensor on `device`
/// (`rows = gx*gy*gz`, plus a leading zero row when `cls_token`).
pub fn sincos_3d(
    dim: i64,
    grid: [i64; 3],
    cls_token: bool,
    device: Device,
) -> Result<Tensor, PosEmbedError> {
    let values = sincos_3d_values(dim, grid, cls_token)?;
    let rows = values.len() as i64 / dim;
    Ok(Tensor::from_slice(&values)
        .view([1, rows, dim])
        .to_device(device))
}

/// Resizes a grid of position embeddings with trilinear interpolation
/// (`F.interpolate(mode="trilinear", align_corners=False)`), as MeDUET's DiT/SiT init does:
/// `[1, gx*gy*gz, D]` -> `[1, D, gx, gy, gz]` -> interpolate -> `[1, tx*ty*tz, D]`.
/// Returns a copy of the input when the grids are equal. The input has no cls row (pass
/// `pos_embed.narrow(1, 1, n)` for a table that has one).
///
/// # Shapes
/// - `pos`: `[1, from[0]*from[1]*from[2], D]`
/// - returns `[1, to[0]*to[1]*to[2], D]`
pub fn interpolate_3d(pos: &Tensor, from: [i64; 3], to: [i64; 3]) -> Result<Tensor, PosEmbedError> {
    if from.iter().chain(to.iter()).any(|&g| g <= 0) {
        return Err(PosEmbedError::BadGrid(if from.iter().any(|&g| g <= 0) {
            from
        } else {
            to
        }));
    }
    if from == to {
        return Ok(pos.copy());
    }
    let d = *pos.size().last().expect("pos embed has a width");
    let grid = pos
        .reshape([1, from[0], from[1], from[2], d])
        .permute([0, 4, 1, 2, 3])
        .to_kind(Kind::Float);
    let resized = grid.upsample_trilinear3d(to, false, None, None, None);
    Ok(resized
        .permute([0, 2, 3, 4, 1])
        .reshape([1, to[0] * to[1] * to[2], d])
        .to_kind(pos.kind()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_axis_formula() {
        let v = sincos_1d(8, 3.0);
        // omega = [1, 1e-1, 1e-2, 1e-3]
        let expect = [
            3f64.sin(),
            0.3f64.sin(),
            0.03f64.sin(),
            0.003f64.sin(),
            3f64.cos(),
            0.3f64.cos(),
            0.03f64.cos(),
            0.003f64.cos(),
        ];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-14, "{a} vs {b}");
        }
    }

    #[test]
    fn rejects_bad_width() {
        assert_eq!(
            sincos_3d_values(64, [2, 2, 2], true).unwrap_err(),
            PosEmbedError::WidthNotDivisibleBy6(64)
        );
    }
}
