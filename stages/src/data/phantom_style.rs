//! Phantom *style*: what a simulated site, scanner and protocol (a domain) changes.
//!
//! A [`DomainStyle`] never changes the anatomy, only how it is imaged: grid (shape,
//! spacing, slice thickness), the orientation written in the header, the contrast phase
//! (organ enhancement), a linear HU calibration (`hu_scale`, `hu_offset`), noise level and
//! texture (white noise smoothed by a Gaussian of `noise_corr_mm`), the reconstruction
//! kernel (`blur_mm`), a smooth additive bias field (`bias_hu`) and the stored data type.
//!
//! Six presets ([`presets`]) differ in all of these; [`derived`] makes more domains by
//! perturbing a preset with a seeded generator, so any number of domains is available.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::nifti_io::NiftiDtype;

/// Contrast phase of the acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContrastPhase {
    NonContrast,
    Arterial,
    PortalVenous,
    Delayed,
}

/// Tissue classes the phantom renders (each has a mean HU per phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Tissue {
    Air = 0,
    Fat,
    Muscle,
    Visceral,
    Liver,
    Spleen,
    Kidney,
    Bone,
    Blood,
    Gas,
    Lesion,
}

/// Number of [`Tissue`] classes.
pub const TISSUES: usize = 11;

/// Mean HU of each tissue in a phase (index = `Tissue as usize`).
pub fn tissue_hu(phase: ContrastPhase) -> [f32; TISSUES] {
    //            air     fat    muscle visc  liver spleen kidney bone  blood  gas   lesion
    match phase {
        ContrastPhase::NonContrast => [
            -1000.0, -100.0, 45.0, -20.0, 58.0, 48.0, 32.0, 420.0, 42.0, -880.0, 28.0,
        ],
        ContrastPhase::Arterial => [
            -1000.0, -100.0, 55.0, -10.0, 75.0, 125.0, 190.0, 420.0, 320.0, -880.0, 150.0,
        ],
        ContrastPhase::PortalVenous => [
            -1000.0, -100.0, 60.0, 0.0, 115.0, 118.0, 165.0, 420.0, 165.0, -880.0, 70.0,
        ],
        ContrastPhase::Delayed => [
            -1000.0, -100.0, 55.0, -5.0, 95.0, 92.0, 150.0, 420.0, 115.0, -880.0, 75.0,
        ],
    }
}

/// How one domain images the anatomy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainStyle {
    /// Dataset name (also the domain name downstream).
    pub name: String,
    /// Voxels per axis, in RAS order (before the header orientation is applied).
    pub shape: [usize; 3],
    /// Spacing in mm, RAS order.
    pub spacing: [f64; 3],
    /// Slice thickness (mm): the slice profile FWHM along z.
    pub slice_thickness_mm: f64,
    /// Orientation code written in the header, e.g. `"LPS"`.
    pub orientation: String,
    pub phase: ContrastPhase,
    /// Calibration: stored HU = `hu_scale * HU + hu_offset`.
    pub hu_scale: f64,
    pub hu_offset: f64,
    /// Noise standard deviation (HU).
    pub noise_hu: f64,
    /// Noise correlation (Gaussian sigma, mm).
    pub noise_corr_mm: f64,
    /// Reconstruction kernel blur (Gaussian sigma, mm).
    pub blur_mm: f64,
    /// Amplitude of the smooth additive bias field (HU).
    pub bias_hu: f64,
    /// Data type of the written image.
    pub dtype: NiftiDtype,
}

