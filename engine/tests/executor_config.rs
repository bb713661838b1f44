//! Executor settings in pipeline files: validated before anything runs, with the file,
//! line and column of the offending value; never part of a cache key; item-level exec.

use std::path::PathBuf;

use meduet_engine::executor::config::{ExecutorKind, TimeLimit};
use meduet_engine::{Pipeline, Registry};

fn registry() -> Registry {
    let mut r = Registry::new();
    meduet_engine::utility::register(&mut r);
    r
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn error(text: &str) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = write(&d, "p.toml", text);
    let e = Pipeline::load(&p, &registry()).unwrap_err().to_string();
    e.replace(&d.path().to_string_lossy().into_owned(), "DIR")
}

#[test]
fn valid_settings_are_read() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        &d,
        "p.toml",
        r#"
[executor]
default = "slurm"
[executor.slurm]
partition = "gpu"
time = "2:00:00"
time_per_kind = { wait = "1-00:00" }
extra_args = ["--constraint=a100"]
poll_interval = 2.5
max_jobs = 7
array_parallelism = 3
retries = 1
gpu_request = "--gpus={n}"
[stages.a]
kind = "text"
text = "x"
executor = "local"
[stages.b]
kind = "wait"
executor = { slurm = { time = "10", gpus = 2, extra_args = ["--exclusive"] } }
"#,
    );
    let pl = Pipeline::load(&p, &registry()).unwrap();
    let c = &pl.executor_config;
    assert_eq!(c.default, Some(ExecutorKind::Slurm));
    assert_eq!(c.slurm.partition.as_deref(), Some("gpu"));
    assert_eq!(c.slurm.poll_interval.as_secs_f64(), 2.5);
    assert_eq!(
        (c.slurm.max_jobs, c.slurm.array_parallelism, c.slurm.retries),
        (7, 3, 1)
    );
    assert_eq!(c.slurm.time_per_kind["wait"], TimeLimit("1-00:00".into()));
    assert_eq!(
        pl.stage("a").unwrap().executor.run_on,
        Some(ExecutorKind::Local)
    );
    let b = pl.stage("b").unwrap();
    let s = c
        .slurm
        .for_stage("wait", b.resources.device, &b.executor.slurm);
    assert_eq!(s.time, Some(TimeLimit("10".into())));
    assert_eq!(s.gpus, 2);
    assert_eq!(s.extra_args, ["--constraint=a100", "--exclusive"]);
}

#[test]
fn bad_settings_name_file_line_and_expectation() {
    let e = error("[executor.slurm]\npartition = \"gpu\"\ntime = \"2h\"\n");
    assert!(
        e.starts_with("DIR/p.toml:3:1: [executor.slurm] 'time': invalid time limit '2h' (expected minutes, MM:SS, HH:MM:SS"),
        "{e}"
    );
    let e = error("[executor.slurm]\npartiton = \"gpu\"\n");
    assert!(
        e.starts_with("DIR/p.toml:2:1: [executor.slurm]: unknown key 'partiton' (known keys: partition, account"),
        "{e}"
    );
    let e = error("[executor]\ndefault = \"kubernetes\"\n");
    assert!(e.contains("p.toml:2:1: [executor] 'default': unknown executor 'kubernetes' (expected \"local\" or \"slurm\")"), "{e}");
    let e = error("[executor.slurm]\nmax_jobs = 0\n");
    assert!(
        e.contains(
            "p.toml:2:1: [executor.slurm] 'max_jobs': expected an integer >= 1, got the integer 0"
        ),
        "{e}"
    );
    let e = error("[executor.slurm]\ntime_per_kind = { txet = \"10\" }\n");
    assert!(e.contains("p.toml:2:19: [executor.slurm.time_per_kind] 'txet': unknown stage kind 'txet' (known kinds:"), "{e}");
    let e = error("[executor.slurm]\ngpu_request = \"gpu\"\n");
    assert!(e.contains("p.toml:2:1: [executor.slurm] 'gpu_request': 'gpu' must be an sbatch option containing {n}"), "{e}");
    let e = error("[stages.a]\nkind = \"text\"\n\n[stages.a.executor.slurm]\ntime = \"soon\"\n");
    assert!(
        e.contains("p.toml:5:1: [stages.a.executor.slurm] 'time': invalid time limit 'soon'"),
        "{e}"
    );
    let e = error("[stages.a]\nkind = \"text\"\nexecutor = \"cloud\"\n");
    assert!(
        e.contains("p.toml:3:1: stage 'a': 'executor': unknown executor 'cloud'"),
        "{e}"
    );
    let e = error(
        "[stages.a]\nkind = \"text\"\nexecutor = { slurm = { extra_args = \"--exclusive\" } }\n",
    );
    assert!(e.contains("p.toml:3:24: [stages.a.executor.slurm] 'extra_args': expected a list of sbatch options"), "{e}");
}

