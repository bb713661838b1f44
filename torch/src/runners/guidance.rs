//! `guidance_sweep` (declared, with its measures and outputs, in
//! `meduet_stages::kinds::guidance`): dual-CFG samples over a grid of content and style
//! weights, scored by a segmenter (content) and a domain classifier (style).

use std::collections::BTreeMap;
use std::sync::Arc;

use meduet_engine::{StageContext, StageError};
use meduet_stages::data::volume::{Volume, VolumeOf};
use meduet_stages::kinds::diffusion::GuidanceParams;
use meduet_stages::kinds::guidance::{
    pair_references, write_report, GuidanceSweep, GuidanceSweepParams, Reference, ReferenceSet,
    StyleClassifier, SweepRow,
};
use meduet_stages::kinds::segment::Network;
use meduet_stages::plot::{montage, GrayImage};
use meduet_stages::sampling::CropSource;
use meduet_stages::segmentation::metrics::mean_class_dice;
use tch::nn::VarStore;
use tch::{Device, Kind};

use super::classify::{classify_volume, load_classifier, Classifier};
use super::common::{device, fail, step_seed, DomainMap};
use super::diffusion::{
    decode_to_volume, load_diffusion, orthogonal_slices, ConditionBank, LatentSampler,
    WeightsChoice,
};
use super::factors::{grid_stride, load_meduet, pooled_factors};
use super::segment::{by_id, label_lut, load_segmenter, read_case, segment_case, Case};
use crate::inference::SlidingWindow;
use crate::models::dit::{Cond, ConditionMode};
use crate::models::meduet::MeDuet;
use meduet_stages::analysis::logistic::{cross_validate, fit, Logistic, ProbeResult};
use meduet_stages::analysis::Matrix;

/// Where a length-`n` axis starts inside a window of `s`: the centre crop when longer, the
/// centred zero padding (a negative start) when shorter, as training padded latents.
fn centre_origin(n: usize, s: usize) -> i64 {
    if n > s {
        ((n - s) / 2) as i64
    } else {
        -(((s - n) / 2) as i64)
    }
}

/// A `[C, X, Y, Z]` array cropped or zero-padded to `size` from `origin`.
fn window(data: &Arc<Vec<f32>>, shape: [usize; 4], origin: [i64; 3], size: [usize; 3]) -> Vec<f32> {
    let src = CropSource {
        id: String::new(),
        domain_id: 0,
        shape,
        data: data.clone(),
    };
    let mut out = vec![0.0f32; shape[0] * size.iter().product::<usize>()];
    src.read_crop(origin, size, &mut out);
    out
}

/// A reference subject's case cut to the samples' grid: latent window `size`, image window
/// `size * f`, about the centre of the latent.
fn reference_case(
    case: &Case,
    latent_shape: [usize; 4],
    size: [usize; 3],
    f: usize,
) -> Result<Case, StageError> {
    let origin: [i64; 3] = std::array::from_fn(|a| centre_origin(latent_shape[a + 1], size[a]));
    let isize = size.map(|s| s * f);
    let iorigin = origin.map(|o| o * f as i64);
    let [x, y, z] = case.image.shape;
    let img = window(
        &Arc::new(case.image.data.clone()),
        [1, x, y, z],
        iorigin,
        isize,
    );
    let cls: Vec<f32> = case.classes.iter().map(|&c| c as f32).collect();
    let cls = window(&Arc::new(cls), [1, x, y, z], iorigin, isize);
    let latent = case.latent.as_ref().map(|(d, s)| {
        (
            Arc::new(window(d, *s, origin, size)),
            [s[0], size[0], size[1], size[2]],
        )
    });
    Ok(Case {
        id: case.id.clone(),
        domain: case.domain.clone(),
        image: VolumeOf::from_parts(img, isize, case.image.affine).map_err(fail)?,
        classes: cls.iter().map(|&v| v as u8).collect(),
        latent,
    })
}

