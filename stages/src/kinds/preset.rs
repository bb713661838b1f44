//! Model configurations given as a named preset plus overrides.
//!
//! ```toml
//! preset = "tiny"                 # a named configuration
//! model = { depth = 4 }           # fields that differ from it (unknown fields rejected)
//! ```
//!
//! The resolved configuration is what a training stage builds and saves beside its weights.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Applies `overrides` (a JSON object of fields) onto `base`, rejecting unknown or mistyped
/// fields with serde's message prefixed by `what`.
pub fn apply_overrides<C: Serialize + DeserializeOwned>(
    base: &C,
    overrides: &serde_json::Map<String, serde_json::Value>,
    what: &str,
) -> Result<C, String> {
    let mut v = serde_json::to_value(base).map_err(|e| e.to_string())?;
    merge(&mut v, &serde_json::Value::Object(overrides.clone()));
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        format!("{what}.{path}: {}", e.into_inner())
    })
}

fn merge(base: &mut serde_json::Value, over: &serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot @ serde_json::Value::Object(_)) if v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        a: i64,
        inner: Inner,
    }
    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        x: f64,
        y: bool,
    }

    #[test]
    fn overrides_merge_and_reject_unknown_fields() {
        let base = Cfg {
            a: 1,
            inner: Inner { x: 0.5, y: true },
        };
        let o: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"inner": {"y": false}}"#).unwrap();
        assert_eq!(
            apply_overrides(&base, &o, "model").unwrap(),
            Cfg {
                a: 1,
                inner: Inner { x: 0.5, y: false }
            }
        );
        let bad: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"inner": {"z": 1}}"#).unwrap();
        let e = apply_overrides(&base, &bad, "model").unwrap_err();
        assert!(
            e.contains("model.inner") && e.contains("unknown field `z`"),
            "{e}"
        );
        let typed: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"a": "two"}"#).unwrap();
        let e = apply_overrides(&base, &typed, "model").unwrap_err();
        assert!(e.contains("model.a") && e.contains("expected i64"), "{e}");
    }
}
