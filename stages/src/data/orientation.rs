//! Orientation: axis codes ("RAS", "LPS", ...) and reorientation to RAS.
//!
//! # Conventions
//!
//! The orientation code of an affine names, for each voxel axis in order, the world
//! direction it points to most: `R`/`L` (`+x`/`-x`), `A`/`P` (`+y`/`-y`), `S`/`I`
//! (`+z`/`-z`), as nibabel's `aff2axcodes`. So a DICOM-style LPS volume, whose first axis
//! runs towards the patient's left, is `"LPS"`.
//!
//! [`reorient_to_ras`] (MONAI `Orientationd(axcodes="RAS")`, nibabel `as_closest_canonical`)
//! permutes and flips the voxel axes so that axis 0 points most to `R`, axis 1 to `A` and
//! axis 2 to `S`. It moves voxels only (no interpolation) and updates the affine exactly:
//! every voxel keeps its world position. An oblique affine stays oblique (only the
//! closest axis permutation is applied), as in MONAI.

use rayon::prelude::*;

use crate::data::volume::{mat_mul, Affine, VolumeOf, IDENTITY};

/// For each world axis `w` (R, A, S), the voxel axis that points most along it and the sign.
/// Greedy on the largest absolute direction cosine, so the assignment is a permutation even
/// for oblique affines.
pub fn axis_mapping(a: &Affine) -> ([usize; 3], [i8; 3]) {
    let mut dir = [[0.0f64; 3]; 3]; // dir[c][r]: column c normalised
    for (c, d) in dir.iter_mut().enumerate() {
        let n = (0..3).map(|r| a[r][c] * a[r][c]).sum::<f64>().sqrt();
        for (r, x) in d.iter_mut().enumerate() {
            *x = if n > 0.0 { a[r][c] / n } else { 0.0 };
        }
    }
    let mut used_c = [false; 3];
    let mut used_w = [false; 3];
    let mut perm = [0usize; 3];
    let mut sign = [1i8; 3];
    for _ in 0..3 {
        let mut best = (-1.0, 0, 0);
        for (c, d) in dir.iter().enumerate() {
            for (w, &x) in d.iter().enumerate() {
                if !used_c[c] && !used_w[w] && x.abs() > best.0 {
                    best = (x.abs(), c, w);
                }
            }
        }
        let (_, c, w) = best;
        used_c[c] = true;
        used_w[w] = true;
        perm[w] = c;
        sign[w] = if dir[c][w] < 0.0 { -1 } else { 1 };
    }
    (perm, sign)
}

/// The orientation code of an affine, e.g. `"RAS"` or `"LPS"`.
pub fn axcodes(a: &Affine) -> String {
    let (perm, sign) = axis_mapping(a);
    let mut codes = [' '; 3];
    for w in 0..3 {
        let letters = [('R', 'L'), ('A', 'P'), ('S', 'I')][w];
        codes[perm[w]] = if sign[w] > 0 { letters.0 } else { letters.1 };
    }
    codes.iter().collect()
}

/// Whether `a` is already RAS (no permutation, no flip).
pub fn is_ras(a: &Affine) -> bool {
    axis_mapping(a) == ([0, 1, 2], [1, 1, 1])
}

/// Parses an orientation code such as `"LPS"` into, per voxel axis, the world axis it
/// points along and the sign.
pub fn parse_axcodes(code: &str) -> Result<([usize; 3], [i8; 3]), String> {
    let letters: Vec<char> = code.chars().map(|c| c.to_ascii_uppercase()).collect();
    let bad = || {
        format!("invalid orientation code '{code}' (three letters, one of R/L, A/P, S/I each, e.g. \"LPS\")")
    };
    if letters.len() != 3 {
        return Err(bad());
    }
    let mut world = [0usize; 3];
    let mut sign = [1i8; 3];
    let mut seen = [false; 3];
    for (c, l) in letters.iter().enumerate() {
        let (w, s) = match l {
            'R' => (0, 1),
            'L' => (0, -1),
            'A' => (1, 1),
            'P' => (1, -1),
            'S' => (2, 1),
            'I' => (2, -1),
            _ => return Err(bad()),
        };
        if seen[w] {
            return Err(bad());
        }
        seen[w] = true;
        world[c] = w;
        sign[c] = s;
    }
    Ok((world, sign))
}

