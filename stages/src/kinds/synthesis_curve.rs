//! `synthesis_curve`: a synthesis metric against training steps, one line per training
//! setting (the paper's Fig. 5: FID of `meduet`- vs `scratch`-initialised DiT/SiT), plus the
//! steps-to-equal-metric ratio against a reference setting (plain Rust).
//!
//! Its inputs are `synthesis_metrics` reports; each knows what made its generated volumes
//! (`generated_from` in `metrics.json`: method, initialisation and training step of the
//! sampled weights, taken from the `sample` stage's items). Series are
//! `"{method} {init}"`; points are (training step, metric). For every series other than the
//! reference, "steps to equal" is the first training step at which it reaches the
//! reference's metric at the reference's last step (linear interpolation between
//! evaluated steps; an upper bound when already reached at its first point), and the ratio
//! is that step over the reference's last step (below 1: fewer steps for the same quality).
//!
//! Writes `curve.csv` (series, step, metric, stage), `curve.md` (the points and the ratios)
//! and `curve.png`.

use std::collections::BTreeMap;

use meduet_engine::{Arity, ArtifactType, InputSpec, OutputSpec, Stage, StageContext, StageError};
use serde::{Deserialize, Serialize};

use crate::kinds::diffusion::SYNTHESIS_REPORT;
use crate::plot::{line_plot, Series};

/// A metric-against-steps table and plot.
pub const SYNTHESIS_CURVE: ArtifactType = ArtifactType::single("synthesis_curve");

/// Which reported value the curve shows (lower is better for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CurveMetric {
    #[default]
    Fid,
    Mmd,
}

impl CurveMetric {
    fn key(self) -> &'static str {
        match self {
            CurveMetric::Fid => "fid",
            CurveMetric::Mmd => "mmd",
        }
    }
}

/// `synthesis_curve` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthesisCurveParams {
    pub metric: CurveMetric,
    /// The initialisation of the reference series (`scratch`): the others are compared
    /// with it.
    pub reference: String,
    pub title: Option<String>,
}

impl Default for SynthesisCurveParams {
    fn default() -> Self {
        Self {
            metric: CurveMetric::Fid,
            reference: "scratch".into(),
            title: None,
        }
    }
}

/// The first x at which a lower-is-better curve reaches `target` (points sorted by x),
/// linearly interpolated between points; the first point's x when it is already there;
/// `None` when never reached.
pub fn steps_to_reach(points: &[(f64, f64)], target: f64) -> Option<f64> {
    let first = points.first()?;
    if first.1 <= target {
        return Some(first.0);
    }
    points.windows(2).find_map(|w| {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        (y1 <= target).then(|| x0 + (x1 - x0) * (y0 - target) / (y0 - y1))
    })
}

/// One series' comparison with the reference.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepsToEqual {
    pub series: String,
    /// The reference's metric at its last step, and that step.
    pub target: f64,
    pub reference_steps: f64,
    /// The first step at which this series reaches the target.
    pub steps: Option<f64>,
    /// `steps / reference_steps`.
    pub ratio: Option<f64>,
}

/// Compares every non-reference series with the reference's last point.
pub fn steps_to_equal(
    series: &BTreeMap<String, Vec<(f64, f64)>>,
    reference: &str,
) -> Option<Vec<StepsToEqual>> {
    let &(ref_steps, target) = series.get(reference)?.last()?;
    Some(
        series
            .iter()
            .filter(|(name, _)| name.as_str() != reference)
            .map(|(name, pts)| {
                let steps = steps_to_reach(pts, target);
                StepsToEqual {
                    series: name.clone(),
                    target,
                    reference_steps: ref_steps,
                    steps,
                    ratio: steps.map(|s| s / ref_steps),
                }
            })
            .collect(),
    )
}

/// `synthesis_curve`.
pub struct SynthesisCurve;

