//! One lease per key, never one lock for the whole cache.
//!
//! A lease is the file `leases/<key>.lease`, created with `O_EXCL`, holding the owner's
//! host, pid and start time as JSON. The owner keeps it open and touches its mtime every
//! `heartbeat` (the heartbeat *is* the mtime). A second process that needs the same key
//! waits until the object appears, then reuses it. A lease is *stale*, and broken
//! automatically with a log line, when its owner is on this host and its pid is dead, or
//! when its heartbeat is older than `stale_after` (owners on other hosts, such as
//! cluster nodes, are judged by heartbeat only).
//!
//! Breaking races: two waiters may both find the same lease stale. Breaking goes through
//! a second `O_EXCL` file (`<key>.lease.break`); whoever creates it re-reads the lease,
//! deletes it only if it is still the same stale lease (same pid and start), and removes
//! the break file. A break file older than `stale_after` is itself stale.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::digest::StageKey;
use crate::error::{CacheError, IoContext, Result};
use crate::store::Store;

/// Timing of leases. Defaults: heartbeat every 5 s, stale after 30 s without one, poll
/// every 100 ms. `MEDUET_LEASE_STALE_SECS` overrides the staleness (tests use 2).
#[derive(Debug, Clone, Copy)]
pub struct LeaseOptions {
    pub heartbeat: Duration,
    pub stale_after: Duration,
    pub poll: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        let stale = std::env::var("MEDUET_LEASE_STALE_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .unwrap_or(30.0);
        Self {
            heartbeat: Duration::from_secs_f64((stale / 6.0).max(0.05)),
            stale_after: Duration::from_secs_f64(stale),
            poll: Duration::from_millis(100),
        }
    }
}

/// What a lease file says about its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub host: String,
    pub pid: u32,
    /// Unix time (seconds) when the lease was taken.
    pub started_unix: u64,
    /// Free text: what holds it (stage name, run id).
    #[serde(default)]
    pub holder: String,
}

/// The result of [`Store::acquire_or_wait`].
pub enum Acquired {
    /// We hold the lease: compute the object, commit it, then drop the guard.
    Lease(LeaseGuard),
    /// The object was committed (possibly by the process we waited for).
    ObjectReady,
}

/// A held lease; dropping it releases the lease (only if it is still ours).
pub struct LeaseGuard {
    path: PathBuf,
    ino: u64,
    stop: Arc<AtomicBool>,
    heartbeat: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.heartbeat.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        if fs::metadata(&self.path).map(|m| m.ino()).ok() == Some(self.ino) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// This machine's host name.
pub fn host_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Whether `pid` is a live process on this host.
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn age(path: &PathBuf) -> Option<Duration> {
    let m = fs::metadata(path).ok()?.modified().ok()?;
    Some(SystemTime::now().duration_since(m).unwrap_or_default())
}

impl Store {
    /// Reads the lease of `key`, if any, with the age of its heartbeat.
    pub fn lease_info(&self, key: &StageKey) -> Option<(LeaseInfo, Duration)> {
        let path = self.lease_path(key);
        let text = fs::read_to_string(&path).ok()?;
        let info: LeaseInfo = serde_json::from_str(&text).ok()?;
        Some((info, age(&path)?))
    }

    /// Why the lease of `key` is stale (its owner on this host is dead, or its heartbeat
    /// stopped), or `None` when it is live or absent. A stale lease is broken by the next
    /// run that needs the key.
    pub fn lease_stale_reason(&self, key: &StageKey) -> Option<String> {
        self.stale_reason(key, &host_name(), LeaseOptions::default())
    }

    /// Takes the lease of `key`, or waits for whoever holds it. Returns
    /// [`Acquired::ObjectReady`] as soon as the object exists. `cancelled` is polled
    /// while waiting.
    pub fn acquire_or_wait(
        &self,
        key: &StageKey,
        holder: &str,
        opts: LeaseOptions,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Acquired> {
        let path = self.lease_path(key);
        let me = host_name();
        let mut announced = false;
        loop {
            if self.contains(key) {
                return Ok(Acquired::ObjectReady);
            }
            if cancelled() {
                return Err(CacheError::Cancelled(*key));
            }
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    let info = LeaseInfo {
                        host: me.clone(),
                        pid: std::process::id(),
                        started_unix: crate::store::now_unix(),
                        holder: holder.to_string(),
                    };
                    file.write_all(serde_json::to_string(&info).unwrap().as_bytes())
                        .at(&path)?;
                    file.sync_all().at(&path)?;
                    let ino = file.metadata().at(&path)?.ino();
                    let guard = start_heartbeat(path.clone(), file, ino, opts.heartbeat);
                    // The holder we waited for may have committed just before we got here.
                    if self.contains(key) {
                        drop(guard);
                        return Ok(Acquired::ObjectReady);
                    }
                    return Ok(Acquired::Lease(guard));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if let Some(reason) = self.stale_reason(key, &me, opts) {
                        self.break_lease(key, &reason, opts);
                        continue;
                    }
                    if !announced {
                        if let Some((info, _)) = self.lease_info(key) {
                            tracing::info!(
                                key = %key.short(),
                                "waiting for {} (pid {} on {}) which is computing this object",
                                if info.holder.is_empty() { "another run" } else { &info.holder },
                                info.pid,
                                info.host
                            );
                        }
                        announced = true;
                    }
                    std::thread::sleep(opts.poll);
                }
                Err(e) => return Err(e).at(&path),
            }
        }
    }

