//! UNETR in VAE latent space (method.md 5; the authors' `Word/unetr.py` on MONAI blocks),
//! with MONAI's state-dict names so weights convert both ways.
//!
//! # Topology (paper sizes: latent 4 x 24³, patch 4, ViT-B, feature size 32)
//!
//! ```text
//! x [b,4,24³] -> vit.patch_embedding (Conv3d k=s=4, + position_embeddings) -> 216 tokens
//!   -> vit.blocks.0..11 (pre-norm; hidden states kept) -> vit.norm
//! enc1 = encoder1: UnetResBlock(4 -> fs)                              at 24³
//! enc2 = encoder2: UnetrPrUpBlock(hidden -> 2fs, 2 extra up-layers)   of block skips[0], 48³
//! enc3 = encoder3: UnetrPrUpBlock(hidden -> 4fs, 1 extra)             of block skips[1], 24³
//! enc4 = encoder4: UnetrPrUpBlock(hidden -> 8fs, 0 extra)             of block skips[2], 12³
//! dec3 = decoder5(proj(vit out) 6³, enc4) -> 12³ ; dec2 = decoder4(dec3, enc3) -> 24³
//! dec1 = decoder3(dec2, enc2) -> 48³
//! out  = decoder2 (dynamic fusion): resize dec1 to enc1's size (trilinear), Conv3d(2fs -> fs,
//!        k3), concat enc1, UnetResBlock(2fs -> fs)                    at 24³
//! logits = out: 1x1x1 conv fs -> K          (or, for classification, mean-pool + Linear fs -> K)
//! ```
//!
//! Skips come from blocks 3, 6 and 9 of 12 (generally `depth/4, depth/2, 3 depth/4`).
//! Normalisation is instance norm without affine parameters (MONAI `norm_name="instance"`);
//! LayerNorms use PyTorch's eps 1e-5 (MONAI's `TransformerBlock`).
//!
//! # Names (MONAI `UNETR`)
//!
//! `vit.patch_embedding.patch_embeddings.{weight,bias}`, `vit.patch_embedding.position_embeddings`,
//! `vit.blocks.i.{norm1,norm2}.*`, `vit.blocks.i.attn.qkv.weight` (qkv bias when `qkv_bias`),
//! `vit.blocks.i.attn.out_proj.*`, `vit.blocks.i.mlp.linear{1,2}.*`, `vit.norm.*`,
//! `encoder1.layer.conv1.conv.weight`, `encoder2.transp_conv_init.conv.weight`,
//! `encoder2.blocks.0.0.conv.weight`, `encoder2.blocks.0.1.conv1.conv.weight`,
//! `decoder5.transp_conv.conv.weight`, `decoder5.conv_block.conv1.conv.weight`,
//! `decoder2.conv.{weight,bias}` and `decoder2.conv_block.*` (the authors' fusion block),
//! `out.conv.conv.{weight,bias}`; for classification `head.{weight,bias}`.
//!
//! # Initialisation from MeDUET ([`Unetr::load_meduet`])
//!
//! As the authors' `load_UNETR`: `embed_layer.proj` -> `vit.patch_embedding.patch_embeddings`,
//! `blocks.i.*` -> `vit.blocks.i.*` with `attn.proj` -> `attn.out_proj`, `mlp.fc1` ->
//! `mlp.linear1`, `mlp.fc2` -> `mlp.linear2`, `norm` -> `vit.norm`. The MeDUET position table
//! (`[1, 1+L, D]`, fixed sin-cos with a cls row) does not fit MONAI's `[1, L, D]`: the
//! authors skip it ([`PosEmbedInit::Skip`], the default); the paper interpolates it
//! trilinearly ([`PosEmbedInit::Interpolate`]: the cls row dropped, the grid resized).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Kind, Tensor};

use super::conv::{Conv3, ConvT3, OutBlock, ResBlock};
use super::init::{linear, LinearInit};
use super::pos_embed::interpolate_3d;

/// What the network ends in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnetrHead {
    /// Per-voxel logits on the latent grid (`out`).
    #[default]
    Segmentation,
    /// Mean-pooled decoder features and a linear layer (`head`): one logit vector per crop.
    Classification,
}

