//! Overlap and surface metrics of one class in one case: Dice and the 95th-percentile
//! Hausdorff distance (HD95), as MONAI's `DiceMetric` and `HausdorffDistanceMetric(percentile=95)`
//! define them.
//!
//! - **Dice** `2|P ∩ T| / (|P| + |T|)`. Both empty: undefined (`None`, left out of means,
//!   as nnU-Net's `nanmean`); one empty: 0.
//! - **Surface** of a mask: its voxels that a binary erosion with the 6-neighbourhood
//!   removes (`seg ^ erode(seg)`, voxels outside the volume count as background), as
//!   MONAI's `get_mask_edges`.
//! - **HD95**: for each surface voxel of one mask, the Euclidean distance in millimetres
//!   (anisotropic spacing) to the nearest surface voxel of the other; the 95th percentile
//!   (NumPy's linear interpolation) of each directed set; the larger of the two. Undefined
//!   (`None`) when either mask is empty (MONAI returns `inf`/`nan` there with a warning).
//!
//! Distances come from an exact Euclidean distance transform (Felzenszwalb and
//! Huttenlocher's separable lower envelope of parabolas, one pass per axis), linear in the
//! number of voxels.

/// Dice of two binary masks of the same length; `None` when both are empty.
pub fn dice(pred: &[bool], truth: &[bool]) -> Option<f64> {
    assert_eq!(pred.len(), truth.len(), "dice: masks of different sizes");
    let (mut inter, mut p, mut t) = (0usize, 0usize, 0usize);
    for (&a, &b) in pred.iter().zip(truth) {
        p += a as usize;
        t += b as usize;
        inter += (a && b) as usize;
    }
    if p + t == 0 {
        None
    } else {
        Some(2.0 * inter as f64 / (p + t) as f64)
    }
}

/// Mean Dice over the foreground classes `1..=classes` present in either class map;
/// `None` when neither has foreground.
pub fn mean_class_dice(a: &[u8], b: &[u8], classes: u8) -> Option<f64> {
    let d: Vec<f64> = (1..=classes)
        .filter_map(|c| {
            let ma: Vec<bool> = a.iter().map(|&v| v == c).collect();
            let mb: Vec<bool> = b.iter().map(|&v| v == c).collect();
            dice(&ma, &mb)
        })
        .collect();
    (!d.is_empty()).then(|| d.iter().sum::<f64>() / d.len() as f64)
}

/// The surface voxels of a mask (`[x, y, z]` C order): inside voxels with at least one
/// 6-neighbour outside the mask or outside the volume.
pub fn surface(mask: &[bool], shape: [usize; 3]) -> Vec<bool> {
    let [nx, ny, nz] = shape;
    assert_eq!(
        mask.len(),
        nx * ny * nz,
        "surface: mask does not match shape"
    );
    let idx = |i: usize, j: usize, k: usize| (i * ny + j) * nz + k;
    let mut out = vec![false; mask.len()];
    for i in 0..nx {
        for j in 0..ny {
            for k in 0..nz {
                let v = idx(i, j, k);
                if !mask[v] {
                    continue;
                }
                let interior = i > 0
                    && i + 1 < nx
                    && j > 0
                    && j + 1 < ny
                    && k > 0
                    && k + 1 < nz
                    && mask[idx(i - 1, j, k)]
                    && mask[idx(i + 1, j, k)]
                    && mask[idx(i, j - 1, k)]
                    && mask[idx(i, j + 1, k)]
                    && mask[idx(i, j, k - 1)]
                    && mask[idx(i, j, k + 1)];
                out[v] = !interior;
            }
        }
    }
    out
}

/// One-dimensional squared distance transform of `f` (0 at sites, `INFINITY` elsewhere, or
/// any values) with sample spacing `w`: `out[p] = min_q (w (p - q))^2 + f[q]`.
fn dt1d(f: &[f64], w: f64, out: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    let mut k: isize = -1;
    for q in 0..n {
        if f[q].is_infinite() {
            continue;
        }
        let xq = q as f64 * w;
        loop {
            if k < 0 {
                k = 0;
                v[0] = q;
                z[0] = f64::NEG_INFINITY;
                z[1] = f64::INFINITY;
                break;
            }
            let p = v[k as usize];
            let xp = p as f64 * w;
            let s = ((f[q] + xq * xq) - (f[p] + xp * xp)) / (2.0 * (xq - xp));
            if s <= z[k as usize] {
                k -= 1;
                continue;
            }
            k += 1;
            v[k as usize] = q;
            z[k as usize] = s;
            z[k as usize + 1] = f64::INFINITY;
            break;
        }
    }
    if k < 0 {
        out.fill(f64::INFINITY);
        return;
    }
    let mut j = 0usize;
    for (p, o) in out.iter_mut().enumerate() {
        let xp = p as f64 * w;
        while z[j + 1] < xp {
            j += 1;
        }
        let d = xp - v[j] as f64 * w;
        *o = d * d + f[v[j]];
    }
}

