//! The Slurm executor against a real Slurm cluster (`scripts/slurm-local start` sets up
//! a single-node one; `scripts/test` and `.ci/run` start it before and stop it after).
//!
//! Run alone with `cargo test --release -p meduet --test slurm`. Every test skips, with
//! a loud message, only when `sbatch` is not on PATH; with `sbatch` present and no
//! cluster answering, they fail.
//!
//! Caches live under Cargo's target tmp folder. meduet refuses a cache in a local
//! temporary folder under Slurm (the nodes of a cluster could not see it) unless every
//! node of the cluster is this machine, as the local one's is: so the tests pass from a
//! clone under /tmp too, and two tests check both sides of the rule.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pipelines::{text_stage, two_branches};
use common::{read_json, succeeded_runs, text, Project};

fn sbatch_available() -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("sbatch").is_file()))
        .unwrap_or(false);
    if !found {
        eprintln!(
            "\n==================================================================\n\
             SKIPPED: sbatch is not on PATH, so the Slurm executor tests cannot run.\n\
             Start a local cluster with `scripts/slurm-local start` (as root).\n\
             ==================================================================\n"
        );
    }
    found
}

macro_rules! require_slurm {
    () => {
        if !sbatch_available() {
            return;
        }
    };
}

/// `meduet` without colours in its logs (the tests read their columns).
fn meduet() -> Command {
    let mut c = common::meduet();
    c.env("NO_COLOR", "1");
    c
}

fn run_ok(args: &[&str]) -> Output {
    common::output_ok(meduet(), args)
}

