//! Implementations of the stage kinds that use tensors (declared in `meduet-stages`).
//!
//! | kind        | implementation          |
//! |-------------|-------------------------|
//! | `pretrain`        | [`pretrain`]      |
//! | `extract_factors` | [`factors`]       |
//! | `vae_train`, `vae_import`, `vae_encode`, `vae_decode` | [`vae`] |
//! | `diffusion_train`, `sample` | [`diffusion`] |
//! | `synthesis_metrics` | [`synthesis`] |

pub mod common;
pub mod diffusion;
pub mod factors;
pub mod pretrain;
pub mod synthesis;
pub mod vae;

use meduet_engine::{Implementation, Registry};
use meduet_stages::kinds;

/// Registers the implementations.
pub fn implement(r: &mut Registry) {
    r.implement(
        kinds::pretrain::Pretrain,
        Implementation::run(pretrain::run),
    );
    r.implement(
        kinds::pretrain::ExtractFactors,
        Implementation::run(factors::run),
    );
    r.implement(kinds::vae::VaeTrain, Implementation::run(vae::train));
    r.implement(kinds::vae::VaeImport, Implementation::run(vae::import));
    r.implement(kinds::vae::VaeEncode, Implementation::run_item(vae::encode));
    r.implement(kinds::vae::VaeDecode, Implementation::run_item(vae::decode));
    r.implement(
        kinds::diffusion::DiffusionTrain,
        Implementation::run(diffusion::train),
    );
    r.implement(kinds::diffusion::Sample, Implementation::run(diffusion::sample));
    r.implement(
        kinds::diffusion::SynthesisMetrics,
        Implementation::run(synthesis::run),
    );
}
