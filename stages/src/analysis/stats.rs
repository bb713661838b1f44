//! Summaries of repeated measurements: mean, sample standard deviation and range
//! ([`Spread`]), and percentiles.

use serde::Serialize;

/// Mean, sample standard deviation and range of repeated measurements (seeds, fold
/// seeds); `None` where no value was measured (`sd`: fewer than two).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub mean: Option<f64>,
    pub sd: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        if n == 0 {
            return Self {
                mean: None,
                sd: None,
                min: None,
                max: None,
                n,
            };
        }
        let m = values.iter().sum::<f64>() / n as f64;
        let sd = (n > 1)
            .then(|| (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
        Self {
            mean: Some(m),
            sd,
            min: values.iter().copied().reduce(f64::min),
            max: values.iter().copied().reduce(f64::max),
            n,
        }
    }

    /// `mean ± sd` with `digits` decimals, `mean` alone for one value, `-` for none.
    pub fn text(&self, digits: usize) -> String {
        match (self.mean, self.sd) {
            (None, _) => "-".into(),
            (Some(m), None) => format!("{m:.digits$}"),
            (Some(m), Some(s)) => format!("{m:.digits$} ± {s:.digits$}"),
        }
    }

    /// `[min, max]` with `digits` decimals, `-` for none.
    pub fn range_text(&self, digits: usize) -> String {
        match (self.min, self.max) {
            (Some(a), Some(b)) => format!("[{a:.digits$}, {b:.digits$}]"),
            _ => "-".into(),
        }
    }
}

/// The `q`-quantile (0..=1) of `values` with linear interpolation between order
/// statistics (numpy's default); `None` for no values.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_quantiles_match_numpy() {
        // numpy: mean 2.5, std(ddof=1) 1.2909944, percentile 2.5 -> 1.075, 97.5 -> 3.925.
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(s.mean, Some(2.5));
        assert!((s.sd.unwrap() - 1.2909944487358056).abs() < 1e-12);
        assert_eq!((s.min, s.max, s.n), (Some(1.0), Some(4.0), 4));
        assert_eq!(s.text(2), "2.50 ± 1.29");
        assert_eq!(s.range_text(1), "[1.0, 4.0]");
        assert!((quantile(&[4.0, 1.0, 3.0, 2.0], 0.025).unwrap() - 1.075).abs() < 1e-12);
        assert!((quantile(&[4.0, 1.0, 3.0, 2.0], 0.975).unwrap() - 3.925).abs() < 1e-12);
        assert_eq!(Spread::of(&[]).text(3), "-");
        assert_eq!(Spread::of(&[0.5]).text(3), "0.500");
        assert_eq!(quantile(&[], 0.5), None);
    }
}
