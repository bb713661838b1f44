//! The crates' direction of dependency: libtorch (`tch`, `torch-sys`) is linked by the
//! `meduet-torch` crate and its worker binary only, never by the cache, the engine, the
//! stage declarations or the `meduet` binary (which starts in milliseconds because it
//! does not load libtorch). Read from `cargo tree` over normal and build dependencies.

use std::process::Command;

fn tree(package: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            "--offline",
            "--locked",
            "-e",
            "normal,build",
            "-p",
            package,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn torch_lines(t: &str) -> Vec<&str> {
    t.lines()
        .filter(|l| {
            l.contains(" tch v") || l.contains(" torch-sys v") || l.contains(" meduet-torch v")
        })
        .collect()
}

#[test]
fn libtorch_stays_out_of_the_cache_engine_stages_and_cli() {
    for package in ["meduet-cache", "meduet-engine", "meduet-stages", "meduet"] {
        let t = tree(package);
        assert!(t.lines().count() > 10, "{package}: {t}");
        let found = torch_lines(&t);
        assert!(found.is_empty(), "{package} depends on libtorch: {found:?}");
    }
    // The check can fail: the torch crate's tree has it.
    assert!(!torch_lines(&tree("meduet-torch")).is_empty());
}
