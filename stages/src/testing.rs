//! Helpers for tests that compare against Python references (the project venv).

use std::path::PathBuf;

/// The Python interpreter of the project venv: `$MEDUET_PYTHON`, else
/// `$MEDUET_VENV/bin/python`, else `~/.cache/meduet/venv/bin/python`. Panics with a hint
/// when it does not exist (run `scripts/setup` first).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("MEDUET_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var("MEDUET_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/meduet/venv")
        });
    let p = venv.join("bin/python");
    assert!(
        p.exists(),
        "the project venv python '{}' does not exist (hint: run scripts/setup)",
        p.display()
    );
    p
}

/// Runs a Python snippet with the venv interpreter; panics with its stderr on failure.
pub fn run_python(code: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