/// Permutes and flips voxel axes: output axis `a` is input axis `src[a]`, reversed when
/// `flip[a]`. The affine is updated so every voxel keeps its world position.
pub fn permute_flip<T: Copy + Send + Sync>(
    v: &VolumeOf<T>,
    src: [usize; 3],
    flip: [bool; 3],
) -> VolumeOf<T> {
    let mut t = [[0.0; 4]; 4];
    t[3][3] = 1.0;
    for a in 0..3 {
        let c = src[a];
        t[c][a] = if flip[a] { -1.0 } else { 1.0 };
        if flip[a] {
            t[c][3] = v.shape[c] as f64 - 1.0;
        }
    }
    if t == IDENTITY {
        return v.clone();
    }
    let in_strides = [v.shape[1] * v.shape[2], v.shape[2], 1];
    let shape = [v.shape[src[0]], v.shape[src[1]], v.shape[src[2]]];
    let mut base: isize = 0;
    let mut stride = [0isize; 3];
    for a in 0..3 {
        let s = in_strides[src[a]] as isize;
        if flip[a] {
            base += (v.shape[src[a]] as isize - 1) * s;
            stride[a] = -s;
        } else {
            stride[a] = s;
        }
    }
    let plane = shape[1] * shape[2];
    let src = &v.data;
    let mut data: Vec<T> = Vec::with_capacity(v.data.len());
    // Every element is written below before being read.
    data.extend(std::iter::repeat_n(src[0], v.data.len()));
    data.par_chunks_mut(plane.max(1))
        .enumerate()
        .for_each(|(i, slab)| {
            for j in 0..shape[1] {
                let row = base + i as isize * stride[0] + j as isize * stride[1];
                let out = &mut slab[j * shape[2]..][..shape[2]];
                if stride[2] == 1 {
                    out.copy_from_slice(&src[row as usize..row as usize + shape[2]]);
                } else {
                    for (k, o) in out.iter_mut().enumerate() {
                        *o = src[(row + k as isize * stride[2]) as usize];
                    }
                }
            }
        });
    VolumeOf {
        data,
        shape,
        affine: mat_mul(&v.affine, &t),
    }
}

/// Reorients a volume to RAS: permutes and flips voxel axes, updates the affine exactly.
pub fn reorient_to_ras<T: Copy + Send + Sync>(v: &VolumeOf<T>) -> VolumeOf<T> {
    let (perm, sign) = axis_mapping(&v.affine);
    permute_flip(v, perm, sign.map(|s| s < 0))
}

/// Reorients a volume to the orientation `code` (e.g. `"LPS"`): the inverse of
/// [`reorient_to_ras`] for a volume that has that code.
pub fn reorient_to<T: Copy + Send + Sync>(
    v: &VolumeOf<T>,
    code: &str,
) -> Result<VolumeOf<T>, String> {
    let (world, sign) = parse_axcodes(code)?;
    let ras = reorient_to_ras(v);
    Ok(permute_flip(&ras, world, sign.map(|s| s < 0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::volume::apply_affine;

    fn lps(shape: [usize; 3]) -> VolumeOf<f32> {
        let affine = [
            [-0.7, 0.0, 0.0, 90.0],
            [0.0, -0.8, 0.0, 100.0],
            [0.0, 0.0, 2.5, -50.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let n = shape.iter().product();
        VolumeOf {
            data: (0..n).map(|x| x as f32).collect(),
            shape,
            affine,
        }
    }

    #[test]
    fn codes_of_common_orientations() {
        assert_eq!(axcodes(&IDENTITY), "RAS");
        assert_eq!(axcodes(&lps([2, 2, 2]).affine), "LPS");
        // Axes permuted: first voxel axis along -z, second along +x, third along -y.
        let a = [
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, -1.0, 0.0],
            [-2.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        assert_eq!(axcodes(&a), "IRP");
        assert!(is_ras(&IDENTITY));
        assert!(!is_ras(&a));
    }

    #[test]
    fn reorientation_keeps_every_voxel_at_its_world_position() {
        for affine in [
            lps([3, 4, 5]).affine,
            [
                [0.0, 1.0, 0.0, 3.0],
                [0.0, 0.0, -1.5, 2.0],
                [-2.0, 0.0, 0.0, 1.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        ] {
            let mut v = lps([3, 4, 5]);
            v.affine = affine;
            let r = reorient_to_ras(&v);
            assert_eq!(axcodes(&r.affine), "RAS");
            assert_eq!(r.len(), v.len());
            // Each value (unique) sits at the same world position before and after.
            for i in 0..r.shape[0] {
                for j in 0..r.shape[1] {
                    for k in 0..r.shape[2] {
                        let val = r.get(i, j, k) as usize;
                        let (ii, rest) = (val / (4 * 5), val % 20);
                        let (jj, kk) = (rest / 5, rest % 5);
                        let p = apply_affine(&r.affine, [i as f64, j as f64, k as f64]);
                        let q = apply_affine(&v.affine, [ii as f64, jj as f64, kk as f64]);
                        for d in 0..3 {
                            assert!((p[d] - q[d]).abs() < 1e-9, "{p:?} {q:?}");
                        }
                    }
                }
            }
            // Diagonal positive spacing afterwards.
            for (c, row) in r.affine[..3].iter().enumerate() {
                assert!(row[c] > 0.0);
            }
        }
    }

    #[test]
    fn ras_input_is_returned_unchanged() {
        let mut v = lps([2, 3, 4]);
        v.affine = IDENTITY;
        assert_eq!(reorient_to_ras(&v), v);
    }

    #[test]
    fn reorient_to_inverts_reorient_to_ras() {
        let mut v = lps([3, 4, 5]);
        v.affine = IDENTITY;
        v.affine[0][3] = -4.0;
        for code in ["LPS", "PIR", "LAS", "SAR", "RAS"] {
            let o = reorient_to(&v, code).unwrap();
            assert_eq!(axcodes(&o.affine), code);
            assert_eq!(reorient_to_ras(&o), v);
        }
        let e = reorient_to(&v, "LPX").unwrap_err();
        assert!(e.contains("invalid orientation code 'LPX'"), "{e}");
        assert!(reorient_to(&v, "LLS").is_err());
    }
}