/// Exact squared Euclidean distance (mm²) from every voxel to the nearest `site` voxel, with
/// voxel `spacing` (mm); `INFINITY` everywhere when there is no site.
pub fn squared_distance_transform(
    sites: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
) -> Vec<f64> {
    let [nx, ny, nz] = shape;
    assert_eq!(
        sites.len(),
        nx * ny * nz,
        "distance transform: sites do not match shape"
    );
    let mut d: Vec<f64> = sites
        .iter()
        .map(|&s| if s { 0.0 } else { f64::INFINITY })
        .collect();
    let n = nx.max(ny).max(nz);
    let (mut f, mut out) = (vec![0.0; n], vec![0.0; n]);
    let (mut v, mut z) = (vec![0usize; n], vec![0.0; n + 1]);
    let strides = [ny * nz, nz, 1];
    for axis in 0..3 {
        let len = shape[axis];
        let stride = strides[axis];
        // Every line along `axis`: its start is any voxel with coordinate 0 on that axis.
        for start in 0..d.len() {
            if (start / stride) % len != 0 {
                continue;
            }
            for t in 0..len {
                f[t] = d[start + t * stride];
            }
            dt1d(&f[..len], spacing[axis], &mut out[..len], &mut v, &mut z);
            for t in 0..len {
                d[start + t * stride] = out[t];
            }
        }
    }
    d
}

/// NumPy's `percentile(values, q)` with linear interpolation; `None` when empty.
pub fn percentile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let pos = (values.len() - 1) as f64 * q / 100.0;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    Some(values[lo] + (values[hi] - values[lo]) * (pos - lo as f64))
}

/// Directed surface distances (mm) from the surface of `from` to the surface of `to`.
fn directed(
    from_surface: &[bool],
    to_surface: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
) -> Vec<f64> {
    let dt = squared_distance_transform(to_surface, shape, spacing);
    from_surface
        .iter()
        .zip(&dt)
        .filter(|(&s, _)| s)
        .map(|(_, &d)| d.sqrt())
        .collect()
}

/// The `q`-th percentile Hausdorff distance (mm) between two masks: the larger of the two
/// directed surface-distance percentiles. `None` when either mask is empty.
pub fn hausdorff_percentile(
    pred: &[bool],
    truth: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
    q: f64,
) -> Option<f64> {
    if !pred.iter().any(|&x| x) || !truth.iter().any(|&x| x) {
        return None;
    }
    let (sp, st) = (surface(pred, shape), surface(truth, shape));
    let a = percentile(&mut directed(&sp, &st, shape, spacing), q)?;
    let b = percentile(&mut directed(&st, &sp, shape, spacing), q)?;
    Some(a.max(b))
}

/// HD95: [`hausdorff_percentile`] at 95.
pub fn hd95(pred: &[bool], truth: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> Option<f64> {
    hausdorff_percentile(pred, truth, shape, spacing, 95.0)
}

/// Per-class Dice and HD95 of a label map against a reference (values `1..=classes`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassMetrics {
    pub dice: Option<f64>,
    pub hd95: Option<f64>,
    /// Voxels predicted / in the reference.
    pub n_pred: usize,
    pub n_ref: usize,
}

