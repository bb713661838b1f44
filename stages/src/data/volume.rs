//! In-memory 3D volumes and their geometry.
//!
//! # Conventions
//!
//! - **Layout.** Voxels are stored in C order: voxel `(i, j, k)` is at index
//!   `(i * ny + j) * nz + k`, where `i` runs along the first NIfTI axis and `k` along the
//!   third (so `k`, usually the slice axis, is contiguous). `shape = [nx, ny, nz]`.
//! - **Affine.** `affine` is a row-major 4x4 matrix mapping the voxel *centre* `(i, j, k, 1)`
//!   to RAS+ world coordinates in millimetres, exactly as NIfTI's sform/qform and nibabel's
//!   `img.affine`: `+x` points towards the patient's **R**ight, `+y` towards
//!   **A**nterior, `+z` towards **S**uperior.
//! - **Spacing** is the Euclidean norm of the affine's first three columns (nibabel's
//!   `img.header.get_zooms()` for a consistent header).
//!
//! Images are [`Volume`] (`f32`), labels [`LabelVolume`] (`u8`); both are [`VolumeOf`].

/// A 4x4 affine (row-major), voxel centre to world millimetres.
pub type Affine = [[f64; 4]; 4];

/// A 3D volume with voxels of type `T` and its geometry.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeOf<T> {
    /// Voxels in C order, `shape[0] * shape[1] * shape[2]` of them.
    pub data: Vec<T>,
    /// `[nx, ny, nz]`.
    pub shape: [usize; 3],
    /// Voxel centre to RAS+ world millimetres.
    pub affine: Affine,
}

/// An image: intensities as `f32` (Hounsfield units for CT before windowing).
pub type Volume = VolumeOf<f32>;
/// A label map: one class index per voxel.
pub type LabelVolume = VolumeOf<u8>;

