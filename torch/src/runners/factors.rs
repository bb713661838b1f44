//! `extract_factors`: one content and one style vector per subject.
//!
//! As the authors' `create_training_factor.py`: the whole-volume latent is cut into
//! 24³ grid patches with overlap 0.25 (MONAI `GridPatchd`, replicate padding at the far
//! edges), each patch goes through `encode_full`, tokens are averaged per patch and the
//! patches averaged per subject.

use std::collections::BTreeMap;

use crate::models::meduet::{Config, MeDuet};
use meduet_engine::{StageContext, StageError};
use meduet_stages::data::array_store::read_array_f32;
use meduet_stages::kinds::pretrain::{ExtractFactors, ExtractFactorsParams, Weights};
use meduet_stages::kinds::vae::LATENT_ZARR;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::common::{device, fail, load_frozen, read_json};

/// Start offsets of grid patches of `patch` along an axis of length `n` with stride
/// `stride`, covering the whole axis (the last patch may run past the end: replicate
/// padding fills it).
pub fn grid_starts(n: usize, patch: usize, stride: usize) -> Vec<usize> {
    let mut v = vec![0];
    while v.last().unwrap() + patch < n {
        v.push(v.last().unwrap() + stride.max(1));
    }
    v
}

/// The stride of grid patches of `patch` overlapping by the fraction `overlap`.
pub fn grid_stride(patch: usize, overlap: f64) -> usize {
    ((patch as f64) * (1.0 - overlap)).round().max(1.0) as usize
}

/// Copies the patch at `origin` of a `[C, X, Y, Z]` array, clamping indices past the edges
/// (replicate padding).
pub fn replicate_patch(
    data: &[f32],
    shape: &[usize],
    origin: [usize; 3],
    patch: usize,
    out: &mut Vec<f32>,
) {
    let (c, nx, ny, nz) = (shape[0], shape[1], shape[2], shape[3]);
    for ch in 0..c {
        for i in 0..patch {
            let x = (origin[0] + i).min(nx - 1);
            for j in 0..patch {
                let y = (origin[1] + j).min(ny - 1);
                let row = ((ch * nx + x) * ny + y) * nz;
                for k in 0..patch {
                    out.push(data[row + (origin[2] + k).min(nz - 1)]);
                }
            }
        }
    }
}

/// One subject's content and style vectors: the `[C, X, Y, Z]` latent cut into grid patches
/// of the model's crop with `stride` (replicate padding at the far edges), `encode_full` on
/// batches of `batch_size` patches, tokens averaged per patch and patches averaged.
/// Returns `([D], [d_s], patches)` on the model's device.
pub fn pooled_factors(
    model: &MeDuet,
    data: &[f32],
    shape: &[usize],
    stride: usize,
    batch_size: usize,
) -> (Tensor, Tensor, usize) {
    let cfg = model.config();
    let dev = model.device();
    let patch = cfg.crop as usize;
    let (dc, ds) = (cfg.content_dim(), cfg.style_out_dim());
    let (a, b, c) = (
        grid_starts(shape[1], patch, stride),
        grid_starts(shape[2], patch, stride),
        grid_starts(shape[3], patch, stride),
    );
    let mut origins = Vec::with_capacity(a.len() * b.len() * c.len());
    for &x in &a {
        for &y in &b {
            for &z in &c {
                origins.push([x, y, z]);
            }
        }
    }
    let mut sum_c = Tensor::zeros([dc], (Kind::Float, dev));
    let mut sum_s = Tensor::zeros([ds], (Kind::Float, dev));
    for chunk in origins.chunks(batch_size.max(1)) {
        let mut buf = Vec::with_capacity(chunk.len() * shape[0] * patch * patch * patch);
        for o in chunk {
            replicate_patch(data, shape, *o, patch, &mut buf);
        }
        let x = Tensor::from_slice(&buf)
            .view([
                chunk.len() as i64,
                cfg.in_chans,
                cfg.crop,
                cfg.crop,
                cfg.crop,
            ])
            .to_device(dev);
        let f = model.encode_full(&x);
        sum_c += f
            .content
            .to_kind(Kind::Float)
            .mean_dim(1, false, Kind::Float)
            .sum_dim_intlist(0, false, Kind::Float);
        sum_s += f
            .style
            .to_kind(Kind::Float)
            .mean_dim(1, false, Kind::Float)
            .sum_dim_intlist(0, false, Kind::Float);
    }
    let n = origins.len();
    (sum_c / n as f64, sum_s / n as f64, n)
}

/// Loads a pretrained MeDUET (student or teacher weights) from a `meduet` artifact folder.
pub fn load_meduet(
    dir: &std::path::Path,
    weights: Weights,
    dev: tch::Device,
) -> Result<(VarStore, MeDuet, serde_json::Value), StageError> {
    let cfg_json: serde_json::Value = read_json(&dir.join("config.json"))?;
    let cfg: Config = serde_json::from_value(cfg_json["model"].clone()).map_err(|e| {
        StageError::input(format!(
            "'{}': model config: {e}",
            dir.join("config.json").display()
        ))
    })?;
    let mut vs = VarStore::new(dev);
    let model = MeDuet::new(&vs.root(), &cfg).map_err(fail)?;
    let file = match weights {
        Weights::Student => "student.safetensors",
        Weights::Teacher => "teacher.safetensors",
    };
    load_frozen(&mut vs, &dir.join(file))?;
    Ok((vs, model, cfg_json))
}