fn spawn(args: &[&str]) -> Child {
    meduet()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A pipeline folder on a filesystem the (local) cluster sees: Cargo's target tmp.
fn project() -> Project {
    Project::in_target_tmp("slurm-")
}

/// The latest job ids the ledger records for a stage.
fn stage_jobs(pr: &Project, pipeline: &str, stage: &str) -> Option<Vec<String>> {
    let p = pr
        .cache()
        .join("slurm/stages")
        .join(pipeline)
        .join(format!("{stage}.json"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    Some(
        v["jobs"]
            .as_array()?
            .iter()
            .map(|j| j.as_str().unwrap().to_string())
            .collect(),
    )
}

/// A fast poll for tests (the default, 5 s, is what clusters want).
const FAST: &str = "[executor.slurm]\npoll_interval = 0.3\n";

/// Lines "▶ STAGE ... submitted as job N" of a driver's output: stage -> count.
fn submissions(out: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in out.lines() {
        if let Some(rest) = l.split("▶ ").nth(1) {
            if rest.contains("submitted as job") {
                let stage = rest.split_whitespace().next().unwrap().to_string();
                *m.entry(stage).or_default() += 1;
            }
        }
    }
    m
}

/// Every file under `objects/*/out/` and every manifest's outputs, by path.
fn object_contents(cache: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    let objects = cache.join("objects");
    for e in walk(&objects) {
        let rel = e
            .strip_prefix(&objects)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel.contains("/out/") {
            m.insert(rel, std::fs::read(&e).unwrap());
        } else if rel.ends_with("/manifest.json") {
            let v = read_json(&e);
            m.insert(rel, serde_json::to_vec(&v["outputs"]).unwrap());
        }
    }
    m
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn squeue_state(job: &str) -> String {
    let o = Command::new("squeue")
        .args(["--states=all", "-h", "-o", "%T", "-j", job])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `scontrol -o show job` field of a job (StartTime, EndTime, JobState...).
fn job_field(job: &str, field: &str) -> String {
    let o = Command::new("scontrol")
        .args(["-o", "show", "job", job])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&o.stdout).into_owned();
    t.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{field}=")).map(str::to_string))
        .unwrap_or_else(|| panic!("no {field} for job {job}: {t}"))
}

/// Waits until `f` holds (or fails the test after `secs`).
fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out after {secs}s waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The job running `stage` once Slurm says it is RUNNING.
fn running_job(pr: &Project, pipeline: &str, stage: &str) -> String {
    let mut job = String::new();
    wait_until(60, &format!("stage {stage} runs"), || {
        match stage_jobs(pr, pipeline, stage).and_then(|j| j.last().cloned()) {
            Some(j) if squeue_state(&j) == "RUNNING" => {
                job = j;
                true
            }
            _ => false,
        }
    });
    job
}

#[test]
fn pipeline_under_slurm_is_byte_identical_to_local_and_a_rerun_submits_nothing() {
    require_slurm!();
    let pr = project();
    let body = r#"
[stages.phantom]
kind = "phantom"
domains = 2
subjects_per_domain = 2
shape = [24, 24, 20]
spacing = [3.0, 3.0, 3.0]
seed = 3
[stages.ingest]
kind = "ingest"
inputs = { datasets = "phantom.datasets" }
[stages.resample]
kind = "resample"
inputs = { subjects = "ingest.subjects" }
spacing = [3.0, 3.0, 3.0]
min_size = [16, 16, 16]
resources = { threads = 1 }
[stages.notes]
kind = "text"
text = "alpha\nbeta\ngamma"
[stages.split]
kind = "split_lines"
inputs = { text = "notes.text" }
[stages.shout]
kind = "map_lines"
inputs = { lines = "split.lines" }
op = "upper"
"#;
    let p = pr.write("p.toml", &format!("{FAST}{body}"));
    let out = run_ok(&["run", &p, "--executor", "slurm"]);
    let t = text(&out);
    assert!(
        t.contains("resample                 resample submitted as job array")
            && t.contains("(4 item(s), 0 cached)"),
        "resample's subjects are one job array: {t}"
    );
    assert!(
        t.contains("shout                    map_lines submitted as job array"),
        "{t}"
    );
    assert_eq!(
        submissions(&t).values().sum::<usize>(),
        6,
        "one submission per stage: {t}"
    );
    assert!(
        t.contains("done in") && t.contains("6 stage(s) computed"),
        "{t}"
    );
    // Logs in each object's log folder.
    let logs = walk(&pr.cache().join("logs"));
    assert!(
        logs.iter()
            .filter(|l| l
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("slurm-"))
            .count()
            >= 6 + 4 + 3 - 2,
        "{logs:?}"
    );

    // The local executor computes the very same objects, byte for byte.
    let local_cache = pr.path("local-cache");
    run_ok(&[
        "run",
        &p,
        "--executor",
        "local",
        "--cache",
        local_cache.to_str().unwrap(),
    ]);
    let (a, b) = (object_contents(&pr.cache()), object_contents(&local_cache));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same objects (keys) and files"
    );
    for (k, v) in &a {
        assert!(
            v == &b[k],
            "{k} differs between the Slurm and the local executor"
        );
    }

    // Everything is cached: a second run submits no job.
    let again = run_ok(&["run", &p, "--executor", "slurm"]);
    let t = text(&again);
    assert!(t.contains("slurm: 0 job(s) submitted"), "{t}");
    assert!(t.contains("0 stage(s) computed, 6 cached"), "{t}");
}

#[test]
fn killed_job_is_resubmitted_and_resumes() {
    require_slurm!();
    let pr = project();
    let p = pr.write(
        "p.toml",
        &format!("{FAST}[stages.slow]\nkind = \"wait\"\nsteps = 8\nstep_ms = 500\n"),
    );
    let driver = spawn(&["run", &p, "--executor", "slurm"]);
    let job = running_job(&pr, "p", "slow");
    // Let it checkpoint a few steps, then kill the job behind meduet's back.
    wait_until(30, "the wait stage checkpoints", || {
        walk(&pr.cache().join("scratch"))
            .iter()
            .any(|f| f.ends_with("wait.step"))
    });
    let st = Command::new("scancel").arg(&job).status().unwrap();
    assert!(st.success());
    let out = driver.wait_with_output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&format!("job {job} of 'slow' was cancelled"))
            && t.contains("resubmitting (attempt 2 of 3)"),
        "{t}"
    );
    let jobs = stage_jobs(&pr, "p", "slow").unwrap();
    assert_eq!(
        jobs.len(),
        2,
        "two jobs: the killed one and its resubmission"
    );
    assert_eq!(squeue_state(&jobs[0]), "CANCELLED");
    // The resubmitted job resumed from the checkpoint of the killed one.
    let rec = walk(&pr.cache().join("objects"))
        .into_iter()
        .find(|f| f.ends_with("metrics.json"))
        .unwrap();
    let m = read_json(rec);
    assert!(m["resumed_at"].as_u64().unwrap() > 0, "{m}");
}

#[test]
fn timed_out_job_is_resubmitted_and_finishes() {
    require_slurm!();
    let pr = project();
    // Slurm's smallest limit is one minute, enforced within 30 s after it: 95 steps of
    // one second outlive the first job; the second resumes from the checkpoint.
    let p = pr.write(
        "p.toml",
        &format!(
            "{FAST}[stages.long]\nkind = \"wait\"\nsteps = 95\nstep_ms = 1000\nexecutor = {{ slurm = {{ time = \"1\" }} }}\n"
        ),
    );
    let out = meduet()
        .args(["run", &p, "--executor", "slurm"])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("hit its time limit (TIMEOUT); resubmitting (attempt 2 of 3)"),
        "{t}"
    );
    let jobs = stage_jobs(&pr, "p", "long").unwrap();
    assert_eq!(job_field(&jobs[0], "JobState"), "TIMEOUT");
    assert_eq!(job_field(&jobs[0], "TimeLimit"), "00:01:00");
    assert_eq!(job_field(&jobs[1], "JobState"), "COMPLETED");
}