/// What names a latent's domain (style consistency).
enum StyleJudge {
    /// A `classify_train` domain classifier on latents.
    Trained(Classifier),
    /// A pretrained MeDUET's `Cls_s` on the latent's pooled style tokens.
    Meduet {
        _vs: VarStore,
        model: MeDuet,
        /// The domain id of each of `Cls_s`'s classes.
        domains: Vec<i64>,
        stride: usize,
    },
    /// A logistic regression on the pooled style vector, fitted on the condition bank.
    StyleProbe {
        _vs: VarStore,
        model: MeDuet,
        stride: usize,
        probe: Logistic,
        /// Standardisation of the bank's style vectors.
        mean: Vec<f64>,
        std: Vec<f64>,
        /// The domain id of each class.
        domains: Vec<i64>,
        /// Its stratified cross-validated accuracy on the bank.
        cv: ProbeResult,
    },
}

/// L2 penalty and iterations of the `style_probe` judge (the `probe` stage's defaults).
const STYLE_PROBE_L2: f64 = 1e-2;
const STYLE_PROBE_ITERATIONS: usize = 300;

/// The pooled style vector `[d_s]` of a latent `[C, X, Y, Z]`, encoded as `extract_factors`
/// does.
fn pooled_style(
    model: &MeDuet,
    data: &[f32],
    shape: [usize; 4],
    stride: usize,
    batch: usize,
) -> Result<tch::Tensor, StageError> {
    if shape[0] as i64 != model.config().in_chans {
        return Err(fail(format!(
            "latents have {} channels, the MeDUET model {}",
            shape[0],
            model.config().in_chans
        )));
    }
    Ok(pooled_factors(model, data, &shape, stride, batch).1)
}

/// Fits the `style_probe` judge on the bank's style vectors of the subjects whose domain is
/// known.
fn fit_style_probe(
    bank: &ConditionBank,
    style_dim: i64,
    domain_of: impl Fn(&str) -> Option<i64>,
    seed: u64,
) -> Result<(Logistic, Vec<f64>, Vec<f64>, Vec<i64>, ProbeResult), StageError> {
    let style = bank
        .tensors
        .get(1)
        .ok_or_else(|| StageError::input("style_probe: the condition bank has no style vectors"))?;
    if style.size()[1] != style_dim {
        return Err(StageError::input(format!(
            "style_probe: the condition bank's style vectors have {} dimensions, the MeDUET model's {style_dim}: connect the MeDUET that made the factors",
            style.size()[1]
        )));
    }
    let all = Vec::<f64>::try_from(
        style
            .to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .view([-1]),
    )
    .map_err(fail)?;
    let d = style_dim as usize;
    let labelled: Vec<(usize, i64)> = bank
        .subjects
        .iter()
        .enumerate()
        .filter_map(|(i, id)| domain_of(id).map(|dom| (i, dom)))
        .collect();
    let mut domains: Vec<i64> = labelled.iter().map(|l| l.1).collect();
    domains.sort_unstable();
    domains.dedup();
    if domains.len() < 2 {
        return Err(StageError::input(format!(
            "style_probe: the condition bank has subjects of {} known domain(s); it needs at least 2",
            domains.len()
        )));
    }
    let rows: Vec<f64> = labelled
        .iter()
        .flat_map(|&(i, _)| all[i * d..(i + 1) * d].iter().copied())
        .collect();
    let x = Matrix::new(labelled.len(), d, rows);
    let y: Vec<usize> = labelled
        .iter()
        .map(|l| domains.binary_search(&l.1).expect("listed"))
        .collect();
    let cv = cross_validate(
        &x,
        &y,
        domains.len(),
        5,
        STYLE_PROBE_L2,
        STYLE_PROBE_ITERATIONS,
        seed,
    );
    let (mean, std) = x.column_stats();
    let probe = fit(
        &x.standardized(&mean, &std),
        &y,
        domains.len(),
        STYLE_PROBE_L2,
        STYLE_PROBE_ITERATIONS,
    );
    Ok((probe, mean, std, domains, cv))
}

