//! MeDUET: disentangled, demixing masked pretraining of a ViT in VAE latent space
//! (paper section 3; authors' `pretrain/models_MeDUET.py`, `MFTD.py`, `SiQC.py`).
//!
//! # One training step
//!
//! ```text
//! x [B,4,24,24,24], pairs i <-> B-1-i, mask M [B,216] with 108 zeros per row
//! t   = embed_layer(x) + pos_embed[1:]                    # [B,L,D]
//! t   = t*(1-M) + t.flip(0)*M                             # token mixing
//! h   = norm(blocks(cat[cls + pos_embed[0], t]))          # [B,1+L,D]
//! z1, z2 = h[1:][M==0], h[1:][M==1]                       # demix, position order
//! (zc_k, zs_k) = Dis(z_k)                                 # content D, style d_s
//! xrec = dual decoder(remix(Ent(zc1,zs1), Ent(zc2,zs2)))  # [2B,L,p^3 C]
//! L = L_rec + 0.2 (L_dc + L_ds) + 0.5 L_MFTD [step >= 20%] + 0.3 L_SiQC
//! ```
//!
//! The teacher is an EMA copy ([`Teacher`]); MFTD and SiQC read it without gradients. All
//! randomness is injected: the mask ([`Masks`], from a tensor or a Rust RNG) and the weights
//! (seed libtorch before [`MeDuet::new`]).
//!
//! # Variable names
//!
//! Every variable carries the authors' PyTorch parameter name (`embed_layer.proj.weight`,
//! `blocks.3.attn.qkv.bias`, `disentangled_factorizer.proj_s.weight`,
//! `domain_classifier.domain_classifier_c.4.bias`, the unused `patch_embed.proj.weight`, the
//! fixed `pos_embed` / `decoder_pos_embed`, ...), so a `VarStore` saved as `.safetensors` loads
//! into the Python reference (`reference/meduet_ref.py`) and the authors' model, and back.
//!
//! # Init
//!
//! As the authors' `initialize_weights`: xavier-uniform + zero bias on every Linear (qkv, the
//! domain MLPs, decoder_embed/pred), LayerNorm 1/0, `cls_token` and `mask_token` N(0, 0.02),
//! fixed sin-cos position tables; the Conv3d `embed_layer` and every Conv1d keep PyTorch's
//! default init, while the unused 2-D `patch_embed` is xavier-initialised (the quirk of
//! `initialize_weights`).

mod factors;
mod losses;
mod mask;
mod teacher;

pub use factors::{grad_reverse, Disentanglement, DomainClassifier, Entanglement, Mlp3};
pub use losses::{LossValues, Losses, StepInfo};
pub use mask::{MaskError, Masks};
pub use meduet_stages::configs::meduet::{Config, ConfigError, LossConfig, RecMaskPairing};
pub use teacher::Teacher;

use tch::{nn, nn::Module, Device, Kind, Tensor};

use super::block::{layer_norm, Block, BlockConfig};
use super::init::{linear, LinearInit};
use super::patch_embed::{PatchEmbed2d, PatchEmbed3d, PatchInit};
use super::pos_embed::sincos_3d;

