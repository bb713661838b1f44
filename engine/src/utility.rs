//! Utility stage kinds: small text and file kinds for glue steps, examples, tests and
//! benchmarks of the engine itself (they need no libtorch).
//!
//! | kind          | does                                                          |
//! |---------------|---------------------------------------------------------------|
//! | `text`        | writes a given text (optionally slowly, in two halves)         |
//! | `concat`      | concatenates texts                                            |
//! | `transform`   | upper/lower-cases or copies a text                            |
//! | `split_lines` | emits one item per line (a collection)                        |
//! | `map_lines`   | fan-out: transforms each item                                 |
//! | `join_lines`  | joins a collection back into one text                         |
//! | `list_files`  | emits one item per file of a source folder (hashed by content) |
//! | `fail`        | fails with a message (for testing failure handling)           |
//! | `wait`        | waits in steps, checkpointed in scratch: resumes after a kill |

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::StageError;
use crate::params::SourcePath;
use crate::registry::Registry;
use crate::stage::{Arity, ArtifactType, InputSpec, OutputSpec, Stage, StageContext};

const TEXT: ArtifactType = ArtifactType::single("text");
const LINES: ArtifactType = ArtifactType::collection("lines");
const FILE_FILE: &str = "text.txt";

fn text_out() -> Vec<OutputSpec> {
    vec![OutputSpec {
        name: "text",
        ty: TEXT,
        doc: "a text file",
    }]
}

fn read_text(dir: &std::path::Path) -> Result<String, StageError> {
    let p = dir.join(FILE_FILE);
    fs::read_to_string(&p).map_err(|e| StageError::io(&p, e))
}

fn write_text(ctx: &StageContext, s: &str) -> Result<(), StageError> {
    let p = ctx.output_dir("text")?.join(FILE_FILE);
    fs::write(&p, s).map_err(|e| StageError::io(&p, e))
}

fn sleep_cancellable(ctx: &StageContext, ms: u64) -> Result<(), StageError> {
    let end = std::time::Instant::now() + Duration::from_millis(ms);
    while std::time::Instant::now() < end {
        ctx.check_cancelled()?;
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `text`.
pub struct Text;
#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TextParams {
    pub text: String,
    /// Milliseconds to wait between writing the first and the second half.
    pub delay_ms: u64,
}
impl Stage for Text {
    type Params = TextParams;
    const KIND: &'static str = "text";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "writes a given text";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        text_out()
    }
    fn run(&self, p: &TextParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let path = ctx.output_dir("text")?.join(FILE_FILE);
        let bytes = p.text.as_bytes();
        let half = bytes.len() / 2;
        fs::write(&path, &bytes[..half]).map_err(|e| StageError::io(&path, e))?;
        tracing::info!("wrote {half} of {} bytes", bytes.len());
        sleep_cancellable(ctx, p.delay_ms)?;
        fs::write(&path, bytes).map_err(|e| StageError::io(&path, e))?;
        ctx.set_metric("bytes", bytes.len());
        Ok(())
    }
}

/// `concat`.
pub struct Concat;
#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ConcatParams {
    pub separator: String,
}
impl Stage for Concat {
    type Params = ConcatParams;
    const KIND: &'static str = "concat";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "concatenates texts";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "parts",
            ty: TEXT,
            arity: Arity::Many,
            doc: "texts, in order",
        }]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        text_out()
    }
    fn run(&self, p: &ConcatParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let parts = ctx
            .inputs("parts")
            .iter()
            .map(|a| read_text(&a.dir))
            .collect::<Result<Vec<_>, _>>()?;
        write_text(ctx, &parts.join(&p.separator))
    }
}

/// `transform`.
pub struct Transform;
#[derive(Debug, Serialize, Deserialize, Clone, Copy, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TextOp {
    #[default]
    Identity,
    Upper,
    Lower,
}
fn apply(op: TextOp, s: &str) -> String {
    match op {
        TextOp::Identity => s.to_string(),
        TextOp::Upper => s.to_uppercase(),
        TextOp::Lower => s.to_lowercase(),
    }
}
#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TransformParams {
    pub op: TextOp,
}
impl Stage for Transform {
    type Params = TransformParams;
    const KIND: &'static str = "transform";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "upper/lower-cases or copies a text";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "text",
            ty: TEXT,
            arity: Arity::One,
            doc: "a text",
        }]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        text_out()
    }
    fn run(&self, p: &TransformParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let s = read_text(&ctx.input("text")?.dir)?;
        write_text(ctx, &apply(p.op, &s))
    }
}

/// `split_lines`.
pub struct SplitLines;
#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SplitParams {}
impl Stage for SplitLines {
    type Params = SplitParams;
    const KIND: &'static str = "split_lines";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "emits one item per non-empty line";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "text",
            ty: TEXT,
            arity: Arity::One,
            doc: "a text",
        }]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "lines",
            ty: LINES,
            doc: "one item per line",
        }]
    }
    fn run(&self, _p: &SplitParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let s = read_text(&ctx.input("text")?.dir)?;
        for (i, line) in s.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let id = format!("line{i:04}");
            let mut attrs = BTreeMap::new();
            attrs.insert("index".to_string(), serde_json::json!(i));
            let dir = ctx.emit_item("lines", &id, attrs)?;
            fs::write(dir.join(FILE_FILE), line).map_err(|e| StageError::io(&dir, e))?;
        }
        Ok(())
    }
}