impl StyleJudge {
    fn load(
        p: &GuidanceSweepParams,
        ctx: &StageContext,
        dev: Device,
        bank: &ConditionBank,
        domain_of: impl Fn(&str) -> Option<i64>,
    ) -> Result<Self, StageError> {
        let wanted = p.style_classifier.input();
        for name in ["meduet", "classifier"] {
            let connected = !ctx.inputs(name).is_empty();
            if name == wanted && !connected {
                return Err(StageError::input(format!(
                    "{name}: style_classifier = \"{}\" reads the '{name}' input; connect it",
                    p.style_classifier.name()
                )));
            }
            if name != wanted && connected {
                tracing::warn!(
                    "input '{name}' is connected but unused: style_classifier = \"{}\" reads '{wanted}'",
                    p.style_classifier.name()
                );
            }
        }
        let dir = &ctx.input(wanted)?.dir;
        match p.style_classifier {
            StyleClassifier::Trained => {
                let c = load_classifier(dir, dev)?;
                if c.config.label_attr != "domain_id" {
                    return Err(StageError::input(format!(
                        "classifier: a domain classifier is needed (classify_train with label_attr = \"domain_id\"); this one predicts '{}'",
                        c.config.label_attr
                    )));
                }
                Ok(Self::Trained(c))
            }
            StyleClassifier::Meduet => {
                let (vs, model, cfg_json) = load_meduet(dir, p.meduet_weights, dev)?;
                let domains: DomainMap = serde_json::from_value(cfg_json["domains"].clone())
                    .map_err(|e| {
                        StageError::input(format!(
                            "'{}': domains: {e} (a pretrain artifact records its domains)",
                            dir.join("config.json").display()
                        ))
                    })?;
                if !model.has_domain_classifier() {
                    return Err(StageError::input(
                        "meduet: this model has no style domain head (pretrained without disentanglement); use style_classifier = \"trained\"",
                    ));
                }
                let stride = grid_stride(model.config().crop as usize, p.meduet_overlap);
                Ok(Self::Meduet {
                    _vs: vs,
                    model,
                    domains: domains.classes.iter().map(|c| c.0).collect(),
                    stride,
                })
            }
            StyleClassifier::StyleProbe => {
                let (vs, model, _) = load_meduet(dir, p.meduet_weights, dev)?;
                let (probe, mean, std, domains, cv) =
                    fit_style_probe(bank, model.config().style_out_dim(), domain_of, p.seed)?;
                tracing::info!(
                    "style probe on the bank's style vectors: cross-validated accuracy {:.3} (chance {:.3}, {} subjects, {} domains)",
                    cv.accuracy, cv.chance_accuracy, cv.samples, cv.classes
                );
                let stride = grid_stride(model.config().crop as usize, p.meduet_overlap);
                Ok(Self::StyleProbe {
                    _vs: vs,
                    model,
                    stride,
                    probe,
                    mean,
                    std,
                    domains,
                    cv,
                })
            }
        }
    }

    /// The domain ids it can name.
    fn domains(&self) -> &[i64] {
        match self {
            Self::Trained(c) => &c.values,
            Self::Meduet { domains, .. } | Self::StyleProbe { domains, .. } => domains,
        }
    }

    /// The predicted domain id of a latent `[C, X, Y, Z]`.
    fn predict(
        &self,
        data: Arc<Vec<f32>>,
        shape: [usize; 4],
        overlap: f64,
        batch: usize,
        dev: Device,
    ) -> Result<i64, StageError> {
        let (p, values) = match self {
            Self::Trained(c) => {
                let src = CropSource {
                    id: String::new(),
                    domain_id: 0,
                    shape,
                    data,
                };
                let p =
                    classify_volume(&c.net, &src, c.config.unetr.img_size, overlap, batch, dev)?;
                (p, c.values.as_slice())
            }
            Self::Meduet {
                model,
                domains,
                stride,
                ..
            } => {
                let style = pooled_style(model, &data, shape, *stride, batch)?;
                let logits = model
                    .style_domain_logits(&style.unsqueeze(0))
                    .expect("checked at load")
                    .squeeze_dim(0)
                    .to_kind(Kind::Double)
                    .to_device(Device::Cpu);
                (
                    Vec::<f64>::try_from(logits).map_err(fail)?,
                    domains.as_slice(),
                )
            }
            Self::StyleProbe {
                model,
                stride,
                probe,
                mean,
                std,
                domains,
                ..
            } => {
                let style = pooled_style(model, &data, shape, *stride, batch)?;
                let v = Vec::<f64>::try_from(style.to_kind(Kind::Double).to_device(Device::Cpu))
                    .map_err(fail)?;
                let x = Matrix::new(1, v.len(), v).standardized(mean, std);
                let p = probe.predict_proba(&x).remove(0);
                (p, domains.as_slice())
            }
        };
        let arg = (0..p.len())
            .max_by(|&a, &b| p[a].total_cmp(&p[b]))
            .ok_or_else(|| fail("the classifier has no classes"))?;
        Ok(values[arg])
    }