/// Dice and HD95 of every foreground class `1..=classes` of integer label maps.
pub fn per_class(
    pred: &[u8],
    truth: &[u8],
    shape: [usize; 3],
    spacing: [f64; 3],
    classes: u8,
) -> Vec<ClassMetrics> {
    (1..=classes)
        .map(|c| {
            let p: Vec<bool> = pred.iter().map(|&v| v == c).collect();
            let t: Vec<bool> = truth.iter().map(|&v| v == c).collect();
            ClassMetrics {
                dice: dice(&p, &t),
                hd95: hd95(&p, &t, shape, spacing),
                n_pred: p.iter().filter(|&&x| x).count(),
                n_ref: t.iter().filter(|&&x| x).count(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_class_dice_averages_the_classes_present() {
        // Class 1: 2 voxels each, 1 shared -> 0.5; class 2 only in b -> 0; class 3 absent.
        let a = [1, 1, 0, 0, 0];
        let b = [1, 0, 1, 2, 0];
        assert_eq!(mean_class_dice(&a, &b, 3), Some(0.25));
        assert_eq!(mean_class_dice(&a, &a, 3), Some(1.0));
        assert_eq!(mean_class_dice(&[0, 0], &[0, 0], 3), None);
    }

    fn cube(shape: [usize; 3], lo: [usize; 3], hi: [usize; 3]) -> Vec<bool> {
        let mut m = vec![false; shape.iter().product()];
        for i in lo[0]..hi[0] {
            for j in lo[1]..hi[1] {
                for k in lo[2]..hi[2] {
                    m[(i * shape[1] + j) * shape[2] + k] = true;
                }
            }
        }
        m
    }

    const S: [usize; 3] = [8, 7, 6];

    #[test]
    fn empty_prediction() {
        let t = cube(S, [2, 2, 2], [5, 5, 5]);
        let p = vec![false; t.len()];
        assert_eq!(dice(&p, &t), Some(0.0));
        assert_eq!(hd95(&p, &t, S, [1.0; 3]), None);
    }

    #[test]
    fn empty_reference() {
        let p = cube(S, [2, 2, 2], [5, 5, 5]);
        let t = vec![false; p.len()];
        assert_eq!(dice(&p, &t), Some(0.0));
        assert_eq!(hd95(&p, &t, S, [1.0; 3]), None);
        // Both empty: undefined, left out of means.
        assert_eq!(dice(&t, &t), None);
        assert_eq!(hd95(&t, &t, S, [1.0; 3]), None);
    }

    #[test]
    fn perfect_overlap() {
        let t = cube(S, [1, 2, 0], [6, 5, 4]);
        assert_eq!(dice(&t, &t), Some(1.0));
        assert_eq!(hd95(&t, &t, S, [0.7, 1.5, 3.0]), Some(0.0));
    }

    #[test]
    fn one_voxel_shift() {
        // 3x3x3 cube shifted by one voxel along x: overlap 18 of 27 + 27 voxels.
        let t = cube(S, [1, 1, 1], [4, 4, 4]);
        let p = cube(S, [2, 1, 1], [5, 4, 4]);
        let d = dice(&p, &t).unwrap();
        assert!((d - 2.0 / 3.0).abs() < 1e-12, "{d}");
        // Each surface (26 voxels: the cube minus its centre) has 10 voxels at distance 1
        // from the other's surface (the 9 of the leading face and the voxel that is the
        // other cube's centre) and 16 at 0; the 95th percentile of 16 zeros and 10 ones
        // (position 23.75 of 0..25) is 1 voxel, i.e. the x spacing.
        assert_eq!(hd95(&p, &t, S, [1.0; 3]), Some(1.0));
        assert_eq!(hd95(&p, &t, S, [2.5, 1.0, 1.0]), Some(2.5));
        // A shift along y is measured with the y spacing.
        let py = cube(S, [1, 2, 1], [4, 5, 4]);
        assert_eq!(hd95(&py, &t, S, [2.5, 0.5, 1.0]), Some(0.5));
    }

    #[test]
    fn distance_between_single_voxels_is_euclidean() {
        let p = cube(S, [0, 0, 0], [1, 1, 1]);
        let t = cube(S, [3, 4, 0], [4, 5, 1]);
        assert_eq!(hd95(&p, &t, S, [1.0; 3]), Some(5.0));
        let h = hd95(&p, &t, S, [1.0, 2.0, 1.0]).unwrap();
        assert!((h - (9.0f64 + 64.0).sqrt()).abs() < 1e-12, "{h}");
    }

    #[test]
    fn distance_transform_matches_brute_force() {
        let shape = [9, 6, 7];
        let spacing = [0.8, 1.7, 1.1];
        let sites: Vec<bool> = (0..shape.iter().product::<usize>())
            .map(|v| (v * 7919) % 37 == 0)
            .collect();
        let d = squared_distance_transform(&sites, shape, spacing);
        let coord = |v: usize| {
            [
                v / (shape[1] * shape[2]),
                (v / shape[2]) % shape[1],
                v % shape[2],
            ]
        };
        for v in 0..sites.len() {
            let a = coord(v);
            let best = (0..sites.len())
                .filter(|&s| sites[s])
                .map(|s| {
                    let b = coord(s);
                    (0..3)
                        .map(|ax| ((a[ax] as f64 - b[ax] as f64) * spacing[ax]).powi(2))
                        .sum::<f64>()
                })
                .fold(f64::INFINITY, f64::min);
            assert!((d[v] - best).abs() < 1e-9, "voxel {v}: {} vs {best}", d[v]);
        }
        assert!(
            squared_distance_transform(&vec![false; 8], [2, 2, 2], [1.0; 3])
                .iter()
                .all(|x| x.is_infinite())
        );
    }

    #[test]
    fn percentile_is_numpys_linear() {
        // numpy.percentile([1, 2, 3, 4], 95) = 3.85
        let p = percentile(&mut [4.0, 1.0, 3.0, 2.0], 95.0).unwrap();
        assert!((p - 3.85).abs() < 1e-12, "{p}");
        assert_eq!(percentile(&mut [], 95.0), None);
    }

    #[test]
    fn per_class_of_label_maps() {
        let shape = [4, 4, 4];
        let mut t = vec![0u8; 64];
        let mut p = vec![0u8; 64];
        t[0] = 1;
        p[0] = 1;
        t[63] = 2;
        let m = per_class(&p, &t, shape, [1.0; 3], 3);
        assert_eq!(m[0].dice, Some(1.0));
        assert_eq!(m[1].dice, Some(0.0));
        assert_eq!(m[1].hd95, None);
        assert_eq!(m[2].dice, None);
        assert_eq!((m[1].n_pred, m[1].n_ref), (0, 1));
    }
}
