//! The local scheduler: ready stages run concurrently within budgets.
//!
//! A dependency queue (as cargo's `DependencyQueue`): a stage becomes ready when all its
//! upstream objects exist. The dispatcher computes its key at once; a cache hit
//! completes immediately without taking resources. Otherwise it waits for resources:
//! a number of CPU threads from the run's budget (each stage gets its own rayon pool of
//! that many, and libtorch's intra-op threads to match) and, for GPU stages, an explicit
//! CUDA device from the pool (devices are *assigned*, not counted). Among ready stages,
//! the one with the most descendants goes first. Workers report back over a crossbeam
//! channel.
//!
//! A failing stage stops its dependents. Without `keep_going`, no new stage starts after
//! a failure; with it, independent stages finish. Cancellation (Ctrl-C) stops dispatching,
//! lets running stages notice the flag, and commits nothing partial.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crossbeam_channel::{unbounded, Receiver, Sender};
use meduet_cache::{Object, StageKey, Store};

use crate::error::{EngineError, StageError};
use crate::exec::{execute, prepare, ExecEnv, Executed, Prepared};
use crate::fingerprint::{History, StageHistory};
use crate::pipeline::Pipeline;
use crate::plan::{gather_inputs, select_for_run};
use crate::resources::{Device, DeviceRequest};

/// Options of `meduet run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run only these stages (and what they need).
    pub only: Vec<String>,
    /// Recompute these stages even if cached.
    pub force: Vec<String>,
    pub keep_going: bool,
    /// CPU thread budget (0: all cores).
    pub threads: usize,
    /// CUDA device indices available to the run.
    /// CUDA device indices available to the run; `None`: ask `device_probe` the first
    /// time a stage that may use a GPU has to run (the probe may cost a worker start).
    pub cuda_devices: Option<Vec<usize>>,
    pub device_probe: Option<DeviceProbe>,
}

/// Lists the CUDA devices (called lazily).
#[derive(Clone)]
pub struct DeviceProbe(pub std::sync::Arc<dyn Fn() -> Vec<usize> + Send + Sync>);

impl std::fmt::Debug for DeviceProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceProbe")
    }
}

/// How one stage ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Cached {
        key: StageKey,
    },
    Computed {
        key: StageKey,
        wall_seconds: f64,
        items: Option<(usize, usize)>,
    },
    /// Another process computed it while we waited for its lease.
    Reused {
        key: StageKey,
    },
    Failed {
        message: String,
    },
    /// Not run because an upstream stage failed (or the run stopped).
    Skipped {
        because: String,
    },
}

/// The result of a run.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub stages: Vec<(String, Outcome)>,
    pub wall_seconds: f64,
}

impl RunSummary {
    pub fn computed(&self) -> Vec<&str> {
        self.stages
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Computed { .. }))
            .map(|(n, _)| n.as_str())
            .collect()
    }
    pub fn cached(&self) -> Vec<&str> {
        self.stages
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Cached { .. } | Outcome::Reused { .. }))
            .map(|(n, _)| n.as_str())
            .collect()
    }
    pub fn failures(&self) -> Vec<(String, String)> {
        self.stages
            .iter()
            .filter_map(|(n, o)| match o {
                Outcome::Failed { message } => Some((n.clone(), message.clone())),
                _ => None,
            })
            .collect()
    }
}