#[test]
fn the_executor_never_enters_a_key() {
    let d = tempfile::tempdir().unwrap();
    let plain = write(&d, "a.toml", "[stages.a]\nkind = \"text\"\ntext = \"x\"\n");
    let slurm = write(
        &d,
        "b.toml",
        "[executor]\ndefault = \"slurm\"\n[executor.slurm]\ntime = \"5\"\n[stages.a]\nkind = \"text\"\ntext = \"x\"\nexecutor = { run_on = \"slurm\", slurm = { partition = \"gpu\" } }\n",
    );
    let store = meduet_cache::Store::open(d.path().join("cache")).unwrap();
    let key = |p: &PathBuf| {
        let pl = Pipeline::load(p, &registry()).unwrap();
        match &meduet_engine::plan::plan(&pl, &store, &[], &[], &meduet_engine::plan::no_cuda)
            .unwrap()[0]
            .status
        {
            meduet_engine::plan::StageStatus::WillRun { key, .. } => key.unwrap(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(key(&plain), key(&slurm));
}

/// What one task of a job array runs: `exec-stage` with an item index computes that
/// item's object only, and a bad index is a clear error.
#[test]
fn exec_stage_with_an_item_index_computes_one_item() {
    use meduet_engine::exec_stage::{exec_stage_item, ExecStage};
    let d = tempfile::tempdir().unwrap();
    let p = write(
        &d,
        "p.toml",
        "[stages.a]\nkind = \"text\"\ntext = \"x\\ny\\nz\"\n[stages.split]\nkind = \"split_lines\"\ninputs = { text = \"a.text\" }\n[stages.up]\nkind = \"map_lines\"\ninputs = { lines = \"split.lines\" }\nop = \"upper\"\n",
    );
    let reg = registry();
    let pl = Pipeline::load(&p, &reg).unwrap();
    let store = meduet_cache::Store::open(d.path().join("cache")).unwrap();
    let env = meduet_engine::ExecEnv::new(store.clone());
    let opts = meduet_engine::RunOptions {
        only: vec!["split".into()],
        ..Default::default()
    };
    meduet_engine::run(&pl, &env, &opts).unwrap();
    let specs = meduet_engine::plan::write_ready_specs(
        &pl,
        &store,
        &[],
        &[],
        &meduet_engine::plan::no_cuda,
    )
    .unwrap();
    let (_, spec) = specs.iter().find(|(s, _)| s == "up").unwrap();
    let before = store.object_keys().unwrap().len();
    let ex = match exec_stage_item(spec, Some(1), store.clone(), &reg, &env, &Vec::new).unwrap() {
        ExecStage::Done(ex) => ex,
        ExecStage::Delegate(w) => panic!("delegated to {w}"),
    };
    assert!(ex.computed);
    assert_eq!(
        std::fs::read_to_string(ex.object.output_dir("lines").join("text.txt")).unwrap(),
        "Y",
        "item 1 is the second line"
    );
    assert_eq!(
        store.object_keys().unwrap().len(),
        before + 1,
        "one item object, no cohort"
    );
    let again = match exec_stage_item(spec, Some(1), store.clone(), &reg, &env, &Vec::new).unwrap()
    {
        ExecStage::Done(ex) => ex,
        ExecStage::Delegate(_) => unreachable!(),
    };
    assert!(!again.computed, "idempotent");
    let e = match exec_stage_item(spec, Some(3), store.clone(), &reg, &env, &Vec::new) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("index 3 of 3 items must fail"),
    };
    assert!(
        e.contains("item index 3 is out of range: stage 'up' has 3 item(s) to compute"),
        "{e}"
    );
}