/// The 4x4 identity.
pub const IDENTITY: Affine = [
    [1.0, 0.0, 0.0, 0.0],
    [0.0, 1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
];

impl<T: Copy> VolumeOf<T> {
    /// A volume filled with `value`.
    pub fn filled(shape: [usize; 3], affine: Affine, value: T) -> Self {
        Self {
            data: vec![value; shape[0] * shape[1] * shape[2]],
            shape,
            affine,
        }
    }

    /// Wraps data, checking its length against the shape.
    pub fn from_parts(data: Vec<T>, shape: [usize; 3], affine: Affine) -> Result<Self, String> {
        let n = shape[0] * shape[1] * shape[2];
        if data.len() != n {
            return Err(format!(
                "volume data has {} voxels but shape {:?} needs {n}",
                data.len(),
                shape
            ));
        }
        Ok(Self {
            data,
            shape,
            affine,
        })
    }

    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the volume has no voxel.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Linear index of voxel `(i, j, k)`.
    #[inline]
    pub fn index(&self, i: usize, j: usize, k: usize) -> usize {
        (i * self.shape[1] + j) * self.shape[2] + k
    }

    /// The value at voxel `(i, j, k)`.
    #[inline]
    pub fn get(&self, i: usize, j: usize, k: usize) -> T {
        self.data[self.index(i, j, k)]
    }

    /// Voxel spacing in millimetres (column norms of the affine).
    pub fn spacing(&self) -> [f64; 3] {
        spacing_of(&self.affine)
    }

    /// World position (mm) of a (possibly fractional) voxel coordinate.
    pub fn voxel_to_world(&self, v: [f64; 3]) -> [f64; 3] {
        apply_affine(&self.affine, v)
    }

    /// A volume of the same geometry with every voxel mapped by `f`.
    pub fn map<U>(&self, f: impl Fn(T) -> U + Sync + Send) -> VolumeOf<U>
    where
        T: Sync,
        U: Send,
    {
        use rayon::prelude::*;
        VolumeOf {
            data: self.data.par_iter().map(|&x| f(x)).collect(),
            shape: self.shape,
            affine: self.affine,
        }
    }
}

/// Column norms of the affine's 3x3 part: the voxel spacing.
pub fn spacing_of(a: &Affine) -> [f64; 3] {
    let mut s = [0.0; 3];
    for (c, sc) in s.iter_mut().enumerate() {
        *sc = (0..3).map(|r| a[r][c] * a[r][c]).sum::<f64>().sqrt();
    }
    s
}

/// `a * (v, 1)`, the world position of voxel coordinate `v`.
pub fn apply_affine(a: &Affine, v: [f64; 3]) -> [f64; 3] {
    let mut w = [0.0; 3];
    for (r, wr) in w.iter_mut().enumerate() {
        *wr = a[r][0] * v[0] + a[r][1] * v[1] + a[r][2] * v[2] + a[r][3];
    }
    w
}

/// Matrix product `a * b`.
pub fn mat_mul(a: &Affine, b: &Affine) -> Affine {
    let mut m = [[0.0; 4]; 4];
    for (r, row) in m.iter_mut().enumerate() {
        for (c, x) in row.iter_mut().enumerate() {
            *x = (0..4).map(|t| a[r][t] * b[t][c]).sum();
        }
    }
    m
}

/// Inverse of an affine whose last row is `[0, 0, 0, 1]`; `None` when singular.
pub fn invert_affine(a: &Affine) -> Option<Affine> {
    let m = |r: usize, c: usize| a[r][c];
    let det = m(0, 0) * (m(1, 1) * m(2, 2) - m(1, 2) * m(2, 1))
        - m(0, 1) * (m(1, 0) * m(2, 2) - m(1, 2) * m(2, 0))
        + m(0, 2) * (m(1, 0) * m(2, 1) - m(1, 1) * m(2, 0));
    let scale = spacing_of(a).iter().product::<f64>();
    if !det.is_finite() || det.abs() <= 1e-12 * scale.max(1e-300) {
        return None;
    }
    let inv_det = 1.0 / det;
    let mut r = IDENTITY;
    r[0][0] = (m(1, 1) * m(2, 2) - m(1, 2) * m(2, 1)) * inv_det;
    r[0][1] = (m(0, 2) * m(2, 1) - m(0, 1) * m(2, 2)) * inv_det;
    r[0][2] = (m(0, 1) * m(1, 2) - m(0, 2) * m(1, 1)) * inv_det;
    r[1][0] = (m(1, 2) * m(2, 0) - m(1, 0) * m(2, 2)) * inv_det;
    r[1][1] = (m(0, 0) * m(2, 2) - m(0, 2) * m(2, 0)) * inv_det;
    r[1][2] = (m(0, 2) * m(1, 0) - m(0, 0) * m(1, 2)) * inv_det;
    r[2][0] = (m(1, 0) * m(2, 1) - m(1, 1) * m(2, 0)) * inv_det;
    r[2][1] = (m(0, 1) * m(2, 0) - m(0, 0) * m(2, 1)) * inv_det;
    r[2][2] = (m(0, 0) * m(1, 1) - m(0, 1) * m(1, 0)) * inv_det;
    for row in r.iter_mut().take(3) {
        row[3] = -(0..3).map(|c| row[c] * a[c][3]).sum::<f64>();
    }
    Some(r)
}

/// The affine of a sub-grid that starts at voxel `offset` of the grid of `a` (negative
/// offsets for padding): `a * translate(offset)`.
pub fn shift_affine(a: &Affine, offset: [f64; 3]) -> Affine {
    let mut out = *a;
    let w = apply_affine(a, offset);
    for (r, wr) in w.iter().enumerate() {
        out[r][3] = *wr;
    }
    out
}

/// Checks that two grids agree: same shape and affines within `tol_mm` (largest
/// difference of the world positions of the grid's corners). Returns a description of
/// the first difference.
pub fn check_same_grid(
    a_shape: [usize; 3],
    a: &Affine,
    b_shape: [usize; 3],
    b: &Affine,
    tol_mm: f64,
) -> Result<(), String> {
    if a_shape != b_shape {
        return Err(format!("shape {b_shape:?} differs from {a_shape:?}"));
    }
    let mut worst: f64 = 0.0;
    for corner in 0..8 {
        let v = [
            if corner & 1 == 0 {
                0.0
            } else {
                a_shape[0] as f64 - 1.0
            },
            if corner & 2 == 0 {
                0.0
            } else {
                a_shape[1] as f64 - 1.0
            },
            if corner & 4 == 0 {
                0.0
            } else {
                a_shape[2] as f64 - 1.0
            },
        ];
        let (p, q) = (apply_affine(a, v), apply_affine(b, v));
        let d = (0..3).map(|r| (p[r] - q[r]).powi(2)).sum::<f64>().sqrt();
        worst = worst.max(d);
    }
    if worst > tol_mm || worst.is_nan() {
        return Err(format!(
            "affine differs by {worst:.3} mm at a grid corner (tolerance {tol_mm} mm): {} vs {}",
            format_affine(b),
            format_affine(a)
        ));
    }
    Ok(())
}

/// A compact one-line form of an affine's first three rows, for messages.
pub fn format_affine(a: &Affine) -> String {
    let rows: Vec<String> = a[..3]
        .iter()
        .map(|r| format!("[{:.4}, {:.4}, {:.4}, {:.4}]", r[0], r[1], r[2], r[3]))
        .collect();
    format!("[{}]", rows.join(", "))
}

/// The affine as nested JSON arrays (4 rows).
pub fn affine_to_json(a: &Affine) -> serde_json::Value {
    serde_json::json!(a.iter().map(|r| r.to_vec()).collect::<Vec<_>>())
}

/// Parses an affine from nested JSON arrays (3 or 4 rows of 4 numbers).
pub fn affine_from_json(v: &serde_json::Value) -> Option<Affine> {
    let rows = v.as_array()?;
    if rows.len() != 4 && rows.len() != 3 {
        return None;
    }
    let mut a = IDENTITY;
    for (r, row) in rows.iter().enumerate() {
        let row = row.as_array()?;
        if row.len() != 4 {
            return None;
        }
        for (c, x) in row.iter().enumerate() {
            a[r][c] = x.as_f64()?;
        }
    }
    Some(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oblique() -> Affine {
        let (s, c) = (0.3f64.sin(), 0.3f64.cos());
        [
            [-0.7 * c, 0.7 * s, 0.0, 12.5],
            [-0.7 * s, -0.7 * c, 0.0, -40.0],
            [0.0, 0.0, 2.5, 7.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }

    #[test]
    fn inverse_round_trips_and_spacing_is_column_norm() {
        let a = oblique();
        let inv = invert_affine(&a).unwrap();
        let id = mat_mul(&a, &inv);
        for (r, row) in id.iter().enumerate() {
            for (c, &x) in row.iter().enumerate() {
                let want = if r == c { 1.0 } else { 0.0 };
                assert!((x - want).abs() < 1e-12, "{id:?}");
            }
        }
        let s = spacing_of(&a);
        assert!((s[0] - 0.7).abs() < 1e-12 && (s[1] - 0.7).abs() < 1e-12);
        assert!((s[2] - 2.5).abs() < 1e-12);
        let mut singular = a;
        singular[0][2] = 0.0;
        singular[1][2] = 0.0;
        singular[2][2] = 0.0;
        assert!(invert_affine(&singular).is_none());
    }

    #[test]
    fn shift_moves_origin_by_voxels() {
        let a = oblique();
        let b = shift_affine(&a, [3.0, -2.0, 5.0]);
        let p = apply_affine(&b, [1.0, 1.0, 1.0]);
        let q = apply_affine(&a, [4.0, -1.0, 6.0]);
        for r in 0..3 {
            assert!((p[r] - q[r]).abs() < 1e-9);
        }
    }

    #[test]
    fn grid_check_reports_shape_and_affine() {
        let a = oblique();
        assert!(check_same_grid([4, 5, 6], &a, [4, 5, 6], &a, 1e-3).is_ok());
        let e = check_same_grid([4, 5, 6], &a, [4, 5, 7], &a, 1e-3).unwrap_err();
        assert!(e.contains("shape [4, 5, 7] differs from [4, 5, 6]"), "{e}");
        let b = shift_affine(&a, [0.0, 0.0, 0.1]);
        let e = check_same_grid([4, 5, 6], &a, [4, 5, 6], &b, 1e-3).unwrap_err();
        assert!(e.contains("affine differs by 0.250 mm"), "{e}");
        let j = affine_to_json(&a);
        assert_eq!(affine_from_json(&j).unwrap(), a);
    }
}
