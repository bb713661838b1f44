//! 3-D DiT / SiT with MeDUET content and style conditioning (method.md section 4.2; the
//! authors' `downstream/generation/{DiT,SiT}/models.py`, identical in both).
//!
//! # Forward
//!
//! ```text
//! x [B,C,X,Y,Z] -> x_embedder (Conv3d k=s=p) + pos_embed (fixed 3-D sin-cos)   # [B,T,D]
//! t [B]         -> t_embedder (256 sinusoid -> Linear -> SiLU -> Linear)       # [B,D]
//! c, s          -> content_embedder / style_embedder (null on drop, L2 / tau, SiLU, Linear)
//! block (xN):  shift, scale = mod_content(c) + mod_style(s)        (AdaLn::Code)
//!              gate_msa, gate_mlp = mod_gate(t)
//!              x += gate_msa * attn(LN1(x)(1+scale_msa)+shift_msa)
//!              x += gate_mlp * mlp (LN2(x)(1+scale_mlp)+shift_mlp)
//! final:       shift, scale = mod_time(t) + mod_content(c) + mod_style(s)
//!              linear(LN(x)(1+scale)+shift)                       # [B,T,p^3*2C]
//! unpatchify ('nxyzpqrc->ncxpyqzr') and keep the first C channels  # [B,C,X,Y,Z]
//! ```
//!
//! Every `mod_*` layer starts at zero (AdaLN-Zero), so at init every block is the identity
//! and the output is `final_layer.linear(LN(x_embed + pos))`, whatever `t`, `c` and `s`.
//! Conditioning `metadata` replaces the two factor branches by one (`meta_embedder`,
//! `mod_meta`); `none` has no condition branch (time drives the gates and the final layer).
//!
//! # Variable names
//!
//! The authors' state-dict names: `x_embedder.proj.*`, `pos_embed` (not trainable),
//! `t_embedder.mlp.{0,2}.*`, `y_embedder.embedding_table.weight` (unused, kept when
//! `num_classes > 0`), `content_embedder.{tau,c_null,s_null,embedding_table.1.*}`,
//! `style_embedder.*`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`,
//! `blocks.i.{mod_content,mod_style,mod_gate}.1.*`,
//! `final_layer.{linear,mod_time.1,mod_content.1,mod_style.1}.*`. A `VarStore` saved as
//! safetensors loads into the authors' model (`load_state_dict`) and back.
//!
//! # Init
//!
//! `scratch`: as the authors' `initialize_weights` (xavier-uniform + zero bias on every
//! Linear, the patch conv xavier on its flattened view with zero bias, N(0, 0.02) for the
//! timestep MLP weights, the label table and the null vectors, zero `mod_*` layers; the
//! final linear keeps its xavier weight). `meduet`: [`Dit::load_meduet`] then copies the
//! patch embedding, the trilinearly resized position table and every block's attention and
//! MLP weights from a MeDUET student.

mod embed;

use std::collections::HashMap;
use std::path::Path;

pub use embed::{timestep_embedding, FactorEmbedder, FactorKind, MetaEmbedder, TimestepEmbedder};
pub use meduet_stages::configs::dit::{AdaLn, ConditionMode, Config, ConfigError};

use tch::{nn, nn::Module, Device, Kind, Tensor};

use super::attention::Attention;
use super::block::layer_norm;
use super::init::{linear, LinearInit};
use super::mlp::{Gelu, Mlp};
use super::patch_embed::{PatchEmbed3d, PatchInit};
use super::pos_embed::{interpolate_3d, sincos_3d};

