//! Phantom *content*: a seeded abdominal anatomy, independent of how it is imaged.
//!
//! [`sample_anatomy`] draws one subject from a seed: a body outline (an elliptic cylinder
//! along `z` with a flatter back, angular harmonics and a slow variation along `z`, a
//! subcutaneous fat band and a muscle wall), organs as superellipsoids with random size,
//! position, pose, squareness and a low-frequency deformation (a sum of sines of the
//! normalised local coordinates added to the implicit function), a vertebral column of
//! vertebral bodies and posterior elements, the aorta as a gently curving tube, paraspinal
//! muscles, bowel gas pockets, and with probability `lesion_probability` a liver lesion.
//! Organ texture is a sum of plane waves in world millimetres.
//!
//! Everything is defined in world millimetres (RAS+, origin at the centre of the field of
//! view), scaled by `scale` (1.0: a body about 200 x 150 mm, a small abdomen), so the same
//! anatomy can be rasterised on any grid: this is what makes content and style independent.
//! Rendering it as an image in a domain's style is [`crate::data::phantom_render`].
//!
//! Labels ([`LABELS`]): 0 background, 1 liver, 2 spleen, 3 kidney_right, 4 kidney_left,
//! 5 vertebrae, 6 aorta, 7 bowel_gas, 8 liver_lesion.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use crate::data::phantom_style::Tissue;
use crate::data::volume::{Affine, IDENTITY};

/// Label names by value.
pub const LABELS: [&str; 9] = [
    "background",
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "vertebrae",
    "aorta",
    "bowel_gas",
    "liver_lesion",
];

/// A plane wave `amp * sin(k . p + phase)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Wave {
    pub k: [f64; 3],
    pub phase: f64,
    pub amp: f64,
}

impl Wave {
    #[inline]
    fn at(&self, p: [f64; 3]) -> f64 {
        self.amp * (self.k[0] * p[0] + self.k[1] * p[1] + self.k[2] * p[2] + self.phase).sin()
    }
}

/// A deformed superellipsoid: inside where
/// `sum_a |q_a / r_a|^(2/e) < 1 + sum_w w(q / r)`, `q = rot * (p - c)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Blob {
    pub c: [f64; 3],
    pub r: [f64; 3],
    /// World to local rotation (rows are the local axes).
    pub rot: [[f64; 3]; 3],
    pub e: f64,
    pub waves: Vec<Wave>,
    /// Half-size of an axis-aligned box holding the blob.
    bound: [f64; 3],
}

impl Blob {
    fn new(c: [f64; 3], r: [f64; 3], yaw: f64, pitch: f64, e: f64, waves: Vec<Wave>) -> Self {
        let (sy, cy) = yaw.sin_cos();
        let (sp, cp) = pitch.sin_cos();
        // rot = Rx(pitch) * Rz(yaw), applied to world offsets.
        let rot = [
            [cy, sy, 0.0],
            [-sy * cp, cy * cp, sp],
            [sy * sp, -cy * sp, cp],
        ];
        let amp: f64 = waves.iter().map(|w| w.amp.abs()).sum();
        // |u_a| < (1 + amp)^(e/2) inside; the world extent along w is at most
        // sum_a |rot[a][w]| r_a times that.
        let grow = (1.0 + amp).powf(e / 2.0).max(1.0) * 1.01;
        let mut bound = [0.0; 3];
        for (w, b) in bound.iter_mut().enumerate() {
            *b = grow * (0..3).map(|a| rot[a][w].abs() * r[a]).sum::<f64>();
        }
        Self {
            c,
            r,
            rot,
            e,
            waves,
            bound,
        }
    }

    /// Whether world point `p` is inside.
    #[inline]
    pub fn inside(&self, p: [f64; 3]) -> bool {
        let d = [p[0] - self.c[0], p[1] - self.c[1], p[2] - self.c[2]];
        if d[0].abs() > self.bound[0] || d[1].abs() > self.bound[1] || d[2].abs() > self.bound[2] {
            return false;
        }
        let mut u = [0.0; 3];
        for (a, ua) in u.iter_mut().enumerate() {
            let q = self.rot[a][0] * d[0] + self.rot[a][1] * d[1] + self.rot[a][2] * d[2];
            *ua = q / self.r[a];
        }
        let f = if self.e == 1.0 {
            u[0] * u[0] + u[1] * u[1] + u[2] * u[2]
        } else {
            let ex = 1.0 / self.e;
            (u[0] * u[0]).powf(ex) + (u[1] * u[1]).powf(ex) + (u[2] * u[2]).powf(ex)
        };
        let def: f64 = self.waves.iter().map(|w| w.at(u)).sum();
        f < 1.0 + def
    }
}

