//! `gc` and `verify`.
//!
//! Garbage collection roots are the keys of the last recorded run of each pipeline file
//! (`roots/*.json`, written by the engine after every run), pinned keys (`pins/*`) and the
//! keys of running processes (`live/*.json`, [`crate::live`]; gc holds `gc.lock` while it
//! reads them and sweeps).
//! Everything else in `objects/` is garbage, as are scratch folders of unrooted keys and
//! temporary folders whose key nobody holds a lease on. `gc --dry-run` reports what would
//! go, with bytes per stage, and removes nothing.
//!
//! `verify` re-hashes every file of every object against its manifest and recomputes each
//! output's Merkle digest. A mismatch moves the object to `quarantine/`, so the next run
//! recomputes it instead of trusting corrupt bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;

use rayon::prelude::*;
use serde::Serialize;

use crate::digest::StageKey;
use crate::error::{IoContext, Result};
use crate::hashing::hash_file;
use crate::store::{Store, OUT_DIR};

/// Meta file listing the keys an object refers to (`{"keys": [...]}`); gc keeps them
/// alive while the referring object is rooted.
pub const REFS_FILE: &str = "refs.json";

/// What `gc` removed (or would remove).
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub roots: usize,
    /// Running processes whose keys were kept.
    pub live_roots: usize,
    pub kept_objects: usize,
    /// Stage name -> (objects, bytes) removed.
    pub removed_by_stage: BTreeMap<String, (usize, u64)>,
    pub removed_objects: Vec<StageKey>,
    pub removed_scratch: Vec<PathBuf>,
    pub removed_tmp: Vec<PathBuf>,
    /// Job logs of cluster executors (`logs/<key>/`) whose object is gone and which
    /// nothing is computing.
    pub removed_logs: Vec<PathBuf>,
    pub bytes: u64,
}

/// One object that failed verification.
#[derive(Debug, Serialize)]
pub struct Corruption {
    pub key: StageKey,
    pub stage: String,
    pub problems: Vec<String>,
    pub quarantined_to: Option<PathBuf>,
}

/// The result of `verify`.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub objects: usize,
    pub files: usize,
    pub bytes: u64,
    pub corrupt: Vec<Corruption>,
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    walkdir::WalkDir::new(p)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

impl Store {
    /// Every rooted key: last runs of pipelines, pins and live roots of running processes.
    pub fn root_keys(&self) -> Result<BTreeSet<StageKey>> {
        let mut keys = self.live_keys(true)?.0;
        let rdir = self.root().join("roots");
        for e in fs::read_dir(&rdir).at(&rdir)? {
            let p = e.at(&rdir)?.path();
            let text = fs::read_to_string(&p).at(&p)?;
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            for k in v["keys"].as_array().into_iter().flatten() {
                if let Some(k) = k.as_str().and_then(|s| StageKey::parse_hex(s).ok()) {
                    keys.insert(k);
                }
            }
        }
        let pdir = self.root().join("pins");
        for e in fs::read_dir(&pdir).at(&pdir)? {
            let p = e.at(&pdir)?.path();
            let text = fs::read_to_string(&p).at(&p)?;
            keys.extend(
                text.lines()
                    .filter_map(|l| StageKey::parse_hex(l.trim()).ok()),
            );
        }
        // Follow references (a cohort object refers to its per-item objects).
        let mut stack: Vec<StageKey> = keys.iter().copied().collect();
        while let Some(k) = stack.pop() {
            let refs = self.object_dir(&k).join(REFS_FILE);
            let Ok(text) = fs::read_to_string(&refs) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            for r in v["keys"].as_array().into_iter().flatten() {
                if let Some(r) = r.as_str().and_then(|s| StageKey::parse_hex(s).ok()) {
                    if keys.insert(r) {
                        stack.push(r);
                    }
                }
            }
        }
        Ok(keys)
    }

