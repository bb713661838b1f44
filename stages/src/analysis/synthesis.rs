//! Distribution distances between feature sets of real and generated volumes (method.md
//! section 8, protocol A): the Fréchet distance (FID) and a Gaussian-kernel MMD with the
//! median-heuristic bandwidth. Plain f64 (nalgebra); the features come from a 3-D network.
//!
//! ```text
//! FID  = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))      (np.cov: 1/(n-1))
//!        Tr (S_1 S_2)^(1/2) = sum_i sqrt(lambda_i(A S_2 A)),  A = S_1^(1/2)   (A S_2 A is
//!        symmetric PSD and similar to S_1 S_2, so this is the trace scipy's sqrtm gives)
//! MMD^2 (unbiased, torch_two_sample's MMDStatistic):
//!        1/(n(n-1)) sum_{i!=j} k(x_i,x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i,y_j) - 2/(nm) sum k(x_i,y_j)
//!        k(a, b) = exp(-|a - b|^2 / (2 h^2)),  h = median pairwise distance of the pooled set
//! ```

use nalgebra::{DMatrix, DVector, SymmetricEigen};

use super::Matrix;

/// Mean and covariance (`1/(n-1)`, `np.cov(rowvar=False)`) of the rows.
pub fn mean_cov(x: &Matrix) -> (DVector<f64>, DMatrix<f64>) {
    let (n, d) = (x.rows, x.cols);
    let m = DMatrix::from_row_slice(n, d, &x.data);
    let mean = DVector::from_iterator(d, (0..d).map(|j| m.column(j).mean()));
    let mut c = m.clone();
    for j in 0..d {
        let mj = mean[j];
        c.column_mut(j).add_scalar_mut(-mj);
    }
    let cov = c.transpose() * &c / ((n as f64 - 1.0).max(1.0));
    (mean, cov)
}

fn sqrt_psd(s: &DMatrix<f64>) -> DMatrix<f64> {
    let e = SymmetricEigen::new(s.clone());
    let d = DMatrix::from_diagonal(&e.eigenvalues.map(|v| v.max(0.0).sqrt()));
    &e.eigenvectors * d * e.eigenvectors.transpose()
}

/// The Fréchet distance of two Gaussians.
pub fn frechet_distance(
    mu1: &DVector<f64>,
    s1: &DMatrix<f64>,
    mu2: &DVector<f64>,
    s2: &DMatrix<f64>,
) -> f64 {
    let diff = (mu1 - mu2).norm_squared();
    let a = sqrt_psd(s1);
    let m = &a * s2 * &a;
    let m = (&m + m.transpose()) * 0.5;
    let tr_sqrt: f64 = SymmetricEigen::new(m)
        .eigenvalues
        .iter()
        .map(|v| v.max(0.0).sqrt())
        .sum();
    (diff + s1.trace() + s2.trace() - 2.0 * tr_sqrt).max(0.0)
}

/// FID between two feature sets (rows = volumes).
pub fn fid(real: &Matrix, fake: &Matrix) -> f64 {
    let (m1, s1) = mean_cov(real);
    let (m2, s2) = mean_cov(fake);
    frechet_distance(&m1, &s1, &m2, &s2)
}

fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// The median-heuristic bandwidth: the median of the pairwise distances of the pooled rows.
pub fn median_bandwidth(x: &Matrix, y: &Matrix) -> f64 {
    let rows: Vec<&[f64]> = (0..x.rows)
        .map(|i| x.row(i))
        .chain((0..y.rows).map(|i| y.row(i)))
        .collect();
    let mut d = Vec::with_capacity(rows.len() * rows.len() / 2);
    for i in 0..rows.len() {
        for j in i + 1..rows.len() {
            d.push(sq_dist(rows[i], rows[j]).sqrt());
        }
    }
    if d.is_empty() {
        return 1.0;
    }
    d.sort_by(|a, b| a.total_cmp(b));
    let n = d.len();
    let m = if n % 2 == 1 {
        d[n / 2]
    } else {
        0.5 * (d[n / 2 - 1] + d[n / 2])
    };
    if m > 0.0 {
        m
    } else {
        1.0
    }
}

