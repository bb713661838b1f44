//! DiT/SiT input embedders: timesteps, content/style factors (L2 norm, learnable temperature,
//! learnable null vectors), metadata vectors, and the authors' unused label table.

use tch::{nn, nn::Module, Kind, Tensor};

use crate::models::init::{linear, LinearInit};

/// GLIDE's sinusoidal timestep features `[cos(t f_k), sin(t f_k)]`,
/// `f_k = exp(-ln(10000) k / half)`, `k < half = dim / 2` (a zero column is appended when
/// `dim` is odd).
///
/// # Shapes
/// - `t`: `[b]` (any float or integer kind; fractional values allowed)
/// - returns `[b, dim]` float32
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let freqs =
        (Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()) / half as f64)).exp();
    // [b, 1] * [1, half]
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let emb = Tensor::cat(&[args.cos(), args.sin()], -1);
    if dim % 2 == 1 {
        let z = emb.narrow(1, 0, 1).zeros_like();
        Tensor::cat(&[emb, z], -1)
    } else {
        emb
    }
}

/// `t_embedder`: `mlp.0` (256 -> D), SiLU, `mlp.2` (D -> D); weights N(0, 0.02), zero bias.
#[derive(Debug)]
pub struct TimestepEmbedder {
    fc0: nn::Linear,
    fc2: nn::Linear,
    freq_dim: i64,
}

impl TimestepEmbedder {
    pub fn new(vs: &nn::Path, hidden: i64, freq_dim: i64) -> Self {
        let normal = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let cfg = nn::LinearConfig {
            ws_init: normal,
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        };
        let mlp = vs / "mlp";
        Self {
            fc0: nn::linear(&mlp / 0, freq_dim, hidden, cfg),
            fc2: nn::linear(&mlp / 2, hidden, hidden, cfg),
            freq_dim,
        }
    }

    /// # Shapes
    /// - `t`: `[b]`
    /// - returns `[b, D]`
    pub fn forward(&self, t: &Tensor) -> Tensor {
        self.fc2.forward(
            &self
                .fc0
                .forward(&timestep_embedding(t, self.freq_dim))
                .silu(),
        )
    }
}

/// Which factor a [`FactorEmbedder`] embeds (it owns both null vectors, as the authors'
/// `CSEmbedder` does, but uses only its own kind's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorKind {
    Content,
    Style,
}

/// The authors' `CSEmbedder`: `v' = dropped ? null : v`,
/// `v'' = normalize_L2(v', eps 1e-6) / clamp(tau, 1e-3)`, `emb = Linear(SiLU(v''))`.
///
/// Variables: `tau` (0-dim; only when learnable, as in the authors' code), `c_null`,
/// `s_null` (`[in]`, N(0, 0.02)), `embedding_table.1.{weight,bias}`.
#[derive(Debug)]
pub struct FactorEmbedder {
    kind: FactorKind,
    tau: Tensor,
    c_null: Tensor,
    s_null: Tensor,
    table: nn::Linear,
}

impl FactorEmbedder {
    pub fn new(
        vs: &nn::Path,
        kind: FactorKind,
        in_dim: i64,
        hidden: i64,
        tau_init: f64,
        learnable_tau: bool,
    ) -> Self {
        let tau = if learnable_tau {
            vs.var("tau", &[], nn::Init::Const(tau_init))
        } else {
            Tensor::from(tau_init as f32).to_device(vs.device())
        };
        let normal = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let c_null = vs.var("c_null", &[in_dim], normal);
        let s_null = vs.var("s_null", &[in_dim], normal);
        let table = linear(
            &(vs / "embedding_table" / 1),
            in_dim,
            hidden,
            true,
            LinearInit::XavierZeroBias,
        );
        Self {
            kind,
            tau,
            c_null,
            s_null,
            table,
        }
    }

    /// The null vector of this embedder's kind, `[in]`.
    pub fn null_vec(&self) -> &Tensor {
        match self.kind {
            FactorKind::Content => &self.c_null,
            FactorKind::Style => &self.s_null,
        }
    }

    /// The current temperature (clamped at 1e-3).
    pub fn temperature(&self) -> f64 {
        self.tau.clamp_min(1e-3).double_value(&[])
    }

    fn norm_temp(&self, v: &Tensor) -> Tensor {
        // F.normalize(v, p=2, dim=-1, eps=1e-6) / tau.clamp_min(1e-3)
        let n = v
            .norm_scalaropt_dim(2, [-1i64].as_slice(), true)
            .clamp_min(1e-6);
        v / n / self.tau.clamp_min(1e-3).to_kind(v.kind())
    }

    /// Embeds factor vectors, replacing the rows where `drop` is true by the null vector.
    ///
    /// # Shapes
    /// - `v`: `[b, in]`; `drop`: `[b]` bool
    /// - returns `[b, D]`
    pub fn forward(&self, v: &Tensor, drop: Option<&Tensor>) -> Tensor {
        let v = match drop {
            Some(d) => {
                let null = self.null_vec().to_kind(v.kind()).unsqueeze(0).expand_as(v);
                null.where_self(&d.unsqueeze(-1), v)
            }
            None => v.shallow_clone(),
        };
        self.table.forward(&self.norm_temp(&v).silu())
    }

    /// The embedding of the null vector, repeated `b` times: `[b, D]`.
    pub fn null_embedding(&self, b: i64) -> Tensor {
        let v = self.null_vec().unsqueeze(0).expand([b, -1], false);
        self.table.forward(&self.norm_temp(&v).silu())
    }
}

/// The metadata embedder of the baseline (`metadata` conditioning): `emb = Linear(SiLU(m'))`
/// with `m' = dropped ? null : m`. No normalisation: numeric metadata keeps its magnitude.
///
/// Variables: `null` (`[in]`, N(0, 0.02)), `embedding_table.1.{weight,bias}`.
#[derive(Debug)]
pub struct MetaEmbedder {
    null: Tensor,
    table: nn::Linear,
}

impl MetaEmbedder {
    pub fn new(vs: &nn::Path, in_dim: i64, hidden: i64) -> Self {
        Self {
            null: vs.var(
                "null",
                &[in_dim],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            table: linear(
                &(vs / "embedding_table" / 1),
                in_dim,
                hidden,
                true,
                LinearInit::XavierZeroBias,
            ),
        }
    }

    /// # Shapes
    /// - `m`: `[b, in]`; `drop`: `[b]` bool
    /// - returns `[b, D]`
    pub fn forward(&self, m: &Tensor, drop: Option<&Tensor>) -> Tensor {
        let m = match drop {
            Some(d) => {
                let null = self.null.to_kind(m.kind()).unsqueeze(0).expand_as(m);
                null.where_self(&d.unsqueeze(-1), m)
            }
            None => m.shallow_clone(),
        };
        self.table.forward(&m.silu())
    }

    /// `[b, D]`.
    pub fn null_embedding(&self, b: i64) -> Tensor {
        let v = self.null.unsqueeze(0).expand([b, -1], false);
        self.table.forward(&v.silu())
    }
}
