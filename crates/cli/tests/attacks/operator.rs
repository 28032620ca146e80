//! An operator with a valid certificate of the cell.

use crate::cell::Cell;
use crate::{alerts, bobs_drain_batch, connect_as, logd_of, post, runtime};

/// Bogus ingest requests bob sends in the flood.
const FLOOD: usize = 2_000;

/// Issue 9, 2: any principal could send bogus ingest requests, each raising
/// an alert; the list was served whole, so after about 10,000 of them
/// `nitrile audit alerts` failed and the alerts raised before were gone.
#[test]
fn claim6_an_operator_flooding_logd_cannot_blind_the_auditor() {
    let cell = Cell::up();
    // A real alert first: alice drains the host (a sensitive operation).
    cell.ok(&cell.alice, &["host", "drain"]);
    cell.ok(&cell.alice, &["host", "undrain"]);
    let sensitive = |a: &serde_json::Value| {
        a["alert"] == "monitor"
            && a["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Sensitive operation"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !alerts(&cell).iter().any(sensitive) {
        assert!(
            std::time::Instant::now() < deadline,
            "no sensitive-operation alert"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // bob floods logd with bogus journals over one connection.
    let (logd, addr) = logd_of(&cell.carol);
    let scratch = tempfile::tempdir().unwrap();
    let batch = bobs_drain_batch(scratch.path(), "operator/bob");
    runtime().block_on(async {
        let mut c = connect_as(&cell.state, "operator-bob", &addr, &logd).await;
        for _ in 0..FLOOD {
            let (status, _) = post(&mut c, "/v1/ingest", batch.clone()).await;
            assert_eq!(status, 403);
        }
    });

    // The auditor's listing still works, pages through everything, and
    // shows the earlier alert; bob's flood is one line that counts it all.
    let listed = alerts(&cell);
    assert!(listed.iter().any(sensitive), "{listed:#?}");
    let flood: Vec<_> = listed
        .iter()
        .filter(|a| a["kind"] == "undeclared_source")
        .collect();
    assert_eq!(flood.len(), 1, "{flood:#?}");
    assert_eq!(flood[0]["count"], FLOOD as u64);
    assert_eq!(flood[0]["principal"], "nitrile://local/operator/bob");
    let table = cell.ok(&cell.carol, &["audit", "alerts"]);
    assert!(table.contains("Sensitive operation"), "{table}");
    // Every one of bob's requests is on logd's record all the same.
    let refused = cell
        .journal(&cell.state.join("logd/journal"))
        .iter()
        .filter(|r| r["principal"] == "nitrile://local/operator/bob" && r["kind"] == "refusal")
        .count();
    assert_eq!(refused, FLOOD);
}

/// Issue 9, 7: tokens lived up to 15 minutes; the claim is at most 5.
#[test]
fn claim5_an_operator_cannot_get_a_token_living_longer_than_five_minutes() {
    let cell = Cell::up();
    for lifetime in ["6m", "15m", "301s"] {
        let out = cell.nitrile(
            &cell.alice,
            &[
                "token",
                "request",
                "--op",
                "host.describe",
                "--resource",
                "host/h1",
                "--audience",
                "h1",
                "--lifetime",
                lifetime,
            ],
        );
        assert_ne!(out.status.code(), Some(0), "{lifetime}: {out:?}");
        assert!(out.stdout.is_empty(), "no token for {lifetime}");
    }
    let token = cell.ok(
        &cell.alice,
        &[
            "token",
            "request",
            "--op",
            "host.describe",
            "--resource",
            "host/h1",
            "--audience",
            "h1",
            "--lifetime",
            "5m",
        ],
    );
    assert!(!token.trim().is_empty());
}
