//! `probe`: how identifiable the factors are (the paper's Table 6 and Fig. 8). Plain Rust
//! ([`crate::analysis`]), no libtorch.
//!
//! Linear probes (multinomial logistic regression, stratified k-fold cross-validation)
//! predict the domain from the content vectors and from the style vectors (accuracy and
//! macro one-vs-rest AUC, mean / sd / range over `repeats` fold seeds, and a permutation
//! test against chance: p-value and 95 % chance band); silhouette scores by domain for
//! both; a t-SNE of each, side by side, coloured by domain (`tsne.png`). Where subjects
//! carry a known anatomical attribute (phantoms: `has_lesion`), the same probes predict it
//! from content and from style. Output `report`: `probe.json`, `probe.md`, `tsne.png`.

use std::path::Path;

use meduet_engine::{
    Arity, ArtifactType, InputSpec, OutputSpec, Resources, Stage, StageContext, StageError,
};
use serde::{Deserialize, Serialize};

use crate::analysis::cluster::silhouette;
use crate::analysis::logistic::{check_folds, repeated_probe, ProbeSettings, RepeatedProbe};
use crate::analysis::tsne::tsne;
use crate::analysis::Matrix;
use crate::kinds::pretrain::FACTORS;
use crate::plot::{scatter_panels, ScatterPanel};

/// A report of probe results.
pub const PROBE_REPORT: ArtifactType = ArtifactType::single("probe_report");

/// `probe` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeParams {
    /// Cross-validation folds (at most the subject count of the rarest class).
    pub folds: usize,
    /// Stratified k-fold splits, one per fold seed (`seed`, `seed + 1`, ...): the figures
    /// are their mean, sd and range.
    pub repeats: usize,
    /// Shuffled labellings of the permutation test against chance.
    pub permutations: usize,
    /// L2 penalty of the logistic regression (on standardised features).
    pub l2: f64,
    /// Optimiser iterations of each fit.
    pub iterations: usize,
    pub tsne_perplexity: f64,
    pub tsne_iterations: usize,
    /// Subject attributes to probe besides the domain (missing ones are skipped).
    pub attributes: Vec<String>,
    pub seed: u64,
}

impl Default for ProbeParams {
    fn default() -> Self {
        Self {
            folds: 5,
            repeats: 20,
            permutations: 200,
            l2: 1e-2,
            iterations: 300,
            tsne_perplexity: 10.0,
            tsne_iterations: 750,
            attributes: vec!["has_lesion".into()],
            seed: 0,
        }
    }
}

/// `probe`.
pub struct Probe;

