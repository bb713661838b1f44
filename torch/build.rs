//! Links meduet-torch and its test binaries so they run without LD_LIBRARY_PATH and find CUDA.
//!
//! torch-sys declares `links = "tch"`, so its build script's `libtorch_lib` metadata
//! reaches us as `DEP_TCH_LIBTORCH_LIB`. We add an rpath to that folder and force
//! libtorch itself to be linked (`--no-as-needed -ltorch`): without it the linker drops
//! `libtorch_cuda` and CUDA is reported unavailable on GPU machines.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{dir}");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=MEDUET_GIT_COMMIT={commit}");
}