/// How the position embedding is initialised from MeDUET.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PosEmbedInit {
    /// The authors' code: not transferred (shape mismatch), random init kept.
    #[default]
    Skip,
    /// The paper: MeDUET's table without its cls row, trilinearly resized to UNETR's grid.
    Interpolate,
}

/// UNETR sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetrConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Edge of the (cubic) input crop: 24 latent voxels.
    pub img_size: i64,
    pub patch: i64,
    pub hidden_size: i64,
    pub mlp_dim: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub feature_size: i64,
    pub qkv_bias: bool,
    /// Blocks whose outputs feed encoder2/3/4 (0-based).
    pub skips: [i64; 3],
    pub head: UnetrHead,
}

impl UnetrConfig {
    /// The paper's UNETR on 24³ latents (ViT-B, feature size 32).
    pub fn paper(out_channels: i64) -> Self {
        Self {
            in_channels: 4,
            out_channels,
            img_size: 24,
            patch: 4,
            hidden_size: 768,
            mlp_dim: 3072,
            num_layers: 12,
            num_heads: 12,
            feature_size: 32,
            qkv_bias: true,
            skips: default_skips(12),
            head: UnetrHead::Segmentation,
        }
    }

    /// Tokens per side.
    pub fn grid(&self) -> i64 {
        self.img_size / self.patch
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.img_size <= 0 || self.patch <= 0 || self.img_size % self.patch != 0 {
            return Err(format!(
                "unetr: img_size {} must be a positive multiple of patch {}",
                self.img_size, self.patch
            ));
        }
        if self.num_heads <= 0 || self.hidden_size % self.num_heads != 0 {
            return Err(format!(
                "unetr: hidden_size {} must be divisible by num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if self.skips.iter().any(|&s| s < 0 || s >= self.num_layers) {
            return Err(format!(
                "unetr: skips {:?} must be block indices below num_layers {}",
                self.skips, self.num_layers
            ));
        }
        if self.feature_size <= 0 || self.out_channels <= 0 || self.in_channels <= 0 {
            return Err(
                "unetr: feature_size, in_channels and out_channels must be positive".into(),
            );
        }
        Ok(())
    }
}

/// Blocks `depth/4, depth/2, 3 depth/4` (3, 6, 9 for 12), as UNETR's skips.
pub fn default_skips(depth: i64) -> [i64; 3] {
    [1, 2, 3].map(|k| ((depth * k) / 4).clamp(0, (depth - 1).max(0)))
}

/// MONAI's `TransformerBlock` (SABlock + MLPBlock), pre-norm.
#[derive(Debug)]
struct VitBlock {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    out_proj: nn::Linear,
    norm2: nn::LayerNorm,
    linear1: nn::Linear,
    linear2: nn::Linear,
    heads: i64,
}

impl VitBlock {
    fn new(vs: &nn::Path, cfg: &UnetrConfig) -> Self {
        let d = cfg.hidden_size;
        let ln = |p: nn::Path| nn::layer_norm(p, vec![d], Default::default());
        Self {
            norm1: ln(vs / "norm1"),
            qkv: linear(
                &(vs / "attn" / "qkv"),
                d,
                3 * d,
                cfg.qkv_bias,
                LinearInit::TorchDefault,
            ),
            out_proj: linear(
                &(vs / "attn" / "out_proj"),
                d,
                d,
                true,
                LinearInit::TorchDefault,
            ),
            norm2: ln(vs / "norm2"),
            linear1: linear(
                &(vs / "mlp" / "linear1"),
                d,
                cfg.mlp_dim,
                true,
                LinearInit::TorchDefault,
            ),
            linear2: linear(
                &(vs / "mlp" / "linear2"),
                cfg.mlp_dim,
                d,
                true,
                LinearInit::TorchDefault,
            ),
            heads: cfg.num_heads,
        }
    }

    /// `[b, n, d]` -> `[b, n, d]`
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().expect("[b, n, d]");
        let hd = d / self.heads;
        // SABlock: "b h (qkv l d) -> qkv b l h d", the timm layout.
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x))
            .reshape([b, n, 3, self.heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let o = Tensor::scaled_dot_product_attention(
            &qkv.get(0),
            &qkv.get(1),
            &qkv.get(2),
            None::<&Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let x = x + self.out_proj.forward(&o.transpose(1, 2).reshape([b, n, d]));
        let h = self.linear1.forward(&self.norm2.forward(&x)).gelu("none");
        &x + self.linear2.forward(&h)
    }
}

/// MONAI `UnetrPrUpBlock(conv_block=True, res_block=True)`: a transposed conv, then
/// `num_layer` x (transposed conv + UnetResBlock).
#[derive(Debug)]
struct PrUpBlock {
    init: ConvT3,
    blocks: Vec<(ConvT3, ResBlock)>,
}

impl PrUpBlock {
    fn new(vs: &nn::Path, cin: i64, cout: i64, num_layer: usize) -> Self {
        let init = ConvT3::new(&(vs / "transp_conv_init" / "conv"), cin, cout, [2; 3]);
        let blocks = (0..num_layer)
            .map(|i| {
                let b = vs / "blocks" / i;
                (
                    ConvT3::new(&(&b / 0 / "conv"), cout, cout, [2; 3]),
                    ResBlock::new(&(&b / 1), cout, cout, [3; 3], [1; 3], false),
                )
            })
            .collect();
        Self { init, blocks }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.init.forward(x);
        for (t, r) in &self.blocks {
            h = r.forward(&t.forward(&h));
        }
        h
    }
}

/// MONAI `UnetrUpBlock(res_block=True)`: transposed conv x2, concat the skip, UnetResBlock.
#[derive(Debug)]
struct UpBlock {
    transp: ConvT3,
    block: ResBlock,
}

impl UpBlock {
    fn new(vs: &nn::Path, cin: i64, cout: i64) -> Self {
        Self {
            transp: ConvT3::new(&(vs / "transp_conv" / "conv"), cin, cout, [2; 3]),
            block: ResBlock::new(&(vs / "conv_block"), 2 * cout, cout, [3; 3], [1; 3], false),
        }
    }

    fn forward(&self, x: &Tensor, skip: &Tensor) -> Tensor {
        self.block.forward(&Tensor::cat(
            &[self.transp.forward(x), skip.shallow_clone()],
            1,
        ))
    }
}

/// The authors' dynamic-fusion decoder block: resize to the skip's grid (trilinear),
/// Conv3d(k3, biased), concat the skip, UnetResBlock.
#[derive(Debug)]
struct FusionBlock {
    conv: Conv3,
    block: ResBlock,
}

impl FusionBlock {
    fn new(vs: &nn::Path, cin: i64, cout: i64) -> Self {
        Self {
            conv: Conv3::new(&(vs / "conv"), cin, cout, [3; 3], [1; 3], true),
            block: ResBlock::new(&(vs / "conv_block"), 2 * cout, cout, [3; 3], [1; 3], false),
        }
    }

    fn forward(&self, x: &Tensor, skip: &Tensor) -> Tensor {
        let s = skip.size();
        let r = x.upsample_trilinear3d([s[2], s[3], s[4]], false, None, None, None);
        self.block.forward(&Tensor::cat(
            &[self.conv.forward(&r), skip.shallow_clone()],
            1,
        ))
    }
}

enum Head {
    Seg(OutBlock),
    Cls(nn::Linear),
}

/// UNETR (see the module documentation).
pub struct Unetr {
    cfg: UnetrConfig,
    patch_embeddings: Conv3,
    position_embeddings: Tensor,
    blocks: Vec<VitBlock>,
    norm: nn::LayerNorm,
    encoder1: ResBlock,
    encoder2: PrUpBlock,
    encoder3: PrUpBlock,
    encoder4: PrUpBlock,
    decoder5: UpBlock,
    decoder4: UpBlock,
    decoder3: UpBlock,
    decoder2: FusionBlock,
    head: Head,
}

impl std::fmt::Debug for Unetr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unetr").field("cfg", &self.cfg).finish()
    }
}

