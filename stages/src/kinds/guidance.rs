//! `guidance_sweep`: content and style consistency of a factor-conditioned DiT/SiT under
//! sweeps of the two dual-CFG weights (the paper's Fig. 7).
//!
//! Pairs of references are fixed first: a content reference (by default a subject the
//! segmenter never trained on: its test and held-out splits) and a style reference from a
//! different domain. For every cell `(w_c, w_s)` of the sweep, each pair gets one sample,
//! from the same starting noise in every cell (so cells differ only by the weights),
//! conditioned on the content vector of the one and the style vector of the other, and
//! decoded with the VAE. Then:
//!
//! - **content consistency**: the segmenter (nnU-Net-style U-Net on images, or UNETR on
//!   latents) segments the generated volume and the content reference (its volume, or its
//!   latent, cropped or zero-padded about the centre to the model's sample shape exactly as
//!   training padded it), and the Dice between the two segmentations is averaged over the
//!   classes present in either (the paper's "Dice between segmentations of the references
//!   and the generated volumes");
//! - **style consistency**: a domain classifier names the generated latent's domain; a hit
//!   is the style reference's domain. By default (`style_classifier = "meduet"`) it is
//!   MeDUET's own style domain head `Cls_s` (the paper's "MeDUET's domain classifier"): the
//!   latent is encoded on grid patches exactly as `extract_factors` does, its style tokens
//!   pooled, and `Cls_s` picks one of the pretraining's domains; `style_classifier =
//!   "style_probe"` applies a logistic regression fitted on the condition bank's pooled
//!   style vectors (the `probe` stage's classifier; it judges whole-volume style as the
//!   factors represent it, where `Cls_s` was trained on demixed crops' style tokens);
//!   `style_classifier = "trained"` uses a `classify_train` classifier (`label_attr =
//!   "domain_id"`).
//!
//! The paper expects Dice to rise with `w_c` and saturate, insensitive to `w_s`, and the hit
//! rate to rise with `w_s`, insensitive to `w_c`: the summary reports the Spearman rank
//! correlations of Dice with `w_c` and of the hit rate with `w_s` over all cells, and the
//! Dice of the segmenter on the references against their labels (how far Dice can go).
//!
//! Writes `sweep.csv` (one row per cell and pair), `summary.csv` and `summary.md` (per
//! cell), `content_dice.png` (Dice against `w_c`, a line per `w_s`), `style_hit.png` (hit
//! rate against `w_s`, a line per `w_c`), `montage.png` (the first pair's samples across
//! the grid) and `summary.json`.
//!
//! Guidance weights mean what their names say (`naming = "paper"`, Eq. 24) unless
//! `naming = "code"` (the authors' code, which swaps them).

use std::collections::BTreeMap;
use std::path::Path;

use meduet_engine::{
    Arity, ArtifactType, DeviceRequest, InputSpec, OutputSpec, Resources, Runtime, Stage,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::kinds::diffusion::{
    DdpmVariance, GuidanceNaming, OdeMethod, SampleParams, SampleWeights, Sampler, DIFFUSION,
};
use crate::kinds::pretrain::{Weights, FACTORS, MEDUET};
use crate::kinds::resample::VOLUMES;
use crate::kinds::segment::{CLASSIFIER, SEGMENTER};
use crate::kinds::vae::{LATENTS, TORCH, VAE};
use crate::plot::{line_plot, PlotError, Series};

/// A guidance sweep's tables and plots.
pub const GUIDANCE_SWEEP: ArtifactType = ArtifactType::single("guidance_sweep");

/// Which subjects serve as content references.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceSet {
    /// The segmenter's test and held-out subjects (never trained on).
    #[default]
    SegmenterTest,
    /// Every subject with a volume and condition vectors.
    All,
}

