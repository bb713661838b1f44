//! The registry of stage kinds, and the type-erased view of a [`Stage`] the engine uses.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::StageError;
use crate::resources::Resources;
use crate::stage::{InputSpec, OutputSpec, Stage, StageContext};

/// A stage kind as the engine sees it (parameters as JSON).
pub trait DynStage: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn about(&self) -> &'static str;
    fn inputs(&self) -> Vec<InputSpec>;
    fn outputs(&self) -> Vec<OutputSpec>;
    fn default_resources(&self) -> Resources;
    fn map_over(&self) -> Option<&'static str>;
    fn parallel_items(&self) -> bool;
    /// Parses a parameter table into canonical JSON (defaults filled). On error returns
    /// `(parameter path, message)`.
    fn resolve_params(&self, raw: toml::Table) -> Result<serde_json::Value, (String, String)>;
    fn seed(&self, params: &serde_json::Value) -> Option<u64>;
    /// What named presets in the parameters resolve to ([`Stage::resolved`]).
    fn resolved(&self, params: &serde_json::Value) -> Option<serde_json::Value>;
    /// Versions of shared code that enter the key ([`Stage::code_versions`]).
    fn code_versions(&self) -> &'static [(&'static str, u32)];
    /// Whether the device class enters the key ([`Stage::device_dependent`]).
    fn device_dependent(&self, params: &serde_json::Value) -> bool;
    /// The worker binary that must run this kind, or `None` when this process can.
    fn worker(&self) -> Option<&'static str>;
    fn run(&self, params: &serde_json::Value, ctx: &mut StageContext) -> Result<(), StageError>;
    fn run_item(
        &self,
        params: &serde_json::Value,
        ctx: &mut StageContext,
    ) -> Result<(), StageError>;
}

/// A typed implementation supplied apart from the kind's declaration.
pub type RunFn<S> = Box<
    dyn Fn(&S, &<S as Stage>::Params, &mut StageContext) -> Result<(), StageError> + Send + Sync,
>;

/// The implementation of a kind whose declaration says it runs in a worker.
pub struct Implementation<S: Stage> {
    pub run: Option<RunFn<S>>,
    pub run_item: Option<RunFn<S>>,
}

impl<S: Stage> Implementation<S> {
    /// A whole-stage implementation.
    pub fn run(
        f: impl Fn(&S, &S::Params, &mut StageContext) -> Result<(), StageError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            run: Some(Box::new(f)),
            run_item: None,
        }
    }
    /// A per-item implementation (fan-out kinds).
    pub fn run_item(
        f: impl Fn(&S, &S::Params, &mut StageContext) -> Result<(), StageError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            run: None,
            run_item: Some(Box::new(f)),
        }
    }
}

struct Typed<S: Stage> {
    stage: S,
    implementation: Option<Implementation<S>>,
}

/// The new spelling of a moved parameter named by serde's "unknown field `x`" message.
fn moved_hint(message: &str, moved: &[(&str, &str)]) -> Option<String> {
    let field = message.strip_prefix("unknown field `")?.split('`').next()?;
    let (_, new) = moved.iter().find(|(old, _)| *old == field)?;
    Some(format!("`{field}` is now written `{new}`"))
}

fn parse<S: Stage>(params: &serde_json::Value) -> Result<S::Params, StageError> {
    serde_json::from_value(params.clone())
        .map_err(|e| StageError::failed(format!("parameters of '{}' do not parse: {e}", S::KIND)))
}