/// Errors of building, loading or running the DiT.
#[derive(Debug, thiserror::Error)]
pub enum DitError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Inputs that do not fit the model.
    #[error("dit input: {0}")]
    Input(String),
    /// A MeDUET checkpoint that cannot initialise this DiT.
    #[error("meduet init from '{path}': {message}")]
    Transfer { path: String, message: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// The raw conditions of a batch.
#[derive(Debug)]
pub enum Cond<'a> {
    /// Content `[b, d_c]` and style `[b, d_s]` vectors.
    Factors {
        content: &'a Tensor,
        style: &'a Tensor,
    },
    /// Metadata vectors `[b, m]`.
    Metadata(&'a Tensor),
    /// Unconditional.
    None,
}

impl<'a> Cond<'a> {
    /// The condition of a model of `mode` from its tensors in [`Config::needed_dims`]
    /// order (`factors`: content, style; `metadata`: the vectors; `none`: nothing).
    pub fn of(mode: ConditionMode, tensors: &'a [Tensor]) -> Self {
        match mode {
            ConditionMode::Factors => Cond::Factors {
                content: &tensors[0],
                style: &tensors[1],
            },
            ConditionMode::Metadata => Cond::Metadata(&tensors[0]),
            ConditionMode::None => Cond::None,
        }
    }
}

fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    // x [b, n, d], shift/scale [b, d]
    x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

fn zero_linear(vs: &nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(
        vs,
        i,
        o,
        nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}

/// The names of the condition branches of a mode (block and final-layer `mod_*` layers).
pub fn branch_names(mode: ConditionMode) -> &'static [&'static str] {
    match mode {
        ConditionMode::Factors => &["mod_content", "mod_style"],
        ConditionMode::Metadata => &["mod_meta"],
        ConditionMode::None => &[],
    }
}

/// One DiT block with dual-branch AdaLN-Zero.
#[derive(Debug)]
pub struct DitBlock {
    norm1: nn::LayerNorm,
    attn: Attention,
    norm2: nn::LayerNorm,
    mlp: Mlp,
    /// One per condition branch: `D -> 4D` (code) or `D -> 6D` (paper).
    mods: Vec<nn::Linear>,
    mod_gate: nn::Linear,
    adaln: AdaLn,
}

impl DitBlock {
    /// A block with the authors' init under `vs` (`norm1`, `attn`, `norm2`, `mlp`,
    /// `mod_*`).
    pub fn new(vs: &nn::Path, cfg: &Config) -> Self {
        let d = cfg.hidden_size;
        let chunks = match cfg.adaln {
            AdaLn::Code => 4,
            AdaLn::Paper => 6,
        };
        Self {
            norm1: layer_norm(&(vs / "norm1"), d, 1e-6),
            attn: Attention::new(
                &(vs / "attn"),
                d,
                cfg.num_heads,
                true,
                LinearInit::XavierZeroBias,
            ),
            norm2: layer_norm(&(vs / "norm2"), d, 1e-6),
            mlp: Mlp::new(
                &(vs / "mlp"),
                d,
                cfg.mlp_hidden(),
                d,
                Gelu::Tanh,
                LinearInit::XavierZeroBias,
            ),
            mods: branch_names(cfg.condition)
                .iter()
                .map(|n| zero_linear(&(vs / *n / 1), d, chunks * d))
                .collect(),
            mod_gate: zero_linear(&(vs / "mod_gate" / 1), d, 2 * d),
            adaln: cfg.adaln,
        }
    }

    /// # Shapes
    /// - `x`: `[b, T, D]`; `t_act`: `SiLU(t_emb)` `[b, D]`; `conds`: `SiLU(emb)` per branch
    /// - returns `[b, T, D]`
    pub fn forward(&self, x: &Tensor, t_act: &Tensor, conds: &[Tensor]) -> Tensor {
        let gates = self.mod_gate.forward(t_act).chunk(2, 1);
        let (mut g_msa, mut g_mlp) = (gates[0].shallow_clone(), gates[1].shallow_clone());
        let modv: Option<Tensor> = self
            .mods
            .iter()
            .zip(conds)
            .map(|(m, c)| m.forward(c))
            .reduce(|a, b| a + b);
        let (h1, h2) = match modv {
            None => (self.norm1.forward(x), None),
            Some(m) => match self.adaln {
                AdaLn::Code => {
                    let c = m.chunk(4, 1);
                    (
                        modulate(&self.norm1.forward(x), &c[0], &c[1]),
                        Some((c[2].shallow_clone(), c[3].shallow_clone())),
                    )
                }
                AdaLn::Paper => {
                    // DiT's order: shift, scale, gate (msa), shift, scale, gate (mlp)
                    let c = m.chunk(6, 1);
                    g_msa = g_msa + &c[2];
                    g_mlp = g_mlp + &c[5];
                    (
                        modulate(&self.norm1.forward(x), &c[0], &c[1]),
                        Some((c[3].shallow_clone(), c[4].shallow_clone())),
                    )
                }
            },
        };
        let x = x + g_msa.unsqueeze(1) * self.attn.forward(&h1);
        let n2 = self.norm2.forward(&x);
        let h2 = match h2 {
            Some((shift, scale)) => modulate(&n2, &shift, &scale),
            None => n2,
        };
        &x + g_mlp.unsqueeze(1) * self.mlp.forward(&h2)
    }
}

/// The final layer: LN without affine, AdaLN from time + conditions, then the linear head.
#[derive(Debug)]
pub struct FinalLayer {
    linear: nn::Linear,
    mod_time: nn::Linear,
    mods: Vec<nn::Linear>,
    hidden: i64,
}

impl FinalLayer {
    fn new(vs: &nn::Path, cfg: &Config) -> Self {
        let d = cfg.hidden_size;
        Self {
            linear: linear(
                &(vs / "linear"),
                d,
                cfg.patch.pow(3) * cfg.out_channels(),
                true,
                LinearInit::XavierZeroBias,
            ),
            mod_time: zero_linear(&(vs / "mod_time" / 1), d, 2 * d),
            mods: branch_names(cfg.condition)
                .iter()
                .map(|n| zero_linear(&(vs / *n / 1), d, 2 * d))
                .collect(),
            hidden: d,
        }
    }

    /// # Shapes
    /// - `x`: `[b, T, D]` -> `[b, T, p^3 * out_channels]`
    pub fn forward(&self, x: &Tensor, t_act: &Tensor, conds: &[Tensor]) -> Tensor {
        let mut m = self.mod_time.forward(t_act);
        for (l, c) in self.mods.iter().zip(conds) {
            m = m + l.forward(c);
        }
        let c = m.chunk(2, 1);
        let n = x.layer_norm([self.hidden], None::<&Tensor>, None::<&Tensor>, 1e-6, true);
        self.linear.forward(&modulate(&n, &c[0], &c[1]))
    }
}

/// What [`Dit::load_meduet`] copied.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TransferReport {
    /// DiT variable names that received MeDUET weights.
    pub copied: Vec<String>,
    /// Parameters copied / all parameters of the DiT.
    pub copied_params: i64,
    pub total_params: i64,
    /// MeDUET grid -> DiT grid of the position table.
    pub pos_embed_from: [i64; 3],
    pub pos_embed_to: [i64; 3],
}