/// Which network names a sample's domain (style consistency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StyleClassifier {
    /// The pretrained MeDUET's style domain head `Cls_s` on pooled style tokens (input
    /// `meduet`).
    #[default]
    Meduet,
    /// A `classify_train` domain classifier on latents (input `classifier`).
    Trained,
    /// A logistic regression fitted on the condition bank's pooled style vectors and their
    /// domains (the `probe` stage's classifier), applied to the sample's pooled style from
    /// the pretrained MeDUET (input `meduet`, the model that made the factors): it judges
    /// whole-volume style as the factors represent it.
    StyleProbe,
}

impl StyleClassifier {
    /// Its value in a pipeline file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Meduet => "meduet",
            Self::Trained => "trained",
            Self::StyleProbe => "style_probe",
        }
    }

    /// The input this choice reads.
    pub fn input(self) -> &'static str {
        match self {
            Self::Meduet | Self::StyleProbe => "meduet",
            Self::Trained => "classifier",
        }
    }
}

/// `guidance_sweep` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuidanceSweepParams {
    /// The content weights swept (`w_c`).
    pub content_weights: Vec<f64>,
    /// The style weights swept (`w_s`).
    pub style_weights: Vec<f64>,
    /// Content/style reference pairs: one sample per pair and cell.
    pub pairs: usize,
    pub references: ReferenceSet,
    pub naming: GuidanceNaming,
    /// The sampler (as `sample`).
    pub sampler: Sampler,
    pub steps: usize,
    pub weights: SampleWeights,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<u64>,
    pub ddpm_variance: DdpmVariance,
    pub ode_method: OdeMethod,
    /// Samples per forward pass (each guided step evaluates 3x this batch).
    pub batch_size: usize,
    /// Sliding-window overlap of the segmenter and the trained classifier.
    pub overlap: f64,
    pub style_classifier: StyleClassifier,
    /// The MeDUET weights that encode the samples' style (`style_classifier = "meduet"` or
    /// `"style_probe"`).
    pub meduet_weights: Weights,
    /// Grid-patch overlap of the MeDUET encoding (as `extract_factors`).
    pub meduet_overlap: f64,
    pub seed: u64,
}

impl Default for GuidanceSweepParams {
    fn default() -> Self {
        Self {
            content_weights: vec![0.0, 1.0, 2.0, 3.0, 5.0],
            style_weights: vec![0.0, 1.0, 2.0, 3.0, 5.0],
            pairs: 8,
            references: ReferenceSet::SegmenterTest,
            naming: GuidanceNaming::Paper,
            sampler: Sampler::Auto,
            steps: 250,
            weights: SampleWeights::Ema,
            snapshot: None,
            ddpm_variance: DdpmVariance::Large,
            ode_method: OdeMethod::Heun,
            batch_size: 4,
            overlap: 0.5,
            style_classifier: StyleClassifier::Meduet,
            meduet_weights: Weights::Student,
            meduet_overlap: 0.25,
            seed: 0,
        }
    }
}

impl GuidanceSweepParams {
    /// The `sample` settings of every cell (weights and conditions set per cell).
    pub fn sample_params(&self) -> SampleParams {
        SampleParams {
            weights: self.weights,
            batch_size: self.batch_size,
            sampler: self.sampler,
            steps: self.steps,
            ddpm_variance: self.ddpm_variance,
            ode_method: self.ode_method,
            seed: self.seed,
            snapshot: self.snapshot,
            ..SampleParams::default()
        }
    }
}

/// A reference subject: id and domain id.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub id: String,
    pub domain_id: i64,
}