#[test]
fn deterministic_failure_reports_the_log_tail_and_never_submits_dependents() {
    require_slurm!();
    let pr = project();
    let p = pr.write(
        "p.toml",
        &format!(
            r#"{FAST}
[stages.a]
kind = "text"
text = "input"
[stages.f]
kind = "fail"
inputs = {{ after = "a.text" }}
message = "the GPU caught fire"
[stages.g]
kind = "transform"
inputs = {{ text = "f.text" }}
[stages.h]
kind = "transform"
inputs = {{ text = "g.text" }}
"#
        ),
    );
    let out = meduet()
        .args(["run", &p, "--executor", "slurm"])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("stage 'f' failed: job "), "{t}");
    assert!(t.contains("exited with status 1"), "{t}");
    assert!(
        t.contains("last lines of") && t.contains("slurm-") && t.contains("the GPU caught fire"),
        "the log tail names the error: {t}"
    );
    assert!(
        !t.contains("resubmitting"),
        "a deterministic failure is not retried: {t}"
    );
    assert_eq!(
        submissions(&t),
        BTreeMap::from([("a".to_string(), 1), ("f".to_string(), 1)]),
        "{t}"
    );
    assert!(
        t.contains("g                        not submitted: upstream stage 'f' did not complete"),
        "{t}"
    );
    assert!(stage_jobs(&pr, "p", "g").is_none() && stage_jobs(&pr, "p", "h").is_none());
}

#[test]
fn two_concurrent_drivers_submit_each_stage_once() {
    require_slurm!();
    let pr = project();
    let p = pr.write("p.toml", &format!("{FAST}{}", two_branches(1500)));
    let (c1, c2) = (
        spawn(&["run", &p, "--executor", "slurm"]),
        spawn(&["run", &p, "--executor", "slurm"]),
    );
    let (o1, o2) = (
        c1.wait_with_output().unwrap(),
        c2.wait_with_output().unwrap(),
    );
    assert!(o1.status.success(), "{}", text(&o1));
    assert!(o2.status.success(), "{}", text(&o2));
    let mut all = submissions(&text(&o1));
    for (k, v) in submissions(&text(&o2)) {
        *all.entry(k).or_default() += v;
    }
    assert_eq!(
        all,
        BTreeMap::from(["a", "b", "join", "split", "up"].map(|s| (s.to_string(), 1usize))),
        "each stage submitted once in all:\n{}\n{}",
        text(&o1),
        text(&o2)
    );
    assert_eq!(
        succeeded_runs(&pr.cache()),
        [
            "a",
            "b",
            "join",
            "split",
            "up",
            "up[line0000]",
            "up[line0001]",
            "up[line0002]"
        ],
        "each stage and item computed exactly once"
    );
}

