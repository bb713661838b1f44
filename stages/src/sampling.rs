//! Random training crops from a set of volumes or latents, deterministic given a seed.
//!
//! Training stages (VAE on image crops, MeDUET on 24³ latent crops) draw batches through a
//! [`CropSampler`]: each batch is a pure function of `(seed, step)`, so a killed run that
//! resumes at step `k` sees exactly the batches an uninterrupted run would have seen.
//! Augmentations follow the MeDUET pretraining transforms (method.md 1.2): a random
//! spatial crop (padded with zeros when the source is smaller), `RandFlip(p)` on each
//! spatial axis independently, then `RandRotate90(p, max_k = 3)` in the plane of the
//! first two spatial axes. Sampling is either shuffled (subjects drawn uniformly) or
//! balanced across domains (a domain uniformly, then a subject of it).
//! A [`Prefetcher`] computes upcoming batches on background threads.

use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A channel-first array `[C, X, Y, Z]` held in memory.
#[derive(Debug, Clone)]
pub struct CropSource {
    pub id: String,
    pub domain_id: i64,
    pub shape: [usize; 4],
    pub data: Arc<Vec<f32>>,
}

impl CropSource {
    /// Copies the region starting at `origin` (may extend past the edges: zeros there).
    pub fn read_crop(&self, origin: [i64; 3], size: [usize; 3], out: &mut [f32]) {
        let [c, nx, ny, nz] = self.shape;
        let [sx, sy, sz] = size;
        debug_assert_eq!(out.len(), c * sx * sy * sz);
        for ch in 0..c {
            for i in 0..sx {
                let x = origin[0] + i as i64;
                for j in 0..sy {
                    let y = origin[1] + j as i64;
                    let dst = ((ch * sx + i) * sy + j) * sz;
                    let row = &mut out[dst..dst + sz];
                    if x < 0 || y < 0 || x >= nx as i64 || y >= ny as i64 {
                        row.fill(0.0);
                        continue;
                    }
                    let src_row = ((ch * nx + x as usize) * ny + y as usize) * nz;
                    for (k, v) in row.iter_mut().enumerate() {
                        let z = origin[2] + k as i64;
                        *v = if z < 0 || z >= nz as i64 {
                            0.0
                        } else {
                            self.data[src_row + z as usize]
                        };
                    }
                }
            }
        }
    }
}

/// How subjects are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Uniformly over subjects.
    #[default]
    Shuffled,
    /// A domain uniformly, then a subject of that domain.
    Balanced,
}

/// Augmentation probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Probability of flipping along each spatial axis (independently).
    pub flip_p: f64,
    /// Probability of a rotation by k·90° (k in 1..=3) in the plane of axes 0 and 1.
    pub rot90_p: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            flip_p: 0.2,
            rot90_p: 0.2,
        }
    }
}

/// A batch: `data` is `[B, C, X, Y, Z]` in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub data: Vec<f32>,
    pub shape: [usize; 5],
    pub domains: Vec<i64>,
    pub ids: Vec<String>,
}

/// Draws batches of random crops.
#[derive(Debug, Clone)]
pub struct CropSampler {
    sources: Vec<CropSource>,
    by_domain: Vec<(i64, Vec<usize>)>,
    pub crop: [usize; 3],
    pub augment: Augment,
    pub sampling: Sampling,
    pub seed: u64,
}

impl CropSampler {
    /// All sources must have the same channel count.
    pub fn new(
        sources: Vec<CropSource>,
        crop: [usize; 3],
        augment: Augment,
        sampling: Sampling,
        seed: u64,
    ) -> Result<Self, String> {
        if sources.is_empty() {
            return Err("no volumes to sample crops from".into());
        }
        let c = sources[0].shape[0];
        if let Some(s) = sources.iter().find(|s| s.shape[0] != c) {
            return Err(format!(
                "'{}' has {} channels, others {c}",
                s.id, s.shape[0]
            ));
        }
        let mut by_domain: Vec<(i64, Vec<usize>)> = Vec::new();
        for (i, s) in sources.iter().enumerate() {
            match by_domain.iter_mut().find(|d| d.0 == s.domain_id) {
                Some(d) => d.1.push(i),
                None => by_domain.push((s.domain_id, vec![i])),
            }
        }
        by_domain.sort_by_key(|d| d.0);
        Ok(Self {
            sources,
            by_domain,
            crop,
            augment,
            sampling,
            seed,
        })
    }

    pub fn channels(&self) -> usize {
        self.sources[0].shape[0]
    }

    pub fn sources(&self) -> &[CropSource] {
        &self.sources
    }