/// The body outline and its layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    pub c: [f64; 2],
    pub ax: f64,
    pub ay: f64,
    /// Posterior semi-axis factor (a flatter back).
    pub back: f64,
    /// `(m, amplitude, phase)` angular harmonics of the outline.
    pub harmonics: Vec<(f64, f64, f64)>,
    /// `(amplitude, period mm, phase)` of the outline's variation along z.
    pub zwave: (f64, f64, f64),
    pub fat_mm: f64,
    pub muscle_mm: f64,
}

impl Body {
    /// The in-plane part of the normalised radius at `(x, y)`: `(rho, b)`, with the
    /// outline's angular factor `b` (harmonics of the polar angle, computed from
    /// `cos`/`sin` of the angle by the multiple-angle formulas, no trigonometry).
    #[inline]
    fn in_plane(&self, x: f64, y: f64) -> (f64, f64) {
        let dx = x - self.c[0];
        let dy = y - self.c[1];
        let ay = if dy < 0.0 {
            self.ay * self.back
        } else {
            self.ay
        };
        let (u, v) = (dx / self.ax, dy / ay);
        let rho = (u * u + v * v).sqrt();
        let (c1, s1) = if rho > 0.0 {
            (u / rho, v / rho)
        } else {
            (1.0, 0.0)
        };
        // cos/sin of 2 and 3 and 4 times the angle.
        let (c2, s2) = (c1 * c1 - s1 * s1, 2.0 * s1 * c1);
        let (c3, s3) = (c2 * c1 - s2 * s1, s2 * c1 + c2 * s1);
        let (c4, s4) = (c2 * c2 - s2 * s2, 2.0 * s2 * c2);
        let mut b = 0.0;
        for &(m, a, ph) in &self.harmonics {
            let (cm, sm) = match m as u32 {
                2 => (c2, s2),
                3 => (c3, s3),
                _ => (c4, s4),
            };
            // cos(m theta + ph)
            b += a * (cm * ph.cos() - sm * ph.sin());
        }
        (rho, b)
    }

    /// The z part of the outline factor.
    #[inline]
    fn along_z(&self, z: f64) -> f64 {
        1.0 + self.zwave.0 * (std::f64::consts::TAU * z / self.zwave.1 + self.zwave.2).cos()
    }

    /// Normalised radius: < 1 inside the outline.
    pub fn radius(&self, p: [f64; 3]) -> f64 {
        let (rho, b) = self.in_plane(p[0], p[1]);
        rho / (b + self.along_z(p[2]))
    }
}

/// A tube along z: centre `(x0 + a sin(z / period + phase), y0)`, radius `radius`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tube {
    pub x0: f64,
    pub y0: f64,
    pub wiggle: (f64, f64, f64),
    pub radius: f64,
}

impl Tube {
    #[inline]
    fn inside(&self, p: [f64; 3]) -> bool {
        let cx = self.x0 + self.wiggle.0 * (p[2] / self.wiggle.1 + self.wiggle.2).sin();
        (p[0] - cx).powi(2) + (p[1] - self.y0).powi(2) < self.radius * self.radius
    }
}

/// One subject's anatomy.
#[derive(Debug, Clone, PartialEq)]
pub struct Anatomy {
    pub body: Body,
    pub liver: Blob,
    pub spleen: Blob,
    pub kidney_right: Blob,
    pub kidney_left: Blob,
    pub vertebrae: Vec<Blob>,
    pub paraspinal: Vec<Blob>,
    pub aorta: Tube,
    pub gas: Vec<Blob>,
    pub lesion: Option<Blob>,
    /// Texture waves (world mm), about unit standard deviation in total.
    pub texture: Vec<Wave>,
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    rng.sample::<f64, _>(StandardNormal)
}