impl DomainStyle {
    /// Checks the values; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let n = &self.name;
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(format!(
                "domain name '{n}' must be non-empty letters, digits, '-' or '_'"
            ));
        }
        if self.shape.iter().any(|&s| !(8..=1024).contains(&s)) {
            return Err(format!(
                "domain '{n}': shape {:?} must be 8..=1024 per axis",
                self.shape
            ));
        }
        if self
            .spacing
            .iter()
            .any(|&s| s.is_nan() || s <= 0.0 || s > 20.0)
        {
            return Err(format!(
                "domain '{n}': spacing {:?} must be in (0, 20] mm",
                self.spacing
            ));
        }
        crate::data::orientation::parse_axcodes(&self.orientation)
            .map_err(|e| format!("domain '{n}': {e}"))?;
        for (field, v) in [
            ("slice_thickness_mm", self.slice_thickness_mm),
            ("noise_hu", self.noise_hu),
            ("noise_corr_mm", self.noise_corr_mm),
            ("blur_mm", self.blur_mm),
            ("bias_hu", self.bias_hu),
        ] {
            if v.is_nan() || v < 0.0 {
                return Err(format!("domain '{n}': {field} must be >= 0, got {v}"));
            }
        }
        if self.hu_scale.is_nan() || self.hu_scale <= 0.0 {
            return Err(format!("domain '{n}': hu_scale must be > 0"));
        }
        if self.dtype == NiftiDtype::Uint8 {
            return Err(format!("domain '{n}': dtype must be int16 or float32"));
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn style(
    name: &str,
    shape: [usize; 3],
    spacing: [f64; 3],
    thickness: f64,
    orientation: &str,
    phase: ContrastPhase,
    scale_offset: (f64, f64),
    noise: (f64, f64),
    blur_mm: f64,
    bias_hu: f64,
    dtype: NiftiDtype,
) -> DomainStyle {
    DomainStyle {
        name: name.into(),
        shape,
        spacing,
        slice_thickness_mm: thickness,
        orientation: orientation.into(),
        phase,
        hu_scale: scale_offset.0,
        hu_offset: scale_offset.1,
        noise_hu: noise.0,
        noise_corr_mm: noise.1,
        blur_mm,
        bias_hu,
        dtype,
    }
}

/// The built-in domain presets: fields of view of about 230 x 230 x 130 mm at roughly
/// 96 x 96 x 64 voxels, each with a different protocol.
pub fn presets() -> Vec<DomainStyle> {
    use ContrastPhase::*;
    use NiftiDtype::*;
    vec![
        style(
            "venous",
            [96, 96, 64],
            [2.4, 2.4, 2.0],
            2.0,
            "RAS",
            PortalVenous,
            (1.0, 0.0),
            (12.0, 1.2),
            0.8,
            10.0,
            Int16,
        ),
        style(
            "arterial",
            [104, 104, 52],
            [2.2, 2.2, 2.5],
            3.0,
            "LPS",
            Arterial,
            (1.0, 20.0),
            (25.0, 0.6),
            0.3,
            20.0,
            Int16,
        ),
        style(
            "native",
            [88, 88, 80],
            [2.6, 2.6, 1.6],
            1.6,
            "LAS",
            NonContrast,
            (0.95, -10.0),
            (8.0, 2.0),
            1.6,
            5.0,
            Float32,
        ),
        style(
            "lowdose",
            [100, 100, 44],
            [2.3, 2.3, 3.0],
            5.0,
            "LPI",
            Delayed,
            (1.05, -30.0),
            (40.0, 1.8),
            1.0,
            35.0,
            Int16,
        ),
        style(
            "sagittal",
            [96, 96, 56],
            [2.4, 2.4, 2.3],
            2.3,
            "PIR",
            PortalVenous,
            (0.9, 15.0),
            (18.0, 1.0),
            0.5,
            15.0,
            Int16,
        ),
        style(
            "sharp",
            [110, 110, 60],
            [2.1, 2.1, 2.2],
            2.2,
            "RPS",
            Arterial,
            (1.0, -15.0),
            (30.0, 0.4),
            0.0,
            8.0,
            Float32,
        ),
    ]
}

/// A preset by name.
pub fn preset(name: &str) -> Option<DomainStyle> {
    presets().into_iter().find(|p| p.name == name)
}

/// Domain `index` for a count-only request: the presets first, then seeded
/// perturbations of them (named `domain<index>`).
pub fn derived(index: usize, seed: u64) -> DomainStyle {
    let all = presets();
    if index < all.len() {
        return all[index].clone();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_d0a1_0000_0000 ^ index as u64);
    let mut s = all[index % all.len()].clone();
    s.name = format!("domain{index}");
    let f = |rng: &mut ChaCha8Rng, lo: f64, hi: f64| rng.random_range(lo..hi);
    s.hu_scale = f(&mut rng, 0.9, 1.1);
    s.hu_offset = f(&mut rng, -40.0, 40.0);
    s.noise_hu = f(&mut rng, 6.0, 45.0);
    s.noise_corr_mm = f(&mut rng, 0.3, 2.2);
    s.blur_mm = f(&mut rng, 0.0, 1.8);
    s.bias_hu = f(&mut rng, 0.0, 40.0);
    let phases = [
        ContrastPhase::NonContrast,
        ContrastPhase::Arterial,
        ContrastPhase::PortalVenous,
        ContrastPhase::Delayed,
    ];
    s.phase = phases[rng.random_range(0..4)];
    let codes = ["RAS", "LPS", "LAS", "LPI", "RPS", "PIR"];
    s.orientation = codes[rng.random_range(0..codes.len())].into();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_distinct() {
        let p = presets();
        assert_eq!(p.len(), 6);
        for s in &p {
            s.validate().unwrap();
            let fov: Vec<f64> = (0..3).map(|a| s.shape[a] as f64 * s.spacing[a]).collect();
            assert!(
                fov[0] > 225.0 && fov[0] < 240.0 && fov[2] >= 128.0,
                "{fov:?}"
            );
        }
        let d = derived(7, 3);
        assert_eq!(d.name, "domain7");
        d.validate().unwrap();
        assert_eq!(derived(7, 3), d);
        assert_ne!(derived(7, 4), d);
        assert_eq!(derived(2, 0), p[2]);
        let mut bad = p[0].clone();
        bad.orientation = "XYZ".into();
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("invalid orientation code 'XYZ'"));
        assert_eq!(preset("lowdose").unwrap().orientation, "LPI");
    }
}