impl Stage for Probe {
    type Params = ProbeParams;
    const KIND: &'static str = "probe";
    const VERSION: u32 = 3;
    const ABOUT: &'static str =
        "linear probes, silhouettes and t-SNE of content vs style vectors (factor identifiability)";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "factors",
            ty: FACTORS,
            arity: Arity::One,
            doc: "factors of subjects",
        }]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "report",
            ty: PROBE_REPORT,
            doc: "probe.json, probe.md, tsne.png",
        }]
    }
    fn default_resources(&self) -> Resources {
        Resources {
            threads: 0,
            ..Resources::default()
        }
    }
    fn seed(&self, p: &ProbeParams) -> Option<u64> {
        Some(p.seed)
    }
    fn validate(&self, p: &ProbeParams) -> Result<(), String> {
        if p.folds < 2 {
            return Err(format!("folds: {} must be at least 2", p.folds));
        }
        if p.repeats == 0 {
            return Err("repeats: must be at least 1 (stratified k-fold splits)".into());
        }
        if p.permutations == 0 {
            return Err(
                "permutations: must be at least 1 (shuffled labellings of the test against chance; 200 or more for a p-value below 0.005)".into(),
            );
        }
        if !(p.tsne_perplexity > 1.0) {
            return Err("tsne_perplexity: must be above 1".into());
        }
        Ok(())
    }
    fn run(&self, p: &ProbeParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let dir = ctx.input("factors")?.dir.clone();
        let f = read_factors(&dir)?;
        let n = f.subjects.len();
        if n < 2 * p.folds {
            return Err(StageError::input(format!(
                "{n} subjects are too few for {}-fold probes (need at least {})",
                p.folds,
                2 * p.folds
            )));
        }
        // Domains as contiguous classes.
        let mut ids: Vec<i64> = f.domain_ids.clone();
        ids.sort();
        ids.dedup();
        let y: Vec<usize> = f
            .domain_ids
            .iter()
            .map(|d| ids.binary_search(d).expect("present"))
            .collect();
        let names: Vec<String> = ids
            .iter()
            .map(|id| {
                f.domain_names
                    .iter()
                    .find(|(i, _)| i == id)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_else(|| format!("domain {id}"))
            })
            .collect();
        check_folds(&y, &names, p.folds).map_err(StageError::input)?;
        let settings = ProbeSettings {
            folds: p.folds,
            l2: p.l2,
            iterations: p.iterations,
            repeats: p.repeats,
            permutations: p.permutations,
            seed: p.seed,
        };
        let mut report = serde_json::Map::new();
        let mut md = format!(
            "# Factor identifiability\n\n| target | features | accuracy | range | chance | 95 % chance band | p | macro AUC | AUC p | silhouette |\n|---|---|---|---|---|---|---|---|---|---|\n"
        );
        let mut emb = Vec::new();
        for (name, x) in [("content", &f.content), ("style", &f.style)] {
            ctx.check_cancelled()?;
            let r = repeated_probe(x, &y, ids.len(), &settings);
            let (mean, std) = x.column_stats();
            let z = x.standardized(&mean, &std);
            let sil = silhouette(&z, &y);
            md.push_str(&format!("| domain | {name} | {} | {sil:.3} |\n", row(&r)));
            ctx.set_metric(
                &format!("{name}_domain_accuracy"),
                r.accuracy.mean.unwrap_or(f64::NAN),
            );
            ctx.set_metric(
                &format!("{name}_domain_accuracy_sd"),
                r.accuracy.sd.unwrap_or(0.0),
            );
            if let Some(t) = &r.permutation {
                ctx.set_metric(&format!("{name}_domain_accuracy_p"), t.accuracy_p);
            }
            ctx.set_metric(
                &format!("{name}_domain_auc"),
                r.macro_auc.mean.unwrap_or(f64::NAN),
            );
            ctx.set_metric(&format!("{name}_silhouette"), sil);
            report.insert(
                format!("domain_from_{name}"),
                serde_json::json!({ "probe": r, "silhouette": sil }),
            );
            emb.push(ScatterPanel {
                title: format!("{name} vectors (d = {})", x.cols),
                points: tsne(&z, p.tsne_perplexity, p.tsne_iterations, p.seed)
                    .into_iter()
                    .zip(&y)
                    .map(|((a, b), &c)| (a, b, c))
                    .collect(),
            });
        }
        // Known subject attributes (phantoms: has_lesion), probed from both factors.
        for attr in &p.attributes {
            let vals: Vec<Option<String>> = f
                .subjects
                .iter()
                .map(|s| s.get(attr).filter(|v| !v.is_null()).map(|v| v.to_string()))
                .collect();
            if vals.iter().any(|v| v.is_none()) {
                tracing::info!("attribute '{attr}' is not known for every subject: not probed");
                continue;
            }
            let mut levels: Vec<String> = vals.iter().map(|v| v.clone().unwrap()).collect();
            levels.sort();
            levels.dedup();
            if levels.len() < 2 {
                continue;
            }
            let ya: Vec<usize> = vals
                .iter()
                .map(|v| levels.binary_search(v.as_ref().unwrap()).unwrap())
                .collect();
            let level_names: Vec<String> = levels.iter().map(|l| format!("{attr} = {l}")).collect();
            if let Err(e) = check_folds(&ya, &level_names, p.folds) {
                tracing::warn!("attribute '{attr}' not probed: {e}");
                md.push_str(&format!("| {attr} | | not probed: {e} | | | | | | | |\n"));
                continue;
            }
            let mut entry = serde_json::Map::new();
            for (name, x) in [("content", &f.content), ("style", &f.style)] {
                let r: RepeatedProbe = repeated_probe(x, &ya, levels.len(), &settings);
                md.push_str(&format!("| {attr} | {name} | {} | |\n", row(&r)));
                ctx.set_metric(
                    &format!("{name}_{attr}_auc"),
                    r.macro_auc.mean.unwrap_or(f64::NAN),
                );
                entry.insert(name.to_string(), serde_json::to_value(r).expect("json"));
            }
            report.insert(
                format!("{attr}_from_factors"),
                serde_json::Value::Object(entry),
            );
        }
        md.push_str(&format!("\n{n} subjects, {} domains ({}); {}-fold stratified cross-validation of an L2 logistic regression (l2 = {}) on standardised features, repeated over {} fold seeds (accuracy and AUC: mean ± sd, range). Chance band and p: the first split refitted on {} shuffled labellings (95 % band of their accuracy; p = (1 + #shuffled >= observed) / (1 + shuffles)). A good disentanglement puts the domain in the style vectors (accuracy far above chance) and not in the content vectors (near chance).\n", ids.len(), names.join(", "), p.folds, p.l2, p.repeats, p.permutations));
        let out = ctx.output_dir("report")?;
        std::fs::write(out.join("probe.md"), &md).map_err(|e| StageError::io(&out, e))?;
        std::fs::write(
            out.join("probe.json"),
            serde_json::to_vec_pretty(&report).expect("json"),
        )
        .map_err(|e| StageError::io(&out, e))?;
        scatter_panels(
            &out.join("tsne.png"),
            "t-SNE of MeDUET factors, coloured by domain",
            &emb,
            &names,
        )
        .map_err(|e| StageError::failed(e))?;
        tracing::info!("probe results:\n{md}");
        Ok(())
    }
}