enum Message {
    Finished {
        stage: usize,
        device: Device,
        threads: usize,
        result: Result<Executed, StageError>,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Waiting,
    Queued,
    Running,
    Done,
    Failed,
    Skipped,
}

/// Picks a device for a request, or says why it cannot be satisfied now or ever.
fn assign_device(
    req: DeviceRequest,
    all: &[usize],
    free: &[usize],
) -> Result<Option<Device>, String> {
    match req {
        DeviceRequest::Cpu => Ok(Some(Device::Cpu)),
        DeviceRequest::Auto if all.is_empty() => Ok(Some(Device::Cpu)),
        DeviceRequest::Auto | DeviceRequest::AnyCuda => {
            if all.is_empty() {
                return Err("asks for device 'cuda' but no CUDA device is available (hint: device = \"auto\" falls back to the CPU)".into());
            }
            Ok(free.first().map(|&d| Device::Cuda(d)))
        }
        DeviceRequest::Cuda(n) => {
            if !all.contains(&n) {
                return Err(format!(
                    "asks for device 'cuda:{n}' but the CUDA devices available are {:?}",
                    all
                ));
            }
            Ok(free.contains(&n).then_some(Device::Cuda(n)))
        }
    }
}

/// Runs a pipeline.
pub fn run(
    pipeline: &Pipeline,
    env: &ExecEnv,
    opts: &RunOptions,
) -> Result<RunSummary, EngineError> {
    let t0 = Instant::now();
    let store = &env.store;
    for f in &opts.force {
        if pipeline.index_of(f).is_none() {
            return Err(crate::error::PipelineError::NoSuchStage {
                file: pipeline.file.clone(),
                stage: f.clone(),
                known: pipeline.stage_names(),
            }
            .into());
        }
    }
    crate::plan::check_name(store, pipeline)?;
    let selected: Vec<usize> = select_for_run(pipeline, &opts.only)?;
    // What this run uses is kept by a concurrent `gc` from the moment its key is known.
    let env = &env.with_live_root(&format!("run {}", pipeline.name))?;
    let n = pipeline.stages.len();
    let in_sel = |i: usize| selected.binary_search(&i).is_ok();
    let budget = if opts.threads == 0 {
        crate::resources::machine_threads()
    } else {
        opts.threads
    };
    let mut free_threads = budget;
    // The CUDA devices, probed once when first needed (by a key that holds the device class
    // or a stage that may use a GPU); `probed` says whether `free_devices` was filled.
    let device_list = std::cell::OnceCell::new();
    let devices = || -> Vec<usize> {
        device_list
            .get_or_init(|| {
                opts.cuda_devices.clone().unwrap_or_else(|| {
                    opts.device_probe
                        .as_ref()
                        .map(|p| (p.0)())
                        .unwrap_or_default()
                })
            })
            .clone()
    };
    let cuda_visible = |_: &crate::pipeline::StageDef| !devices().is_empty();
    let mut probed = opts.cuda_devices.is_some();
    let mut free_devices: Vec<usize> = opts.cuda_devices.clone().unwrap_or_default();
    let priority: Vec<usize> = (0..n).map(|i| pipeline.descendants_of(i).len()).collect();

    let mut state = vec![State::Waiting; n];
    let mut objects: HashMap<usize, Object> = HashMap::new();
    let mut prepared: HashMap<usize, Prepared> = HashMap::new();
    let mut outcomes: BTreeMap<usize, Outcome> = BTreeMap::new();
    let mut stop = false;
    let (tx, rx): (Sender<Message>, Receiver<Message>) = unbounded();
    let mut running = 0usize;
    let mut auto_logged = false;

    loop {
        // 1. Promote waiting stages whose inputs exist; cache hits complete at once.
        let mut progressed = true;
        while progressed {
            progressed = false;
            for i in 0..n {
                if !in_sel(i) || state[i] != State::Waiting || stop {
                    continue;
                }
                let ups = pipeline.upstream_of(i);
                if let Some(&bad) = ups
                    .iter()
                    .find(|&&u| matches!(state[u], State::Failed | State::Skipped))
                {
                    state[i] = State::Skipped;
                    outcomes.insert(
                        i,
                        Outcome::Skipped {
                            because: format!(
                                "upstream stage '{}' did not complete",
                                pipeline.stages[bad].name
                            ),
                        },
                    );
                    progressed = true;
                    continue;
                }
                if !ups.iter().all(|u| state[*u] == State::Done) {
                    continue;
                }
                let def = &pipeline.stages[i];
                let inputs =
                    gather_inputs(pipeline, store, i, &objects)?.expect("upstream objects exist");
                let p = match prepare(def, store, inputs, &cuda_visible) {
                    Ok(p) => p,
                    Err(e) => {
                        state[i] = State::Failed;
                        outcomes.insert(
                            i,
                            Outcome::Failed {
                                message: e.to_string(),
                            },
                        );
                        tracing::error!("✗ {}: {e}", def.name);
                        stop |= !opts.keep_going;
                        progressed = true;
                        continue;
                    }
                };
                let forced = opts.force.contains(&def.name);
                env.protect([p.key])?;
                if !forced {
                    if let Some(obj) = store.load(&p.key)? {
                        tracing::info!("· {:<24} cached   {}", def.name, p.key.short());
                        outcomes.insert(i, Outcome::Cached { key: p.key });
                        objects.insert(i, obj);
                        prepared.insert(i, p);
                        state[i] = State::Done;
                        progressed = true;
                        continue;
                    }
                }
                prepared.insert(i, p);
                state[i] = State::Queued;
                progressed = true;
            }
        }
        if env.cancel.is_cancelled() {
            stop = true;
        }
        // 2. Dispatch queued stages by priority while resources allow.
        if !stop {
            let mut queued: Vec<usize> = (0..n).filter(|&i| state[i] == State::Queued).collect();
            queued.sort_by_key(|&i| (std::cmp::Reverse(priority[i]), i));
            for i in queued {
                let def = &pipeline.stages[i];
                let want = def.resources.threads_within(budget);
                if def.resources.device != DeviceRequest::Cpu && !probed {
                    free_devices = devices();
                    probed = true;
                }
                let devices_now = if probed { devices() } else { Vec::new() };
                let device = match assign_device(def.resources.device, &devices_now, &free_devices)
                {
                    Ok(Some(d)) => d,
                    Ok(None) => continue,
                    Err(m) => {
                        state[i] = State::Failed;
                        let message = format!("stage '{}' {m}", def.name);
                        tracing::error!("✗ {message}");
                        outcomes.insert(i, Outcome::Failed { message });
                        stop |= !opts.keep_going;
                        continue;
                    }
                };
                if def.resources.device == DeviceRequest::Auto
                    && devices_now.is_empty()
                    && !auto_logged
                {
                    tracing::info!("device = \"auto\": no CUDA device found, running on the CPU");
                    auto_logged = true;
                }
                if want > free_threads && running > 0 {
                    continue;
                }
                let threads = want.min(free_threads.max(1));
                free_threads = free_threads.saturating_sub(threads);
                if let Device::Cuda(d) = device {
                    free_devices.retain(|&x| x != d);
                }
                state[i] = State::Running;
                running += 1;
                let mut p = prepared[&i].clone();
                p.locator = std::sync::Arc::new(locator_for(pipeline, i, &prepared, &objects));
                p.locator_roots = locator_roots(pipeline, i, &prepared, &objects);
                let env2 = env.clone();
                let tx2 = tx.clone();
                let forced = opts.force.contains(&def.name);
                let pname = pipeline.name.clone();
                let resources = def.resources.clone();
                tracing::info!(
                    "▶ {:<24} {} on {device} x{threads}",
                    def.name,
                    def.kind.kind()
                );
                std::thread::Builder::new()
                    .name(format!("stage-{}", def.name))
                    .spawn(move || {
                        // A panicking stage is a failed stage: the scheduler must hear of it
                        // (it waits for every started stage) and its scratch stays unpublished.
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            match p.kind.worker() {
                                None => execute(&env2, &p, device, threads, forced),
                                Some(w) => crate::worker::execute_in_worker(
                                    &env2, &pname, &p, &resources, device, threads, forced, w,
                                ),
                            }
                        }))
                        .unwrap_or_else(|panic| {
                            let msg = panic
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "a non-string panic payload".into());
                            Err(StageError::failed(format!("the stage panicked: {msg}")))
                        });
                        let _ = tx2.send(Message::Finished {
                            stage: i,
                            device,
                            threads,
                            result,
                        });
                    })
                    .map_err(|e| EngineError::Other(format!("cannot spawn a stage thread: {e}")))?;
            }
        }
        if running == 0 {
            break;
        }
        // 3. Wait for a worker.
        let Message::Finished {
            stage: i,
            device,
            threads,
            result,
        } = rx.recv().expect("a worker is running");
        running -= 1;
        free_threads += threads;
        if let Device::Cuda(d) = device {
            free_devices.push(d);
            free_devices.sort();
        }
        let name = pipeline.stages[i].name.clone();
        match result {
            Ok(ex) => {
                let key = ex.object.key();
                let items = (pipeline.stages[i].kind.map_over().is_some())
                    .then_some((ex.items_total, ex.items_computed));
                if ex.computed {
                    let extra = items
                        .map(|(t, c)| format!(" ({c} of {t} items computed)"))
                        .unwrap_or_default();
                    tracing::info!("✓ {:<24} {:.2}s{extra}", name, ex.wall_seconds);
                    outcomes.insert(
                        i,
                        Outcome::Computed {
                            key,
                            wall_seconds: ex.wall_seconds,
                            items,
                        },
                    );
                } else {
                    tracing::info!(
                        "· {:<24} reused   {} (computed by another process)",
                        name,
                        key.short()
                    );
                    outcomes.insert(i, Outcome::Reused { key });
                }
                objects.insert(i, ex.object);
                state[i] = State::Done;
            }
            Err(StageError::Cancelled) => {
                state[i] = State::Failed;
                outcomes.insert(
                    i,
                    Outcome::Failed {
                        message: "cancelled".into(),
                    },
                );
                stop = true;
            }
            Err(e) => {
                tracing::error!("✗ {name}: {e}");
                state[i] = State::Failed;
                outcomes.insert(
                    i,
                    Outcome::Failed {
                        message: e.to_string(),
                    },
                );
                stop |= !opts.keep_going;
            }
        }
    }
    for i in 0..n {
        if in_sel(i) && !outcomes.contains_key(&i) {
            outcomes.insert(
                i,
                Outcome::Skipped {
                    because: "the run stopped before it".into(),
                },
            );
        }
    }
    record_history(pipeline, store, &prepared, &objects)?;
    let summary = RunSummary {
        stages: outcomes
            .into_iter()
            .map(|(i, o)| (pipeline.stages[i].name.clone(), o))
            .collect(),
        wall_seconds: t0.elapsed().as_secs_f64(),
    };
    if env.cancel.is_cancelled() {
        return Err(EngineError::Cancelled);
    }
    let failures = summary.failures();
    if !failures.is_empty() {
        if failures.len() == 1 {
            let (stage, message) = failures.into_iter().next().unwrap();
            return Err(EngineError::StageFailed { stage, message });
        }
        return Err(EngineError::StagesFailed { failures });
    }
    Ok(summary)
}

