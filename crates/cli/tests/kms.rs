//! `nitrile up` runs the key service (`nitrile kms`, a process of its own)
//! with the cell's default key, owned by the service; a customer manages
//! its own keys with `nitrile kms-key`; no provider principal changes them
//! and no customer changes the provider's; the key service's journal is
//! shipped to the audit log with the others.

// The test prints for the person running it; the rule that everything goes
// through the output layer is for the binary.
#![allow(clippy::disallowed_macros)]

mod cell;

use std::time::{Duration, Instant};

use cell::Cell;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn nitrile_up_runs_the_key_service_and_customers_manage_only_their_own_keys() {
    let cell = Cell::up();
    let said = cell.up_stdout.join("\n");
    for expected in ["kms ", "kms journal", "kms/kms.toml"] {
        assert!(said.contains(expected), "{expected:?} not in {said}");
    }
    let kms_dir = cell.state.join("kms");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&kms_dir).unwrap().permissions().mode() & 0o077;
    assert_eq!(mode, 0, "the key service's directory is readable by others");
    let acme = cell.alice.with_file_name("customer-acme.toml");
    assert!(acme.exists(), "no client config for the sample customer");

    // The cell's default key, owned by the key service, seen by on-call.
    let keys = json(&cell.ok(&cell.alice, &["kms-key", "list", "-o", "json"]));
    assert_eq!(keys[0]["name"], "default", "{keys}");
    assert_eq!(keys[0]["owner"], "nitrile://local/service/kms", "{keys}");
    assert_eq!(keys[0]["state"], "enabled", "{keys}");

    // acme makes a key of its own and sees only its own.
    let made = cell.ok(&acme, &["kms-key", "create", "acme-data"]);
    assert!(made.contains("nitrile://local/customer/acme"), "{made}");
    let mine = json(&cell.ok(&acme, &["kms-key", "list", "-o", "json"]));
    assert_eq!(mine.as_array().unwrap().len(), 1, "{mine}");
    assert_eq!(mine[0]["name"], "acme-data");

    // acme disables it; on-call sees that, and may not turn it back on:
    // the token service's guardrail refuses the token.
    let disabled = json(&cell.ok(&acme, &["kms-key", "disable", "acme-data", "-o", "json"]));
    assert_eq!(disabled["state"], "disabled");
    let seen = json(&cell.ok(
        &cell.alice,
        &["kms-key", "describe", "acme-data", "-o", "json"],
    ));
    assert_eq!(seen["state"], "disabled");
    let out = cell.nitrile(&cell.alice, &["kms-key", "enable", "acme-data"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokend refused") && err.contains("entitlement"),
        "{err}"
    );

    // acme holds a token to disable the provider's default key (its
    // entitlement names any key), but the key service refuses: a customer
    // manages only its own keys. The refusal names its journal record.
    let out = cell.nitrile(&acme, &["kms-key", "disable", "default"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("key service refused")
            && err.contains("step entitlement")
            && err.contains("audit record"),
        "{err}"
    );
    let keys = json(&cell.ok(&cell.alice, &["kms-key", "list", "-o", "json"]));
    let default = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "default")
        .unwrap();
    assert_eq!(default["state"], "enabled");

    // The key service's journal: every call, and it verifies.
    let journal = cell.state.join("kms/journal");
    let records = cell.journal(&journal);
    assert!(
        records
            .iter()
            .any(|r| r["operations"][0] == "kms-key.disable"
                && r["principal"] == "nitrile://local/customer/acme"
                && r["outcome"] == "failed"),
        "the refused disable is not journaled"
    );
    cell.verify_journal(&journal);

    // It is shipped to the audit log: carol finds the key service's record
    // of the refused disable there, with acme's other calls.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cell.nitrile(
            &cell.carol,
            &[
                "audit",
                "tail",
                "--principal",
                "customer/acme",
                "-n",
                "100",
                "-o",
                "json",
            ],
        );
        let shipped = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|e| {
                e["source"] == "nitrile://local/service/kms"
                    && e["record"]["operations"][0] == "kms-key.disable"
                    && e["record"]["outcome"] == "failed"
            });
        if shipped {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the key service's journal never reached the log: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
