//! Live roots: what running processes use, kept by `gc` while they live.
//!
//! The last run of each pipeline is recorded in `roots/` only when the run ends, so without
//! more a `gc` during a run would delete objects the run committed (or found cached) and
//! still needs. Every process that runs stages therefore holds a *live root*:
//! `live/<host>-<pid>-<nanos>.json` with its owner (host, pid, start) and the keys it uses.
//! Like a lease, its heartbeat is its mtime; it is live while its owner on this host is
//! alive, or (owners on other hosts, such as cluster nodes) while its heartbeat is younger
//! than the lease staleness; `gc` removes dead ones.
//!
//! The protocol, with `gc.lock` (an `flock`): a process records a key in its live root
//! under a shared lock *before* it looks the object up; `gc` holds the exclusive lock while
//! it reads the live roots and sweeps. So a key recorded before a sweep is kept by it, and
//! an object swept before the key was recorded is found missing and recomputed: never
//! found, then deleted under the reader.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::digest::StageKey;
use crate::error::{IoContext, Result};
use crate::lease::{host_name, pid_alive, LeaseOptions};
use crate::store::Store;

/// What a live root file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LiveRootInfo {
    pub host: String,
    pub pid: u32,
    pub started_unix: u64,
    /// What holds it (`run quickstart`, `exec-stage vae`).
    pub holder: String,
    pub keys: BTreeSet<StageKey>,
}

/// A held live root; dropping it removes the file.
pub struct LiveRoot {
    path: PathBuf,
    lock: PathBuf,
    state: Mutex<(File, LiveRootInfo)>,
    stop: Arc<AtomicBool>,
    heartbeat: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LiveRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveRoot")
            .field("path", &self.path)
            .finish()
    }
}

/// An `flock` held until dropped.
struct Flock(File);

impl Flock {
    fn take(path: &Path, exclusive: bool) -> Result<Self> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .at(path)?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a valid open file descriptor.
        loop {
            let r = unsafe { libc::flock(f.as_raw_fd(), op) };
            if r == 0 {
                return Ok(Self(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).at(path);
            }
        }
    }
}

impl Drop for Flock {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor we locked.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

fn write_in_place(file: &mut File, info: &LiveRootInfo, path: &Path) -> Result<()> {
    let bytes = serde_json::to_vec(info).expect("json");
    file.seek(SeekFrom::Start(0)).at(path)?;
    file.set_len(0).at(path)?;
    file.write_all(&bytes).at(path)?;
    file.sync_data().at(path)
}

impl Store {
    fn gc_lock_path(&self) -> PathBuf {
        self.root().join("gc.lock")
    }

    /// Takes the exclusive gc lock (blocks while a process records keys).
    pub(crate) fn gc_lock(&self) -> Result<impl Drop> {
        Flock::take(&self.gc_lock_path(), true)
    }

    /// Starts this process's live root (`holder` says what it runs).
    pub fn start_live_root(&self, holder: &str) -> Result<LiveRoot> {
        let dir = self.root().join("live");
        fs::create_dir_all(&dir).at(&dir)?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let info = LiveRootInfo {
            host: host_name(),
            pid: std::process::id(),
            started_unix: now.as_secs(),
            holder: holder.to_string(),
            keys: BTreeSet::new(),
        };
        let path = dir.join(format!(
            "{}-{}-{}.json",
            crate::store::sanitize(&info.host),
            info.pid,
            now.as_nanos()
        ));
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .at(&path)?;
        write_in_place(&mut file, &info, &path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, touch, every) = (
            stop.clone(),
            file.try_clone().at(&path)?,
            LeaseOptions::default().heartbeat,
        );
        let heartbeat = std::thread::Builder::new()
            .name("meduet-live-root".into())
            .spawn(move || {
                while !stop2.load(Ordering::SeqCst) {
                    std::thread::park_timeout(every);
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let _ = touch.set_modified(SystemTime::now());
                }
            })
            .expect("spawn live-root heartbeat");
        Ok(LiveRoot {
            path,
            lock: self.gc_lock_path(),
            state: Mutex::new((file, info)),
            stop,
            heartbeat: Some(heartbeat),
        })
    }

