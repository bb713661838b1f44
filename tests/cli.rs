//! The `meduet` binary end to end, on the engine's utility kinds (fast: no tensors).
//! Crash safety, concurrent runs, corruption, exec-stage, exit codes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pipelines::{text_stage, text_then_upper, two_branches};
use common::{meduet, read_json, run_ok, succeeded_runs, text, Project};

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
    let info = read_json(leases[0].path());
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
    let p = pr.write("p.toml", &two_branches(600));
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

/// Flips the first byte of a committed (read-only) file, as a disk error or a careless
/// edit would.
fn flip_first_byte(f: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(f).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(f, bytes).unwrap();
}

fn object_with_text(pr: &Project, want: &str) -> PathBuf {
    std::fs::read_dir(pr.cache().join("objects"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| std::fs::read_to_string(d.join("out/text/text.txt")).is_ok_and(|t| t == want))
        .unwrap_or_else(|| panic!("no object holds '{want}'"))
}

/// Issue 19, item 4: committed files are read-only; a corrupt input object never
/// spreads downstream (the stage that would read it fails naming the file, the object is
/// quarantined, the next run recomputes both); an object that lost a file is "gone" for
/// plan and run, not an i/o error on every run; gc sweeps folders without a manifest.
#[test]
fn a_corrupt_input_is_refused_and_recomputed_never_spread() {
    use std::os::unix::fs::PermissionsExt;
    let pr = Project::new();
    let a = text_stage("precious data");
    let p = pr.write("p.toml", &a);
    run_ok(&["run", &p]);
    let obj = object_with_text(&pr, "precious data");
    let f = obj.join("out/text/text.txt");
    for file in [&f, &obj.join("manifest.json")] {
        let mode = std::fs::metadata(file).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o222,
            0,
            "{} is read-only ({mode:o})",
            file.display()
        );
    }
    flip_first_byte(&f);
    pr.write("p.toml", &format!("{a}[stages.c]\nkind = \"transform\"\ninputs = {{ text = \"a.text\" }}\nop = \"upper\"\n"));
    let out = meduet().args(["run", &p]).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("stage 'c' failed")
            && t.contains("input 'a.text' does not match its manifest: file '")
            && t.contains("out/text/text.txt' has digest")
            && t.contains("was moved to '")
            && t.contains("run again to recompute it"),
        "{t}"
    );
    assert!(!obj.exists(), "the corrupt object was quarantined");
    let rerun = run_ok(&["run", &p]);
    assert!(
        text(&rerun).contains("2 stage(s) computed"),
        "{}",
        text(&rerun)
    );
    let c = object_with_text(&pr, "PRECIOUS DATA");
    assert!(c.is_dir() && object_with_text(&pr, "precious data").is_dir());
    let clean = run_ok(&["verify", &p]);
    assert!(
        text(&clean).contains("verified 2 object(s)"),
        "{}",
        text(&clean)
    );

    // A file gone from an object: the object is gone, and the run replaces it.
    let obj = object_with_text(&pr, "precious data");
    std::fs::remove_file(obj.join("out/text/text.txt")).unwrap();
    let plan = run_ok(&["plan", &p]);
    assert!(text(&plan).contains("will run  a"), "{}", text(&plan));
    let rerun = run_ok(&["run", &p]);
    assert!(
        text(&rerun).contains("1 stage(s) computed, 1 cached"),
        "{}",
        text(&rerun)
    );
    assert!(object_with_text(&pr, "precious data").is_dir());

    // gc sweeps a folder under objects/ that has no manifest.
    let stray = pr.cache().join("objects").join("ab".repeat(32));
    std::fs::create_dir_all(stray.join("out")).unwrap();
    std::fs::write(stray.join("out/x"), "half").unwrap();
    run_ok(&["gc", &p]);
    assert!(!stray.exists());
}