    /// The batch of step `step`: a pure function of `(seed, step, batch_size)`.
    pub fn batch(&self, step: u64, batch_size: usize) -> Batch {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let c = self.channels();
        let [cx, cy, cz] = self.crop;
        let per = c * cx * cy * cz;
        let mut data = vec![0.0f32; batch_size * per];
        let mut domains = Vec::with_capacity(batch_size);
        let mut ids = Vec::with_capacity(batch_size);
        for b in 0..batch_size {
            let si = match self.sampling {
                Sampling::Shuffled => rng.random_range(0..self.sources.len()),
                Sampling::Balanced => {
                    let d = &self.by_domain[rng.random_range(0..self.by_domain.len())].1;
                    d[rng.random_range(0..d.len())]
                }
            };
            let src = &self.sources[si];
            let mut origin = [0i64; 3];
            for a in 0..3 {
                let n = src.shape[a + 1] as i64;
                let s = self.crop[a] as i64;
                origin[a] = if n > s {
                    rng.random_range(0..=(n - s))
                } else {
                    -((s - n) / 2)
                };
            }
            let out = &mut data[b * per..(b + 1) * per];
            src.read_crop(origin, self.crop, out);
            let flips = [
                rng.random_bool(self.augment.flip_p),
                rng.random_bool(self.augment.flip_p),
                rng.random_bool(self.augment.flip_p),
            ];
            let k = if rng.random_bool(self.augment.rot90_p) {
                rng.random_range(1..=3)
            } else {
                0
            };
            augment_in_place(out, c, self.crop, flips, k);
            domains.push(src.domain_id);
            ids.push(src.id.clone());
        }
        Batch {
            data,
            shape: [batch_size, c, cx, cy, cz],
            domains,
            ids,
        }
    }
}

/// Flips the chosen axes, then rotates by `k`·90° in the (0, 1) plane (the first axis
/// towards the second, as `numpy.rot90(x, k, axes=(0, 1))`). Rotation needs equal sizes
/// on axes 0 and 1; otherwise it is skipped.
pub fn augment_in_place(buf: &mut [f32], c: usize, size: [usize; 3], flips: [bool; 3], k: u32) {
    let [sx, sy, sz] = size;
    let idx = |ch: usize, i: usize, j: usize, l: usize| ((ch * sx + i) * sy + j) * sz + l;
    if flips.iter().any(|&f| f) || (k % 4 != 0 && sx == sy) {
        let src = buf.to_vec();
        for ch in 0..c {
            for i in 0..sx {
                for j in 0..sy {
                    for l in 0..sz {
                        // Output (i, j) after rotation comes from input (ri, rj) before it.
                        let (ri, rj) = match if sx == sy { k % 4 } else { 0 } {
                            0 => (i, j),
                            // numpy.rot90 k=1 on axes (0,1): out[i, j] = in[j, n-1-i]
                            1 => (j, sx - 1 - i),
                            2 => (sx - 1 - i, sy - 1 - j),
                            _ => (sy - 1 - j, i),
                        };
                        let fi = if flips[0] { sx - 1 - ri } else { ri };
                        let fj = if flips[1] { sy - 1 - rj } else { rj };
                        let fl = if flips[2] { sz - 1 - l } else { l };
                        buf[idx(ch, i, j, l)] = src[idx(ch, fi, fj, fl)];
                    }
                }
            }
        }
    }
}

/// Computes batches `start, start+1, ...` on background threads, in order.
pub struct Prefetcher {
    rx: Receiver<(u64, Batch)>,
    _workers: Vec<std::thread::JoinHandle<()>>,
}

impl Prefetcher {
    /// `threads` workers, up to `depth` batches ahead. Worker threads inherit the
    /// caller's stage log.
    pub fn new(
        sampler: Arc<CropSampler>,
        start: u64,
        end: u64,
        batch_size: usize,
        threads: usize,
        depth: usize,
    ) -> Self {
        let threads = threads.max(1);
        let (tx, rx) = bounded::<(u64, Batch)>(depth.max(1));
        // Tickets hand out steps in order so the bounded queue stays ordered.
        let next = Arc::new(std::sync::Mutex::new(start));
        let turn = Arc::new((std::sync::Mutex::new(start), std::sync::Condvar::new()));
        let sink = meduet_engine::logging::current_sink();
        let workers = (0..threads)
            .map(|_| {
                let (s, tx, next, turn, sink) = (
                    sampler.clone(),
                    tx.clone(),
                    next.clone(),
                    turn.clone(),
                    sink.clone(),
                );
                std::thread::spawn(move || {
                    let _g = meduet_engine::logging::enter_sink(sink);
                    loop {
                        let step = {
                            let mut n = next.lock().expect("ticket lock");
                            let v = *n;
                            *n += 1;
                            v
                        };
                        if step >= end {
                            break;
                        }
                        let b = s.batch(step, batch_size);
                        let (lock, cv) = &*turn;
                        let mut t = lock.lock().expect("turn lock");
                        while *t != step {
                            t = cv.wait(t).expect("turn wait");
                        }
                        let ok = tx.send((step, b)).is_ok();
                        *t += 1;
                        cv.notify_all();
                        if !ok {
                            break;
                        }
                    }
                })
            })
            .collect();
        Self {
            rx,
            _workers: workers,
        }
    }

