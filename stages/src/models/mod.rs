//! Networks in tch.
pub mod vae;
pub mod attention;
pub mod block;
pub mod init;
pub mod meduet;
pub mod mlp;
pub mod patch_embed;
pub mod pos_embed;