    fn stale_reason(&self, key: &StageKey, me: &str, opts: LeaseOptions) -> Option<String> {
        let path = self.lease_path(key);
        let text = fs::read_to_string(&path).ok()?;
        let hb_age = age(&path)?;
        match serde_json::from_str::<LeaseInfo>(&text) {
            Ok(info) => {
                if info.host == me && !pid_alive(info.pid) {
                    Some(format!(
                        "its owner pid {} on {} is dead",
                        info.pid, info.host
                    ))
                } else if hb_age > opts.stale_after {
                    Some(format!(
                        "no heartbeat from pid {} on {} for {:.1}s",
                        info.pid,
                        info.host,
                        hb_age.as_secs_f64()
                    ))
                } else {
                    None
                }
            }
            // An unreadable lease (torn write by a crash right after create) is judged by age.
            Err(_) => (hb_age > opts.stale_after).then(|| {
                format!(
                    "unreadable lease file untouched for {:.1}s",
                    hb_age.as_secs_f64()
                )
            }),
        }
    }

    fn break_lease(&self, key: &StageKey, reason: &str, opts: LeaseOptions) {
        let path = self.lease_path(key);
        let brk = path.with_extension("lease.break");
        if age(&brk).is_some_and(|a| a > opts.stale_after) {
            let _ = fs::remove_file(&brk);
        }
        let Ok(_b) = OpenOptions::new().write(true).create_new(true).open(&brk) else {
            std::thread::sleep(opts.poll);
            return;
        };
        let before = fs::read_to_string(&path).ok();
        // Re-check under the break file: still present and still stale?
        if before.is_some() && self.stale_reason(key, &host_name(), opts).is_some() {
            tracing::warn!(key = %key.short(), "breaking stale lease {}: {}", path.display(), reason);
            let _ = fs::remove_file(&path);
        }
        let _ = fs::remove_file(&brk);
    }
}

fn start_heartbeat(path: PathBuf, file: File, ino: u64, every: Duration) -> LeaseGuard {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let handle = std::thread::Builder::new()
        .name("meduet-lease-heartbeat".into())
        .spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                std::thread::park_timeout(every);
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let _ = file.set_modified(SystemTime::now());
            }
        })
        .expect("spawn heartbeat thread");
    LeaseGuard {
        path,
        ino,
        stop,
        heartbeat: Some(handle),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Provenance;

    fn key(n: u8) -> StageKey {
        StageKey::from_bytes([n; 32])
    }

    fn fast() -> LeaseOptions {
        LeaseOptions {
            heartbeat: Duration::from_millis(50),
            stale_after: Duration::from_millis(400),
            poll: Duration::from_millis(10),
        }
    }

    #[test]
    fn second_waiter_reuses_committed_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let Acquired::Lease(guard) = store
            .acquire_or_wait(&key(1), "a", fast(), &|| false)
            .unwrap()
        else {
            panic!("first must acquire");
        };
        let s2 = store.clone();
        let waiter = std::thread::spawn(move || {
            matches!(
                s2.acquire_or_wait(&key(1), "b", fast(), &|| false).unwrap(),
                Acquired::ObjectReady
            )
        });
        std::thread::sleep(Duration::from_millis(700)); // longer than stale_after: heartbeat keeps it alive
        let st = store.stage(key(1)).unwrap();
        fs::write(st.output_dir("o").unwrap().join("f"), b"x").unwrap();
        st.commit(Provenance::default()).unwrap();
        drop(guard);
        assert!(waiter.join().unwrap());
        assert!(!store.lease_path(&key(1)).exists());
    }

    #[test]
    fn lease_of_dead_pid_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // A pid that cannot exist (beyond pid_max).
        let info = LeaseInfo {
            host: host_name(),
            pid: 4_000_000_000,
            started_unix: 0,
            holder: "ghost".into(),
        };
        fs::write(
            store.lease_path(&key(2)),
            serde_json::to_string(&info).unwrap(),
        )
        .unwrap();
        let opts = LeaseOptions {
            stale_after: Duration::from_secs(3600),
            ..fast()
        };
        assert!(matches!(
            store
                .acquire_or_wait(&key(2), "me", opts, &|| false)
                .unwrap(),
            Acquired::Lease(_)
        ));
    }

    #[test]
    fn lease_without_heartbeat_is_broken_after_stale_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let info = LeaseInfo {
            host: "other-host".into(),
            pid: 1,
            started_unix: 0,
            holder: "remote".into(),
        };
        let p = store.lease_path(&key(3));
        fs::write(&p, serde_json::to_string(&info).unwrap()).unwrap();
        let t0 = std::time::Instant::now();
        assert!(matches!(
            store
                .acquire_or_wait(&key(3), "me", fast(), &|| false)
                .unwrap(),
            Acquired::Lease(_)
        ));
        assert!(t0.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn cancel_while_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let _held = store
            .acquire_or_wait(&key(4), "a", fast(), &|| false)
            .unwrap();
        let r = store.acquire_or_wait(&key(4), "b", fast(), &|| true);
        assert!(matches!(r, Err(CacheError::Cancelled(_))));
    }
}