impl<S: Stage> DynStage for Typed<S> {
    fn kind(&self) -> &'static str {
        S::KIND
    }
    fn version(&self) -> u32 {
        S::VERSION
    }
    fn about(&self) -> &'static str {
        S::ABOUT
    }
    fn inputs(&self) -> Vec<InputSpec> {
        self.stage.inputs()
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        self.stage.outputs()
    }
    fn default_resources(&self) -> Resources {
        self.stage.default_resources()
    }
    fn map_over(&self) -> Option<&'static str> {
        self.stage.map_over()
    }
    fn parallel_items(&self) -> bool {
        self.stage.parallel_items()
    }
    fn resolve_params(&self, raw: toml::Table) -> Result<serde_json::Value, (String, String)> {
        let mut typed: S::Params = serde_path_to_error::deserialize(toml::Value::Table(raw))
            .map_err(|e| {
                let path = e.path().to_string();
                let path = if path == "." { String::new() } else { path };
                let message = e.into_inner().message().to_string();
                let message = match moved_hint(&message, self.stage.moved_params()) {
                    Some(hint) => format!("{message}; {hint}"),
                    None => message,
                };
                (path, message)
            })?;
        self.stage.resolve(&mut typed);
        self.stage.validate(&typed).map_err(|m| {
            // Validation messages start with the parameter name when they concern one.
            let param = m.split(':').next().unwrap_or("").trim().to_string();
            if param.contains(' ') {
                (String::new(), m)
            } else {
                (
                    param,
                    m.split_once(':')
                        .map(|x| x.1.trim().to_string())
                        .unwrap_or(m),
                )
            }
        })?;
        serde_json::to_value(&typed).map_err(|e| (String::new(), e.to_string()))
    }
    fn seed(&self, params: &serde_json::Value) -> Option<u64> {
        parse::<S>(params).ok().and_then(|p| self.stage.seed(&p))
    }
    fn resolved(&self, params: &serde_json::Value) -> Option<serde_json::Value> {
        parse::<S>(params)
            .ok()
            .and_then(|p| self.stage.resolved(&p))
    }
    fn code_versions(&self) -> &'static [(&'static str, u32)] {
        self.stage.code_versions()
    }
    fn device_dependent(&self, params: &serde_json::Value) -> bool {
        parse::<S>(params)
            .map(|p| self.stage.device_dependent(&p))
            .unwrap_or(false)
    }
    fn worker(&self) -> Option<&'static str> {
        match (self.stage.runtime(), &self.implementation) {
            (crate::stage::Runtime::Worker(name), None) => Some(name),
            _ => None,
        }
    }
    fn run(&self, params: &serde_json::Value, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = parse::<S>(params)?;
        match self.implementation.as_ref().and_then(|i| i.run.as_ref()) {
            Some(f) => f(&self.stage, &p, ctx),
            None => self.stage.run(&p, ctx),
        }
    }
    fn run_item(
        &self,
        params: &serde_json::Value,
        ctx: &mut StageContext,
    ) -> Result<(), StageError> {
        let p = parse::<S>(params)?;
        match self
            .implementation
            .as_ref()
            .and_then(|i| i.run_item.as_ref())
        {
            Some(f) => f(&self.stage, &p, ctx),
            None => self.stage.run_item(&p, ctx),
        }
    }
}

/// All known stage kinds.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn DynStage>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a kind. Panics if the name is taken (a programming error).
    pub fn register<S: Stage>(&mut self, stage: S) -> &mut Self {
        let prev = self.kinds.insert(
            S::KIND,
            Arc::new(Typed {
                stage,
                implementation: None,
            }),
        );
        assert!(prev.is_none(), "stage kind '{}' registered twice", S::KIND);
        self
    }

    /// Supplies the implementation of a kind declared with a worker runtime (the worker
    /// binary calls this for the kinds it runs). Replaces the declaration-only entry.
    pub fn implement<S: Stage>(
        &mut self,
        stage: S,
        implementation: Implementation<S>,
    ) -> &mut Self {
        self.kinds.insert(
            S::KIND,
            Arc::new(Typed {
                stage,
                implementation: Some(implementation),
            }),
        );
        self
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn DynStage>> {
        self.kinds.get(kind).cloned()
    }

    /// Kind names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn DynStage>> {
        self.kinds.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::{ArtifactType, Runtime};

    struct Declared;
    impl Stage for Declared {
        type Params = serde_json::Value;
        const KIND: &'static str = "declared";
        const VERSION: u32 = 1;
        const ABOUT: &'static str = "declared here, implemented in a worker";
        fn inputs(&self) -> Vec<InputSpec> {
            vec![]
        }
        fn outputs(&self) -> Vec<OutputSpec> {
            vec![OutputSpec {
                name: "text",
                ty: ArtifactType::single("text"),
                doc: "",
            }]
        }
        fn runtime(&self) -> Runtime {
            Runtime::Worker("meduet-test-worker")
        }
    }

    #[test]
    fn implementations_replace_declarations() {
        let mut r = Registry::new();
        r.register(Declared);
        assert_eq!(
            r.get("declared").unwrap().worker(),
            Some("meduet-test-worker")
        );
        r.implement(
            Declared,
            Implementation::run(|_, _, ctx| {
                ctx.set_metric("ran", true);
                Ok(())
            }),
        );
        let k = r.get("declared").unwrap();
        assert_eq!(k.worker(), None, "an implemented kind runs in this process");
        let dir = tempfile::tempdir().unwrap();
        let mut ctx = crate::stage::StageContext::for_tests(dir.path(), k.outputs());
        k.run(&serde_json::json!({}), &mut ctx).unwrap();
        assert_eq!(ctx.metrics()["ran"], true);
    }
}