fn deformation(rng: &mut ChaCha8Rng, n: usize, amp: f64) -> Vec<Wave> {
    (0..n)
        .map(|_| {
            let dir = [normal(rng), normal(rng), normal(rng)];
            let len = (dir[0] * dir[0] + dir[1] * dir[1] + dir[2] * dir[2])
                .sqrt()
                .max(1e-9);
            let f = rng.random_range(1.0..2.6);
            Wave {
                k: dir.map(|x| x / len * f),
                phase: rng.random_range(0.0..std::f64::consts::TAU),
                amp: amp * rng.random_range(0.5..1.0),
            }
        })
        .collect()
}

/// An organ around a nominal centre and size (mm, scale 1).
fn organ(rng: &mut ChaCha8Rng, s: f64, c: [f64; 3], jitter: f64, r: [f64; 3], yaw: f64) -> Blob {
    let size = 1.0 + 0.09 * normal(rng);
    let c = c.map(|x| (x + jitter * normal(rng)) * s);
    let r = r.map(|x| x * s * size * (1.0 + 0.05 * normal(rng)));
    let yaw = yaw + 0.15 * normal(rng);
    let pitch = 0.08 * normal(rng);
    let e = rng.random_range(0.75..1.1);
    let waves = deformation(rng, 3, 0.12);
    Blob::new(c, r, yaw, pitch, e, waves)
}

/// Draws one subject from `seed`. `scale` multiplies every length (1.0: small abdomen).
pub fn sample_anatomy(seed: u64, scale: f64, lesion_probability: f64) -> Anatomy {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let s = scale;
    let tau = std::f64::consts::TAU;
    let body = Body {
        c: [3.0 * s * normal(&mut rng), 3.0 * s * normal(&mut rng)],
        ax: 100.0 * s * (1.0 + 0.06 * normal(&mut rng)),
        ay: 75.0 * s * (1.0 + 0.06 * normal(&mut rng)),
        back: rng.random_range(0.8..0.9),
        harmonics: (2..5)
            .map(|m| {
                (
                    m as f64,
                    0.025 * normal(&mut rng),
                    rng.random_range(0.0..tau),
                )
            })
            .collect(),
        zwave: (
            0.03 * normal(&mut rng),
            300.0 * s,
            rng.random_range(0.0..tau),
        ),
        fat_mm: rng.random_range(6.0..14.0) * s,
        muscle_mm: rng.random_range(5.0..8.0) * s,
    };
    let liver = organ(&mut rng, s, [38.0, 5.0, 22.0], 4.0, [40.0, 42.0, 30.0], 0.0);
    let spleen = organ(
        &mut rng,
        s,
        [-52.0, -22.0, 25.0],
        3.0,
        [15.0, 24.0, 20.0],
        -0.5,
    );
    let kidney_right = organ(
        &mut rng,
        s,
        [34.0, -32.0, -22.0],
        3.0,
        [13.0, 15.0, 25.0],
        0.3,
    );
    let kidney_left = organ(
        &mut rng,
        s,
        [-34.0, -32.0, -16.0],
        3.0,
        [13.0, 15.0, 25.0],
        -0.3,
    );
    let z0 = rng.random_range(-13.0..13.0);
    let mut vertebrae = Vec::new();
    for k in -4..=4 {
        let z = (z0 + 26.0 * k as f64) * s;
        let jit = 1.0 + 0.04 * normal(&mut rng);
        vertebrae.push(Blob::new(
            [0.0, -44.0 * s, z],
            [15.0 * s * jit, 13.0 * s * jit, 10.0 * s],
            0.0,
            0.0,
            0.5,
            vec![],
        ));
        vertebrae.push(Blob::new(
            [0.0, -63.0 * s, z],
            [4.0 * s, 10.0 * s, 7.0 * s],
            0.0,
            0.0,
            0.8,
            vec![],
        ));
    }
    let paraspinal = [-1.0, 1.0]
        .iter()
        .map(|side| {
            Blob::new(
                [side * 30.0 * s, -50.0 * s, 0.0],
                [16.0 * s, 14.0 * s, 400.0 * s],
                0.0,
                0.0,
                1.0,
                vec![],
            )
        })
        .collect();
    let aorta = Tube {
        x0: -12.0 * s + 2.0 * s * normal(&mut rng),
        y0: -22.0 * s,
        wiggle: (3.0 * s, 40.0 * s, rng.random_range(0.0..tau)),
        radius: 9.0 * s * (1.0 + 0.1 * normal(&mut rng)),
    };
    let n_gas = rng.random_range(2..5);
    let gas = (0..n_gas)
        .map(|_| {
            let c = [
                rng.random_range(-40.0..30.0),
                rng.random_range(5.0..45.0),
                rng.random_range(-55.0..-5.0),
            ]
            .map(|x| x * s);
            let r = [0; 3].map(|_| rng.random_range(7.0..13.0) * s);
            let waves = deformation(&mut rng, 2, 0.15);
            Blob::new(c, r, rng.random_range(0.0..tau), 0.0, 1.0, waves)
        })
        .collect();
    let lesion = (rng.random::<f64>() < lesion_probability).then(|| {
        let mut c = liver.c;
        for _ in 0..50 {
            let u = [normal(&mut rng), normal(&mut rng), normal(&mut rng)];
            // Local offset within half the semi-axes, rotated back to world.
            let q: Vec<f64> = (0..3)
                .map(|a| 0.35 * u[a].clamp(-1.4, 1.4) * liver.r[a])
                .collect();
            let p: Vec<f64> = (0..3)
                .map(|w| liver.c[w] + (0..3).map(|a| liver.rot[a][w] * q[a]).sum::<f64>())
                .collect();
            let p = [p[0], p[1], p[2]];
            if liver.inside(p) {
                c = p;
                break;
            }
        }
        let rad = rng.random_range(5.0..10.0) * s;
        let waves = deformation(&mut rng, 2, 0.1);
        Blob::new(
            c,
            [
                rad,
                rad * rng.random_range(0.8..1.2),
                rad * rng.random_range(0.8..1.2),
            ],
            0.0,
            0.0,
            1.0,
            waves,
        )
    });
    let texture = (0..8)
        .map(|_| {
            let dir = [normal(&mut rng), normal(&mut rng), normal(&mut rng)];
            let len = (dir[0] * dir[0] + dir[1] * dir[1] + dir[2] * dir[2])
                .sqrt()
                .max(1e-9);
            let wavelength = rng.random_range(8.0..30.0) * s;
            Wave {
                k: dir.map(|x| x / len * tau / wavelength),
                phase: rng.random_range(0.0..tau),
                amp: 0.5,
            }
        })
        .collect();
    Anatomy {
        body,
        liver,
        spleen,
        kidney_right,
        kidney_left,
        vertebrae,
        paraspinal,
        aorta,
        gas,
        lesion,
        texture,
    }
}