#[test]
fn corrupt_object_is_reported_and_recomputed() {
    let pr = Project::new();
    let p = pr.write("p.toml", &text_then_upper("precious data"));
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
    flip_first_byte(&f);
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
    let p = pr.write("p.toml", &text_then_upper("x"));
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

fn ready_specs(p: &str) -> Vec<(String, String)> {
    let out = run_ok(&["plan", p, "--specs"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (a, b) = l.split_once('\t').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect()
}

/// Issue 19, item 1: a spec edited after it was planned is refused before anything
/// runs, naming the field: a changed parameter, an input reference pointed at another
/// object, `force` switched on; also when the editor renames the file to its new digest
/// (the parameter and input checks against the fingerprint catch that).
#[test]
fn a_tampered_spec_is_refused_naming_the_field() {
    let pr = Project::new();
    let p = pr.write(
        "p.toml",
        &format!(
            "{}[stages.o]\nkind = \"text\"\ntext = \"other\"\n",
            text_then_upper("original")
        ),
    );
    let specs = ready_specs(&p);
    let spec_a = &specs.iter().find(|(s, _)| s == "a").unwrap().1;
    let original = std::fs::read(spec_a).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_slice(&original).unwrap();
        f(&mut v);
        serde_json::to_vec_pretty(&v).unwrap()
    };
    let refused = |spec: &str, want: &[&str]| {
        let out = meduet()
            .args(["exec-stage", "--spec", spec])
            .output()
            .unwrap();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{t}");
        for w in want {
            assert!(t.contains(w), "missing '{w}' in: {t}");
        }
    };
    // Edited in place: the name is no longer the content's digest.
    let tampered = edit(&|v| v["params"]["text"] = "TAMPERED".into());
    std::fs::write(spec_a, &tampered).unwrap();
    refused(spec_a, &["was changed after it was written"]);
    std::fs::write(spec_a, edit(&|v| v["force"] = true.into())).unwrap();
    refused(spec_a, &["was changed after it was written"]);
    // Renamed to its new digest: the parameter differs from the fingerprint.
    let renamed = pr.path(&format!(
        ".meduet/specs/{}.json",
        blake3::hash(&tampered).to_hex()
    ));
    std::fs::write(&renamed, &tampered).unwrap();
    refused(
        renamed.to_str().unwrap(),
        &["stage 'a': field 'params.text' is \"TAMPERED\" but its fingerprint says \"original\""],
    );
    assert_eq!(pr.objects(), 0, "nothing was committed");
    // The untouched spec still runs; then b's input is pointed at another object.
    std::fs::write(spec_a, &original).unwrap();
    run_ok(&["exec-stage", "--spec", spec_a]);
    let spec_o = ready_specs(&p)
        .into_iter()
        .find(|(s, _)| s == "o")
        .unwrap()
        .1;
    run_ok(&["exec-stage", "--spec", &spec_o]);
    let spec_b = ready_specs(&p)
        .into_iter()
        .find(|(s, _)| s == "b")
        .unwrap()
        .1;
    let plan_o = read_json(&spec_o);
    let mut v = read_json(&spec_b);
    v["inputs"]["text"][0]["key"] = plan_o["key"].clone();
    v["inputs"]["text"][0]["stage"] = "o".into();
    v["inputs"]["text"][0]["digest"] = "ab".repeat(32).into();
    let bytes = serde_json::to_vec_pretty(&v).unwrap();
    let other = pr.path(&format!(
        ".meduet/specs/{}.json",
        blake3::hash(&bytes).to_hex()
    ));
    std::fs::write(&other, &bytes).unwrap();
    refused(other.to_str().unwrap(), &["field 'inputs.text[0].digest'"]);
    let objects = pr.objects();
    run_ok(&["exec-stage", "--spec", &spec_b]);
    assert_eq!(pr.objects(), objects + 1);
    let plan = run_ok(&["plan", &p]);
    assert!(
        text(&plan).contains("3 of 3 stage(s) cached"),
        "{}",
        text(&plan)
    );
    let texts: Vec<String> = std::fs::read_dir(pr.cache().join("objects"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("out/text/text.txt")).ok())
        .collect();
    assert!(texts.contains(&"ORIGINAL".to_string()), "{texts:?}");
    assert!(!texts.iter().any(|t| t.contains("TAMPERED")), "{texts:?}");
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
    let p = pr.write("p.toml", &text_stage("v1"));
    run_ok(&["run", &p]);
    pr.write("p.toml", &text_stage("v2"));
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
    // An empty pin name is a clear error (issue 19, item 6), not an OS error.
    let out = meduet().args(["pin", &p, "--name", ""]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("--name must not be empty"),
        "{}",
        text(&out)
    );
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
    // A lease left by a dead process (issue 19, item 6) is shown as stale, not running.
    let plan: serde_json::Value =
        serde_json::from_slice(&run_ok(&["plan", &p, "--json"]).stdout).unwrap();
    let key_b = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "b")
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    std::fs::create_dir_all(pr.cache().join("leases")).unwrap();
    std::fs::write(
        pr.cache().join(format!("leases/{key_b}.lease")),
        format!(
            r#"{{"host":"{}","pid":{dead_pid},"started_unix":0,"holder":"b"}}"#,
            host.trim()
        ),
    )
    .unwrap();
    let st = String::from_utf8_lossy(&run_ok(&["status", &p]).stdout).into_owned();
    assert!(
        st.lines().any(|l| l.starts_with("b ")
            && l.contains(" stale ")
            && l.contains(&format!("its owner pid {dead_pid}"))
            && l.contains("is dead")),
        "{st}"
    );
    run_ok(&["run", &p]);
    let show = String::from_utf8_lossy(&run_ok(&["show", &p, "a", "--log"]).stdout).into_owned();
    assert!(
        show.contains("outputs") && show.contains("text ") && show.contains("wrote 0 of 1 bytes"),
        "{show}"
    );
}

/// `meduet` with HOME an empty folder: a fresh machine where no optional setup step
/// (`scripts/fetch_i3resnet`) has run, whatever this machine holds.
fn meduet_fresh_home(home: &Path, args: &[&str]) -> Output {
    meduet().env("HOME", home).args(args).output().unwrap()
}

fn shipped_pipelines() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// Whether a `meduet plan` outcome is acceptable for a shipped pipeline on a fresh
/// machine: a complete plan (exit 0), or a complete plan followed by the missing-files
/// list (exit 3) where every missing file names the command that makes it and the
/// README documents that command as optional. Anything else (a validation error, a
/// missing file nobody makes: a typo) is not.
fn acceptable_fresh_plan(out: &Output) -> Result<(), String> {
    let t = text(out);
    match out.status.code() {
        Some(0) if t.contains("will run") => Ok(()),
        Some(3) => {
            let readme =
                std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                    .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let (plan, list) = stdout
                .split_once("MISSING FILES:")
                .ok_or_else(|| format!("exit 3 without the missing-files list:\n{t}"))?;
            if !plan.contains("will run") || !plan.contains("cannot run yet") {
                return Err(format!("the plan is not printed before the list:\n{t}"));
            }
            let files = list.lines().skip(1).filter(|l| !l.starts_with("    "));
            for line in files.filter(|l| !l.trim().is_empty()) {
                let command = line
                    .split_once("): make it with: ")
                    .map(|(_, c)| c.trim())
                    .ok_or_else(|| format!("a missing file that nothing makes: {line}"))?;
                if !readme.contains(&format!("Optional: `{command}`")) {
                    return Err(format!(
                        "'{command}' is not documented as optional in the README: {line}"
                    ));
                }
            }
            Ok(())
        }
        _ => Err(format!("plan failed ({:?}):\n{t}", out.status.code())),
    }
}

/// Every pipeline file that ships draws (`graph` reads no input file), loads, resolves
/// its includes and `extends`, passes every stage's parameter validation and plans on a
/// fresh cache and an empty HOME; where it reads an optional file, the plan lists it with
/// the command that makes it (exit 3).
#[test]
fn every_shipped_pipeline_plans() {
    let cache = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let files = shipped_pipelines();
    assert!(files.len() >= 8, "{files:?}");
    let mut with_missing = Vec::new();
    for f in &files {
        let f = f.to_str().unwrap();
        let graph = meduet_fresh_home(home.path(), &["graph", f]);
        assert!(graph.status.success(), "graph {f}: {}", text(&graph));
        assert!(String::from_utf8_lossy(&graph.stdout).starts_with("digraph"));
        let out = meduet_fresh_home(
            home.path(),
            &["plan", f, "--cache", cache.path().to_str().unwrap()],
        );
        if let Err(e) = acceptable_fresh_plan(&out) {
            panic!("{f}: {e}");
        }
        if out.status.code() == Some(3) {
            with_missing.push(f.to_string());
        }
    }
    assert!(
        with_missing
            .iter()
            .any(|f| f.ends_with("fig5_convergence.toml")),
        "fig5 reads the optional I3ResNet weights: {with_missing:?}"
    );
}

/// A typo in a path of a shipped pipeline is not mistaken for an optional file: the plan
/// still exits 3, but the check of the shipped pipelines refuses it. `meduet run` refuses
/// the same list before running any stage, with the same exit status.
#[test]
fn a_path_typo_fails_the_shipped_check_and_run_refuses_before_anything_runs() {
    let pr = Project::new();
    let home = tempfile::tempdir().unwrap();
    let fig5 = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/fig5_convergence.toml");
    let p = pr.write(
        "typo.toml",
        &format!(
            "include = [\"{}\"]\n[stages.real_features]\nweights = \"~/.cache/meduet/weights/i3resnet125.safetensors\"\n",
            fig5.display()
        ),
    );
    let out = meduet_fresh_home(home.path(), &["plan", &p]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let e = acceptable_fresh_plan(&out).unwrap_err();
    assert!(
        e.contains("a missing file that nothing makes") && e.contains("i3resnet125"),
        "{e}"
    );
    let out = meduet_fresh_home(home.path(), &["run", &p]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}");
    assert!(
        t.contains("MISSING FILES: 2 input file(s) do not exist; the 9 stage(s)")
            && t.contains("i3resnet125.safetensors'): no command of this pipeline makes it")
            && t.contains("typo.toml:3:11: stage 'real_features': parameter 'weights'")
            && t.contains("i3resnet152.safetensors'): make it with: scripts/fetch_i3resnet"),
        "{t}"
    );
    assert_eq!(pr.objects(), 0, "nothing ran");
}