    /// The keys of every live root, removing the roots of dead owners (their host is this
    /// one and their pid is gone, or their heartbeat is older than the lease staleness).
    /// Call it under [`Store::gc_lock`].
    pub(crate) fn live_keys(&self, dry_run: bool) -> Result<(BTreeSet<StageKey>, usize)> {
        let dir = self.root().join("live");
        let (mut keys, mut live) = (BTreeSet::new(), 0);
        let Ok(rd) = fs::read_dir(&dir) else {
            return Ok((keys, 0));
        };
        let (me, stale_after) = (host_name(), LeaseOptions::default().stale_after);
        for e in rd {
            let p = e.at(&dir)?.path();
            let age = fs::metadata(&p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .unwrap_or(Duration::ZERO);
            let info: Option<LiveRootInfo> = fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let dead = match &info {
                Some(i) if i.host == me => !pid_alive(i.pid),
                _ => age > stale_after,
            };
            if dead {
                if !dry_run {
                    let _ = fs::remove_file(&p);
                }
                continue;
            }
            live += 1;
            if let Some(i) = info {
                keys.extend(i.keys);
            }
        }
        Ok((keys, live))
    }

    /// Every live root, with its heartbeat's age (for `meduet status`).
    pub fn live_roots(&self) -> Vec<(LiveRootInfo, Duration)> {
        let dir = self.root().join("live");
        let Ok(rd) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let p = e.path();
                let info = serde_json::from_slice(&fs::read(&p).ok()?).ok()?;
                let age = SystemTime::now()
                    .duration_since(fs::metadata(&p).ok()?.modified().ok()?)
                    .unwrap_or_default();
                Some((info, age))
            })
            .collect()
    }
}

impl LiveRoot {
    /// Records `keys` as used by this process. Call it before looking an object up: an
    /// object found afterwards is kept by every later `gc` while this root lives.
    pub fn protect(&self, keys: impl IntoIterator<Item = StageKey>) -> Result<()> {
        let mut state = self.state.lock().expect("live root lock");
        let before = state.1.keys.len();
        state.1.keys.extend(keys);
        if state.1.keys.len() == before {
            return Ok(());
        }
        let _shared = Flock::take(&self.lock, false)?;
        let (file, info) = &mut *state;
        write_in_place(file, info, &self.path)
    }

    /// The live root file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LiveRoot {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.heartbeat.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_roots_hold_their_keys_until_dropped_and_dead_ones_go() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let k1 = StageKey::parse_hex(&"1".repeat(64)).unwrap();
        let k2 = StageKey::parse_hex(&"2".repeat(64)).unwrap();
        let live = store.start_live_root("run test").unwrap();
        live.protect([k1]).unwrap();
        live.protect([k1, k2]).unwrap();
        let (keys, n) = store.live_keys(false).unwrap();
        assert_eq!(n, 1);
        assert_eq!(keys, BTreeSet::from([k1, k2]));
        assert_eq!(store.live_roots()[0].0.holder, "run test");
        drop(live);
        assert_eq!(store.live_keys(false).unwrap().1, 0);
        // A root left by a dead process on this host is removed, not honoured.
        let dead = LiveRootInfo {
            host: host_name(),
            pid: u32::MAX - 1,
            keys: BTreeSet::from([k1]),
            ..Default::default()
        };
        let p = d.path().join("live").join("dead.json");
        fs::write(&p, serde_json::to_vec(&dead).unwrap()).unwrap();
        assert_eq!(store.live_keys(true).unwrap(), (BTreeSet::new(), 0));
        assert!(p.exists(), "dry run removes nothing");
        store.live_keys(false).unwrap();
        assert!(!p.exists());
    }
}