impl Anatomy {
    /// Tissue and label at world point `p`.
    pub fn classify(&self, p: [f64; 3]) -> (Tissue, u8) {
        self.classify_at(p, self.body.radius(p))
    }

    /// [`Anatomy::classify`] with the body radius at `p` already known.
    fn classify_at(&self, p: [f64; 3], r: f64) -> (Tissue, u8) {
        if r >= 1.0 {
            return (Tissue::Air, 0);
        }
        let mean = 0.5 * (self.body.ax + self.body.ay);
        let fat = 1.0 - self.body.fat_mm / mean;
        if r >= fat {
            return (Tissue::Fat, 0);
        }
        if r >= fat - self.body.muscle_mm / mean {
            return (Tissue::Muscle, 0);
        }
        if self.vertebrae.iter().any(|b| b.inside(p)) {
            return (Tissue::Bone, 5);
        }
        if self.aorta.inside(p) {
            return (Tissue::Blood, 6);
        }
        if self.liver.inside(p) {
            if self.lesion.as_ref().is_some_and(|l| l.inside(p)) {
                return (Tissue::Lesion, 8);
            }
            return (Tissue::Liver, 1);
        }
        if self.spleen.inside(p) {
            return (Tissue::Spleen, 2);
        }
        if self.kidney_right.inside(p) {
            return (Tissue::Kidney, 3);
        }
        if self.kidney_left.inside(p) {
            return (Tissue::Kidney, 4);
        }
        if self.gas.iter().any(|b| b.inside(p)) {
            return (Tissue::Gas, 7);
        }
        if self.paraspinal.iter().any(|b| b.inside(p)) {
            return (Tissue::Muscle, 0);
        }
        (Tissue::Visceral, 0)
    }

    /// Texture value at `p` (about unit standard deviation).
    #[inline]
    pub fn texture_at(&self, p: [f64; 3]) -> f64 {
        self.texture.iter().map(|w| w.at(p)).sum()
    }
}