/// The DiT/SiT network.
#[derive(Debug)]
pub struct Dit {
    cfg: Config,
    x_embedder: PatchEmbed3d,
    pos_embed: Tensor,
    t_embedder: TimestepEmbedder,
    content_embedder: Option<FactorEmbedder>,
    style_embedder: Option<FactorEmbedder>,
    meta_embedder: Option<MetaEmbedder>,
    blocks: Vec<DitBlock>,
    final_layer: FinalLayer,
}

impl Dit {
    /// Builds the network under `vs` with the authors' init (seed libtorch first for a
    /// reproducible init). The condition widths must be filled in.
    pub fn new(vs: &nn::Path, cfg: &Config) -> Result<Self, DitError> {
        cfg.validate_complete()?;
        let d = cfg.hidden_size;
        let x_embedder = PatchEmbed3d::new(
            &(vs / "x_embedder"),
            cfg.in_chans,
            d,
            cfg.patch,
            PatchInit::XavierFlat { zero_bias: true },
        );
        let pos = sincos_3d(d, cfg.grid(), false, vs.device())
            .map_err(|e| DitError::Input(e.to_string()))?;
        let pos_embed = vs.add("pos_embed", pos, false);
        let t_embedder = TimestepEmbedder::new(&(vs / "t_embedder"), d, 256);
        if cfg.num_classes > 0 {
            // The authors' LabelEmbedder(1000, D, 0.2): unused, kept for checkpoints.
            let _ = (vs / "y_embedder" / "embedding_table").var(
                "weight",
                &[cfg.num_classes + 1, d],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            );
        }
        let (content_embedder, style_embedder, meta_embedder) = match cfg.condition {
            ConditionMode::Factors => (
                Some(FactorEmbedder::new(
                    &(vs / "content_embedder"),
                    FactorKind::Content,
                    cfg.content_dim,
                    d,
                    cfg.tau_init,
                    cfg.learnable_tau,
                )),
                Some(FactorEmbedder::new(
                    &(vs / "style_embedder"),
                    FactorKind::Style,
                    cfg.style_dim,
                    d,
                    cfg.tau_init,
                    cfg.learnable_tau,
                )),
                None,
            ),
            ConditionMode::Metadata => (
                None,
                None,
                Some(MetaEmbedder::new(
                    &(vs / "meta_embedder"),
                    cfg.metadata_dim,
                    d,
                )),
            ),
            ConditionMode::None => (None, None, None),
        };
        let blocks = (0..cfg.depth)
            .map(|i| DitBlock::new(&(vs / "blocks" / i), cfg))
            .collect();
        let final_layer = FinalLayer::new(&(vs / "final_layer"), cfg);
        Ok(Self {
            cfg: cfg.clone(),
            x_embedder,
            pos_embed,
            t_embedder,
            content_embedder,
            style_embedder,
            meta_embedder,
            blocks,
            final_layer,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> Device {
        self.pos_embed.device()
    }

    /// The content and style embedders (factors mode).
    pub fn factor_embedders(&self) -> Option<(&FactorEmbedder, &FactorEmbedder)> {
        Some((
            self.content_embedder.as_ref()?,
            self.style_embedder.as_ref()?,
        ))
    }

    /// How many condition branches this mode has (0, 1 or 2).
    pub fn branches(&self) -> usize {
        branch_names(self.cfg.condition).len()
    }

    /// Embeds raw conditions; `drop[i]` (bool `[b]`) replaces branch `i`'s rows by its null
    /// vector (classifier-free dropout). Returns one `[b, D]` embedding per branch.
    pub fn embed(&self, cond: &Cond, drop: &[Option<&Tensor>]) -> Result<Vec<Tensor>, DitError> {
        let dr = |i: usize| drop.get(i).copied().flatten();
        match (cond, self.cfg.condition) {
            (Cond::Factors { content, style }, ConditionMode::Factors) => {
                let (ce, se) = self.factor_embedders().expect("factors mode");
                check_width("content", content, self.cfg.content_dim)?;
                check_width("style", style, self.cfg.style_dim)?;
                Ok(vec![ce.forward(content, dr(0)), se.forward(style, dr(1))])
            }
            (Cond::Metadata(m), ConditionMode::Metadata) => {
                check_width("metadata", m, self.cfg.metadata_dim)?;
                let me = self.meta_embedder.as_ref().expect("metadata mode");
                Ok(vec![me.forward(m, dr(0))])
            }
            (Cond::None, ConditionMode::None) => Ok(vec![]),
            (c, mode) => Err(DitError::Input(format!(
                "conditions {} given to a model conditioned on '{}'",
                match c {
                    Cond::Factors { .. } => "factors",
                    Cond::Metadata(_) => "metadata",
                    Cond::None => "none",
                },
                serde_json::to_value(mode)
                    .expect("json")
                    .as_str()
                    .unwrap_or("?")
            ))),
        }
    }

    /// The null embeddings of every branch, `b` rows each.
    pub fn null_embed(&self, b: i64) -> Vec<Tensor> {
        match self.cfg.condition {
            ConditionMode::Factors => {
                let (ce, se) = self.factor_embedders().expect("factors mode");
                vec![ce.null_embedding(b), se.null_embedding(b)]
            }
            ConditionMode::Metadata => vec![self
                .meta_embedder
                .as_ref()
                .expect("metadata mode")
                .null_embedding(b)],
            ConditionMode::None => vec![],
        }
    }

    /// The network on embedded conditions, all `out_channels` (`2C` with `learn_sigma`).
    ///
    /// # Shapes
    /// - `x`: `[b, C, X, Y, Z]` (the configured `input_size`); `t`: `[b]`; `emb`: `[b, D]` each
    /// - returns `[b, out_channels, X, Y, Z]`
    pub fn forward_full(&self, x: &Tensor, t: &Tensor, emb: &[Tensor]) -> Result<Tensor, DitError> {
        self.check_inputs(x, t, emb)?;
        let (mut h, t_act, acts) = self.prepare(x, t, emb);
        for b in &self.blocks {
            h = b.forward(&h, &t_act, &acts);
        }
        Ok(self.head(&h, &t_act, &acts))
    }

    /// Checks the shapes of a forward pass's inputs (as [`Dit::forward_full`]).
    pub fn check_inputs(&self, x: &Tensor, t: &Tensor, emb: &[Tensor]) -> Result<(), DitError> {
        let s = x.size();
        if s.len() != 5 || s[1] != self.cfg.in_chans || s[2..] != self.cfg.input_size {
            return Err(DitError::Input(format!(
                "x has shape {s:?}, expected [b, {}, {}, {}, {}]",
                self.cfg.in_chans,
                self.cfg.input_size[0],
                self.cfg.input_size[1],
                self.cfg.input_size[2]
            )));
        }
        if t.size() != [s[0]] || emb.len() != self.branches() {
            return Err(DitError::Input(format!(
                "t has shape {:?} and {} condition embeddings; expected [{}] and {}",
                t.size(),
                emb.len(),
                s[0],
                self.branches()
            )));
        }
        Ok(())
    }

    /// What enters the first block: the tokens `x_embedder(x) + pos_embed` `[b, T, D]`,
    /// `SiLU(t_emb)` `[b, D]` and `SiLU(emb)` per branch (inputs checked by the caller).
    pub fn prepare(&self, x: &Tensor, t: &Tensor, emb: &[Tensor]) -> (Tensor, Tensor, Vec<Tensor>) {
        let h = self.x_embedder.forward(x) + &self.pos_embed;
        let t_act = self.t_embedder.forward(t).silu();
        let acts = emb.iter().map(|e| e.silu()).collect();
        (h, t_act, acts)
    }

    /// The blocks, in order.
    pub fn blocks(&self) -> &[DitBlock] {
        &self.blocks
    }

    /// The final layer on the last block's tokens, unpatchified: `[b, out_channels, X, Y, Z]`.
    pub fn head(&self, h: &Tensor, t_act: &Tensor, acts: &[Tensor]) -> Tensor {
        self.unpatchify(&self.final_layer.forward(h, t_act, acts))
    }

    /// The first `C` channels of a full output (the authors drop the sigma half).
    pub fn keep_prediction(&self, out: Tensor) -> Tensor {
        if self.cfg.learn_sigma {
            out.narrow(1, 0, self.cfg.in_chans)
        } else {
            out
        }
    }

    /// The network on embedded conditions: the first `C` channels (the authors drop the
    /// sigma half).
    ///
    /// # Shapes
    /// - returns `[b, C, X, Y, Z]`
    pub fn forward_emb(&self, x: &Tensor, t: &Tensor, emb: &[Tensor]) -> Result<Tensor, DitError> {
        let out = self.forward_full(x, t, emb)?;
        Ok(self.keep_prediction(out))
    }

    /// Embeds `cond` (with dropout masks) and runs [`Dit::forward_emb`].
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        cond: &Cond,
        drop: &[Option<&Tensor>],
    ) -> Result<Tensor, DitError> {
        let emb = self.embed(cond, drop)?;
        self.forward_emb(x, t, &emb)
    }

    /// `[b, T, p^3 c]` -> `[b, c, X, Y, Z]` (`einsum nxyzpqrc->ncxpyqzr`).
    pub fn unpatchify(&self, x: &Tensor) -> Tensor {
        let [gx, gy, gz] = self.cfg.grid();
        let p = self.cfg.patch;
        let c = self.cfg.out_channels();
        let b = x.size()[0];
        x.reshape([b, gx, gy, gz, p, p, p, c])
            .permute([0, 7, 1, 4, 2, 5, 3, 6])
            .reshape([b, c, gx * p, gy * p, gz * p])
    }

    /// Initialises from a MeDUET student (`student.safetensors`) as the authors'
    /// `load_pretrained_from_MeDUET`: `embed_layer.proj.*` -> `x_embedder.proj.*`, the
    /// position table without its cls row, resized trilinearly to this grid, and every
    /// block's `attn.{qkv,proj}.*` and `mlp.{fc1,fc2}.*` (blocks `0..depth`). LayerNorms,
    /// AdaLN layers, embedders and the final layer keep their init. `meduet_grid` is the
    /// MeDUET token grid (`crop / patch` per axis).
    pub fn load_meduet(
        &self,
        vs: &nn::VarStore,
        student: &Path,
        meduet_grid: [i64; 3],
    ) -> Result<TransferReport, DitError> {
        let terr = |m: String| DitError::Transfer {
            path: student.display().to_string(),
            message: m,
        };
        let src: HashMap<String, Tensor> = Tensor::read_safetensors(student)
            .map_err(|e| terr(format!("cannot read: {e}")))?
            .into_iter()
            .collect();
        let dst = vs.variables();
        let mut pairs: Vec<(String, String)> = ["weight", "bias"]
            .iter()
            .map(|k| {
                (
                    format!("embed_layer.proj.{k}"),
                    format!("x_embedder.proj.{k}"),
                )
            })
            .collect();
        for i in 0..self.cfg.depth {
            for m in ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"] {
                for k in ["weight", "bias"] {
                    let n = format!("blocks.{i}.{m}.{k}");
                    pairs.push((n.clone(), n));
                }
            }
        }
        let mut copied = Vec::new();
        let mut copied_params = 0;
        tch::no_grad(|| -> Result<(), DitError> {
            for (s, d) in &pairs {
                let sv = src.get(s).ok_or_else(|| {
                    terr(format!(
                        "has no '{s}' (the DiT has depth {}; a MeDUET with fewer blocks or a \
                         file that is not a MeDUET student cannot initialise it)",
                        self.cfg.depth
                    ))
                })?;
                let mut dv = dst[d].shallow_clone();
                if sv.size() != dv.size() {
                    return Err(terr(format!(
                        "'{s}' has shape {:?} but the DiT's '{d}' has {:?} (widths, heads, \
                         patch and channels must match)",
                        sv.size(),
                        dv.size()
                    )));
                }
                dv.copy_(&sv.to_kind(dv.kind()).to_device(dv.device()));
                copied_params += dv.numel() as i64;
                copied.push(d.clone());
            }
            let pos = src
                .get("pos_embed")
                .ok_or_else(|| terr("has no 'pos_embed'".into()))?;
            let l: i64 = meduet_grid.iter().product();
            let ps = pos.size();
            if ps.len() != 3 || ps[1] != l + 1 || ps[2] != self.cfg.hidden_size {
                return Err(terr(format!(
                    "'pos_embed' has shape {ps:?}, expected [1, {} (cls + grid {meduet_grid:?}), {}]",
                    l + 1,
                    self.cfg.hidden_size
                )));
            }
            let resized = interpolate_3d(&pos.narrow(1, 1, l), meduet_grid, self.cfg.grid())
                .map_err(|e| terr(e.to_string()))?;
            let mut pe = dst["pos_embed"].shallow_clone();
            pe.copy_(&resized.to_kind(pe.kind()).to_device(pe.device()));
            copied.push("pos_embed".into());
            Ok(())
        })?;
        let total_params = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        Ok(TransferReport {
            copied,
            copied_params,
            total_params,
            pos_embed_from: meduet_grid,
            pos_embed_to: self.cfg.grid(),
        })
    }
}

fn check_width(what: &str, t: &Tensor, want: i64) -> Result<(), DitError> {
    let s = t.size();
    if s.len() != 2 || s[1] != want {
        return Err(DitError::Input(format!(
            "{what} vectors have shape {s:?}, expected [b, {want}]"
        )));
    }
    Ok(())
}

/// Bernoulli classifier-free dropout masks: `p` per row, from a seeded Rust RNG (so a
/// resumed run draws the same masks), as a bool tensor `[b]` on `device`.
pub fn dropout_mask(b: usize, p: f64, rng: &mut impl rand::Rng, device: Device) -> Tensor {
    let v: Vec<bool> = (0..b)
        .map(|_| p > 0.0 && rng.random_bool(p.min(1.0)))
        .collect();
    let u: Vec<u8> = v.iter().map(|&x| x as u8).collect();
    Tensor::from_slice(&u).to_kind(Kind::Bool).to_device(device)
}
