//! Networks in tch: shared transformer blocks, the MAISI VAE, MeDUET, and a 3-D patch
//! discriminator for adversarial VAE training.

pub mod attention;
pub mod block;
pub mod controlnet;
pub mod conv;
pub mod discriminator;
pub mod dit;
pub mod init;
pub mod meduet;
pub mod mlp;
pub mod patch_embed;
pub mod pos_embed;
pub mod resnet3d;
pub mod unet;
pub mod unetr;
pub mod vae;
