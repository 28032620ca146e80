//! The init measurement: what the host agent trusts, extended into the
//! TPM's PCR 15 before the host agent starts.
//!
//! [`measure`] opens the TPM through tpm2-tss (the TCTI of the image's
//! `[tpm]`, by default [`DEFAULT_TCTI`]), checks that PCR 15 of the SHA-256
//! bank is still zero, extends it with each event's SHA-256 digest in
//! order, reads it back, and only then writes the event log the host agent
//! returns with its quotes (`host.attest`): one JSON line per event,
//! `{"pcr":15,"name":"...","sha256":"<64 hex>"}`. `nitrile image
//! build-host` predicts the value PCR 15 reaches (`pcr15` in
//! `reference.json`, [`nitrile_image::pcr::init_pcr`] over the same
//! events).
//!
//! Every failure is an error: the init does not start the host agent
//! after a measurement that did not happen as logged.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nitrile_api::admin::{MeasuredEvent, Sha256Hex};
use nitrile_attest::{INIT_PCR, Tpm};
use nitrile_image::pcr::{InitEvent, init_pcr};

/// The TPM of a host whose config names none: the kernel's resource
/// manager of the first TPM.
pub(crate) const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// tpm2-tss's device when a `device` TCTI names none.
const DEFAULT_DEVICE: &str = "/dev/tpm0";
/// How long a TPM device node may take to appear after the drivers loaded.
const DEVICE_WAIT: Duration = Duration::from_secs(2);

/// The device node a `device:PATH` TCTI opens; `None` for the TCTIs that
/// reach a TPM over a socket (`swtpm:`, `mssim:`).
pub(crate) fn device_of(tcti: &str) -> Option<&Path> {
    let (kind, conf) = tcti.split_once(':').unwrap_or((tcti, ""));
    (kind == "device").then(|| {
        Path::new(if conf.is_empty() {
            DEFAULT_DEVICE
        } else {
            conf
        })
    })
}

/// Whether the TPM of `tcti` is there: its device node exists (waiting a
/// little for it to appear). A TPM reached over a socket counts as there;
/// opening it tells.
pub(crate) fn tpm_present(tcti: &str) -> bool {
    let Some(device) = device_of(tcti) else {
        return true;
    };
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        if device.exists() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The event log's lines for `events`, all of PCR 15.
pub(crate) fn event_log(events: &[InitEvent]) -> Vec<u8> {
    let mut text = Vec::new();
    for e in events {
        let line = MeasuredEvent {
            pcr: INIT_PCR,
            name: e.name.clone(),
            sha256: Sha256Hex::from_bytes(e.sha256),
        };
        serde_json::to_writer(&mut text, &line)
            .unwrap_or_else(|_| unreachable!("an event is a number and strings"));
        text.push(b'\n');
    }
    text
}

/// Extends PCR 15 of the TPM behind `tcti` with `events`, in order, checks
/// the value it reached, then writes the event log to `log`. Returns that
/// value.
pub(crate) fn measure(tcti: &str, events: &[InitEvent], log: &Path) -> anyhow::Result<[u8; 32]> {
    let mut tpm = Tpm::open(tcti).with_context(|| format!("opening the TPM ({tcti})"))?;
    let read = |tpm: &mut Tpm| -> anyhow::Result<[u8; 32]> {
        let pcrs = tpm
            .pcrs(&[INIT_PCR])
            .with_context(|| format!("reading PCR {INIT_PCR}"))?;
        pcrs.0
            .get(&INIT_PCR)
            .copied()
            .with_context(|| format!("the TPM returned no PCR {INIT_PCR}"))
    };
    let before = read(&mut tpm)?;
    if before != [0u8; 32] {
        bail!(
            "PCR {INIT_PCR} is {} before the init measurement (something extended it already)",
            hex::encode(before)
        );
    }
    for e in events {
        tpm.extend(INIT_PCR, e.sha256)
            .with_context(|| format!("extending PCR {INIT_PCR} with {}", e.name))?;
    }
    let after = read(&mut tpm)?;
    let expected = init_pcr(events);
    if after != expected {
        bail!(
            "PCR {INIT_PCR} reads {} after the init measurement, expected {}",
            hex::encode(after),
            hex::encode(expected)
        );
    }
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    nitrile_fs::write_atomic(log, &event_log(events), 0o644)
        .with_context(|| format!("writing {}", log.display()))?;
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> Vec<InitEvent> {
        vec![
            InitEvent::of_bytes("hostd-config", Path::new("/etc/h.toml"), b"config"),
            InitEvent::of_bytes("cell-ca", Path::new("/etc/ca.pem"), b"ca"),
        ]
    }

    #[test]
    fn tctis_name_their_device() {
        assert_eq!(device_of(DEFAULT_TCTI), Some(Path::new("/dev/tpmrm0")));
        assert_eq!(device_of("device"), Some(Path::new("/dev/tpm0")));
        assert_eq!(device_of("swtpm:host=127.0.0.1,port=2321"), None);
    }

    /// The log is what the host agent reads back for `host.attest`, line
    /// for line, and replays to the predicted PCR 15.
    #[test]
    fn the_event_log_is_what_the_host_agent_reads() {
        let events = events();
        let text = event_log(&events);
        let first = String::from_utf8(text.clone()).unwrap();
        let first = first.lines().next().unwrap();
        assert_eq!(
            first,
            format!(
                "{{\"pcr\":15,\"name\":\"hostd-config\",\"sha256\":\"{}\"}}",
                hex::encode(events[0].sha256)
            )
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init-events.jsonl");
        std::fs::write(&path, &text).unwrap();
        let read = nitrile_hostd::attest::event_log(Some(&path)).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(
            nitrile_attest::replay(read.iter().map(|e| *e.sha256.as_bytes())),
            init_pcr(&events)
        );
    }

    /// Against swtpm: PCR 15 reaches the predicted value, and a second
    /// measurement (PCR 15 no longer zero) is refused without a log.
    #[test]
    fn the_measurement_reaches_the_predicted_pcr() {
        if let Err(e) = nitrile_attest::swtpm::available() {
            #[allow(clippy::disallowed_macros)]
            {
                println!("SKIPPED: {e}");
            }
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let swtpm = nitrile_attest::swtpm::Swtpm::start(&dir.path().join("tpm")).unwrap();
        let events = events();
        let log = dir.path().join("run/init-events.jsonl");
        let value = measure(&swtpm.tcti(), &events, &log).unwrap();
        assert_eq!(value, init_pcr(&events));
        let quoted = Tpm::open(&swtpm.tcti()).unwrap().pcrs(&[INIT_PCR]).unwrap();
        assert_eq!(quoted.0[&INIT_PCR], value);
        assert_eq!(std::fs::read(&log).unwrap(), event_log(&events));

        std::fs::remove_file(&log).unwrap();
        let again = measure(&swtpm.tcti(), &events, &log).unwrap_err();
        assert!(format!("{again:#}").contains("before the init measurement"));
        assert!(!log.exists());
    }
}