/// Pairs of (content reference, style reference) indices: content references in a seeded
/// order (cycled when there are fewer than `n`); each paired with a style reference of
/// another domain: the domain used least so far (then the one used least with this content
/// reference, so one met again gets another domain), the subject drawn at random (seeded).
/// Balanced style domains keep the hit rate honest: a sweep whose style references were
/// nearly all of one domain would credit a model that always makes that domain.
pub fn pair_references(
    content: &[Reference],
    style: &[Reference],
    n: usize,
    seed: u64,
) -> Result<Vec<(usize, usize)>, String> {
    if content.is_empty() {
        return Err("no content reference subjects".into());
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..content.len()).collect();
    order.shuffle(&mut rng);
    let mut by_domain: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, r) in style.iter().enumerate() {
        by_domain.entry(r.domain_id).or_default().push(i);
    }
    // Style domains used so far, overall and with each content reference.
    let mut uses: BTreeMap<i64, usize> = BTreeMap::new();
    let mut uses_with: BTreeMap<(usize, i64), usize> = BTreeMap::new();
    let mut pairs = Vec::with_capacity(n);
    for k in 0..n {
        let c = order[k % order.len()];
        let others: Vec<(&i64, &Vec<usize>)> = by_domain
            .iter()
            .filter(|(d, _)| **d != content[c].domain_id)
            .collect();
        if others.is_empty() {
            return Err(format!(
                "content reference '{}' (domain {}): no style reference of another domain",
                content[c].id, content[c].domain_id
            ));
        }
        // The least used domain; then the one least used with this content reference; then
        // in turn from pair to pair.
        let (_, &(&d, pool)) = others
            .iter()
            .enumerate()
            .min_by_key(|(i, (d, _))| {
                (
                    uses.get(*d).copied().unwrap_or(0),
                    uses_with.get(&(c, **d)).copied().unwrap_or(0),
                    (i + others.len() - k % others.len()) % others.len(),
                )
            })
            .expect("others is not empty");
        *uses.entry(d).or_default() += 1;
        *uses_with.entry((c, d)).or_default() += 1;
        pairs.push((c, pool[rng.random_range(0..pool.len())]));
    }
    Ok(pairs)
}

/// One sample of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepRow {
    pub content_weight: f64,
    pub style_weight: f64,
    pub pair: usize,
    pub content_subject: String,
    pub style_subject: String,
    pub style_domain_id: i64,
    pub predicted_domain_id: i64,
    pub hit: bool,
    /// Dice between the segmentations of the reference and of the sample (mean over the
    /// classes present in either; `None` when neither has foreground).
    pub dice: Option<f64>,
}

/// One cell of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CellSummary {
    pub content_weight: f64,
    pub style_weight: f64,
    pub samples: usize,
    pub mean_dice: Option<f64>,
    /// Samples with a defined Dice.
    pub dice_samples: usize,
    pub hit_rate: f64,
}

/// Per-cell means, cells in sweep order (`w_c` outer, `w_s` inner).
pub fn summarize(rows: &[SweepRow]) -> Vec<CellSummary> {
    let mut cells: Vec<((f64, f64), Vec<&SweepRow>)> = Vec::new();
    for r in rows {
        let key = (r.content_weight, r.style_weight);
        match cells.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => cells.push((key, vec![r])),
        }
    }
    cells
        .into_iter()
        .map(|((wc, ws), v)| {
            let dices: Vec<f64> = v.iter().filter_map(|r| r.dice).collect();
            CellSummary {
                content_weight: wc,
                style_weight: ws,
                samples: v.len(),
                mean_dice: (!dices.is_empty())
                    .then(|| dices.iter().sum::<f64>() / dices.len() as f64),
                dice_samples: dices.len(),
                hit_rate: v.iter().filter(|r| r.hit).count() as f64 / v.len() as f64,
            }
        })
        .collect()
}

/// Average ranks (1-based; ties share their mean rank).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation (Pearson's on average ranks); `None` when either side is
/// constant or there are fewer than 2 points.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 2 {
        return None;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.4}"))
}