    /// The next batch (in step order), or `None` after the last.
    pub fn next_batch(&self) -> Option<(u64, Batch)> {
        self.rx.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(id: &str, dom: i64, shape: [usize; 4]) -> CropSource {
        let n: usize = shape.iter().product();
        CropSource {
            id: id.into(),
            domain_id: dom,
            shape,
            data: Arc::new((0..n).map(|v| v as f32).collect()),
        }
    }

    #[test]
    fn crops_are_deterministic_per_step() {
        let s = CropSampler::new(
            vec![
                source("a", 0, [2, 10, 9, 8]),
                source("b", 1, [2, 12, 10, 9]),
            ],
            [4, 4, 4],
            Augment::default(),
            Sampling::Balanced,
            7,
        )
        .unwrap();
        assert_eq!(s.batch(3, 4), s.batch(3, 4));
        assert_ne!(s.batch(3, 4).data, s.batch(4, 4).data);
        let b = s.batch(0, 5);
        assert_eq!(b.shape, [5, 2, 4, 4, 4]);
        assert_eq!(b.data.len(), 5 * 2 * 64);
    }

    #[test]
    fn crop_without_augmentation_copies_the_region() {
        let src = source("a", 0, [1, 6, 5, 4]);
        let mut out = vec![0.0; 8];
        src.read_crop([1, 2, 1], [2, 2, 2], &mut out);
        let at = |x: usize, y: usize, z: usize| ((x * 5 + y) * 4 + z) as f32;
        assert_eq!(
            out,
            vec![
                at(1, 2, 1),
                at(1, 2, 2),
                at(1, 3, 1),
                at(1, 3, 2),
                at(2, 2, 1),
                at(2, 2, 2),
                at(2, 3, 1),
                at(2, 3, 2)
            ]
        );
        // Outside the edges: zeros.
        src.read_crop([-1, 0, 0], [2, 1, 1], &mut out[..2]);
        assert_eq!(&out[..2], &[0.0, at(0, 0, 0)]);
    }

    #[test]
    fn rotation_matches_numpy_rot90() {
        // 2x2x1: [[a, b], [c, d]] -> numpy.rot90(k=1, axes=(0,1)) = [[b, d], [a, c]]
        let mut buf = vec![1.0, 2.0, 3.0, 4.0];
        augment_in_place(&mut buf, 1, [2, 2, 1], [false; 3], 1);
        assert_eq!(buf, vec![2.0, 4.0, 1.0, 3.0]);
        let mut four = vec![1.0, 2.0, 3.0, 4.0];
        for _ in 0..4 {
            augment_in_place(&mut four, 1, [2, 2, 1], [false; 3], 1);
        }
        assert_eq!(four, vec![1.0, 2.0, 3.0, 4.0]);
        let mut f = vec![1.0, 2.0, 3.0, 4.0];
        augment_in_place(&mut f, 1, [2, 1, 2], [false, false, true], 0);
        assert_eq!(f, vec![2.0, 1.0, 4.0, 3.0]);
    }

    #[test]
    fn balanced_sampling_draws_domains_evenly() {
        let mut v = vec![source("big0", 0, [1, 4, 4, 4])];
        for i in 0..9 {
            v.push(source(&format!("d1_{i}"), 1, [1, 4, 4, 4]));
        }
        let s = CropSampler::new(
            v,
            [4, 4, 4],
            Augment {
                flip_p: 0.0,
                rot90_p: 0.0,
            },
            Sampling::Balanced,
            1,
        )
        .unwrap();
        let b = s.batch(0, 2000);
        let zeros = b.domains.iter().filter(|&&d| d == 0).count();
        assert!((800..1200).contains(&zeros), "{zeros}");
    }

    #[test]
    fn prefetcher_yields_batches_in_order() {
        let s = Arc::new(
            CropSampler::new(
                vec![source("a", 0, [1, 8, 8, 8])],
                [4, 4, 4],
                Augment::default(),
                Sampling::Shuffled,
                3,
            )
            .unwrap(),
        );
        let p = Prefetcher::new(s.clone(), 5, 15, 2, 3, 2);
        for step in 5..15 {
            let (st, b) = p.next_batch().unwrap();
            assert_eq!(st, step);
            assert_eq!(b, s.batch(step, 2));
        }
        assert!(p.next_batch().is_none());
    }
}