/// Errors of building or running MeDUET.
#[derive(Debug, thiserror::Error)]
pub enum MeduetError {
    /// An invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An invalid mask.
    #[error(transparent)]
    Mask(#[from] MaskError),
    /// Inputs that do not fit the model.
    #[error("meduet input: {0}")]
    Input(String),
    /// A libtorch error (loading, copying).
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Content and style tokens of whole crops, plus the encoder's cls token.
#[derive(Debug)]
pub struct Factors {
    /// `[n, L, D]`.
    pub content: Tensor,
    /// `[n, L, d_s]` (`[n, L, D]` without disentanglement).
    pub style: Tensor,
    /// `[n, 1, D]`.
    pub cls: Tensor,
}

/// The demixed factor tokens of a mixed batch (`encode_demix`).
///
/// With demixing, `*1` are the `M == 0` tokens (from `x`) and `*2` the `M == 1` tokens (from
/// `x.flip(0)`), each in position order. Without demixing (MAE mode), `*1` are the visible
/// tokens of `x` and `*2 = *1.flip(0)`: the pair partner's own visible tokens.
#[derive(Debug)]
pub struct Demixed {
    /// `[B, n0, D]`.
    pub zc1: Tensor,
    /// `[B, n1, D]`.
    pub zc2: Tensor,
    /// `[B, n0, d_s]`.
    pub zs1: Tensor,
    /// `[B, n1, d_s]`.
    pub zs2: Tensor,
    /// `[B, 1, D]`: the encoder's cls token.
    pub cls: Tensor,
}

/// The MeDUET student (or teacher) network.
#[derive(Debug)]
pub struct MeDuet {
    cfg: Config,
    device: Device,
    embed_layer: PatchEmbed3d,
    /// The authors' unused timm 2-D patch embedding (kept for checkpoint compatibility).
    #[allow(dead_code)]
    patch_embed: PatchEmbed2d,
    cls_token: Tensor,
    mask_token: Tensor,
    pos_embed: Tensor,
    decoder_pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    decoder_embed: nn::Linear,
    decoder_blocks: Vec<Block>,
    decoder_norm: nn::LayerNorm,
    decoder_pred: nn::Linear,
    factorizer: Option<Disentanglement>,
    entanglement: Option<Entanglement>,
    domain_classifier: Option<DomainClassifier>,
    logit_scale_c: Tensor,
    logit_scale_s: Tensor,
}

impl MeDuet {
    /// Builds the network under `vs` (normally a var store's root) after validating `cfg`.
    /// Seed libtorch (`tch::manual_seed`) first for a reproducible init.
    pub fn new(vs: &nn::Path, cfg: &Config) -> Result<Self, MeduetError> {
        cfg.validate()?;
        let device = vs.device();
        let (d, dd) = (cfg.embed_dim, cfg.decoder_embed_dim);
        let grid = [cfg.grid(); 3];
        let l = cfg.num_tokens();

        let embed_layer = PatchEmbed3d::new(
            &(vs / "embed_layer"),
            cfg.in_chans,
            d,
            cfg.patch,
            PatchInit::TorchDefault,
        );
        let patch_embed = PatchEmbed2d::new(
            &(vs / "patch_embed"),
            cfg.in_chans,
            d,
            cfg.patch,
            PatchInit::XavierFlat { zero_bias: false },
        );
        let cls_token = vs.var(
            "cls_token",
            &[1, 1, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let mask_token = vs.var(
            "mask_token",
            &[1, 1, dd],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let pos =
            sincos_3d(d, grid, true, device).map_err(|e| MeduetError::Input(e.to_string()))?;
        let pos_embed = vs.add("pos_embed", pos, false);
        let dpos =
            sincos_3d(dd, grid, true, device).map_err(|e| MeduetError::Input(e.to_string()))?;
        let decoder_pos_embed = vs.add("decoder_pos_embed", dpos, false);
        debug_assert_eq!(pos_embed.size(), [1, l + 1, d]);

        let enc_block = BlockConfig::vit(d, cfg.num_heads, cfg.mlp_ratio);
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&(vs / "blocks" / i), &enc_block))
            .collect();
        let norm = layer_norm(&(vs / "norm"), d, 1e-6);
        let decoder_embed = linear(
            &(vs / "decoder_embed"),
            d,
            dd,
            true,
            LinearInit::XavierZeroBias,
        );
        let dec_block = BlockConfig::vit(dd, cfg.decoder_num_heads, cfg.mlp_ratio);
        let decoder_blocks = (0..cfg.decoder_depth)
            .map(|i| Block::new(&(vs / "decoder_blocks" / i), &dec_block))
            .collect();
        let decoder_norm = layer_norm(&(vs / "decoder_norm"), dd, 1e-6);
        let decoder_pred = linear(
            &(vs / "decoder_pred"),
            dd,
            cfg.patch_values(),
            true,
            LinearInit::XavierZeroBias,
        );

        let (factorizer, entanglement, domain_classifier) = if cfg.disentangle {
            (
                Some(Disentanglement::new(
                    &(vs / "disentangled_factorizer"),
                    d,
                    cfg.style_dim,
                )),
                Some(Entanglement::new(
                    &(vs / "latent_entanglement"),
                    d,
                    cfg.style_dim,
                )),
                Some(DomainClassifier::new(
                    &(vs / "domain_classifier"),
                    d,
                    cfg.style_dim,
                    cfg.domain_hidden_mult,
                    cfg.n_domains,
                    cfg.loss.grl_lambda,
                )),
            )
        } else {
            (None, None, None)
        };

        let init = cfg.loss.siqc_logit_scale_init;
        let (logit_scale_c, logit_scale_s) = if cfg.siqc_learnable_scale {
            let s = vs / "siqc";
            (
                s.var("logit_scale_c", &[], nn::Init::Const(init)),
                s.var("logit_scale_s", &[], nn::Init::Const(init)),
            )
        } else {
            let fixed = || {
                Tensor::from_slice(&[init as f32])
                    .reshape([0i64; 0])
                    .to_device(device)
            };
            (fixed(), fixed())
        };

        Ok(Self {
            cfg: cfg.clone(),
            device,
            embed_layer,
            patch_embed,
            cls_token,
            mask_token,
            pos_embed,
            decoder_pos_embed,
            blocks,
            norm,
            decoder_embed,
            decoder_blocks,
            decoder_norm,
            decoder_pred,
            factorizer,
            entanglement,
            domain_classifier,
            logit_scale_c,
            logit_scale_s,
        })
    }

    /// Whether the domain classifiers exist (pretrained with disentanglement).
    pub fn has_domain_classifier(&self) -> bool {
        self.domain_classifier.is_some()
    }

    /// The style domain classifier `Cls_s` on token-mean-pooled style vectors: class logits
    /// (class `k` is the pretraining's `k`-th domain); `None` without disentanglement.
    ///
    /// # Shapes
    /// - `pooled_style`: `[n, d_s]`
    /// - returns `[n, n_domains]`
    pub fn style_domain_logits(&self, pooled_style: &Tensor) -> Option<Tensor> {
        self.domain_classifier
            .as_ref()
            .map(|d| d.style.forward(pooled_style))
    }

    /// The configuration the network was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device of the variables.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The fixed encoder position table `[1, 1+L, D]` (row 0 = cls = zeros).
    pub fn pos_embed(&self) -> &Tensor {
        &self.pos_embed
    }

    /// The fixed decoder position table `[1, 1+L, Dd]`.
    pub fn decoder_pos_embed(&self) -> &Tensor {
        &self.decoder_pos_embed
    }

    /// The SiQC logit scales `(content, style)` (0-dim; trainable only with
    /// `siqc_learnable_scale`).
    pub fn logit_scales(&self) -> (&Tensor, &Tensor) {
        (&self.logit_scale_c, &self.logit_scale_s)
    }

    /// Patch targets, channel fastest: `[B,C,gx,p,gy,p,gz,p]` -> `[B,gx,gy,gz,p,p,p,C]`.
    ///
    /// # Shapes
    /// - `x`: `[b, C, crop, crop, crop]`
    /// - returns `[b, L, p^3 C]`
    pub fn patchify(&self, x: &Tensor) -> Tensor {
        let (c, g, p) = (self.cfg.in_chans, self.cfg.grid(), self.cfg.patch);
        let b = x.size()[0];
        x.reshape([b, c, g, p, g, p, g, p])
            .permute([0, 2, 4, 6, 3, 5, 7, 1])
            .reshape([b, g * g * g, p * p * p * c])
    }

    /// The exact inverse of [`MeDuet::patchify`] (`einsum 'nxyzpqrc->ncxpyqzr'`).
    ///
    /// # Shapes
    /// - `t`: `[n, L, p^3 C]`
    /// - returns `[n, C, crop, crop, crop]`
    pub fn unpatchify(&self, t: &Tensor) -> Tensor {
        let (c, g, p) = (self.cfg.in_chans, self.cfg.grid(), self.cfg.patch);
        let n = t.size()[0];
        t.reshape([n, g, g, g, p, p, p, c])
            .permute([0, 7, 1, 4, 2, 5, 3, 6])
            .reshape([n, c, g * p, g * p, g * p])
    }

    /// Patch embedding plus the fixed position table (without the cls row).
    ///
    /// # Shapes
    /// - `x`: `[b, C, crop, crop, crop]`
    /// - returns `[b, L, D]`
    pub fn embed(&self, x: &Tensor) -> Tensor {
        let l = self.cfg.num_tokens();
        self.embed_layer.forward(x) + self.pos_embed.narrow(1, 1, l)
    }

    /// Prepends `cls_token + pos_embed[0]`, runs the encoder blocks and the final norm.
    ///
    /// # Shapes
    /// - `tokens`: `[b, t, D]`
    /// - returns `[b, 1+t, D]`
    pub fn encode_tokens(&self, tokens: &Tensor) -> Tensor {
        let b = tokens.size()[0];
        let d = self.cfg.embed_dim;
        let cls = (&self.cls_token + self.pos_embed.narrow(1, 0, 1)).expand([b, 1, d], false);
        let mut h = Tensor::cat(&[&cls, tokens], 1);
        for blk in &self.blocks {
            h = blk.forward(&h);
        }
        self.norm.forward(&h)
    }

    /// The encoder on a mixed batch (`forward_encoder`): token mixing with `masks`, then the
    /// blocks. Without demixing, only the `M == 0` tokens of each sample enter (MAE).
    ///
    /// # Shapes
    /// - `x`: `[B, C, crop, crop, crop]`
    /// - returns `[B, 1+L, D]` (demix) or `[B, 1+n0, D]` (MAE)
    pub fn forward_encoder(&self, x: &Tensor, masks: &Masks) -> Tensor {
        let t = self.embed(x);
        let t = if self.cfg.demix {
            masks.mix(&t)
        } else {
            masks.select_keep(&t)
        };
        self.encode_tokens(&t)
    }

    /// `Dis`: content and style tokens (identity pair without disentanglement).
    ///
    /// # Shapes
    /// - `z`: `[n, t, D]`
    /// - returns `([n, t, D], [n, t, d_s])`
    pub fn disentangle(&self, z: &Tensor) -> (Tensor, Tensor) {
        match &self.factorizer {
            Some(f) => f.forward(z),
            None => (z.shallow_clone(), z.shallow_clone()),
        }
    }

    /// `Ent`: fuses content and style back into D-wide tokens (the content itself without
    /// disentanglement).
    ///
    /// # Shapes
    /// - `content`: `[n, t, D]`, `style`: `[n, t, d_s]`
    /// - returns `[n, t, D]`
    pub fn entangle(&self, content: &Tensor, style: &Tensor) -> Tensor {
        match &self.entanglement {
            Some(e) => e.forward(content, style),
            None => content.shallow_clone(),
        }
    }

    /// Applies `f` to the batch concatenation of two token sets of equal length and splits the
    /// result (one call instead of two; per-sample results are unchanged).
    fn paired<F: Fn(&Tensor, &Tensor) -> Tensor>(
        f: F,
        a1: &Tensor,
        a2: &Tensor,
        b1: &Tensor,
        b2: &Tensor,
    ) -> (Tensor, Tensor) {
        let n = a1.size()[0];
        if a1.size()[1] == a2.size()[1] {
            let out = f(&Tensor::cat(&[a1, a2], 0), &Tensor::cat(&[b1, b2], 0));
            (out.narrow(0, 0, n), out.narrow(0, n, n))
        } else {
            (f(a1, b1), f(a2, b2))
        }
    }

    /// Mixed encoding, demixing and disentanglement (`encode_demix`).
    ///
    /// # Shapes
    /// - `x`: `[B, C, crop, crop, crop]`
    /// - returns [`Demixed`] with `[B, n0|n1, D|d_s]` factors and `[B, 1, D]` cls
    pub fn encode_demix(&self, x: &Tensor, masks: &Masks) -> Demixed {
        let h = self.forward_encoder(x, masks);
        let t = h.size()[1] - 1;
        let cls = h.narrow(1, 0, 1);
        let patches = h.narrow(1, 1, t);
        if self.cfg.demix {
            let (z1, z2) = masks.demix(&patches);
            let (c1, c2, s1, s2) = if z1.size()[1] == z2.size()[1] {
                let n = z1.size()[0];
                let (c, s) = self.disentangle(&Tensor::cat(&[&z1, &z2], 0));
                (
                    c.narrow(0, 0, n),
                    c.narrow(0, n, n),
                    s.narrow(0, 0, n),
                    s.narrow(0, n, n),
                )
            } else {
                let (c1, s1) = self.disentangle(&z1);
                let (c2, s2) = self.disentangle(&z2);
                (c1, c2, s1, s2)
            };
            Demixed {
                zc1: c1,
                zc2: c2,
                zs1: s1,
                zs2: s2,
                cls,
            }
        } else {
            let (c1, s1) = self.disentangle(&patches);
            Demixed {
                zc2: c1.flip([0]),
                zs2: s1.flip([0]),
                zc1: c1,
                zs1: s1,
                cls,
            }
        }
    }

    /// Entangles, remixes and decodes (`reconstruct`): `Ent(zc1, zs1)` goes to the `M == 0`
    /// positions and `Ent(zc2, zs2)` to the `M == 1` positions; two decoder passes follow, one
    /// with mask tokens at `M == 1` (-> `x`) and one with mask tokens at `M == 0`
    /// (-> `x.flip(0)`). Without demixing only the first pass runs, on `Ent(zc1, zs1)`
    /// (`zc2`, `zs2` are unused; pass the swapped style as `zs1` for SiQC).
    ///
    /// # Shapes
    /// - `zc*`: `[B, n, D]`, `zs*`: `[B, n, d_s]`, `cls`: `[B, 1, D]`
    /// - returns `[2B, L, p^3 C]` (demix; first B -> `x`) or `[B, L, p^3 C]` (MAE)
    pub fn reconstruct(
        &self,
        zc1: &Tensor,
        zc2: &Tensor,
        zs1: &Tensor,
        zs2: &Tensor,
        cls: &Tensor,
        masks: &Masks,
    ) -> Tensor {
        let z = if self.cfg.demix {
            let (e1, e2) = Self::paired(|c, s| self.entangle(c, s), zc1, zc2, zs1, zs2);
            masks.remix(&e1, &e2)
        } else {
            let e1 = self.entangle(zc1, zs1);
            let (b, _, d) = e1.size3().expect("[B, n0, D]");
            let hidden = Tensor::zeros([b, masks.num_take(), d], (e1.kind(), e1.device()));
            masks.remix(&e1, &hidden)
        };
        self.forward_decoder(&z, cls, masks)
    }

    /// The dual decoder (`forward_decoder`).
    ///
    /// # Shapes
    /// - `z`: `[B, L, D]` remixed tokens, `cls`: `[B, 1, D]`
    /// - returns `[2B, L, p^3 C]` (demix) or `[B, L, p^3 C]` (MAE)
    pub fn forward_decoder(&self, z: &Tensor, cls: &Tensor, masks: &Masks) -> Tensor {
        let l = self.cfg.num_tokens();
        // [B, 1+L, Dd]
        let u = self.decoder_embed.forward(&Tensor::cat(&[cls, z], 1));
        let ucls = u.narrow(1, 0, 1);
        let up = u.narrow(1, 1, l);
        let p1 = &up * masks.keep() + &self.mask_token * masks.take();
        let x = if self.cfg.demix {
            let p2 = &up * masks.take() + &self.mask_token * masks.keep();
            Tensor::cat(
                &[Tensor::cat(&[&ucls, &p1], 1), Tensor::cat(&[&ucls, &p2], 1)],
                0,
            )
        } else {
            Tensor::cat(&[&ucls, &p1], 1)
        };
        self.decode_tokens(&(x + &self.decoder_pos_embed))
            .narrow(1, 1, l)
    }

    /// Decoder blocks, norm and prediction head on position-embedded decoder tokens.
    ///
    /// # Shapes
    /// - `x`: `[n, 1+L, Dd]`
    /// - returns `[n, 1+L, p^3 C]`
    fn decode_tokens(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for blk in &self.decoder_blocks {
            h = blk.forward(&h);
        }
        self.decoder_pred.forward(&self.decoder_norm.forward(&h))
    }

    /// Unmixed encoding of whole crops (`encode_full`): encoder on all L tokens, then `Dis`.
    /// Used by MFTD, SiQC, factor extraction and downstream models.
    ///
    /// # Shapes
    /// - `x`: `[n, C, crop, crop, crop]`
    /// - returns [`Factors`]: content `[n, L, D]`, style `[n, L, d_s]`, cls `[n, 1, D]`
    pub fn encode_full(&self, x: &Tensor) -> Factors {
        let l = self.cfg.num_tokens();
        let h = self.encode_tokens(&self.embed(x));
        let (content, style) = self.disentangle(&h.narrow(1, 1, l));
        Factors {
            content,
            style,
            cls: h.narrow(1, 0, 1),
        }
    }

    /// Decodes whole-crop factors without mask tokens (`decode_full`, style augmentation).
    ///
    /// # Shapes
    /// - `content`: `[n, L, D]`, `style`: `[n, L, d_s]`, `cls`: `[n, 1, D]`
    /// - returns `[n, C, crop, crop, crop]`
    pub fn decode_full(&self, content: &Tensor, style: &Tensor, cls: &Tensor) -> Tensor {
        let l = self.cfg.num_tokens();
        let z = self.entangle(content, style);
        let u = self.decoder_embed.forward(&Tensor::cat(&[cls, &z], 1)) + &self.decoder_pos_embed;
        self.unpatchify(&self.decode_tokens(&u).narrow(1, 1, l))
    }

    /// Checks that a batch fits this model before a step.
    fn check_inputs(&self, x: &Tensor, domains: &Tensor, masks: &Masks) -> Result<(), MeduetError> {
        let c = &self.cfg;
        let size = x.size();
        let expect = [c.in_chans, c.crop, c.crop, c.crop];
        if size.len() != 5 || size[1..] != expect {
            return Err(MeduetError::Input(format!(
                "batch must be [B, {}, {}, {}, {}], got {size:?}",
                c.in_chans, c.crop, c.crop, c.crop
            )));
        }
        let b = size[0];
        if b < 2 || b % 2 != 0 {
            return Err(MeduetError::Input(format!(
                "batch size {b} must be even and >= 2 (samples are paired i <-> B-1-i)"
            )));
        }
        if !matches!(
            x.kind(),
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        ) {
            return Err(MeduetError::Input(format!(
                "batch kind {:?} is not floating",
                x.kind()
            )));
        }
        if domains.size() != [b] {
            return Err(MeduetError::Input(format!(
                "domains must be [{b}], got {:?}",
                domains.size()
            )));
        }
        let lo = i64::try_from(domains.min()).map_err(MeduetError::Torch)?;
        let hi = i64::try_from(domains.max()).map_err(MeduetError::Torch)?;
        if lo < 0 || hi >= c.n_domains {
            return Err(MeduetError::Input(format!(
                "domain ids must be in 0..{}, got {lo}..={hi} (hint: n_domains comes from the data)",
                c.n_domains
            )));
        }
        if masks.batch() != b
            || masks.num_tokens() != c.num_tokens()
            || masks.num_keep() != c.num_keep()
        {
            return Err(MeduetError::Input(format!(
                "mask is [{}, {}] with {} zeros per row; the model needs [{b}, {}] with {}",
                masks.batch(),
                masks.num_tokens(),
                masks.num_keep(),
                c.num_tokens(),
                c.num_keep()
            )));
        }
        Ok(())
    }
}