/// The table cells of one probe: accuracy, range, chance, chance band, p, AUC, AUC p.
fn row(r: &RepeatedProbe) -> String {
    let (band, p, auc_p) = match &r.permutation {
        Some(t) => (
            format!(
                "{:.3} to {:.3}",
                t.accuracy_chance_band[0], t.accuracy_chance_band[1]
            ),
            format!("{:.3}", t.accuracy_p),
            format!("{:.3}", t.auc_p),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    };
    format!(
        "{} | {} | {:.3} | {band} | {p} | {} | {auc_p}",
        r.accuracy.text(3),
        r.accuracy.range_text(3),
        r.chance_accuracy,
        r.macro_auc.text(3)
    )
}

/// A `factors` artifact read back.
pub struct FactorTable {
    pub content: Matrix,
    pub style: Matrix,
    pub domain_ids: Vec<i64>,
    pub domain_names: Vec<(i64, String)>,
    /// Each subject's attributes.
    pub subjects: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// Reads `factors.safetensors` and `subjects.json`.
pub fn read_factors(dir: &Path) -> Result<FactorTable, StageError> {
    let path = dir.join("factors.safetensors");
    let bytes = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| StageError::input(format!("'{}': {e}", path.display())))?;
    let matrix = |name: &str| -> Result<Matrix, StageError> {
        let t = st
            .tensor(name)
            .map_err(|e| StageError::input(format!("'{}': {name}: {e}", path.display())))?;
        let shape = t.shape();
        if t.dtype() != safetensors::Dtype::F32 || shape.len() != 2 {
            return Err(StageError::input(format!(
                "'{}': {name} must be a float32 matrix, got {:?} {shape:?}",
                path.display(),
                t.dtype()
            )));
        }
        let data = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect();
        Ok(Matrix::new(shape[0], shape[1], data))
    };
    let content = matrix("content")?;
    let style = matrix("style")?;
    let d = st
        .tensor("domain_id")
        .map_err(|e| StageError::input(format!("'{}': domain_id: {e}", path.display())))?;
    let domain_ids: Vec<i64> = d
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let sj = dir.join("subjects.json");
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&sj).map_err(|e| StageError::io(&sj, e))?)
            .map_err(|e| StageError::input(format!("'{}': {e}", sj.display())))?;
    let subjects: Vec<serde_json::Map<String, serde_json::Value>> = rows
        .iter()
        .map(|r| r["attrs"].as_object().cloned().unwrap_or_default())
        .collect();
    if subjects.len() != content.rows
        || domain_ids.len() != content.rows
        || style.rows != content.rows
    {
        return Err(StageError::input(format!(
            "'{}': content, style, domain ids and subjects disagree in length",
            dir.display()
        )));
    }
    let mut domain_names: Vec<(i64, String)> = subjects
        .iter()
        .zip(&domain_ids)
        .map(|(s, &id)| {
            (
                id,
                s.get("domain")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    domain_names.sort();
    domain_names.dedup();
    Ok(FactorTable {
        content,
        style,
        domain_ids,
        domain_names,
        subjects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_probe_parameters_name_the_field() {
        let ok = ProbeParams::default();
        assert!(Probe.validate(&ok).is_ok());
        assert!((ok.repeats, ok.permutations) == (20, 200));
        let zero = |f: fn(&mut ProbeParams)| {
            let mut p = ProbeParams::default();
            f(&mut p);
            Probe.validate(&p).unwrap_err()
        };
        assert!(zero(|p| p.permutations = 0).starts_with("permutations:"));
        assert!(zero(|p| p.repeats = 0).starts_with("repeats:"));
        assert!(zero(|p| p.folds = 1).starts_with("folds:"));
    }
}
