//! The `meduet` binary end to end, on the engine's utility kinds (fast: no tensors).
//! Crash safety, concurrent runs, corruption, exec-stage, exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn meduet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meduet"));
    c.env_remove("MEDUET_CACHE").env("MEDUET_LOG", "info");
    c
}

fn run_ok(args: &[&str]) -> Output {
    let out = meduet().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "meduet {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn write(&self, rel: &str, t: &str) -> String {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, t).unwrap();
        p.to_string_lossy().into_owned()
    }
    fn cache(&self) -> PathBuf {
        self.path(".meduet")
    }
    fn objects(&self) -> usize {
        std::fs::read_dir(self.cache().join("objects"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Successful run records per (stage, item).
fn succeeded_runs(cache: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(cache.join("runs")).unwrap() {
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap();
        if r["status"] == "succeeded" {
            v.push(format!(
                "{}{}",
                r["stage"].as_str().unwrap(),
                r["item"]
                    .as_str()
                    .map(|i| format!("[{i}]"))
                    .unwrap_or_default()
            ));
        }
    }
    v.sort();
    v
}

#[test]
fn sigkill_mid_write_leaves_no_object_and_the_rerun_recomputes() {
    let pr = Project::new();
    let p = pr.write(
        "p.toml",
        "[stages.slow]\nkind = \"text\"\ntext = \"0123456789\"\ndelay_ms = 20000\n",
    );
    let mut child = meduet()
        .args(["run", &p])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the stage has written half of its output into its temporary folder.
    let t0 = Instant::now();
    loop {
        let tmp_has_file = std::fs::read_dir(pr.cache().join("tmp"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.path().join("out/text/text.txt").exists())
            })
            .unwrap_or(false);
        if tmp_has_file {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the stage never started writing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: sending SIGKILL to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    assert_eq!(pr.objects(), 0, "a killed stage leaves no object");
    // The lease of the dead process is broken automatically by the next run.
    let plan = run_ok(&["plan", &p]);
    assert!(text(&plan).contains("will run"), "{}", text(&plan));
    // Run it again (same key): the new run breaks the stale lease and restarts the stage;
    // then Ctrl-C it, which must also commit nothing and release the lease.
    let again = meduet()
        .args(["run", &pr.path("p.toml").to_string_lossy()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let lease_dir = pr.cache().join("leases");
    let leases: Vec<_> = std::fs::read_dir(&lease_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .collect();
    assert_eq!(leases.len(), 1, "the new run holds the lease");
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(leases[0].path()).unwrap()).unwrap();
    assert_eq!(
        info["pid"].as_u64().unwrap() as u32,
        again.id(),
        "the stale lease of the killed run was broken"
    );
    unsafe { libc::kill(again.id() as i32, libc::SIGINT) };
    let out = again.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "Ctrl-C exits 130: {}",
        text(&out)
    );
    assert_eq!(pr.objects(), 0, "a cancelled stage commits nothing");
    assert!(
        std::fs::read_dir(&lease_dir).unwrap().next().is_none(),
        "cancel releases the lease"
    );
}

#[test]
fn killed_run_then_fast_rerun_succeeds() {
    let pr = Project::new();
    let p = pr.write("p.toml", "[stages.a]\nkind = \"text\"\ntext = \"abcdef\"\ndelay_ms = 3000\n[stages.b]\nkind = \"transform\"\ninputs = { text = \"a.text\" }\nop = \"upper\"\n");
    let mut child = meduet()
        .args(["run", &p])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    assert_eq!(pr.objects(), 0);
    let out = run_ok(&["run", &p]);
    assert!(text(&out).contains("2 stage(s) computed"), "{}", text(&out));
    let v = std::fs::read_to_string(
        std::fs::read_dir(pr.cache().join("objects"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                std::fs::read_to_string(p.join("out/text/text.txt"))
                    .map(|t| t == "ABCDEF")
                    .unwrap_or(false)
            })
            .unwrap()
            .join("out/text/text.txt"),
    )
    .unwrap();
    assert_eq!(v, "ABCDEF");
}

#[test]
fn two_concurrent_runs_compute_each_stage_once() {
    let pr = Project::new();
    let p = pr.write(
        "p.toml",
        r#"
[stages.a]
kind = "text"
text = "one\ntwo\nthree"
delay_ms = 600
[stages.split]
kind = "split_lines"
inputs = { text = "a.text" }
[stages.up]
kind = "map_lines"
inputs = { lines = "split.lines" }
op = "upper"
[stages.b]
kind = "text"
text = "independent"
delay_ms = 600
[stages.join]
kind = "concat"
inputs = { parts = ["b.text", "a.text"] }
"#,
    );
    let spawn = || {
        meduet()
            .args(["run", &p])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (c1, c2) = (spawn(), spawn());
    let (o1, o2) = (
        c1.wait_with_output().unwrap(),
        c2.wait_with_output().unwrap(),
    );
    assert!(o1.status.success(), "{}", text(&o1));
    assert!(o2.status.success(), "{}", text(&o2));
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
fn corrupt_object_is_reported_and_recomputed() {
    let pr = Project::new();
    let p = pr.write("p.toml", "[stages.a]\nkind = \"text\"\ntext = \"precious data\"\n[stages.b]\nkind = \"transform\"\ninputs = { text = \"a.text\" }\nop = \"upper\"\n");
    run_ok(&["run", &p]);
    let clean = run_ok(&["verify", &p]);
    assert!(
        text(&clean).contains("verified 2 object(s)"),
        "{}",
        text(&clean)
    );
    // Flip one byte of a's output.
    let obj = std::fs::read_dir(pr.cache().join("objects"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| {
            std::fs::read_to_string(d.join("out/text/text.txt"))
                .map(|t| t == "precious data")
                .unwrap_or(false)
        })
        .unwrap();
    let f = obj.join("out/text/text.txt");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&f, bytes).unwrap();
    let out = meduet().args(["verify", &p]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(
        t.contains("CORRUPT")
            && t.contains("stage 'a'")
            && t.contains("out/text/text.txt")
            && t.contains("quarantined"),
        "{t}"
    );
    let plan = run_ok(&["plan", &p]);
    assert!(text(&plan).contains("will run  a"), "{}", text(&plan));
    let rerun = run_ok(&["run", &p]);
    assert!(
        text(&rerun).contains("1 stage(s) computed, 1 cached"),
        "{}",
        text(&rerun)
    );
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "precious data");
}

#[test]
fn exec_stage_runs_a_planned_spec_idempotently() {
    let pr = Project::new();
    let p = pr.write("p.toml", "[stages.a]\nkind = \"text\"\ntext = \"x\"\n[stages.b]\nkind = \"transform\"\ninputs = { text = \"a.text\" }\nop = \"upper\"\n");
    let out = run_ok(&["plan", &p, "--specs"]);
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 1, "only a has its inputs ready: {lines:?}");
    let spec = lines[0].split('\t').nth(1).unwrap().to_string();
    assert!(lines[0].starts_with("a\t"));
    let first = run_ok(&["exec-stage", "--spec", &spec]);
    assert!(String::from_utf8_lossy(&first.stdout).starts_with("computed "));
    let second = run_ok(&["exec-stage", "--spec", &spec]);
    assert!(
        String::from_utf8_lossy(&second.stdout).starts_with("cached "),
        "idempotent"
    );
    // Now b is ready.
    let out = run_ok(&["plan", &p, "--specs"]);
    let spec_b = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap()
        .to_string();
    run_ok(&["exec-stage", "--spec", &spec_b]);
    let plan = run_ok(&["plan", &p]);
    assert!(
        text(&plan).contains("2 of 2 stage(s) cached"),
        "{}",
        text(&plan)
    );
    // A spec whose input object is gone fails clearly.
    let bad = meduet()
        .args(["exec-stage", "--spec", "/nonexistent/spec.json"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad).contains("spec '/nonexistent/spec.json' not found"));
}

#[test]
fn validation_errors_exit_2_and_touch_nothing() {
    let pr = Project::new();
    let p = pr.write("p.toml", "[stages.a]\nkind = \"nope\"\n");
    let out = meduet().args(["run", &p]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(
        t.contains("p.toml:2:8: stage 'a': unknown stage kind 'nope'"),
        "{t}"
    );
    assert!(!pr.cache().exists(), "nothing in the cache is touched");
}

#[test]
fn failing_stage_exits_nonzero_naming_it() {
    let pr = Project::new();
    let p = pr.write(
        "p.toml",
        "[stages.f]\nkind = \"fail\"\nmessage = \"the GPU caught fire\"\n",
    );
    let out = meduet().args(["run", &p]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("stage 'f' failed: the GPU caught fire"),
        "{}",
        text(&out)
    );
}

#[test]
fn gc_removes_what_no_pipeline_uses() {
    let pr = Project::new();
    let p = pr.write("p.toml", "[stages.a]\nkind = \"text\"\ntext = \"v1\"\n");
    run_ok(&["run", &p]);
    pr.write("p.toml", "[stages.a]\nkind = \"text\"\ntext = \"v2\"\n");
    run_ok(&["run", &p]);
    assert_eq!(pr.objects(), 2);
    let dry = run_ok(&["gc", &p, "--dry-run"]);
    assert!(
        text(&dry).contains("would remove 1 object(s)"),
        "{}",
        text(&dry)
    );
    assert_eq!(pr.objects(), 2);
    let real = run_ok(&["gc", &p]);
    assert!(text(&real).contains("removed 1 object(s)"));
    assert!(
        text(&real).contains("a "),
        "bytes per stage are listed: {}",
        text(&real)
    );
    assert_eq!(pr.objects(), 1);
    let plan = run_ok(&["plan", &p]);
    assert!(text(&plan).contains("1 of 1 stage(s) cached"));
}

#[test]
fn graph_and_status_and_show() {
    let pr = Project::new();
    let p = pr.write("p.toml", "[stages.a]\nkind = \"text\"\ntext = \"x\"\n[stages.b]\nkind = \"transform\"\ninputs = { text = \"a.text\" }\n");
    let dot = run_ok(&["graph", &p]);
    assert!(
        String::from_utf8_lossy(&dot.stdout).contains("\"a\" -> \"b\" [label=\"text -> text\"]")
    );
    let mer = run_ok(&["graph", &p, "--format", "mermaid"]);
    assert!(String::from_utf8_lossy(&mer.stdout).contains("a -->|text to text| b"));
    run_ok(&["run", &p, "--only", "a"]);
    let st = String::from_utf8_lossy(&run_ok(&["status", &p]).stdout).into_owned();
    assert!(
        st.lines()
            .any(|l| l.starts_with("a ") && l.contains("cached")),
        "{st}"
    );
    assert!(
        st.lines()
            .any(|l| l.starts_with("b ") && l.contains("missing")),
        "{st}"
    );
    let show = String::from_utf8_lossy(&run_ok(&["show", &p, "a", "--log"]).stdout).into_owned();
    assert!(
        show.contains("outputs") && show.contains("text ") && show.contains("wrote 0 of 1 bytes"),
        "{show}"
    );
}

/// Every pipeline file that ships loads, resolves its includes and `extends`, passes every
/// stage's parameter validation and plans (nothing runs: a fresh cache).
#[test]
fn every_shipped_pipeline_plans() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let cache = tempfile::tempdir().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    for f in &files {
        let out = run_ok(&[
            "plan",
            f.to_str().unwrap(),
            "--cache",
            cache.path().to_str().unwrap(),
        ]);
        let t = text(&out);
        assert!(t.contains("will run"), "{}: {t}", f.display());
    }
}
