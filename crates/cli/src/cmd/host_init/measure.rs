//! The init measurement's one entry point into the TPM.
//!
//! STUB: [`measure`] is to extend PCR 15 (`nitrile_image::pcr::INIT_PCR`)
//! through the attest crate with each event's SHA-256 digest, in order,
//! logging each as a named event. Until it does, it extends nothing and
//! PCR 15 stays zero; `nitrile image build-host` already predicts the
//! value it must reach (`pcr15` in `reference.json`:
//! `nitrile_image::pcr::init_pcr` over the same events).

use nitrile_image::pcr::InitEvent;

/// Extends PCR 15 with `events`, in order (see the module documentation:
/// not done yet).
pub(crate) fn measure(events: &[InitEvent]) -> anyhow::Result<()> {
    let _ = events;
    Ok(())
}