    /// Removes (or with `dry_run`, lists) everything not reachable from a root.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport> {
        // Runs record the keys they use under the shared lock before they look objects up.
        let _lock = self.gc_lock()?;
        let live_roots = self.live_keys(dry_run)?.1;
        let roots = self.root_keys()?;
        let mut report = GcReport {
            dry_run,
            roots: roots.len(),
            live_roots,
            ..Default::default()
        };
        for key in self.object_keys()? {
            if roots.contains(&key) {
                report.kept_objects += 1;
                continue;
            }
            if self.lease_info(&key).is_some() {
                continue; // being rewritten right now
            }
            let stage = self
                .load(&key)
                .ok()
                .flatten()
                .map(|o| o.manifest.provenance.stage)
                .unwrap_or_else(|| "?".into());
            let dir = self.object_dir(&key);
            let bytes = dir_bytes(&dir);
            let e = report.removed_by_stage.entry(stage).or_default();
            e.0 += 1;
            e.1 += bytes;
            report.bytes += bytes;
            report.removed_objects.push(key);
            if !dry_run {
                fs::remove_dir_all(&dir).at(&dir)?;
            }
        }
        // Folders under objects/ without a manifest are not objects (an interrupted
        // quarantine, a hand copy): swept unless someone holds their key's lease.
        let objects = self.root().join("objects");
        for e in fs::read_dir(&objects).at(&objects)? {
            let p = e.at(&objects)?.path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.join(crate::store::MANIFEST_FILE).is_file()
                || StageKey::parse_hex(&name).is_ok_and(|k| self.lease_info(&k).is_some())
            {
                continue;
            }
            report.bytes += dir_bytes(&p);
            report.removed_tmp.push(p.clone());
            if !dry_run {
                if p.is_dir() {
                    fs::remove_dir_all(&p).at(&p)?;
                } else {
                    fs::remove_file(&p).at(&p)?;
                }
            }
        }
        for (sub, list) in [("scratch", 0), ("tmp", 1)] {
            let d = self.root().join(sub);
            for e in fs::read_dir(&d).at(&d)? {
                let p = e.at(&d)?.path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let Ok(key) = StageKey::parse_hex(name.split('.').next().unwrap_or("")) else {
                    continue;
                };
                if self.lease_info(&key).is_some()
                    || (list == 0 && roots.contains(&key) && !self.contains(&key))
                {
                    continue;
                }
                report.bytes += dir_bytes(&p);
                if list == 0 {
                    report.removed_scratch.push(p.clone());
                } else {
                    report.removed_tmp.push(p.clone());
                }
                if !dry_run {
                    fs::remove_dir_all(&p).at(&p)?;
                }
            }
        }
        // Under `runs/`: the record reserves of dead executions (no lease on their key) and
        // temporary files of records whose writer was killed (a record is written in
        // milliseconds: one older than a minute is left over).
        let runs = self.root().join("runs");
        if let Ok(rd) = fs::read_dir(&runs) {
            for e in rd.flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                let dead_reserve = name
                    .strip_prefix(crate::records::RESERVE_PREFIX)
                    .and_then(|r| StageKey::parse_hex(r.get(..64)?).ok())
                    .is_some_and(|k| self.lease_info(&k).is_none());
                let old_tmp = name.starts_with('.')
                    && name.ends_with(".tmp")
                    && e.metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| std::time::SystemTime::now().duration_since(m).ok())
                        .is_some_and(|a| a > std::time::Duration::from_secs(60));
                if dead_reserve || old_tmp {
                    report.bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                    report.removed_tmp.push(p.clone());
                    if !dry_run {
                        let _ = fs::remove_file(&p);
                    }
                }
            }
        }
        // Job logs (`logs/<key>/`, written by cluster executors) go with their object;
        // logs of a key someone is computing or submitting (a lease or a Slurm claim)
        // stay, and so do logs of stages whose key was not known at submission
        // (`logs/pending/`).
        let logs = self.root().join("logs");
        if let Ok(rd) = fs::read_dir(&logs) {
            for e in rd {
                let p = e.at(&logs)?.path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let Ok(key) = StageKey::parse_hex(&name) else {
                    continue;
                };
                let claimed = self
                    .root()
                    .join("slurm/claims")
                    .join(format!("{name}.json"))
                    .exists();
                let exists = self.contains(&key) || report.removed_objects.contains(&key);
                let object_stays = exists && !report.removed_objects.contains(&key);
                // A claim matters only while the object is still to be computed.
                if object_stays || (claimed && !exists) || self.lease_info(&key).is_some() {
                    continue;
                }
                report.bytes += dir_bytes(&p);
                report.removed_logs.push(p.clone());
                if !dry_run {
                    fs::remove_dir_all(&p).at(&p)?;
                }
            }
        }
        Ok(report)
    }

    /// Re-hashes every object; quarantines corrupt ones unless `dry_run`.
    pub fn verify(&self, dry_run: bool) -> Result<VerifyReport> {
        let keys = self.object_keys()?;
        let results: Vec<(usize, u64, Option<Corruption>)> = keys
            .par_iter()
            .map(|key| {
                let obj = match self.load(key) {
                    Ok(Some(o)) => o,
                    Ok(None) => return (0, 0, None),
                    Err(e) => {
                        return (
                            0,
                            0,
                            Some(Corruption {
                                key: *key,
                                stage: "?".into(),
                                problems: vec![e.to_string()],
                                quarantined_to: None,
                            }),
                        )
                    }
                };
                let mut problems = Vec::new();
                let mut files = 0;
                let mut bytes = 0;
                let mut check = |rel: PathBuf, expected: &crate::manifest::FileEntry| {
                    files += 1;
                    bytes += expected.size;
                    let abs = obj.dir.join(&rel);
                    match hash_file(&abs) {
                        Ok(d) if d == expected.digest => {}
                        Ok(d) => problems.push(format!(
                            "{}: content digest {} differs from manifest {}",
                            rel.display(),
                            d.short(),
                            expected.digest.short()
                        )),
                        Err(e) => problems.push(format!("{}: {}", rel.display(), e)),
                    }
                };
                for (name, out) in &obj.manifest.outputs {
                    for (rel, f) in &out.files {
                        check(PathBuf::from(OUT_DIR).join(name).join(rel), f);
                    }
                }
                for (rel, f) in &obj.manifest.meta_files {
                    check(PathBuf::from(rel), f);
                }
                for (name, out) in &obj.manifest.outputs {
                    if out.recomputed_digest() != out.digest {
                        problems.push(format!(
                            "output '{name}': Merkle digest does not match its files"
                        ));
                    }
                }
                let corruption = (!problems.is_empty()).then(|| Corruption {
                    key: *key,
                    stage: obj.manifest.provenance.stage.clone(),
                    problems,
                    quarantined_to: None,
                });
                (files, bytes, corruption)
            })
            .collect();
        let mut report = VerifyReport {
            objects: keys.len(),
            ..Default::default()
        };
        for (files, bytes, c) in results {
            report.files += files;
            report.bytes += bytes;
            if let Some(mut c) = c {
                if !dry_run {
                    c.quarantined_to = Some(self.quarantine(&c.key)?);
                }
                report.corrupt.push(c);
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Provenance;

    fn key(n: u8) -> StageKey {
        StageKey::from_bytes([n; 32])
    }

    fn commit(store: &Store, k: StageKey, stage: &str, content: &[u8]) {
        let st = store.stage(k).unwrap();
        fs::write(st.output_dir("o").unwrap().join("f"), content).unwrap();
        st.commit(Provenance {
            stage: stage.into(),
            kind: "t".into(),
            item: None,
        })
        .unwrap();
    }

    #[test]
    fn gc_keeps_roots_and_pins() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        commit(&store, key(1), "a", b"1");
        commit(&store, key(2), "b", b"22");
        commit(&store, key(3), "c", b"333");
        commit(&store, key(4), "item", b"4444");
        fs::write(
            store.object_dir(&key(1)).join(REFS_FILE),
            format!("{{\"keys\": [\"{}\"]}}", key(4)),
        )
        .unwrap();
        store.write_roots("p", &[key(1)]).unwrap();
        store.pin("keep", &[key(3)]).unwrap();
        let dry = store.gc(true).unwrap();
        assert_eq!(dry.removed_objects, vec![key(2)]);
        assert!(store.contains(&key(2)));
        assert_eq!(dry.removed_by_stage["b"].0, 1);
        let real = store.gc(false).unwrap();
        assert_eq!(real.removed_objects, vec![key(2)]);
        assert!(!store.contains(&key(2)) && store.contains(&key(1)) && store.contains(&key(3)));
        assert!(
            store.contains(&key(4)),
            "objects referenced by a root are kept"
        );
    }

    #[test]
    fn gc_removes_job_logs_with_their_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        commit(&store, key(1), "kept", b"1");
        commit(&store, key(2), "dropped", b"2");
        store.write_roots("p", &[key(1)]).unwrap();
        let log = |k: StageKey| {
            let d = store.root().join("logs").join(k.to_hex());
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("slurm-7.out"), b"log").unwrap();
            d
        };
        let (kept, dropped, running, orphan) = (log(key(1)), log(key(2)), log(key(5)), log(key(6)));
        // key 5 has no object yet but is claimed by a Slurm driver: its job is running.
        fs::create_dir_all(store.root().join("slurm/claims")).unwrap();
        fs::write(
            store
                .root()
                .join(format!("slurm/claims/{}.json", key(5).to_hex())),
            b"{}",
        )
        .unwrap();
        let pending = store.root().join("logs/pending/p/stage");
        fs::create_dir_all(&pending).unwrap();
        let r = store.gc(false).unwrap();
        assert_eq!(r.removed_objects, vec![key(2)]);
        let mut removed = r.removed_logs.clone();
        removed.sort();
        assert_eq!(removed, vec![dropped.clone(), orphan.clone()]);
        assert!(kept.exists() && running.exists() && pending.exists());
        assert!(!dropped.exists() && !orphan.exists());
    }

    #[test]
    fn verify_quarantines_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        commit(&store, key(1), "a", b"hello world");
        commit(&store, key(2), "b", b"fine");
        assert!(store.verify(false).unwrap().corrupt.is_empty());
        let f = store.object_dir(&key(1)).join("out/o/f");
        let mut bytes = fs::read(&f).unwrap();
        bytes[3] ^= 0x01;
        fs::write(&f, bytes).unwrap();
        let report = store.verify(false).unwrap();
        assert_eq!(report.corrupt.len(), 1);
        assert_eq!(report.corrupt[0].key, key(1));
        assert!(report.corrupt[0].problems[0].contains("out/o/f"));
        assert!(!store.contains(&key(1)));
        assert!(store.contains(&key(2)));
    }
}