pub fn run(
    _: &ExtractFactors,
    p: &ExtractFactorsParams,
    ctx: &mut StageContext,
) -> Result<(), StageError> {
    let dev = device(ctx);
    let model_dir = ctx.input("model")?.dir.clone();
    let (_vs, model, _) = load_meduet(&model_dir, p.weights, dev)?;
    let cfg = model.config().clone();
    let stride = grid_stride(cfg.crop as usize, p.overlap);
    let items = ctx.input("latents")?.items.clone();
    let (dc, ds) = (cfg.content_dim(), cfg.style_out_dim());
    let mut content = Vec::with_capacity(items.len() * dc as usize);
    let mut style = Vec::with_capacity(items.len() * ds as usize);
    let mut domain_ids = Vec::with_capacity(items.len());
    let bar = ctx.progress(items.len() as u64, "subjects");
    let _ng = tch::no_grad_guard();
    let mut patches_total = 0usize;
    for it in &items {
        ctx.check_cancelled()?;
        let (data, shape, _) =
            read_array_f32(&it.dir.join(LATENT_ZARR)).map_err(StageError::input)?;
        if shape.len() != 4 || shape[0] as i64 != cfg.in_chans {
            return Err(StageError::input(format!(
                "latent of '{}' has shape {shape:?}, the model expects [{}, X, Y, Z]",
                it.id, cfg.in_chans
            )));
        }
        let (c, s, n) = pooled_factors(&model, &data, &shape, stride, p.batch_size);
        patches_total += n;
        content.extend(Vec::<f32>::try_from(c.to_device(tch::Device::Cpu)).map_err(fail)?);
        style.extend(Vec::<f32>::try_from(s.to_device(tch::Device::Cpu)).map_err(fail)?);
        domain_ids.push(it.attr_i64("domain_id").unwrap_or(-1));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let n = items.len() as i64;
    let out = ctx.output_dir("factors")?;
    let ct = Tensor::from_slice(&content).view([n, dc]);
    let st = Tensor::from_slice(&style).view([n, ds]);
    let dt = Tensor::from_slice(&domain_ids);
    Tensor::write_safetensors(
        &[("content", ct), ("style", st), ("domain_id", dt)],
        out.join("factors.safetensors"),
    )
    .map_err(fail)?;
    // Subjects: ids, domains and every scalar attribute, as CSV and JSON.
    let mut keys: Vec<String> = items
        .iter()
        .flat_map(|i| {
            i.attrs
                .iter()
                .filter(|(_, v)| v.is_number() || v.is_string() || v.is_boolean())
                .map(|(k, _)| k.clone())
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys.retain(|k| k != "domain" && k != "domain_id");
    let cell = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => csv_escape(s),
        Some(v) if !v.is_null() => v.to_string(),
        _ => String::new(),
    };
    let mut subjects = format!(
        "row,subject,domain,domain_id{}\n",
        keys.iter()
            .map(|k| format!(",{}", csv_escape(k)))
            .collect::<String>()
    );
    let mut table = format!(
        "subject,domain_id{}{}\n",
        (0..dc).map(|i| format!(",c{i}")).collect::<String>(),
        (0..ds).map(|i| format!(",s{i}")).collect::<String>()
    );
    let mut json_rows = Vec::new();
    for (r, it) in items.iter().enumerate() {
        subjects.push_str(&format!(
            "{r},{},{},{}{}\n",
            csv_escape(&it.id),
            csv_escape(it.attr_str("domain").unwrap_or("")),
            domain_ids[r],
            keys.iter()
                .map(|k| format!(",{}", cell(it.attrs.get(k))))
                .collect::<String>()
        ));
        let c = &content[r * dc as usize..(r + 1) * dc as usize];
        let s = &style[r * ds as usize..(r + 1) * ds as usize];
        table.push_str(&format!(
            "{},{}{}{}\n",
            csv_escape(&it.id),
            domain_ids[r],
            c.iter().map(|v| format!(",{v}")).collect::<String>(),
            s.iter().map(|v| format!(",{v}")).collect::<String>()
        ));
        let attrs: BTreeMap<_, _> = it.attrs.clone().into_iter().collect();
        json_rows.push(serde_json::json!({ "row": r, "subject": it.id, "attrs": attrs }));
    }
    std::fs::write(out.join("subjects.csv"), subjects).map_err(|e| StageError::io(&out, e))?;
    std::fs::write(out.join("factors.csv"), table).map_err(|e| StageError::io(&out, e))?;
    super::common::write_json(&out.join("subjects.json"), &json_rows)?;
    ctx.set_metric("subjects", n);
    ctx.set_metric("patches", patches_total);
    ctx.set_metric("content_dim", dc);
    ctx.set_metric("style_dim", ds);
    Ok(())
}

fn csv_escape(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_the_axis_like_monai_grid_patch() {
        assert_eq!(grid_starts(24, 24, 18), vec![0]);
        assert_eq!(grid_starts(20, 24, 18), vec![0]);
        assert_eq!(grid_starts(42, 24, 18), vec![0, 18]);
        assert_eq!(grid_starts(43, 24, 18), vec![0, 18, 36]);
    }

    #[test]
    fn replicate_padding_repeats_the_edge() {
        let shape = [1, 2, 1, 1];
        let data = [1.0, 2.0];
        let mut out = Vec::new();
        replicate_patch(&data, &shape, [1, 0, 0], 2, &mut out);
        assert_eq!(out, vec![2.0; 8]);
    }
}
