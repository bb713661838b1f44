//! The stage kinds.
//!
//! | kind       | does                                                                  |
//! |------------|-----------------------------------------------------------------------|
//! | `phantom`  | seeded multi-domain CT phantoms as MSD-style dataset folders          |
//! | `ingest`   | reads and checks NIfTI datasets; one `subjects` item per subject      |
//! | `resample` | fan-out: RAS, window, 1.5 mm, crop/pad per subject into Zarr volumes  |

pub mod ingest;
pub mod phantom;
pub mod resample;
pub mod subject;

/// Registers this crate's stage kinds.
pub fn register(r: &mut meduet_engine::Registry) {
    r.register(phantom::Phantom)
        .register(ingest::Ingest)
        .register(resample::Resample);
}