/// `map_lines`.
pub struct MapLines;
#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MapParams {
    pub op: TextOp,
    /// Fail on items whose text contains this (empty: never).
    pub fail_on: String,
}
impl Stage for MapLines {
    type Params = MapParams;
    const KIND: &'static str = "map_lines";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "transforms each item of a collection (fan-out)";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "lines",
            ty: LINES,
            arity: Arity::One,
            doc: "a collection of lines",
        }]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "lines",
            ty: LINES,
            doc: "one item per input item",
        }]
    }
    fn map_over(&self) -> Option<&'static str> {
        Some("lines")
    }
    fn parallel_items(&self) -> bool {
        true
    }
    fn run_item(&self, p: &MapParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let item = ctx.item()?.clone();
        let s = read_text(&item.dir)?;
        if !p.fail_on.is_empty() && s.contains(&p.fail_on) {
            return Err(StageError::input(format!(
                "item '{}' contains '{}'",
                item.id, p.fail_on
            )));
        }
        let out = ctx.output_dir("lines")?.join(FILE_FILE);
        fs::write(&out, apply(p.op, &s)).map_err(|e| StageError::io(&out, e))?;
        ctx.set_item_attr("length", serde_json::json!(s.len()));
        Ok(())
    }
}

/// `join_lines`.
pub struct JoinLines;
impl Stage for JoinLines {
    type Params = SplitParams;
    const KIND: &'static str = "join_lines";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "joins a collection into one text";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "lines",
            ty: LINES,
            arity: Arity::One,
            doc: "a collection of lines",
        }]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        text_out()
    }
    fn run(&self, _p: &SplitParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let items = ctx.input("lines")?.items.clone();
        let parts = items
            .iter()
            .map(|i| read_text(&i.dir))
            .collect::<Result<Vec<_>, _>>()?;
        write_text(ctx, &parts.join("\n"))
    }
}

/// `list_files`.
pub struct ListFiles;
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListFilesParams {
    pub path: SourcePath,
}
impl Stage for ListFiles {
    type Params = ListFilesParams;
    const KIND: &'static str = "list_files";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "emits one item per file of a source folder or glob";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "lines",
            ty: LINES,
            doc: "one item per file, holding its text",
        }]
    }
    fn run(&self, p: &ListFilesParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let tree = ctx.source(&p.path)?.clone();
        for (i, f) in tree.files.iter().enumerate() {
            let src = tree.path_of(&f.path);
            let text = fs::read_to_string(&src).map_err(|e| StageError::io(&src, e))?;
            let mut attrs = BTreeMap::new();
            attrs.insert("name".to_string(), serde_json::json!(f.path));
            let dir = ctx.emit_item("lines", &format!("file{i:04}"), attrs)?;
            fs::write(dir.join(FILE_FILE), text).map_err(|e| StageError::io(&dir, e))?;
        }
        Ok(())
    }
}

/// `fail`.
pub struct Fail;
#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FailParams {
    pub message: String,
    /// Panic instead of returning the error (a crashing stage).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub panic: bool,
}
impl Stage for Fail {
    type Params = FailParams;
    const KIND: &'static str = "fail";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "fails with a message (or panics, `panic = true`)";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "after",
            ty: TEXT,
            arity: Arity::Any,
            doc: "texts to wait for",
        }]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        text_out()
    }
    fn run(&self, p: &FailParams, _ctx: &mut StageContext) -> Result<(), StageError> {
        if p.panic {
            panic!("{}", p.message);
        }
        Err(StageError::failed(if p.message.is_empty() {
            "failed on purpose"
        } else {
            &p.message
        }))
    }
}

/// `wait`: the smallest resumable stage. It waits `steps` steps of `step_ms` and
/// records the steps done in its scratch folder after each one (written atomically), so
/// a run killed or timed out midway resumes where it stopped; its output does not depend
/// on how often it was interrupted.
pub struct Wait;
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WaitParams {
    pub steps: u64,
    pub step_ms: u64,
}
impl Default for WaitParams {
    fn default() -> Self {
        Self {
            steps: 10,
            step_ms: 1000,
        }
    }
}
const WAIT_STATE: &str = "wait.step";
impl Stage for Wait {
    type Params = WaitParams;
    const KIND: &'static str = "wait";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "waits in checkpointed steps (resumes after a kill)";
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "after",
            ty: TEXT,
            arity: Arity::Any,
            doc: "texts to wait for",
        }]
    }
    fn outputs(&self) -> Vec<OutputSpec> {
        text_out()
    }
    fn run(&self, p: &WaitParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let state = ctx.scratch_dir()?.join(WAIT_STATE);
        let done: u64 = fs::read_to_string(&state)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
            .min(p.steps);
        if done > 0 {
            tracing::info!("resuming at step {done} of {}", p.steps);
        }
        ctx.set_metric("resumed_at", done);
        for step in done..p.steps {
            sleep_cancellable(ctx, p.step_ms)?;
            let tmp = state.with_extension("tmp");
            fs::write(&tmp, (step + 1).to_string()).map_err(|e| StageError::io(&tmp, e))?;
            fs::rename(&tmp, &state).map_err(|e| StageError::io(&state, e))?;
        }
        write_text(
            ctx,
            &format!("counted {} steps of {} ms\n", p.steps, p.step_ms),
        )
    }
}

/// Registers the utility kinds.
pub fn register(r: &mut Registry) {
    r.register(Text)
        .register(Concat)
        .register(Transform)
        .register(SplitLines)
        .register(MapLines)
        .register(JoinLines)
        .register(ListFiles)
        .register(Fail)
        .register(Wait);
}