/// What [`Unetr::load_meduet`] copied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transfer {
    /// `(MeDUET name, UNETR name)` of every copied tensor.
    pub copied: Vec<(String, String)>,
    /// Whether the position table was interpolated in.
    pub pos_embed: bool,
}

impl Unetr {
    /// Builds the network under `vs` (seed libtorch first for a reproducible init).
    pub fn new(vs: &nn::Path, cfg: &UnetrConfig) -> Result<Self, String> {
        cfg.validate()?;
        let (d, fs, p) = (cfg.hidden_size, cfg.feature_size, cfg.patch);
        let vit = vs / "vit";
        let pe = &vit / "patch_embedding";
        let patch_embeddings = Conv3::new(
            &(&pe / "patch_embeddings"),
            cfg.in_channels,
            d,
            [p; 3],
            [p; 3],
            true,
        )
        .unpadded();
        let n = cfg.grid().pow(3);
        let position_embeddings = pe.var(
            "position_embeddings",
            &[1, n, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let blocks = (0..cfg.num_layers)
            .map(|i| VitBlock::new(&(&vit / "blocks" / i), cfg))
            .collect();
        let norm = nn::layer_norm(&vit / "norm", vec![d], Default::default());
        let head = match cfg.head {
            UnetrHead::Segmentation => {
                Head::Seg(OutBlock::new(&(vs / "out"), fs, cfg.out_channels))
            }
            UnetrHead::Classification => Head::Cls(linear(
                &(vs / "head"),
                fs,
                cfg.out_channels,
                true,
                LinearInit::TorchDefault,
            )),
        };
        Ok(Self {
            cfg: cfg.clone(),
            patch_embeddings,
            position_embeddings,
            blocks,
            norm,
            encoder1: ResBlock::new(
                &(vs / "encoder1" / "layer"),
                cfg.in_channels,
                fs,
                [3; 3],
                [1; 3],
                false,
            ),
            encoder2: PrUpBlock::new(&(vs / "encoder2"), d, 2 * fs, 2),
            encoder3: PrUpBlock::new(&(vs / "encoder3"), d, 4 * fs, 1),
            encoder4: PrUpBlock::new(&(vs / "encoder4"), d, 8 * fs, 0),
            decoder5: UpBlock::new(&(vs / "decoder5"), d, 8 * fs),
            decoder4: UpBlock::new(&(vs / "decoder4"), 8 * fs, 4 * fs),
            decoder3: UpBlock::new(&(vs / "decoder3"), 4 * fs, 2 * fs),
            decoder2: FusionBlock::new(&(vs / "decoder2"), 2 * fs, fs),
            head,
        })
    }

    pub fn config(&self) -> &UnetrConfig {
        &self.cfg
    }

    /// `[b, n, d]` tokens -> `[b, d, g, g, g]`.
    fn proj_feat(&self, x: &Tensor) -> Tensor {
        let g = self.cfg.grid();
        let b = x.size()[0];
        x.view([b, g, g, g, self.cfg.hidden_size])
            .permute([0, 4, 1, 2, 3])
            .contiguous()
    }

    /// The ViT: final normed tokens and every block's output.
    fn vit(&self, x: &Tensor) -> (Tensor, Vec<Tensor>) {
        let mut h = self
            .patch_embeddings
            .forward(x)
            .flatten(2, -1)
            .transpose(1, 2)
            + &self.position_embeddings;
        let mut hidden = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            h = b.forward(&h);
            hidden.push(h.shallow_clone());
        }
        (self.norm.forward(&h), hidden)
    }

    /// Decoder features before the head.
    ///
    /// # Shapes
    /// `x`: `[b, in_channels, S, S, S]` (`S = img_size`) -> `[b, feature_size, S, S, S]`
    pub fn features(&self, x: &Tensor) -> Tensor {
        let (h, hidden) = self.vit(x);
        let [s2, s3, s4] = self.cfg.skips.map(|s| s as usize);
        let enc1 = self.encoder1.forward(x);
        let enc2 = self.encoder2.forward(&self.proj_feat(&hidden[s2]));
        let enc3 = self.encoder3.forward(&self.proj_feat(&hidden[s3]));
        let enc4 = self.encoder4.forward(&self.proj_feat(&hidden[s4]));
        let dec3 = self.decoder5.forward(&self.proj_feat(&h), &enc4);
        let dec2 = self.decoder4.forward(&dec3, &enc3);
        let dec1 = self.decoder3.forward(&dec2, &enc2);
        self.decoder2.forward(&dec1, &enc1)
    }

    /// # Shapes
    /// `x`: `[b, in_channels, S, S, S]` -> segmentation `[b, out_channels, S, S, S]`,
    /// classification `[b, out_channels]`
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let f = self.features(x);
        match &self.head {
            Head::Seg(o) => o.forward(&f),
            Head::Cls(l) => l.forward(&f.mean_dim([2i64, 3, 4].as_slice(), false, Kind::Float)),
        }
    }