    /// How the report names it.
    fn describe(&self) -> serde_json::Value {
        match self {
            Self::Trained(c) => serde_json::json!({
                "kind": "trained", "label_attr": c.config.label_attr, "classes": c.values,
            }),
            Self::Meduet { domains, .. } => serde_json::json!({
                "kind": "meduet Cls_s on pooled style tokens", "classes": domains,
            }),
            Self::StyleProbe { domains, cv, .. } => serde_json::json!({
                "kind": "logistic regression on pooled style vectors, fitted on the condition bank",
                "classes": domains, "l2": STYLE_PROBE_L2, "iterations": STYLE_PROBE_ITERATIONS,
                "bank_cross_validated": cv,
            }),
        }
    }
}

pub fn run(
    _: &GuidanceSweep,
    p: &GuidanceSweepParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let model_dir = ctx.input("model")?.dir.clone();
    let ld = load_diffusion(&model_dir, WeightsChoice::of(p.snapshot, p.weights), dev)?;
    let cfg = ld.model.config().clone();
    if cfg.condition != ConditionMode::Factors {
        return Err(StageError::input(format!(
            "model: the sweep needs a model conditioned on factors (model.condition = \"factors\"), this one is {:?}",
            cfg.condition
        )));
    }
    let bank = match ctx.inputs("factors").first() {
        Some(f) => ConditionBank::from_factors(&f.dir)?,
        None => ConditionBank::load(&model_dir)?,
    };
    bank.check_fits(&cfg)?;
    let (_seg_vs, net, seg_cfg, splits) = load_segmenter(&ctx.input("segmenter")?.dir, dev)?;
    let latents = ctx.inputs("latents").first().map(|l| by_id(&l.items));
    if seg_cfg.network == Network::Unetr && latents.is_none() {
        return Err(StageError::input(
            "the segmenter is a UNETR on latents: connect a 'latents' input (the references' latents)",
        ));
    }
    let volumes = by_id(&ctx.input("volumes")?.items);
    let domain_of =
        |id: &str| -> Option<i64> { volumes.get(id).and_then(|it| it.attr_i64("domain_id")) };
    let judge = StyleJudge::load(p, ctx, dev, &bank, domain_of)?;
    let usable = |id: &String| {
        bank.row(id).is_some()
            && domain_of(id).is_some()
            && latents.as_ref().is_none_or(|l| l.contains_key(id))
    };
    let content_ids: Vec<String> = match p.references {
        ReferenceSet::SegmenterTest => splits.test.iter().chain(&splits.heldout).cloned().collect(),
        ReferenceSet::All => volumes.keys().cloned().collect(),
    };
    let content: Vec<Reference> = content_ids
        .iter()
        .filter(|id| usable(id))
        .map(|id| Reference {
            id: id.clone(),
            domain_id: domain_of(id).expect("usable"),
        })
        .collect();
    let style: Vec<Reference> = bank
        .subjects
        .iter()
        .filter(|id| usable(id))
        .map(|id| Reference {
            id: id.clone(),
            domain_id: domain_of(id).expect("usable"),
        })
        .filter(|r| judge.domains().contains(&r.domain_id))
        .collect();
    if content.is_empty() {
        return Err(StageError::input(format!(
            "references: no {:?} subject has a volume, condition vectors{} (of {} candidates)",
            p.references,
            if latents.is_some() {
                " and a latent"
            } else {
                ""
            },
            content_ids.len()
        )));
    }
    let pairs = pair_references(&content, &style, p.pairs, p.seed).map_err(StageError::input)?;

    let (_vae_vs, vae) = super::vae::load_vae(&ctx.input("vae")?.dir, dev)?;
    let f = vae.config().downsample_factor() as usize;
    let size = cfg.input_size.map(|v| v as usize);
    let lut = label_lut(&seg_cfg.labels);
    let k = seg_cfg.labels.len() as u8;
    let sw = SlidingWindow {
        roi: seg_cfg.roi,
        overlap: p.overlap,
        batch: 4,
        scale: seg_cfg.scale,
        sigma_scale: 0.125,
    };
    let seg_latents = (seg_cfg.network == Network::Unetr)
        .then_some(())
        .and(latents.as_ref());

    // The content references, segmented once; the style references, classified once.
    let mut reference_seg: BTreeMap<usize, (Vec<u8>, Volume)> = BTreeMap::new();
    let mut to_labels = Vec::new();
    for &(c, _) in &pairs {
        if reference_seg.contains_key(&c) {
            continue;
        }
        let id = &content[c].id;
        let full = read_case(&volumes[id], latents.as_ref(), &lut)?;
        let lshape = match &full.latent {
            Some((_, s)) => *s,
            None => {
                let [x, y, z] = full.image.shape;
                [cfg.in_chans as usize, x / f, y / f, z / f]
            }
        };
        let mut case = reference_case(&full, lshape, size, f)?;
        if seg_latents.is_none() {
            case.latent = None;
        }
        let (pred, _) = segment_case(&net, &case, &sw, dev)?;
        to_labels.extend(mean_class_dice(&pred, &case.classes, k));
        reference_seg.insert(c, (pred, case.image));
    }
    let reference_dice =
        (!to_labels.is_empty()).then(|| to_labels.iter().sum::<f64>() / to_labels.len() as f64);
    let reference_hit_rate = match &latents {
        Some(l) => {
            let mut hits = Vec::new();
            let mut seen = Vec::new();
            for &(_, s) in &pairs {
                if seen.contains(&s) {
                    continue;
                }
                seen.push(s);
                let it = &l[&style[s].id];
                let (d, sh, _) = meduet_stages::data::array_store::read_array_f32(
                    &it.dir.join(meduet_stages::kinds::vae::LATENT_ZARR),
                )
                .map_err(StageError::input)?;
                let sh = [sh[0], sh[1], sh[2], sh[3]];
                let pred = judge.predict(Arc::new(d), sh, p.overlap, p.batch_size, dev)?;
                hits.push((pred == style[s].domain_id) as u8 as f64);
            }
            Some(hits.iter().sum::<f64>() / hits.len() as f64)
        }
        None => None,
    };
    tracing::info!(
        "{} pairs of {} content and {} style reference subjects; segmenter Dice on the references {}",
        pairs.len(),
        reference_seg.len(),
        pairs.iter().map(|p| p.1).collect::<std::collections::BTreeSet<_>>().len(),
        reference_dice.map_or("undefined".into(), |d| format!("{d:.4}"))
    );

    let sp = p.sample_params();
    let gen = LatentSampler::new(&ld, &sp)?;
    let cells: Vec<(f64, f64)> = p
        .content_weights
        .iter()
        .flat_map(|&wc| p.style_weights.iter().map(move |&ws| (wc, ws)))
        .collect();
    let chunks = pairs.len().div_ceil(p.batch_size);
    let bar = ctx.progress((cells.len() * chunks * p.steps) as u64, "sampling steps");
    let mut done = 0u64;
    let mut rows = Vec::new();
    let mut first_pair: Vec<(f64, f64, GrayImage)> = Vec::new();
    let _ng = tch::no_grad_guard();
    for &(wc, ws) in &cells {
        let guidance = GuidanceParams {
            content: wc,
            style: ws,
            naming: p.naming,
        };
        for (bi, start) in (0..pairs.len()).step_by(p.batch_size).enumerate() {
            ctx.check_cancelled()?;
            let chunk = &pairs[start..(start + p.batch_size).min(pairs.len())];
            let c_rows: Vec<usize> = chunk
                .iter()
                .map(|&(c, _)| bank.row(&content[c].id).expect("usable"))
                .collect();
            let s_rows: Vec<usize> = chunk
                .iter()
                .map(|&(_, s)| bank.row(&style[s].id).expect("usable"))
                .collect();
            let conds = bank.gather(ConditionMode::Factors, &c_rows, &s_rows, dev);
            let cancel = ctx.cancel_flag().clone();
            let progress = |i: usize| -> Result<(), StageError> {
                if cancel.is_cancelled() {
                    return Err(StageError::Cancelled);
                }
                bar.set_position(done + i.min(p.steps) as u64);
                Ok(())
            };
            // The same starting noise for a pair in every cell: cells differ by the weights.
            let z = gen.sample(
                &Cond::of(ConditionMode::Factors, &conds),
                chunk.len(),
                &guidance,
                step_seed(p.seed, bi as u64),
                progress,
            )?;
            done += p.steps as u64;
            for (j, &(c, s)) in chunk.iter().enumerate() {
                let zj = z.narrow(0, j as i64, 1);
                let (ref_pred, ref_img) = &reference_seg[&c];
                // A UNETR segments the latent itself: the image is decoded only for an image
                // segmenter and for the montage's pair (decoding dominates the sweep's time).
                let image = if seg_latents.is_none() || start + j == 0 {
                    let image = decode_to_volume(&vae, &zj, 0, ref_img.affine)?;
                    if image.shape != ref_img.shape {
                        return Err(fail(format!(
                            "decoded samples have shape {:?}, the reference window {:?}",
                            image.shape, ref_img.shape
                        )));
                    }
                    image
                } else {
                    VolumeOf::from_parts(
                        vec![0.0; ref_img.data.len()],
                        ref_img.shape,
                        ref_img.affine,
                    )
                    .map_err(fail)?
                };
                let zc = zj
                    .squeeze_dim(0)
                    .to_kind(Kind::Float)
                    .to_device(Device::Cpu)
                    .contiguous();
                let lshape = [cfg.in_chans as usize, size[0], size[1], size[2]];
                let zdata = Arc::new(Vec::<f32>::try_from(zc.view([-1])).map_err(fail)?);
                let case = Case {
                    id: format!("pair_{}", start + j),
                    domain: String::new(),
                    classes: vec![0; ref_pred.len()],
                    latent: seg_latents.map(|_| (zdata.clone(), lshape)),
                    image,
                };
                let (pred, _) = segment_case(&net, &case, &sw, dev)?;
                let predicted = judge.predict(zdata, lshape, p.overlap, p.batch_size, dev)?;
                if start + j == 0 {
                    let axial =
                        orthogonal_slices(&case.image, &format!("w_c {wc} w_s {ws}"), 0.0, 1.0)
                            .swap_remove(0);
                    first_pair.push((wc, ws, axial));
                }
                rows.push(SweepRow {
                    content_weight: wc,
                    style_weight: ws,
                    pair: start + j,
                    content_subject: content[c].id.clone(),
                    style_subject: style[s].id.clone(),
                    style_domain_id: style[s].domain_id,
                    predicted_domain_id: predicted,
                    hit: predicted == style[s].domain_id,
                    dice: mean_class_dice(&pred, ref_pred, k),
                });
            }
        }
    }
    bar.finish_and_clear();
    let out = ctx.output_dir("report")?;
    let about = serde_json::json!({
        "method": ld.method, "sampler": gen.sampler, "steps": p.steps, "naming": p.naming,
        "pairs": pairs.len(), "latent_size": cfg.input_size, "references": p.references,
        "segmenter": super::segment::model_name(&seg_cfg),
        "style_classifier": judge.describe(),
    });
    let summary =
        write_report(&out, &rows, reference_dice, reference_hit_rate, &about).map_err(fail)?;
    // The first pair across the grid: its references, then one row per w_s.
    let (c0, s0) = pairs[0];
    let mut grid = vec![vec![orthogonal_slices(
        &reference_seg[&c0].1,
        &format!("content {}", content[c0].id),
        0.0,
        1.0,
    )
    .swap_remove(0)]];
    for &ws in &p.style_weights {
        grid.push(
            first_pair
                .iter()
                .filter(|(_, w, _)| *w == ws)
                .map(|(_, _, g)| g.clone())
                .collect(),
        );
    }
    montage(
        &out.join("montage.png"),
        &format!(
            "content {} + style {} (rows: w_s; columns: w_c)",
            content[c0].id, style[s0].id
        ),
        &grid,
        140,
    )
    .map_err(fail)?;
    for key in [
        "spearman_dice_content_weight",
        "spearman_hit_style_weight",
        "reference_dice_to_labels",
    ] {
        ctx.set_metric(key, summary[key].clone());
    }
    ctx.set_metric("samples", rows.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::meduet::Config as MeduetConfig;
    use tch::Tensor;

    #[test]
    fn meduet_judge_is_cls_s_on_pooled_style_tokens() {
        let cfg = MeduetConfig {
            crop: 8,
            n_domains: 3,
            ..MeduetConfig::tiny()
        };
        let vs = VarStore::new(Device::Cpu);
        let model = MeDuet::new(&vs.root(), &cfg).unwrap();
        assert!(model.has_domain_classifier());
        // A 12 x 8 x 8 latent: grid patches at x = 0 and x = 4 (stride 4).
        let c = cfg.in_chans as usize;
        let x = Tensor::randn([1, cfg.in_chans, 12, 8, 8], (Kind::Float, Device::Cpu));
        let data: Vec<f32> = Vec::try_from(x.view([-1])).unwrap();
        let _ng = tch::no_grad_guard();
        let patches = Tensor::cat(&[x.narrow(2, 0, 8), x.narrow(2, 4, 8)], 0);
        let want_style = model
            .encode_full(&patches)
            .style
            .mean_dim(1, false, Kind::Float)
            .mean_dim(0, false, Kind::Float);
        let (_, style, n) = pooled_factors(&model, &data, &[c, 12, 8, 8], 4, 1);
        assert_eq!(n, 2);
        assert!(style.allclose(&want_style, 1e-5, 1e-6, false));
        let logits = model.style_domain_logits(&want_style.unsqueeze(0)).unwrap();
        assert_eq!(logits.size(), [1, 3]);
        let domains = vec![5, 7, 9];
        let want = domains[logits.argmax(-1, false).int64_value(&[0]) as usize];
        let judge = StyleJudge::Meduet {
            _vs: vs,
            model,
            domains,
            stride: 4,
        };
        assert_eq!(judge.domains(), &[5, 7, 9]);
        let got = judge
            .predict(Arc::new(data), [c, 12, 8, 8], 0.5, 2, Device::Cpu)
            .unwrap();
        assert_eq!(got, want);
        // A latent with the wrong channel count is refused, naming both.
        let e = judge
            .predict(
                Arc::new(vec![0.0; 2 * 512]),
                [2, 8, 8, 8],
                0.5,
                2,
                Device::Cpu,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 channels"), "{e}");
    }

    #[test]
    fn style_probe_judge_names_the_domain_of_the_pooled_style() {
        let cfg = MeduetConfig {
            crop: 8,
            n_domains: 3,
            ..MeduetConfig::tiny()
        };
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let model = MeDuet::new(&vs.root(), &cfg).unwrap();
        let _ng = tch::no_grad_guard();
        // Four 8^3 latents for each of domains 2, 5, 7, the domain shifting the intensities.
        let c = cfg.in_chans as usize;
        let (mut subjects, mut latents, mut styles) = (vec![], vec![], vec![]);
        for (k, dom) in [2i64, 5, 7].iter().enumerate() {
            for i in 0..4 {
                let x =
                    Tensor::randn([c as i64, 8, 8, 8], (Kind::Float, Device::Cpu)) + 3.0 * k as f64;
                let data: Vec<f32> = Vec::try_from(x.view([-1])).unwrap();
                styles.push(pooled_factors(&model, &data, &[c, 8, 8, 8], 8, 1).1);
                subjects.push(format!("d{dom}_{i}"));
                latents.push((data, *dom));
            }
        }
        let bank = ConditionBank {
            mode: ConditionMode::Factors,
            subjects: subjects.clone(),
            tensors: vec![
                Tensor::zeros([12, 4], (Kind::Float, Device::Cpu)),
                Tensor::stack(&styles, 0),
            ],
            components: vec![],
        };
        let domain_of = |id: &str| {
            id[1..]
                .split('_')
                .next()
                .and_then(|d| d.parse::<i64>().ok())
        };
        let ds = model.config().style_out_dim();
        let (probe, mean, std, domains, cv) = fit_style_probe(&bank, ds, domain_of, 0).unwrap();
        assert_eq!(domains, vec![2, 5, 7]);
        assert_eq!((cv.samples, cv.classes), (12, 3));
        let judge = StyleJudge::StyleProbe {
            _vs: vs,
            model,
            stride: 8,
            probe,
            mean,
            std,
            domains,
            cv,
        };
        for (data, dom) in latents {
            let got = judge
                .predict(Arc::new(data), [c, 8, 8, 8], 0.5, 2, Device::Cpu)
                .unwrap();
            assert_eq!(got, dom);
        }
        assert_eq!(judge.describe()["classes"], serde_json::json!([2, 5, 7]));
        // A bank from another model's style width, and a bank of one domain, are refused.
        let e = fit_style_probe(&bank, ds + 1, domain_of, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("the MeDUET that made the factors"), "{e}");
        let e = fit_style_probe(&bank, ds, |id: &str| id.starts_with("d2").then_some(2), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 known domain"), "{e}");
    }
}