/// The locator of stage `i`: its ancestors' sources and objects.
pub fn locator_for(
    pipeline: &Pipeline,
    i: usize,
    prepared: &HashMap<usize, Prepared>,
    objects: &HashMap<usize, Object>,
) -> crate::locator::Locator {
    let anc = pipeline.ancestors_of(i);
    crate::locator::build_locator(
        anc.iter()
            .filter_map(|a| prepared.get(a))
            .flat_map(|p| p.sources.values()),
        anc.iter()
            .filter(|&&a| a != i)
            .filter_map(|a| objects.get(a)),
    )
}

/// What [`locator_for`] is built from: ancestor source paths and ancestor object keys.
pub fn locator_roots(
    pipeline: &Pipeline,
    i: usize,
    prepared: &HashMap<usize, Prepared>,
    objects: &HashMap<usize, Object>,
) -> (Vec<std::path::PathBuf>, Vec<StageKey>) {
    let anc = pipeline.ancestors_of(i);
    let sources = anc
        .iter()
        .filter_map(|a| prepared.get(a))
        .flat_map(|p| p.sources.keys().cloned())
        .collect();
    let keys = anc
        .iter()
        .filter(|&&a| a != i)
        .filter_map(|a| objects.get(a))
        .map(|o| o.key())
        .collect();
    (sources, keys)
}

/// Records the fingerprints and keys of this run (for `plan`'s explanations and as gc roots).
pub(crate) fn record_history(
    pipeline: &Pipeline,
    store: &Store,
    prepared: &HashMap<usize, Prepared>,
    objects: &HashMap<usize, Object>,
) -> Result<(), EngineError> {
    let path = crate::plan::history_path(store, pipeline);
    let mut h: History = store.read_json(&path).ok().flatten().unwrap_or_default();
    h.pipeline = pipeline.name.clone();
    h.file = pipeline.file.to_string_lossy().into_owned();
    for (i, p) in prepared {
        if let Some(obj) = objects.get(i) {
            let outputs = obj
                .manifest
                .outputs
                .iter()
                .map(|(k, v)| (k.clone(), v.digest))
                .collect();
            h.stages.insert(
                pipeline.stages[*i].name.clone(),
                StageHistory {
                    key: p.key,
                    fingerprint: p.fingerprint.clone(),
                    outputs,
                },
            );
        }
    }
    h.stages.retain(|name, _| pipeline.index_of(name).is_some());
    h.keys = h.stages.values().map(|s| s.key).collect();
    store.write_json(&path, &h)?;
    Ok(())
}