    /// The MeDUET -> UNETR name of a student tensor, `None` for tensors UNETR does not take.
    pub fn meduet_name(name: &str) -> Option<String> {
        if let Some(rest) = name.strip_prefix("embed_layer.proj.") {
            return Some(format!("vit.patch_embedding.patch_embeddings.{rest}"));
        }
        if let Some(rest) = name.strip_prefix("norm.") {
            return Some(format!("vit.norm.{rest}"));
        }
        let rest = name.strip_prefix("blocks.")?;
        let renamed = rest
            .replace(".attn.proj.", ".attn.out_proj.")
            .replace(".mlp.fc1.", ".mlp.linear1.")
            .replace(".mlp.fc2.", ".mlp.linear2.");
        Some(format!("vit.blocks.{renamed}"))
    }

    /// Copies the encoder of a MeDUET student (`student.safetensors`, the authors' names)
    /// into `vs` (this network's store), and the position table when `pos` says so. Every
    /// target must exist with the same shape; every MeDUET encoder tensor is used.
    pub fn load_meduet(
        &self,
        vs: &mut nn::VarStore,
        student: &Path,
        pos: PosEmbedInit,
        meduet_grid: i64,
    ) -> Result<Transfer, String> {
        let src = Tensor::read_safetensors(student)
            .map_err(|e| format!("'{}': {e}", student.display()))?;
        let src: BTreeMap<String, Tensor> = src.into_iter().collect();
        let mut vars = vs.variables();
        let mut copied = Vec::new();
        tch::no_grad(|| -> Result<(), String> {
            for (name, t) in &src {
                let Some(target) = Self::meduet_name(name) else {
                    continue;
                };
                let v = vars.get_mut(&target).ok_or_else(|| {
                    format!("'{}': tensor '{name}' maps to '{target}', which this UNETR does not have (depth or width differ?)", student.display())
                })?;
                if v.size() != t.size() {
                    return Err(format!(
                        "'{}': '{name}' has shape {:?}, UNETR's '{target}' {:?}",
                        student.display(),
                        t.size(),
                        v.size()
                    ));
                }
                v.copy_(&t.to_kind(v.kind()));
                copied.push((name.clone(), target));
            }
            if pos == PosEmbedInit::Interpolate {
                let pe = src
                    .get("pos_embed")
                    .ok_or_else(|| format!("'{}': no 'pos_embed'", student.display()))?;
                let l = meduet_grid.pow(3);
                let table = pe.narrow(1, pe.size()[1] - l, l);
                let g = self.cfg.grid();
                let r =
                    interpolate_3d(&table, [meduet_grid; 3], [g; 3]).map_err(|e| e.to_string())?;
                let v = vars
                    .get_mut("vit.patch_embedding.position_embeddings")
                    .expect("built with the network");
                if v.size() != r.size() {
                    return Err(format!(
                        "pos_embed resized to {:?}, UNETR expects {:?}",
                        r.size(),
                        v.size()
                    ));
                }
                v.copy_(&r);
            }
            Ok(())
        })?;
        let blocks_expected = self.cfg.num_layers as usize * 12 + 4
            - usize::from(!self.cfg.qkv_bias) * self.cfg.num_layers as usize;
        if copied.len() != blocks_expected {
            return Err(format!(
                "'{}': copied {} tensors, expected {blocks_expected} (patch embedding, {} blocks, norm)",
                student.display(),
                copied.len(),
                self.cfg.num_layers
            ));
        }
        Ok(Transfer {
            copied,
            pos_embed: pos == PosEmbedInit::Interpolate,
        })
    }
}
