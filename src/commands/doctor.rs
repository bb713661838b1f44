//! `meduet doctor`: the environment (versions, cores, the torch worker, the cache and its
//! free disk, the stage kinds).

use std::path::{Path, PathBuf};

use anyhow::Result;
use meduet_cache::Store;
use meduet_engine::Registry;

use super::common::{load, versions};
use super::output::human_bytes;
use crate::cli::DoctorArgs;

/// `meduet doctor [PIPELINE]`.
pub(super) fn doctor(args: DoctorArgs, registry: &Registry) -> Result<i32> {
    let v = versions();
    println!(
        "meduet        {} (commit {})",
        v.meduet,
        v.git_commit.as_deref().unwrap_or("unknown")
    );
    println!(
        "cores         {}",
        meduet_engine::resources::machine_threads()
    );
    print_torch();
    let dir = match (&args.cache.cache, &args.pipeline) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(p)) => Some(load(p, registry)?.cache_dir),
        (None, None) => None,
    };
    print_cache(dir)?;
    println!("stage kinds   {}", registry.names().join(", "));
    Ok(0)
}

/// What the libtorch worker (`meduet-torch doctor`) reports, or why it cannot.
fn print_torch() {
    match meduet_engine::worker::worker_binary("meduet-torch") {
        Ok(bin) => match std::process::Command::new(&bin).arg("doctor").output() {
            Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
            Ok(o) => println!(
                "torch         worker '{}' failed: {}",
                bin.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => println!("torch         cannot run worker '{}': {e}", bin.display()),
        },
        Err(e) => println!("torch         {e}"),
    }
}

/// The cache folder (whether it exists yet) and the free disk under it; without one, the
/// free disk of the current folder.
fn print_cache(dir: Option<PathBuf>) -> Result<()> {
    match dir {
        Some(d) => {
            let exists = Store::open_existing(&d).is_some();
            println!(
                "cache         {}{}",
                d.display(),
                if exists { "" } else { " (not created yet)" }
            );
            if let Some(free) = free_disk(&d) {
                println!("free disk     {}", human_bytes(free));
            }
        }
        None => {
            println!("cache         (give a pipeline file or --cache to check one; default: .meduet/ beside the pipeline file)");
            if let Some(free) = free_disk(&std::env::current_dir()?) {
                println!("free disk     {} (current folder)", human_bytes(free));
            }
        }
    }
    Ok(())
}

/// Bytes free for an unprivileged user on the filesystem of `path` (or of its nearest
/// existing ancestor).
fn free_disk(path: &Path) -> Option<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
    }
    let c = std::ffi::CString::new(p.to_string_lossy().as_bytes()).ok()?;
    // SAFETY: statvfs fills a plain struct for a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut s) == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
    }
}