#[test]
fn gpu_stage_asks_sbatch_for_a_gpu_and_a_refusal_is_reported() {
    require_slurm!();
    let pr = project();
    let p = pr.write(
        "p.toml",
        &format!(
            "{FAST}[stages.train]\nkind = \"text\"\ntext = \"weights\"\nresources = {{ device = \"cuda\" }}\n"
        ),
    );
    let out = meduet()
        .args(["run", &p, "--executor", "slurm"])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("Slurm refused the job of stage 'train'"), "{t}");
    assert!(
        t.contains("--gres=gpu:1"),
        "the GPU request reached sbatch: {t}"
    );
    assert!(
        t.contains("Invalid generic resource"),
        "sbatch's own reason: {t}"
    );
    assert!(
        t.contains("asks for 1 GPU(s)") && t.contains("gpu_request"),
        "{t}"
    );

    // The request form is configurable.
    let p2 = pr.write(
        "p2.toml",
        "[executor.slurm]\npoll_interval = 0.3\ngpu_request = \"--gpus-per-node={n}\"\n[stages.train]\nkind = \"text\"\ntext = \"w\"\nexecutor = { slurm = { gpus = 2 } }\n",
    );
    let out = meduet()
        .args(["run", &p2, "--executor", "slurm"])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("--gpus-per-node=2"), "{t}");
}

#[test]
fn detached_chain_runs_in_order_then_status_reports_everything_cached() {
    require_slurm!();
    let pr = project();
    let p = pr.write(
        "p.toml",
        &format!(
            r#"{FAST}
[stages.a]
kind = "text"
text = "one\ntwo\nthree"
[stages.split]
kind = "split_lines"
inputs = {{ text = "a.text" }}
[stages.up]
kind = "map_lines"
inputs = {{ lines = "split.lines" }}
op = "upper"
[stages.join]
kind = "join_lines"
inputs = {{ lines = "up.lines" }}
[stages.shout]
kind = "transform"
inputs = {{ text = "join.text" }}
op = "lower"
"#
        ),
    );
    // With `split` cached, `up` has known items: a job array plus its cohort job; `join`
    // and `shout` are planned by their jobs when they start.
    run_ok(&["run", &p, "--only", "split"]);
    let out = run_ok(&["run", &p, "--executor", "slurm", "--detach"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let jobs: BTreeMap<String, Vec<String>> = stdout
        .lines()
        .map(|l| {
            let mut f = l.split('\t');
            (
                f.next().unwrap().to_string(),
                f.next().unwrap().split(',').map(str::to_string).collect(),
            )
        })
        .collect();
    assert_eq!(
        jobs.keys().map(String::as_str).collect::<Vec<_>>(),
        ["join", "shout", "up"],
        "{}",
        text(&out)
    );
    assert_eq!(jobs["up"].len(), 2, "an array and its cohort job");
    // Dependencies as submitted.
    let dep = |j: &str| job_field(j, "Dependency");
    assert!(dep(&jobs["up"][1]).contains(&format!("afterok:{}", jobs["up"][0])));
    assert!(dep(&jobs["join"][0]).contains(&format!("afterok:{}", jobs["up"][1])));
    assert!(dep(&jobs["shout"][0]).contains(&format!("afterok:{}", jobs["join"][0])));
    // While they run, status names the jobs.
    let st = String::from_utf8_lossy(&run_ok(&["status", &p]).stdout).into_owned();
    assert!(st.contains("slurm job"), "{st}");
    wait_until(90, "every stage is cached", || {
        let st = String::from_utf8_lossy(&run_ok(&["status", &p]).stdout).into_owned();
        st.lines().skip(1).all(|l| l.contains(" cached "))
    });
    // In order: each job started after the one it depends on ended.
    let t = |j: &str, f: &str| job_field(j, f);
    for (before, after) in [
        (&jobs["up"][0], &jobs["up"][1]),
        (&jobs["up"][1], &jobs["join"][0]),
        (&jobs["join"][0], &jobs["shout"][0]),
    ] {
        assert_eq!(t(after, "JobState"), "COMPLETED");
        assert!(
            t(after, "StartTime") >= t(before, "EndTime"),
            "job {after} started before job {before} ended"
        );
    }
    let st = String::from_utf8_lossy(&run_ok(&["status", &p]).stdout).into_owned();
    assert_eq!(
        st.lines().filter(|l| l.contains(" cached ")).count(),
        5,
        "{st}"
    );
    // A later run finds everything in the cache.
    let again = run_ok(&["run", &p, "--executor", "slurm"]);
    assert!(
        text(&again).contains("slurm: 0 job(s) submitted"),
        "{}",
        text(&again)
    );
}

#[test]
fn status_shows_running_jobs_and_cancel_scancels_them() {
    require_slurm!();
    let pr = project();
    let p = pr.write(
        "p.toml",
        &format!("{FAST}[stages.slow]\nkind = \"wait\"\nsteps = 60\nstep_ms = 500\n"),
    );
    let driver = spawn(&["run", &p, "--executor", "slurm"]);
    let job = running_job(&pr, "p", "slow");
    let st = String::from_utf8_lossy(&run_ok(&["status", &p]).stdout).into_owned();
    let line = st
        .lines()
        .find(|l| l.starts_with("slow "))
        .unwrap()
        .to_string();
    assert!(
        line.contains("running") && line.contains(&format!("slurm job {job} RUNNING")),
        "{st}"
    );
    let c = run_ok(&["cancel", &p]);
    assert!(
        text(&c).contains(&format!("cancelled 1 Slurm job(s) of pipeline 'p': {job}")),
        "{}",
        text(&c)
    );
    let out = driver.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    wait_until(20, "the job is cancelled", || {
        squeue_state(&job) == "CANCELLED"
    });
    assert_eq!(
        stage_jobs(&pr, "p", "slow").unwrap().len(),
        1,
        "not resubmitted"
    );
    assert!(
        std::fs::read_dir(pr.cache().join("objects"))
            .unwrap()
            .next()
            .is_none(),
        "nothing committed"
    );
}

#[test]
fn ctrl_c_scancels_what_the_run_submitted() {
    require_slurm!();
    let pr = project();
    let p = pr.write(
        "p.toml",
        &format!("{FAST}[stages.slow]\nkind = \"wait\"\nsteps = 60\nstep_ms = 500\n"),
    );
    let driver = spawn(&["run", &p, "--executor", "slurm"]);
    let job = running_job(&pr, "p", "slow");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(driver.id() as i32, libc::SIGINT) };
    let out = driver.wait_with_output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(130), "{t}");
    assert!(t.contains(&format!("cancelling Slurm job(s) {job}")), "{t}");
    wait_until(20, "the job is cancelled", || {
        squeue_state(&job) == "CANCELLED"
    });
}

