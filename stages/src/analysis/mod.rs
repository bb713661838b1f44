//! Statistics on feature vectors, in plain Rust: linear probes (multinomial logistic
//! regression with stratified k-fold cross-validation), classification metrics (accuracy,
//! macro one-vs-rest AUC), silhouette scores and t-SNE embeddings.

pub mod cluster;
pub mod fig6;
pub mod logistic;
pub mod metrics;
pub mod stats;
pub mod synthesis;
pub mod tsne;

/// A dense row-major matrix of `rows x cols` f64 values.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data size");
        Self { rows, cols, data }
    }
    pub fn row(&self, r: usize) -> &[f64] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
    /// The rows listed in `idx`.
    pub fn select(&self, idx: &[usize]) -> Matrix {
        let mut data = Vec::with_capacity(idx.len() * self.cols);
        for &r in idx {
            data.extend_from_slice(self.row(r));
        }
        Matrix::new(idx.len(), self.cols, data)
    }
    /// Column means and standard deviations (population), std floored at 1e-12.
    pub fn column_stats(&self) -> (Vec<f64>, Vec<f64>) {
        let n = self.rows.max(1) as f64;
        let mut mean = vec![0.0; self.cols];
        for r in 0..self.rows {
            for (m, v) in mean.iter_mut().zip(self.row(r)) {
                *m += v / n;
            }
        }
        let mut var = vec![0.0; self.cols];
        for r in 0..self.rows {
            for ((s, v), m) in var.iter_mut().zip(self.row(r)).zip(&mean) {
                *s += (v - m) * (v - m) / n;
            }
        }
        (mean, var.into_iter().map(|v| v.sqrt().max(1e-12)).collect())
    }
    /// `(x - mean) / std` per column.
    pub fn standardized(&self, mean: &[f64], std: &[f64]) -> Matrix {
        let mut out = self.clone();
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.data[r * self.cols + c] = (out.data[r * self.cols + c] - mean[c]) / std[c];
            }
        }
        out
    }
    /// Squared Euclidean distances between all rows.
    pub fn pairwise_sq_dist(&self) -> Vec<f64> {
        let n = self.rows;
        let mut d = vec![0.0; n * n];
        for i in 0..n {
            for j in (i + 1)..n {
                let s: f64 = self
                    .row(i)
                    .iter()
                    .zip(self.row(j))
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum();
                d[i * n + j] = s;
                d[j * n + i] = s;
            }
        }
        d
    }
}
