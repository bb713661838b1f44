//! The mixing mask M and the token mixing / demixing / remixing it drives.
//!
//! `M[n, l] = 0` means token `l` of mixed sample `n` comes from sample `n` itself (`x`), `1`
//! means it comes from its pair partner `B-1-n` (`x.flip(0)`). Each row has exactly
//! `num_keep = int(L*(1-ratio))` zeros (the authors' `random_mixing`: a per-sample random
//! permutation, the first `num_keep` positions get 0).
//!
//! Demixing takes the two token subsets of each mixed sample in position order (what
//! PyTorch's boolean `masked_select` yields); remixing is its exact inverse. All index tensors are
//! derived once, in [`Masks::from_tensor`], so that the same mask can be fed to this engine and
//! to the Python reference.

use rand::seq::SliceRandom;
use rand::Rng;
use tch::{Device, Kind, Tensor};

/// An invalid mask tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    /// Not `[B, L]` or `[B, L, 1]`.
    #[error("mixing mask must be [B, L] or [B, L, 1], got {0:?}")]
    Shape(Vec<i64>),
    /// Values other than 0 and 1.
    #[error("mixing mask must contain only 0 and 1")]
    NotBinary,
    /// Rows with different numbers of zeros (the demixed subsets would be ragged).
    #[error("every mask row must have the same number of zeros; rows have {min}..={max}")]
    Ragged {
        /// Fewest zeros in a row.
        min: i64,
        /// Most zeros in a row.
        max: i64,
    },
}

/// A mixing mask with its derived index tensors (all on the mask's device).
#[derive(Debug)]
pub struct Masks {
    /// `[B, L]` f32, 0/1.
    m: Tensor,
    /// `[B, L, 1]` f32, `M`.
    take: Tensor,
    /// `[B, L, 1]` f32, `1 - M`.
    keep: Tensor,
    /// `[B, n0]` i64: positions with `M == 0`, ascending.
    ids0: Tensor,
    /// `[B, n1]` i64: positions with `M == 1`, ascending.
    ids1: Tensor,
    /// `[B, L]` i64: for position `l`, its index in `cat[ids0, ids1]`.
    restore: Tensor,
    n0: i64,
}

impl Masks {
    /// Wraps a given mask (`[B, L]` or `[B, L, 1]`, values 0/1, the same number of zeros in
    /// every row). The mask stays on its device.
    pub fn from_tensor(m: &Tensor) -> Result<Self, MaskError> {
        let size = m.size();
        let m = match size.as_slice() {
            [_, _] => m.to_kind(Kind::Float),
            [_, _, 1] => m.squeeze_dim(-1).to_kind(Kind::Float),
            _ => return Err(MaskError::Shape(size)),
        };
        let (b, l) = m.size2().expect("2-D");
        let binary = m.eq(0.0).logical_or(&m.eq(1.0)).all();
        if !bool::try_from(&binary).unwrap_or(false) {
            return Err(MaskError::NotBinary);
        }
        let zeros = m.eq(0.0).sum_dim_intlist(1, false, Kind::Int64);
        let min = i64::try_from(zeros.min()).expect("scalar");
        let max = i64::try_from(zeros.max()).expect("scalar");
        if min != max {
            return Err(MaskError::Ragged { min, max });
        }
        let n0 = min;
        // A stable ascending sort puts the zeros first, each subset in position order.
        let ids = m.argsort_stable(true, 1, false);
        let ids0 = ids.narrow(1, 0, n0);
        let ids1 = ids.narrow(1, n0, l - n0);
        let restore = ids.argsort_stable(true, 1, false);
        let take = m.unsqueeze(-1);
        let keep = 1.0 - &take;
        debug_assert_eq!(restore.size(), [b, l]);
        Ok(Self {
            m,
            take,
            keep,
            ids0,
            ids1,
            restore,
            n0,
        })
    }

    /// The authors' `random_mixing`: for each sample, a random permutation of the `L`
    /// positions whose first `int(L*(1-ratio))` entries get 0. Deterministic in `rng`.
    pub fn random<R: Rng + ?Sized>(
        batch: i64,
        num_tokens: i64,
        mask_ratio: f64,
        rng: &mut R,
        device: Device,
    ) -> Self {
        let keep = (num_tokens as f64 * (1.0 - mask_ratio)) as usize;
        let l = num_tokens as usize;
        let mut values = vec![1f32; batch as usize * l];
        let mut perm: Vec<usize> = (0..l).collect();
        for row in values.chunks_mut(l) {
            perm.shuffle(rng);
            for &p in &perm[..keep] {
                row[p] = 0.0;
            }
        }
        let m = Tensor::from_slice(&values)
            .view([batch, num_tokens])
            .to_device(device);
        Self::from_tensor(&m).expect("a generated mask is valid")
    }