#[test]
fn a_cache_in_a_temporary_folder_is_used_when_every_node_is_this_machine() {
    require_slurm!();
    let d = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let p = d.path().join("p.toml");
    std::fs::write(&p, text_stage("x")).unwrap();
    let out = run_ok(&["run", p.to_str().unwrap(), "--executor", "slurm"]);
    let t = text(&out);
    assert!(
        t.contains("is in the local temporary folder")
            && t.contains("every node of the cluster (localhost) is this machine"),
        "{t}"
    );
    assert!(d.path().join(".meduet/slurm").exists(), "submitted");
}

#[test]
fn a_cache_in_a_temporary_folder_is_refused_on_a_multi_node_cluster() {
    require_slurm!();
    let d = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    // A cluster of two other machines, as `scontrol` would list it.
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fake = bin.join("scontrol");
    std::fs::write(
        &fake,
        "#!/bin/sh\n[ \"$*\" = \"-o show nodes\" ] || exit 1\n\
         echo 'NodeName=gpu01 NodeAddr=192.0.2.11 State=IDLE'\n\
         echo 'NodeName=gpu02 NodeAddr=192.0.2.12 State=IDLE'\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let p = d.path().join("p.toml");
    std::fs::write(&p, text_stage("x")).unwrap();
    let out = meduet()
        .env("PATH", path)
        .args(["run", p.to_str().unwrap(), "--executor", "slurm"])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("is in the local temporary folder")
            && t.contains("not all this machine: gpu01 (192.0.2.11), gpu02 (192.0.2.12)")
            && t.contains("every node mounts"),
        "{t}"
    );
    assert!(
        !d.path().join(".meduet/slurm").exists(),
        "nothing submitted"
    );
}
