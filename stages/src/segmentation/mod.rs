//! Plain-Rust pieces of downstream segmentation and classification (no libtorch), used by
//! the `segment_*` and `classify_*` kinds and tested here:
//!
//! | module      | concern                                                              |
//! |-------------|----------------------------------------------------------------------|
//! | [`metrics`] | Dice, surfaces, exact Euclidean distance transform, HD95             |
//! | [`splits`]  | test / validation / pool per domain, label fractions, held-out domains |
//! | [`sliding`] | sliding-window tiling and Gaussian blending weights (MONAI)          |
//! | [`planner`] | nnU-Net's patch size, depth, strides and kernels from the data       |
//! | [`sampler`] | paired input/label crops with foreground oversampling, augmentation  |
//! | [`style_augment`] | style augmentation settings (Table 12 defaults) and per-step draws |

pub mod metrics;
pub mod planner;
pub mod sampler;
pub mod sliding;
pub mod splits;
pub mod style_augment;