/// Writes `sweep.csv`, `summary.csv`, `summary.md`, `content_dice.png`, `style_hit.png` and
/// `summary.json` into `dir`; returns the summary's JSON.
pub fn write_report(
    dir: &Path,
    rows: &[SweepRow],
    reference_dice: Option<f64>,
    reference_hit_rate: Option<f64>,
    about: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let io = |f: &str, e: std::io::Error| format!("'{}': {e}", dir.join(f).display());
    let plot = |e: PlotError| e.to_string();
    let mut csv = String::from(
        "content_weight,style_weight,pair,content_subject,style_subject,style_domain_id,predicted_domain_id,hit,dice\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}\n",
            r.content_weight,
            r.style_weight,
            r.pair,
            r.content_subject,
            r.style_subject,
            r.style_domain_id,
            r.predicted_domain_id,
            r.hit,
            r.dice.map_or(String::new(), |d| format!("{d:.6}"))
        ));
    }
    std::fs::write(dir.join("sweep.csv"), csv).map_err(|e| io("sweep.csv", e))?;
    let cells = summarize(rows);
    let mut scsv =
        String::from("content_weight,style_weight,samples,mean_dice,dice_samples,hit_rate\n");
    for c in &cells {
        scsv.push_str(&format!(
            "{},{},{},{},{},{:.6}\n",
            c.content_weight,
            c.style_weight,
            c.samples,
            c.mean_dice.map_or(String::new(), |d| format!("{d:.6}")),
            c.dice_samples,
            c.hit_rate
        ));
    }
    std::fs::write(dir.join("summary.csv"), scsv).map_err(|e| io("summary.csv", e))?;
    let with_dice: Vec<&CellSummary> = cells.iter().filter(|c| c.mean_dice.is_some()).collect();
    let rho_dice = spearman(
        &with_dice
            .iter()
            .map(|c| c.content_weight)
            .collect::<Vec<_>>(),
        &with_dice
            .iter()
            .map(|c| c.mean_dice.expect("filtered"))
            .collect::<Vec<_>>(),
    );
    let rho_hit = spearman(
        &cells.iter().map(|c| c.style_weight).collect::<Vec<_>>(),
        &cells.iter().map(|c| c.hit_rate).collect::<Vec<_>>(),
    );
    // The cross terms: Dice against w_s and hit rate against w_c (the paper: insensitive).
    let rho_dice_ws = spearman(
        &with_dice.iter().map(|c| c.style_weight).collect::<Vec<_>>(),
        &with_dice
            .iter()
            .map(|c| c.mean_dice.expect("filtered"))
            .collect::<Vec<_>>(),
    );
    let rho_hit_wc = spearman(
        &cells.iter().map(|c| c.content_weight).collect::<Vec<_>>(),
        &cells.iter().map(|c| c.hit_rate).collect::<Vec<_>>(),
    );
    let wcs: Vec<f64> = dedup(cells.iter().map(|c| c.content_weight));
    let wss: Vec<f64> = dedup(cells.iter().map(|c| c.style_weight));
    let cell = |wc: f64, ws: f64| {
        cells
            .iter()
            .find(|c| c.content_weight == wc && c.style_weight == ws)
    };
    // One Markdown table of a per-cell value: rows w_c, columns w_s.
    let grid_table = |title: &str, value_of: &dyn Fn(&CellSummary) -> Option<f64>| {
        let mut t = format!("{title} (rows: w_c; columns: w_s)\n\n| w_c \\ w_s |");
        for ws in &wss {
            t.push_str(&format!(" {ws} |"));
        }
        t.push_str(&format!("\n|---|{}\n", "---|".repeat(wss.len())));
        for wc in &wcs {
            t.push_str(&format!("| {wc} |"));
            for ws in &wss {
                t.push_str(&format!(
                    " {} |",
                    fmt_opt(cell(*wc, *ws).and_then(value_of))
                ));
            }
            t.push('\n');
        }
        t
    };
    let mut md = String::from("# Content and style consistency under dual CFG\n\n");
    md.push_str(&grid_table(
        "Mean Dice between the segmentations of the content reference and of the sample",
        &|c| c.mean_dice,
    ));
    md.push('\n');
    md.push_str(&grid_table(
        "Style hit rate of the domain classifier",
        &|c| Some(c.hit_rate),
    ));
    md.push_str(&format!(
        "\nSpearman rank correlation over the cells: Dice with w_c {}, Dice with w_s {}; hit rate with w_s {}, hit rate with w_c {}.\n\
         Segmenter Dice on the content references against their labels: {}. Domain classifier accuracy on the style references: {}.\n",
        fmt_opt(rho_dice),
        fmt_opt(rho_dice_ws),
        fmt_opt(rho_hit),
        fmt_opt(rho_hit_wc),
        fmt_opt(reference_dice),
        fmt_opt(reference_hit_rate),
    ));
    std::fs::write(dir.join("summary.md"), &md).map_err(|e| io("summary.md", e))?;
    let lines = |x_of: fn(&CellSummary) -> f64,
                 group_of: fn(&CellSummary) -> f64,
                 y_of: fn(&CellSummary) -> Option<f64>,
                 name: &str| {
        let mut groups: Vec<(f64, Vec<(f64, f64)>)> = Vec::new();
        for c in &cells {
            let Some(y) = y_of(c) else { continue };
            let g = group_of(c);
            match groups.iter_mut().find(|(k, _)| *k == g) {
                Some((_, v)) => v.push((x_of(c), y)),
                None => groups.push((g, vec![(x_of(c), y)])),
            }
        }
        groups
            .into_iter()
            .map(|(g, mut pts)| {
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series {
                    name: format!("{name} = {g}"),
                    points: pts,
                }
            })
            .collect::<Vec<_>>()
    };
    line_plot(
        &dir.join("content_dice.png"),
        "Content consistency: Dice(reference, sample) against w_c",
        "content guidance w_c",
        "Dice",
        &lines(
            |c| c.content_weight,
            |c| c.style_weight,
            |c| c.mean_dice,
            "w_s",
        ),
        false,
    )
    .map_err(plot)?;
    line_plot(
        &dir.join("style_hit.png"),
        "Style consistency: domain-classifier hit rate against w_s",
        "style guidance w_s",
        "hit rate",
        &lines(
            |c| c.style_weight,
            |c| c.content_weight,
            |c| Some(c.hit_rate),
            "w_c",
        ),
        false,
    )
    .map_err(plot)?;
    let summary = serde_json::json!({
        "cells": cells,
        "spearman_dice_content_weight": rho_dice,
        "spearman_dice_style_weight": rho_dice_ws,
        "spearman_hit_style_weight": rho_hit,
        "spearman_hit_content_weight": rho_hit_wc,
        "reference_dice_to_labels": reference_dice,
        "reference_domain_accuracy": reference_hit_rate,
        "about": about,
    });
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_vec_pretty(&summary).expect("json"),
    )
    .map_err(|e| io("summary.json", e))?;
    Ok(summary)
}