/// The RAS grid of a domain: spacing on the diagonal, centred on the world origin.
pub fn grid_affine(shape: [usize; 3], spacing: [f64; 3]) -> Affine {
    let mut a = IDENTITY;
    for c in 0..3 {
        a[c][c] = spacing[c];
        a[c][3] = -(shape[c] as f64 - 1.0) / 2.0 * spacing[c];
    }
    a
}

/// Rasterises the anatomy on a RAS grid: tissue classes, labels and texture, C order.
pub fn rasterize(
    anatomy: &Anatomy,
    shape: [usize; 3],
    spacing: [f64; 3],
) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let a = grid_affine(shape, spacing);
    let [_, ny, nz] = shape;
    let z: Vec<f64> = (0..nz).map(|k| a[2][2] * k as f64 + a[2][3]).collect();
    let zfac: Vec<f64> = z.iter().map(|&z| anatomy.body.along_z(z)).collect();
    // Texture waves are separable by angle addition: sin(A + B) with A from (x, y), B from z.
    let zwaves: Vec<Vec<(f64, f64)>> = anatomy
        .texture
        .iter()
        .map(|w| {
            z.iter()
                .map(|&z| (w.k[2] * z + w.phase).sin_cos())
                .collect()
        })
        .collect();
    let slabs: Vec<(Vec<u8>, Vec<u8>, Vec<f32>)> = (0..shape[0])
        .into_par_iter()
        .map(|i| {
            let mut t = Vec::with_capacity(ny * nz);
            let mut l = Vec::with_capacity(ny * nz);
            let mut x = Vec::with_capacity(ny * nz);
            let px = a[0][0] * i as f64 + a[0][3];
            for j in 0..ny {
                let py = a[1][1] * j as f64 + a[1][3];
                let (rho, b) = anatomy.body.in_plane(px, py);
                let xy: Vec<(f64, f64, f64)> = anatomy
                    .texture
                    .iter()
                    .map(|w| {
                        let (s, c) = (w.k[0] * px + w.k[1] * py).sin_cos();
                        (s, c, w.amp)
                    })
                    .collect();
                for k in 0..nz {
                    let p = [px, py, z[k]];
                    let (tissue, label) = anatomy.classify_at(p, rho / (b + zfac[k]));
                    t.push(tissue as u8);
                    l.push(label);
                    let tex = if tissue == Tissue::Air {
                        0.0
                    } else {
                        xy.iter()
                            .zip(&zwaves)
                            .map(|(&(s, c, amp), zw)| amp * (s * zw[k].1 + c * zw[k].0))
                            .sum::<f64>()
                    };
                    x.push(tex as f32);
                }
            }
            (t, l, x)
        })
        .collect();
    let mut tissue = Vec::with_capacity(shape.iter().product());
    let mut labels = Vec::with_capacity(tissue.capacity());
    let mut texture = Vec::with_capacity(tissue.capacity());
    for (t, l, x) in slabs {
        tissue.extend_from_slice(&t);
        labels.extend_from_slice(&l);
        texture.extend_from_slice(&x);
    }
    (tissue, labels, texture)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anatomy_is_seeded_and_organs_are_inside_the_body() {
        let a = sample_anatomy(11, 1.0, 1.0);
        assert_eq!(a, sample_anatomy(11, 1.0, 1.0));
        assert_ne!(a, sample_anatomy(12, 1.0, 1.0));
        assert!(a.lesion.is_some());
        assert!(sample_anatomy(11, 1.0, 0.0).lesion.is_none());
        let (t, l, _) = rasterize(&a, [80, 64, 64], [2.5, 2.5, 2.0]);
        let count = |v: u8| l.iter().filter(|&&x| x == v).count();
        for v in 1..=8u8 {
            assert!(count(v) > 10, "label {v} has {} voxels", count(v));
        }
        // The liver is the largest organ and sits on the patient's right (+x).
        let vox_ml = 2.5 * 2.5 * 2.0 / 1000.0;
        let liver_ml = count(1) as f64 * vox_ml;
        assert!((100.0..600.0).contains(&liver_ml), "{liver_ml}");
        assert!(count(1) > count(2) && count(1) > count(3));
        let mut sx = 0.0;
        for (idx, &v) in l.iter().enumerate() {
            if v == 1 {
                sx += (idx / (64 * 64)) as f64;
            }
        }
        assert!(sx / count(1) as f64 > 40.0);
        // Air outside, fat next to it: the corner voxel is air.
        assert_eq!(t[0], Tissue::Air as u8);
    }
}
