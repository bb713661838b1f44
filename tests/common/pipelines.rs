//! Small pipelines of the engine's utility kinds (fast: no tensors) that several test
//! files run.

/// One `text` stage, `a`, writing `text`.
pub fn text_stage(text: &str) -> String {
    format!("[stages.a]\nkind = \"text\"\ntext = \"{text}\"\n")
}

/// [`text_stage`] followed by `b`, which upper-cases `a`'s text.
pub fn text_then_upper(text: &str) -> String {
    format!(
        "{}[stages.b]\nkind = \"transform\"\ninputs = {{ text = \"a.text\" }}\nop = \"upper\"\n",
        text_stage(text)
    )
}

/// Two branches that meet: `a` (three lines) -> `split` -> `up` (one item per line), and
/// `b`; `join` concatenates `b` and `a`. `a` and `b` each take `delay_ms`, so that two
/// runs started together overlap. Each stage and item computed once makes the
/// successful runs `a`, `b`, `join`, `split`, `up` and `up[line0000]` to `up[line0002]`.
pub fn two_branches(delay_ms: u64) -> String {
    format!(
        r#"
[stages.a]
kind = "text"
text = "one\ntwo\nthree"
delay_ms = {delay_ms}
[stages.split]
kind = "split_lines"
inputs = {{ text = "a.text" }}
[stages.up]
kind = "map_lines"
inputs = {{ lines = "split.lines" }}
op = "upper"
[stages.b]
kind = "text"
text = "independent"
delay_ms = {delay_ms}
[stages.join]
kind = "concat"
inputs = {{ parts = ["b.text", "a.text"] }}
"#
    )
}
