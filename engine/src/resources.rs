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