    /// The complementary mask `1 - M` (the SiQC teacher's view).
    pub fn complement(&self) -> Self {
        Self::from_tensor(&(1.0 - &self.m)).expect("the complement of a valid mask is valid")
    }

    /// The mask of the flipped batch, `M.flip(0)`.
    pub fn flip(&self) -> Self {
        Self::from_tensor(&self.m.flip([0])).expect("a flipped valid mask is valid")
    }

    /// `[B, L]` f32 0/1.
    pub fn tensor(&self) -> &Tensor {
        &self.m
    }

    /// `[B, L, 1]` f32: `M` (1 where the partner supplies the token).
    pub fn take(&self) -> &Tensor {
        &self.take
    }

    /// `[B, L, 1]` f32: `1 - M` (1 where the sample supplies its own token).
    pub fn keep(&self) -> &Tensor {
        &self.keep
    }

    /// `[B, n0]` positions with `M == 0`, ascending.
    pub fn ids_keep(&self) -> &Tensor {
        &self.ids0
    }

    /// `[B, n1]` positions with `M == 1`, ascending.
    pub fn ids_take(&self) -> &Tensor {
        &self.ids1
    }

    /// Batch size B.
    pub fn batch(&self) -> i64 {
        self.m.size()[0]
    }

    /// Tokens per sample L.
    pub fn num_tokens(&self) -> i64 {
        self.m.size()[1]
    }

    /// Zeros per row, n0.
    pub fn num_keep(&self) -> i64 {
        self.n0
    }

    /// Ones per row, n1 = L - n0.
    pub fn num_take(&self) -> i64 {
        self.num_tokens() - self.n0
    }

    /// The device of the mask.
    pub fn device(&self) -> Device {
        self.m.device()
    }

    /// Token mixing: `t*(1-M) + t.flip(0)*M`.
    ///
    /// # Shapes
    /// - `t`: `[B, L, D]`
    /// - returns `[B, L, D]`
    pub fn mix(&self, t: &Tensor) -> Tensor {
        t * &self.keep + t.flip([0]) * &self.take
    }

    /// Gathers `t[:, ids]` for a `[B, n]` index.
    fn gather(t: &Tensor, ids: &Tensor) -> Tensor {
        let d = *t.size().last().expect("tokens have a width");
        let (b, n) = ids.size2().expect("[B, n]");
        t.gather(1, &ids.unsqueeze(-1).expand([b, n, d], false), false)
    }

    /// The `M == 0` tokens of each row, in position order.
    ///
    /// # Shapes
    /// - `t`: `[B, L, D]`
    /// - returns `[B, n0, D]`
    pub fn select_keep(&self, t: &Tensor) -> Tensor {
        Self::gather(t, &self.ids0)
    }

    /// The `M == 1` tokens of each row, in position order.
    ///
    /// # Shapes
    /// - `t`: `[B, L, D]`
    /// - returns `[B, n1, D]`
    pub fn select_take(&self, t: &Tensor) -> Tensor {
        Self::gather(t, &self.ids1)
    }

    /// Demixing: `(t[M == 0], t[M == 1])`, each in position order.
    ///
    /// # Shapes
    /// - `t`: `[B, L, D]`
    /// - returns `([B, n0, D], [B, n1, D])`
    pub fn demix(&self, t: &Tensor) -> (Tensor, Tensor) {
        (self.select_keep(t), self.select_take(t))
    }

    /// Remixing, the inverse of [`Masks::demix`]: `a` goes to the `M == 0` positions and `b` to
    /// the `M == 1` positions.
    ///
    /// # Shapes
    /// - `a`: `[B, n0, D]`, `b`: `[B, n1, D]`
    /// - returns `[B, L, D]`
    pub fn remix(&self, a: &Tensor, b: &Tensor) -> Tensor {
        Self::gather(&Tensor::cat(&[a, b], 1), &self.restore)
    }
}
