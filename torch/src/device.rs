//! libtorch glue: devices, threads, versions.

use meduet_engine::Device;

/// The tch device for an assigned engine device.
pub fn tch_device(d: Device) -> tch::Device {
    match d {
        Device::Cpu => tch::Device::Cpu,
        Device::Cuda(i) => tch::Device::Cuda(i),
    }
}

/// CUDA device indices visible to libtorch.
pub fn cuda_devices() -> Vec<usize> {
    if tch::Cuda::is_available() {
        (0..tch::Cuda::device_count() as usize).collect()
    } else {
        Vec::new()
    }
}

/// Sets libtorch's intra-op threads for the calling thread's parallel regions.
pub fn set_threads(n: usize) {
    tch::set_num_threads(n.max(1) as i32);
}

/// The libtorch version this binary is linked against (`torch-sys` checks it at build time).
pub fn torch_version() -> String {
    "2.13.0".to_string()
}