impl Stage for SynthesisCurve {
    type Params = SynthesisCurveParams;
    const KIND: &'static str = "synthesis_curve";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Fig. 5: FID (or MMD) against training steps per initialisation, and the steps-to-equal-FID ratio (CSV, Markdown, plot)";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "reports",
            ty: SYNTHESIS_REPORT,
            arity: Arity::Many,
            doc: "synthesis_metrics reports of samples from snapshots of several trainings",
        }]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "curve",
            ty: SYNTHESIS_CURVE,
            doc: "curve.csv, curve.md, curve.png",
        }]
    }
    fn validate(&self, p: &SynthesisCurveParams) -> Result<(), String> {
        if p.reference.trim().is_empty() {
            return Err("reference: must name an initialisation (for example \"scratch\")".into());
        }
        Ok(())
    }
    fn run(&self, p: &SynthesisCurveParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let key = p.metric.key();
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        let mut inits: BTreeMap<String, String> = BTreeMap::new();
        let mut csv = format!("series,step,{key},stage\n");
        for r in ctx.inputs("reports") {
            let path = r.dir.join("metrics.json");
            let bytes = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
            let m: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| StageError::input(format!("'{}': {e}", path.display())))?;
            let value = m[key].as_f64().ok_or_else(|| {
                StageError::input(format!("'{}': no number '{key}'", path.display()))
            })?;
            let g = &m["generated_from"];
            let (Some(method), Some(init), Some(step)) = (
                g["method"].as_str(),
                g["init"].as_str(),
                g["training_step"].as_f64(),
            ) else {
                return Err(StageError::input(format!(
                    "'{}' (stage {}): 'generated_from' lacks method, init or training_step: the \
                     generated volumes must all come from one `sample` stage (sample stage version 2)",
                    path.display(),
                    r.stage
                )));
            };
            let name = format!("{method} {init}");
            inits.insert(name.clone(), init.to_string());
            series.entry(name.clone()).or_default().push((step, value));
            csv.push_str(&format!("{name},{step},{value:.6},{}\n", r.stage));
        }
        for (name, pts) in series.iter_mut() {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            if let Some(w) = pts.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(StageError::input(format!(
                    "series '{name}' has two reports at training step {}: give each snapshot one report",
                    w[0].0
                )));
            }
        }
        // The reference series: the one whose initialisation is `reference` (exactly one).
        let refs: Vec<&String> = inits
            .iter()
            .filter(|(_, i)| **i == p.reference)
            .map(|(n, _)| n)
            .collect();
        let reference = match refs.as_slice() {
            [one] => Some((*one).clone()),
            [] => None,
            more => {
                return Err(StageError::input(format!(
                    "reference: several series are initialised '{}' ({more:?}); compare one method per curve stage",
                    p.reference
                )))
            }
        };
        let comparisons = reference
            .as_deref()
            .and_then(|r| steps_to_equal(&series, r))
            .unwrap_or_default();
        let title = p
            .title
            .clone()
            .unwrap_or_else(|| format!("{} against training steps", key.to_uppercase()));
        let mut md = format!(
            "# {title}\n\n| series | training step | {} |\n|---|---|---|\n",
            key.to_uppercase()
        );
        for (name, pts) in &series {
            for (x, y) in pts {
                md.push_str(&format!("| {name} | {x} | {y:.4} |\n"));
            }
        }
        if let Some(r) = &reference {
            md.push_str(&format!(
                "\nSteps to equal {} (the reference `{r}` at its last step):\n\n| series | target | reference steps | steps to reach | ratio |\n|---|---|---|---|---|\n",
                key.to_uppercase()
            ));
            for c in &comparisons {
                let f = |v: Option<f64>, d: usize| {
                    v.map_or("not reached".into(), |v| format!("{v:.d$}"))
                };
                md.push_str(&format!(
                    "| {} | {:.4} | {} | {} | {} |\n",
                    c.series,
                    c.target,
                    c.reference_steps,
                    f(c.steps, 0),
                    f(c.ratio, 3)
                ));
            }
        } else {
            md.push_str(&format!(
                "\nNo series is initialised `{}`: no steps-to-equal ratio.\n",
                p.reference
            ));
        }
        let out = ctx.output_dir("curve")?;
        for (file, text) in [("curve.csv", &csv), ("curve.md", &md)] {
            std::fs::write(out.join(file), text).map_err(|e| StageError::io(&out.join(file), e))?;
        }
        std::fs::write(
            out.join("steps_to_equal.json"),
            serde_json::to_vec_pretty(&comparisons)
                .map_err(|e| StageError::failed(e.to_string()))?,
        )
        .map_err(|e| StageError::io(&out.join("steps_to_equal.json"), e))?;
        let lines: Vec<Series> = series
            .iter()
            .map(|(name, pts)| Series {
                name: name.clone(),
                points: pts.clone(),
            })
            .collect();
        line_plot(
            &out.join("curve.png"),
            &title,
            "training step",
            &key.to_uppercase(),
            &lines,
            false,
        )
        .map_err(|e| StageError::failed(e.to_string()))?;
        for c in &comparisons {
            if let Some(ratio) = c.ratio {
                ctx.set_metric(
                    &format!("steps_ratio_{}", c.series.replace(' ', "_")),
                    ratio,
                );
            }
        }
        ctx.set_metric("series", series.len());
        tracing::info!(
            "{} series: {}",
            series.len(),
            out.join("curve.md").display()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_to_reach_interpolates_the_first_crossing() {
        let pts = [(100.0, 50.0), (200.0, 30.0), (400.0, 10.0), (800.0, 20.0)];
        assert_eq!(steps_to_reach(&pts, 40.0), Some(150.0));
        assert_eq!(steps_to_reach(&pts, 30.0), Some(200.0));
        assert_eq!(steps_to_reach(&pts, 20.0), Some(300.0));
        // Already reached at the first evaluation: that step (an upper bound).
        assert_eq!(steps_to_reach(&pts, 60.0), Some(100.0));
        assert_eq!(steps_to_reach(&pts, 5.0), None);
        assert_eq!(steps_to_reach(&[], 5.0), None);
    }

    #[test]
    fn steps_to_equal_compares_with_the_reference_last_point() {
        let mut s = BTreeMap::new();
        s.insert(
            "dit scratch".to_string(),
            vec![(100.0, 80.0), (400.0, 40.0)],
        );
        s.insert(
            "dit meduet".to_string(),
            vec![(100.0, 60.0), (200.0, 40.0), (400.0, 30.0)],
        );
        s.insert("dit other".to_string(), vec![(100.0, 90.0), (400.0, 50.0)]);
        let c = steps_to_equal(&s, "dit scratch").unwrap();
        assert_eq!(c.len(), 2);
        let m = c.iter().find(|c| c.series == "dit meduet").unwrap();
        assert_eq!((m.target, m.reference_steps), (40.0, 400.0));
        assert_eq!(m.steps, Some(200.0));
        assert_eq!(m.ratio, Some(0.5));
        let o = c.iter().find(|c| c.series == "dit other").unwrap();
        assert_eq!((o.steps, o.ratio), (None, None));
        assert!(steps_to_equal(&s, "sit scratch").is_none());
    }
}