/// Unbiased MMD^2 with the Gaussian kernel of bandwidth `h` (needs 2+ rows per set).
pub fn mmd2_gaussian(x: &Matrix, y: &Matrix, h: f64) -> f64 {
    let k = |a: &[f64], b: &[f64]| (-sq_dist(a, b) / (2.0 * h * h)).exp();
    let (n, m) = (x.rows as f64, y.rows as f64);
    let mut kxx = 0.0;
    for i in 0..x.rows {
        for j in 0..x.rows {
            if i != j {
                kxx += k(x.row(i), x.row(j));
            }
        }
    }
    let mut kyy = 0.0;
    for i in 0..y.rows {
        for j in 0..y.rows {
            if i != j {
                kyy += k(y.row(i), y.row(j));
            }
        }
    }
    let mut kxy = 0.0;
    for i in 0..x.rows {
        for j in 0..y.rows {
            kxy += k(x.row(i), y.row(j));
        }
    }
    kxx / (n * (n - 1.0)) + kyy / (m * (m - 1.0)) - 2.0 * kxy / (n * m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    fn gaussian_rows(n: usize, d: usize, seed: u64, shift: f64, scale: f64) -> Matrix {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f64> = (0..n * d)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                z * scale + shift
            })
            .collect();
        Matrix::new(n, d, v)
    }

    #[test]
    fn fid_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square() {
        let x = gaussian_rows(200, 6, 1, 0.0, 1.0);
        assert!(fid(&x, &x).abs() < 1e-9, "{}", fid(&x, &x));
        let shifted = Matrix::new(x.rows, x.cols, x.data.iter().map(|v| v + 0.5).collect());
        // same covariance: FID = |delta|^2 = 6 * 0.25
        assert!(
            (fid(&x, &shifted) - 1.5).abs() < 1e-8,
            "{}",
            fid(&x, &shifted)
        );
        // diagonal covariances: FID = sum (sigma_1 - sigma_2)^2 per axis
        let (m0, z) = (DVector::zeros(3), DVector::zeros(3));
        let s1 = DMatrix::from_diagonal(&DVector::from_vec(vec![1.0, 4.0, 9.0]));
        let s2 = DMatrix::from_diagonal(&DVector::from_vec(vec![4.0, 4.0, 1.0]));
        let f = frechet_distance(&m0, &s1, &z, &s2);
        assert!((f - (1.0 + 0.0 + 4.0)).abs() < 1e-9, "{f}");
        // a rotated (non-commuting) covariance pair against scipy.linalg.sqrtm:
        // S1 = [[2, 1], [1, 2]], S2 = [[1, 0], [0, 3]] -> Tr sqrtm(S1 S2) = 3.7416573867739427
        let s1 = DMatrix::from_row_slice(2, 2, &[2.0, 1.0, 1.0, 2.0]);
        let s2 = DMatrix::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 3.0]);
        let z2 = DVector::zeros(2);
        let f = frechet_distance(&z2, &s1, &z2, &s2);
        assert!(
            (f - (4.0 + 4.0 - 2.0 * 3.7416573867739427)).abs() < 1e-9,
            "{f}"
        );
    }

    #[test]
    fn mmd_known_cases() {
        // Two points per set on a line: x = {0, 1}, y = {3, 4}, h = 1:
        // kxx = 2 e^{-1/2} / 2, kyy the same, kxy = (e^{-9/2} + e^{-16/2} + e^{-4/2} + e^{-9/2}) / 4
        let x = Matrix::new(2, 1, vec![0.0, 1.0]);
        let y = Matrix::new(2, 1, vec![3.0, 4.0]);
        let e = |v: f64| (-v / 2.0).exp();
        let want = e(1.0) + e(1.0) - 2.0 * (e(9.0) + e(16.0) + e(4.0) + e(9.0)) / 4.0;
        assert!((mmd2_gaussian(&x, &y, 1.0) - want).abs() < 1e-12);
        // Pooled distances {1, 3, 4, 2, 3, 1}: median 2.5.
        assert_eq!(median_bandwidth(&x, &y), 2.5);
        // Same distribution: near 0; shifted: clearly positive.
        let a = gaussian_rows(150, 4, 2, 0.0, 1.0);
        let b = gaussian_rows(150, 4, 3, 0.0, 1.0);
        let c = gaussian_rows(150, 4, 4, 1.0, 1.0);
        let same = mmd2_gaussian(&a, &b, median_bandwidth(&a, &b));
        let diff = mmd2_gaussian(&a, &c, median_bandwidth(&a, &c));
        assert!(same.abs() < 0.01 && diff > 0.1, "{same} {diff}");
    }
}
