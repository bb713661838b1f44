//! Loading converted MONAI weights into the VAE's `VarStore`, strictly.
//!
//! `VarStore::load` would stop at the first missing tensor and `fill_safetensors` ignores
//! what does not match; [`load_vae_safetensors`] instead compares the file with the
//! store as a whole and fails with a [`KeyReport`] that lists every missing key, every
//! unexpected key and every shape mismatch, so that a checkpoint of another width or of
//! the old MONAI-generative layout is diagnosed in one go.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use tch::{nn::VarStore, Tensor};

use super::VaeError;

/// A tensor present on both sides whose shape (or kind) differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// The key.
    pub name: String,
    /// Shape of the network's variable.
    pub expected: Vec<i64>,
    /// Shape in the file.
    pub found: Vec<i64>,
    /// Set when the shapes agree but the file's kind is not floating point.
    pub kind: Option<String>,
}

/// Differences between a weight file and the network's variables; empty when they fit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyReport {
    /// Variables of the network absent from the file (sorted).
    pub missing: Vec<String>,
    /// Tensors of the file the network has no variable for (sorted).
    pub unexpected: Vec<String>,
    /// Tensors present on both sides with different shapes or a non-float kind (sorted).
    pub mismatched: Vec<ShapeMismatch>,
}

impl KeyReport {
    /// True when every variable has a tensor of its shape and nothing is left over.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    /// Compares named shapes (and float-ness) of the variables with those of the file.
    pub fn compare(
        variables: &BTreeMap<String, Vec<i64>>,
        file: &BTreeMap<String, (Vec<i64>, tch::Kind)>,
    ) -> KeyReport {
        let vk: BTreeSet<&String> = variables.keys().collect();
        let fk: BTreeSet<&String> = file.keys().collect();
        let mut mismatched = Vec::new();
        for name in vk.intersection(&fk) {
            let expected = &variables[*name];
            let (found, kind) = &file[*name];
            let not_float = !matches!(
                kind,
                tch::Kind::Half | tch::Kind::BFloat16 | tch::Kind::Float | tch::Kind::Double
            );
            if expected != found || not_float {
                mismatched.push(ShapeMismatch {
                    name: (*name).clone(),
                    expected: expected.clone(),
                    found: found.clone(),
                    kind: not_float.then(|| format!("{kind:?}")),
                });
            }
        }
        KeyReport {
            missing: vk.difference(&fk).map(|s| (*s).clone()).collect(),
            unexpected: fk.difference(&vk).map(|s| (*s).clone()).collect(),
            mismatched,
        }
    }

    /// True when the unexpected keys look like the pre-MONAI-1.4 layout
    /// (`encoder.blocks.0.conv.weight` for today's `encoder.blocks.0.conv.conv.weight`).
    fn looks_like_old_layout(&self) -> bool {
        self.unexpected
            .iter()
            .any(|k| k == "encoder.blocks.0.conv.weight" || k == "decoder.blocks.0.conv.weight")
    }
}

impl fmt::Display for KeyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  missing keys ({}):", self.missing.len())?;
        for k in &self.missing {
            writeln!(f, "    {k}")?;
        }
        writeln!(f, "  unexpected keys ({}):", self.unexpected.len())?;
        for k in &self.unexpected {
            writeln!(f, "    {k}")?;
        }
        writeln!(f, "  shape mismatches ({}):", self.mismatched.len())?;
        for m in &self.mismatched {
            match &m.kind {
                Some(kind) => writeln!(f, "    {}: kind {kind} is not floating point", m.name)?,
                None => writeln!(
                    f,
                    "    {}: network {:?}, file {:?}",
                    m.name, m.expected, m.found
                )?,
            }
        }
        if self.looks_like_old_layout() {
            write!(
                f,
                "  (hint: the file uses the old MONAI-generative key layout; convert the \
                 original checkpoint with scripts/convert_maisi.py, which remaps it)"
            )?;
        } else {
            write!(
                f,
                "  (hint: check that the vae config (num_channels, num_res_blocks, \
                 latent_channels) is the one the weights were trained with)"
            )?;
        }
        Ok(())
    }
}

/// Loads a safetensors file written by `scripts/convert_maisi.py` (or by
/// `VarStore::save`) into `vs`, which must hold exactly the network's variables (an
/// [`super::AutoencoderKlMaisi`] built on its root). Every key is mapped: on any missing
/// key, unexpected key or shape mismatch nothing is copied and the error lists them all.
/// Tensors are converted to each variable's kind and device. Returns the number of
/// tensors loaded.
pub fn load_vae_safetensors(path: &Path, vs: &mut VarStore) -> Result<usize, VaeError> {
    let read_err = |source| VaeError::Read {
        path: path.display().to_string(),
        source,
    };
    let file: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(read_err)?
        .into_iter()
        .collect();
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let report = KeyReport::compare(
        &vars.iter().map(|(k, v)| (k.clone(), v.size())).collect(),
        &file
            .iter()
            .map(|(k, t)| (k.clone(), (t.size(), t.kind())))
            .collect(),
    );
    if !report.is_empty() {
        return Err(VaeError::Weights {
            path: path.display().to_string(),
            report,
        });
    }
    tch::no_grad(|| -> Result<(), VaeError> {
        for (name, mut var) in vars {
            var.f_copy_(&file[&name])?;
        }
        Ok(())
    })?;
    Ok(file.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn report_lists_all_three_kinds_of_difference() {
        let vars: BTreeMap<String, Vec<i64>> = [
            ("a.weight", vec![4, 4]),
            ("b.weight", vec![2]),
            ("c.weight", vec![3]),
            ("d.weight", vec![1]),
        ]
        .into_iter()
        .map(|(k, s)| (k.to_string(), s))
        .collect();
        let file: BTreeMap<String, (Vec<i64>, Kind)> = [
            ("a.weight", vec![4, 4], Kind::Float),
            ("b.weight", vec![3], Kind::Half),
            ("d.weight", vec![1], Kind::Int64),
            ("z.weight", vec![1], Kind::Float),
        ]
        .into_iter()
        .map(|(k, s, kind)| (k.to_string(), (s, kind)))
        .collect();
        let r = KeyReport::compare(&vars, &file);
        assert_eq!(r.missing, vec!["c.weight"]);
        assert_eq!(r.unexpected, vec!["z.weight"]);
        assert_eq!(r.mismatched.len(), 2);
        assert_eq!(r.mismatched[0].name, "b.weight");
        assert_eq!(r.mismatched[0].found, vec![3]);
        assert_eq!(r.mismatched[1].kind.as_deref(), Some("Int64"));
        let text = r.to_string();
        assert!(text.contains("network [2], file [3]"), "{text}");
        assert!(text.contains("kind Int64 is not floating point"), "{text}");
    }
}
