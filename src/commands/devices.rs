//! The CUDA devices of this machine, as the planner and the scheduler see them.

/// The CUDA devices of this machine: `MEDUET_CUDA_DEVICES` (comma-separated indices, empty
/// for none) when set, else asked from the libtorch worker once per process (one worker
/// start; only when a stage that may use a GPU has to run or be keyed).
pub fn cuda_devices() -> Vec<usize> {
    static DEVICES: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    DEVICES
        .get_or_init(|| match std::env::var("MEDUET_CUDA_DEVICES") {
            Ok(list) => list
                .split(',')
                .filter_map(|d| d.trim().parse().ok())
                .collect(),
            Err(_) => worker_cuda_devices(),
        })
        .clone()
}

/// Whether a stage planned here would get a CUDA device (for the keys of stages whose
/// bytes depend on the device class).
pub fn cuda_visible(_: &meduet_engine::StageDef) -> bool {
    !cuda_devices().is_empty()
}

/// The devices `meduet-torch devices` lists; none when the worker is absent or fails.
fn worker_cuda_devices() -> Vec<usize> {
    let Ok(bin) = meduet_engine::worker::worker_binary("meduet-torch") else {
        return Vec::new();
    };
    match std::process::Command::new(bin).arg("devices").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect(),
        _ => Vec::new(),
    }
}