fn dedup(v: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::new();
    for x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// `guidance_sweep`.
pub struct GuidanceSweep;

impl Stage for GuidanceSweep {
    type Params = GuidanceSweepParams;
    const KIND: &'static str = "guidance_sweep";
    const VERSION: u32 = 3;
    const ABOUT: &'static str = "Fig. 7: content Dice and style hit rate of dual-CFG samples over a grid of content and style guidance weights";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "model",
                ty: DIFFUSION,
                arity: Arity::One,
                doc: "a DiT/SiT conditioned on factors",
            },
            InputSpec {
                name: "vae",
                ty: VAE,
                arity: Arity::One,
                doc: "the VAE that made the training latents",
            },
            InputSpec {
                name: "volumes",
                ty: VOLUMES,
                arity: Arity::One,
                doc:
                    "the reference subjects' volumes (with labels: the segmenter's reference Dice)",
            },
            InputSpec {
                name: "latents",
                ty: LATENTS,
                arity: Arity::Optional,
                doc: "the reference subjects' latents (needed by a UNETR segmenter)",
            },
            InputSpec {
                name: "factors",
                ty: FACTORS,
                arity: Arity::Optional,
                doc: "reference subjects' factors (default: the model's training bank)",
            },
            InputSpec {
                name: "segmenter",
                ty: SEGMENTER,
                arity: Arity::One,
                doc: "segments references and samples (content consistency)",
            },
            InputSpec {
                name: "meduet",
                ty: MEDUET,
                arity: Arity::Optional,
                doc: "the pretrained MeDUET whose style head judges style (style_classifier = \"meduet\"), or that made the factors (\"style_probe\")",
            },
            InputSpec {
                name: "classifier",
                ty: CLASSIFIER,
                arity: Arity::Optional,
                doc: "a domain classifier (classify_train, label_attr = \"domain_id\"; style_classifier = \"trained\")",
            },
        ]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "report",
            ty: GUIDANCE_SWEEP,
            doc: "sweep.csv, summary.csv/md/json, content_dice.png, style_hit.png, montage.png",
        }]
    }
    fn default_resources(&self) -> Resources {
        Resources {
            threads: 0,
            device: DeviceRequest::Auto,
            memory_gb: None,
        }
    }
    fn runtime(&self) -> Runtime {
        TORCH
    }
    fn seed(&self, p: &GuidanceSweepParams) -> Option<u64> {
        Some(p.seed)
    }
    fn validate(&self, p: &GuidanceSweepParams) -> Result<(), String> {
        for (name, w) in [
            ("content_weights", &p.content_weights),
            ("style_weights", &p.style_weights),
        ] {
            if w.is_empty() {
                return Err(format!("{name}: give at least one weight"));
            }
            if let Some(x) = w.iter().find(|x| !x.is_finite() || **x < 0.0) {
                return Err(format!("{name}: {x} is not a finite weight >= 0"));
            }
            if dedup(w.iter().copied()).len() != w.len() {
                return Err(format!("{name}: {w:?} repeats a weight"));
            }
        }
        if p.pairs == 0 || p.batch_size == 0 {
            return Err("pairs: pairs and batch_size must be positive".into());
        }
        if p.steps < 2 {
            return Err(format!("steps: {} must be at least 2", p.steps));
        }
        if p.snapshot.is_some() && p.weights != SampleWeights::Ema {
            return Err("snapshot: snapshots hold EMA weights; leave weights = \"ema\"".into());
        }
        for (name, o) in [("overlap", p.overlap), ("meduet_overlap", p.meduet_overlap)] {
            if !(0.0..1.0).contains(&o) {
                return Err(format!("{name}: {o} must be in [0, 1)"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, d: i64) -> Reference {
        Reference {
            id: id.into(),
            domain_id: d,
        }
    }

    #[test]
    fn pairs_take_style_from_another_domain() {
        let content = vec![r("a0", 0), r("b0", 1)];
        let style = vec![r("a1", 0), r("b1", 1), r("c1", 2), r("c2", 2)];
        let pairs = pair_references(&content, &style, 8, 3).unwrap();
        assert_eq!(pairs.len(), 8);
        for &(c, s) in &pairs {
            assert_ne!(content[c].domain_id, style[s].domain_id);
        }
        // Both content references are used, in turn; other domains are taken in turn.
        assert_eq!(pairs.iter().filter(|p| p.0 == 0).count(), 4);
        let styles_of_a: Vec<i64> = pairs
            .iter()
            .filter(|p| p.0 == 0)
            .map(|p| style[p.1].domain_id)
            .collect();
        assert!(styles_of_a.contains(&1) && styles_of_a.contains(&2));
        // Seeded.
        assert_eq!(pairs, pair_references(&content, &style, 8, 3).unwrap());
        // One pass over eight content references of four domains: each domain styles two of
        // the eight pairs.
        let content: Vec<Reference> = (0..8).map(|i| r(&format!("c{i}"), i % 4)).collect();
        let style: Vec<Reference> = (0..8).map(|i| r(&format!("s{i}"), i % 4)).collect();
        let pairs = pair_references(&content, &style, 8, 5).unwrap();
        let mut per_domain = [0; 4];
        for &(c, s) in &pairs {
            assert_ne!(content[c].domain_id, style[s].domain_id);
            per_domain[style[s].domain_id as usize] += 1;
        }
        assert_eq!(per_domain, [2, 2, 2, 2]);
        // One domain only: an error that names the subject.
        let e = pair_references(&content, &[r("a1", 0)], 2, 0).unwrap_err();
        assert!(e.contains("another domain"), "{e}");
        assert!(pair_references(&[], &style, 2, 0).is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let ok = GuidanceSweepParams::default();
        assert!(GuidanceSweep.validate(&ok).is_ok());
        let bad = |f: fn(&mut GuidanceSweepParams), field: &str| {
            let mut p = GuidanceSweepParams::default();
            f(&mut p);
            let e = GuidanceSweep.validate(&p).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        };
        bad(|p| p.content_weights.clear(), "content_weights");
        bad(|p| p.style_weights = vec![1.0, -1.0], "style_weights");
        bad(|p| p.style_weights = vec![1.0, 1.0], "style_weights");
        bad(|p| p.pairs = 0, "pairs");
        bad(|p| p.steps = 1, "steps");
        bad(|p| p.overlap = 1.0, "overlap");
        bad(|p| p.meduet_overlap = -0.1, "meduet_overlap");
        bad(
            |p| {
                p.snapshot = Some(10);
                p.weights = SampleWeights::Model;
            },
            "snapshot",
        );
    }

    #[test]
    fn spearman_matches_known_values() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[5.0, 5.0, 5.0]), None);
        // With ties (scipy.stats.spearmanr([1,2,2,3],[1,3,2,4]) = 0.9486832980505138).
        let rho = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((rho - 0.948_683_298_050_513_8).abs() < 1e-12, "{rho}");
    }

    fn row(wc: f64, ws: f64, pair: usize, hit: bool, dice: Option<f64>) -> SweepRow {
        SweepRow {
            content_weight: wc,
            style_weight: ws,
            pair,
            content_subject: format!("c{pair}"),
            style_subject: format!("s{pair}"),
            style_domain_id: 1,
            predicted_domain_id: if hit { 1 } else { 0 },
            hit,
            dice,
        }
    }

    #[test]
    fn summary_averages_per_cell_and_writes_the_report() {
        let rows = vec![
            row(0.0, 0.0, 0, false, Some(0.2)),
            row(0.0, 0.0, 1, true, None),
            row(0.0, 2.0, 0, true, Some(0.4)),
            row(0.0, 2.0, 1, true, Some(0.6)),
            row(2.0, 0.0, 0, false, Some(0.8)),
            row(2.0, 0.0, 1, false, Some(0.6)),
            row(2.0, 2.0, 0, true, Some(0.9)),
            row(2.0, 2.0, 1, false, Some(0.9)),
        ];
        let cells = summarize(&rows);
        assert_eq!(cells.len(), 4);
        assert_eq!((cells[0].content_weight, cells[0].style_weight), (0.0, 0.0));
        assert_eq!(cells[0].mean_dice, Some(0.2));
        assert_eq!((cells[0].dice_samples, cells[0].hit_rate), (1, 0.5));
        assert!((cells[1].mean_dice.unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(cells[1].hit_rate, 1.0);
        assert!((cells[3].mean_dice.unwrap() - 0.9).abs() < 1e-12);
        let dir = tempfile::tempdir().unwrap();
        let s = write_report(
            dir.path(),
            &rows,
            Some(0.95),
            Some(1.0),
            &serde_json::json!({}),
        )
        .unwrap();
        // Dice per cell (0.2, 0.5, 0.7, 0.9) against w_c (0, 0, 2, 2): rank correlation.
        let want = spearman(&[0.0, 0.0, 2.0, 2.0], &[0.2, 0.5, 0.7, 0.9]).unwrap();
        assert_eq!(s["spearman_dice_content_weight"], serde_json::json!(want));
        for f in [
            "sweep.csv",
            "summary.csv",
            "summary.md",
            "summary.json",
            "content_dice.png",
            "style_hit.png",
        ] {
            assert!(dir.path().join(f).is_file(), "{f}");
        }
        let md = std::fs::read_to_string(dir.path().join("summary.md")).unwrap();
        assert!(md.contains("| 2 | 0.7000 | 0.9000 |"), "{md}");
        let csv = std::fs::read_to_string(dir.path().join("sweep.csv")).unwrap();
        assert_eq!(csv.lines().count(), 9);
    }
}
