//! Benchmarks of the data path (driven by `scripts/bench_resample.py`, which also times
//! SimpleITK and scipy on the same volume and writes the comparison).
//!
//! ```text
//! bench_resample resample INPUT.nii [--threads N] [--repeats R] [--spacing S] [--out OUT.nii]
//!     reads INPUT, then times reorientation to RAS + trilinear resampling to S mm (one pass)
//!     (default 1.5) with N threads (default 2); prints one JSON line.
//! bench_resample phantom [--threads N] [--domains D] [--subjects S] [--keep DIR]
//!     times generating D x S phantom cases (render + write NIfTI).
//! bench_resample pipeline [--threads N] [--domains D] [--subjects S]
//!     runs phantom -> ingest -> resample through the engine in a temporary project and
//!     reports each stage's wall time and the subjects per minute of ingest + resample.
//! ```

use std::path::PathBuf;
use std::time::Instant;

use meduet_stages::data::nifti_io::{read_nifti, write_nifti, NiftiDtype};
use meduet_stages::data::resample::{ras_grid, resample_linear};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("bad value for {name}: {v}"))
        })
        .unwrap_or(default)
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn bench_resample(args: &[String]) {
    let input = PathBuf::from(args.get(2).expect("an input NIfTI file"));
    let threads: usize = arg(args, "--threads", 2);
    let repeats: usize = arg(args, "--repeats", 3);
    let spacing: f64 = arg(args, "--spacing", 1.5);
    let out: String = arg(args, "--out", String::new());
    let pool = pool(threads);
    pool.install(|| {
        let t0 = Instant::now();
        let (vol, info) = read_nifti(&input).unwrap_or_else(|e| panic!("{e}"));
        let read_s = t0.elapsed().as_secs_f64();
        let mut times = Vec::new();
        let mut result = None;
        for _ in 0..repeats {
            let t = Instant::now();
            // Reorientation to RAS and resampling in one pass (as the resample stage does).
            let r = resample_linear(&vol, &ras_grid(vol.shape, &vol.affine, [spacing; 3]));
            times.push(t.elapsed().as_secs_f64());
            result = Some(r);
        }
        let r = result.expect("at least one repeat");
        if !out.is_empty() {
            write_nifti(std::path::Path::new(&out), &r, NiftiDtype::Float32).unwrap();
        }
        times.sort_by(f64::total_cmp);
        let json = serde_json::json!({
            "threads": threads,
            "input_shape": vol.shape,
            "input_datatype": info.datatype,
            "input_orientation": info.orientation,
            "output_shape": r.shape,
            "read_seconds": read_s,
            "resample_seconds_min": times[0],
            "resample_seconds_median": times[times.len() / 2],
            "repeats": repeats,
        });
        println!("{json}");
    });
}

fn bench_phantom(args: &[String]) {
    use meduet_stages::data::phantom::sample_anatomy;
    use meduet_stages::data::phantom_render::render_case;
    use meduet_stages::kinds::phantom::{case_name, PhantomParams};
    use rayon::prelude::*;
    let threads: usize = arg(args, "--threads", 2);
    let domains: usize = arg(args, "--domains", 4);
    let subjects: usize = arg(args, "--subjects", 8);
    let keep: String = arg(args, "--keep", String::new());
    let dir = tempfile::tempdir().unwrap();
    let root = if keep.is_empty() {
        dir.path().to_path_buf()
    } else {
        PathBuf::from(keep)
    };
    let params = PhantomParams {
        domains: meduet_stages::kinds::phantom::Domains::Count(domains),
        subjects_per_domain: subjects,
        ..Default::default()
    };
    let styles = params.styles().unwrap();
    let voxels: usize = styles
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum::<usize>()
        * subjects;
    let t0 = Instant::now();
    pool(threads).install(|| {
        (0..domains * subjects).into_par_iter().for_each(|job| {
            let (d, s) = (job / subjects, job % subjects);
            let seed = params.content_seed(d, s);
            let anatomy = sample_anatomy(seed, 1.0, 0.5);
            let (img, lab, _) =
                render_case(&anatomy, seed, &styles[d], params.style_seed(d, s)).unwrap();
            let base = root.join(&styles[d].name);
            write_nifti(
                &base.join(format!("imagesTr/{}.nii.gz", case_name(s))),
                &img,
                styles[d].dtype,
            )
            .unwrap();
            meduet_stages::data::nifti_io::write_nifti_labels(
                &base.join(format!("labelsTr/{}.nii.gz", case_name(s))),
                &lab,
            )
            .unwrap();
        });
    });
    let secs = t0.elapsed().as_secs_f64();
    let cases = domains * subjects;
    println!(
        "{}",
        serde_json::json!({
            "threads": threads, "cases": cases, "seconds": secs,
            "cases_per_minute": cases as f64 / secs * 60.0,
            "mean_voxels_per_case": voxels / cases,
        })
    );
}

fn bench_pipeline(args: &[String]) {
    let threads: usize = arg(args, "--threads", 2);
    let domains: usize = arg(args, "--domains", 4);
    let subjects: usize = arg(args, "--subjects", 8);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pipeline.toml");
    let toml = format!(
        "name = \"bench\"\n[stages.phantom]\nkind = \"phantom\"\ndomains = {domains}\nsubjects_per_domain = {subjects}\n\
         [stages.ingest]\nkind = \"ingest\"\ninputs = {{ datasets = \"phantom.datasets\" }}\n\
         [stages.resample]\nkind = \"resample\"\ninputs = {{ subjects = \"ingest.subjects\" }}\n"
    );
    std::fs::write(&file, toml).unwrap();
    let p = meduet_engine::Pipeline::load(&file, &meduet_stages::registry()).unwrap();
    let store = meduet_cache::Store::open(&p.cache_dir).unwrap();
    let opts = meduet_engine::RunOptions {
        threads,
        ..Default::default()
    };
    let t0 = Instant::now();
    let summary = meduet_engine::run(&p, &meduet_engine::ExecEnv::new(store), &opts).unwrap();
    let total = t0.elapsed().as_secs_f64();
    let mut stages = serde_json::Map::new();
    for (name, outcome) in &summary.stages {
        if let meduet_engine::Outcome::Computed { wall_seconds, .. } = outcome {
            stages.insert(name.clone(), serde_json::json!(wall_seconds));
        } else {
            panic!("stage {name}: {outcome:?}");
        }
    }
    let n = (domains * subjects) as f64;
    let ir = stages["ingest"].as_f64().unwrap() + stages["resample"].as_f64().unwrap();
    println!(
        "{}",
        serde_json::json!({
            "threads": threads, "subjects": n, "total_seconds": total, "stage_seconds": stages,
            "phantom_cases_per_minute": n / stages["phantom"].as_f64().unwrap() * 60.0,
            "ingest_resample_subjects_per_minute": n / ir * 60.0,
        })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("resample") => bench_resample(&args),
        Some("phantom") => bench_phantom(&args),
        Some("pipeline") => bench_pipeline(&args),
        _ => {
            eprintln!(
                "usage: bench_resample resample INPUT.nii | phantom | pipeline [--threads N]"
            );
            std::process::exit(2);
        }
    }
}
