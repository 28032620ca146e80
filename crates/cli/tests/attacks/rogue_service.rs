//! A service principal of the cell acting beyond its role.

use crate::cell::Cell;
use crate::{alerts, bobs_drain_batch, connect_as, logd_of, post, runtime};

/// Issue 9, 3: placement, which wrote no journal then, shipped one to logd
/// with a record saying operator/bob executed host.drain on host/h1; logd
/// took it and `audit tail --principal operator/bob` showed it as bob's.
/// Placement (`nitrile placed`) now ships a journal of its own: a made-up
/// one in its name is refused as not the journal the log holds for it (or,
/// before its first batch, as a record that does not fit its source); so
/// is one in the deployment service's name; a customer, which ships none,
/// is refused as an undeclared source.
#[test]
fn claim6_placement_cannot_put_words_in_bobs_mouth() {
    let cell = Cell::up();
    let (logd, addr) = logd_of(&cell.carol);
    let scratch = tempfile::tempdir().unwrap();
    // As placement, and as a host journal placement made up: both refused.
    for (who, source) in [
        ("service-placement", "service/placement"),
        ("service-placement", "host/h1"),
        ("service-deployer", "service/deployer"),
        ("customer-acme", "customer/acme"),
    ] {
        let batch = bobs_drain_batch(scratch.path(), source);
        let (status, body) = runtime().block_on(async {
            let mut c = connect_as(&cell.state, who, &addr, &logd).await;
            post(&mut c, "/v1/ingest", batch).await
        });
        let expected: &[u16] = if source.starts_with("service/") {
            &[403, 409]
        } else {
            &[403]
        };
        assert!(
            expected.contains(&status),
            "{who} {source}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    // Nothing bob did not do is in the log under his name.
    cell.ok(&cell.alice, &["host", "describe"]);
    let tail = cell.ok(
        &cell.carol,
        &["audit", "tail", "--principal", "operator/bob", "-o", "json"],
    );
    assert!(
        !tail.lines().any(|l| l.contains("host.drain")),
        "bob is shown draining a host: {tail}"
    );
    // The auditor sees who tried.
    let listed = alerts(&cell);
    assert!(
        listed.iter().any(|a| a["kind"] == "undeclared_source"
            && a["principal"] == "nitrile://local/customer/acme"),
        "{listed:#?}"
    );
    assert!(
        listed
            .iter()
            .any(|a| a["principal"] == "nitrile://local/service/placement"),
        "{listed:#?}"
    );
}
