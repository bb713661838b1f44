//! Resources a stage asks for: threads and a device.

use serde::{Deserialize, Serialize};

/// What the pipeline file says under `resources`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// CPU threads: the stage gets a rayon pool of this many (and tch intra-op threads).
    /// 0 means "all threads of the run's budget".
    pub threads: usize,
    /// `"cpu"`, `"cuda"` (any free GPU), `"cuda:N"` or `"auto"` (a GPU if any, else the CPU).
    pub device: DeviceRequest,
    /// Memory in GiB (used by cluster executors; informational locally).
    pub memory_gb: Option<f64>,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            threads: 1,
            device: DeviceRequest::Cpu,
            memory_gb: None,
        }
    }
}

impl Resources {
    /// The threads this stage gets out of a budget of `budget`: all of it for
    /// `threads = 0`, else its request, never more than the budget nor less than one.
    /// The one place where "0 means all" and the clamp are applied.
    pub fn threads_within(&self, budget: usize) -> usize {
        let budget = budget.max(1);
        match self.threads {
            0 => budget,
            n => n.min(budget),
        }
    }

    /// Assigns this request here, on its own (a cluster job, `exec-stage` without an
    /// assignment): the machine's threads, and the first visible CUDA device for `cuda`
    /// or `auto`. `Err` for a CUDA request with none visible.
    pub fn assign_here(&self, cuda_devices: &dyn Fn() -> Vec<usize>) -> Result<Assignment, String> {
        let device = match self.device {
            DeviceRequest::Cpu => Device::Cpu,
            DeviceRequest::Cuda(i) => Device::Cuda(i),
            DeviceRequest::AnyCuda => Device::Cuda(
                *cuda_devices()
                    .first()
                    .ok_or("asks for a CUDA device but none is visible")?,
            ),
            DeviceRequest::Auto => cuda_devices()
                .first()
                .map(|&d| Device::Cuda(d))
                .unwrap_or(Device::Cpu),
        };
        Ok(Assignment {
            device,
            threads: self.threads_within(machine_threads()),
        })
    }
}

/// The CPU threads of this machine.
pub fn machine_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// What a stage was given to run on: a device and a (non-zero) number of threads.
/// Computed once, by the scheduler (or [`Resources::assign_here`] for a stage started on
/// its own), and carried to the process that runs the stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub device: Device,
    pub threads: usize,
}

/// A device request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Cpu,
    AnyCuda,
    Cuda(usize),
    Auto,
}

impl std::fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::AnyCuda => f.write_str("cuda"),
            DeviceRequest::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceRequest::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::AnyCuda),
            "auto" => Ok(Self::Auto),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!(
                        "invalid device '{s}' (expected \"cpu\", \"cuda\", \"cuda:N\" or \"auto\")"
                    )
                }),
        }
    }
}

impl Serialize for DeviceRequest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DeviceRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceRequest {
    /// The class of device the request runs on; `cuda_visible` is asked only for `auto`.
    pub fn class(self, cuda_visible: &dyn Fn() -> bool) -> DeviceClass {
        match self {
            DeviceRequest::Cpu => DeviceClass::Cpu,
            DeviceRequest::AnyCuda | DeviceRequest::Cuda(_) => DeviceClass::Cuda,
            DeviceRequest::Auto if cuda_visible() => DeviceClass::Cuda,
            DeviceRequest::Auto => DeviceClass::Cpu,
        }
    }
}

/// What kind of device a stage runs on: it enters the key of stages whose output bytes
/// depend on it ([`crate::Stage::device_dependent`]: fp16 autocast runs only on CUDA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceClass {
    Cpu,
    Cuda,
}

impl std::fmt::Display for DeviceClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceClass::Cpu => "cpu",
            DeviceClass::Cuda => "cuda",
        })
    }
}

impl Device {
    pub fn class(self) -> DeviceClass {
        match self {
            Device::Cpu => DeviceClass::Cpu,
            Device::Cuda(_) => DeviceClass::Cuda,
        }
    }
}

/// A device assigned to a running stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<DeviceRequest>()? {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Cuda(i) => Ok(Device::Cuda(i)),
            other => Err(format!("'{other}' is a request, not an assigned device")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_resolved_in_one_place() {
        let r = |threads| Resources {
            threads,
            ..Resources::default()
        };
        assert_eq!(r(0).threads_within(6), 6);
        assert_eq!(r(2).threads_within(6), 2);
        assert_eq!(r(8).threads_within(6), 6);
        assert_eq!(r(0).threads_within(0), 1);
        let auto = Resources {
            device: DeviceRequest::Auto,
            ..r(0)
        };
        let a = auto.assign_here(&|| vec![]).unwrap();
        assert_eq!(a.device, Device::Cpu);
        assert!(a.threads >= 1);
        assert_eq!(
            auto.assign_here(&|| vec![3, 1]).unwrap().device,
            Device::Cuda(3)
        );
        let cuda = Resources {
            device: DeviceRequest::AnyCuda,
            ..r(1)
        };
        assert!(cuda
            .assign_here(&|| vec![])
            .unwrap_err()
            .contains("none is visible"));
    }

    #[test]
    fn parse_devices() {
        assert_eq!(
            "cuda:3".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(3)
        );
        assert_eq!(
            "auto".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Auto
        );
        let e = "tpu".parse::<DeviceRequest>().unwrap_err();
        assert!(e.contains("tpu") && e.contains("cuda:N"));
    }
}
