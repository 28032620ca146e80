//! Whoever holds a service's state directory, between two runs of it.

use crate::cell::Cell;

/// The log service's record of how far each source got is a cache of the
/// log: a thief who rolls it back (so that logd takes a journal's records
/// a second time, or a forged continuation after the real one) leaves a
/// tree that verifies, checkpoints the witness cosigns (the log only grew)
/// and sources that find their records in it. The auditor replays every
/// journal through the log and names the entry where it breaks.
#[test]
fn claim6_a_rolled_back_source_record_is_caught_by_audit_verify() {
    let mut cell = Cell::up();
    for _ in 0..3 {
        cell.ok(&cell.alice, &["host", "describe"]);
    }
    // Until h1's records are in the log.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let tail = cell.ok(&cell.carol, &["audit", "tail", "-o", "json", "-n", "1000"]);
        let from_h1 = tail
            .lines()
            .filter(|l| l.contains("\"source\":\"nitrile://local/host/h1\""))
            .count();
        if from_h1 >= 6 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "h1's records never reached the log"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let first = cell.ok(&cell.carol, &["audit", "verify", "-o", "json"]);
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["ok"], true, "{first}");
    cell.stop_up();

    // Roll h1 back to its first record in logd's sources.json.
    let sources = cell.state.join("logd/sources.json");
    let mut file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sources).unwrap()).unwrap();
    let h1 = &mut file["sources"]["nitrile://local/host/h1"];
    assert!(
        h1.is_object(),
        "{}",
        serde_json::to_string_pretty(&file).unwrap()
    );
    assert!(h1["acked_seq"].as_u64().unwrap() >= 3, "{h1}");
    let record_1 = nitrile_audit::JournalReader::open(cell.host_journal())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    h1["acked_seq"] = 1.into();
    h1["hash"] = record_1.hash.to_string().into();
    if let Some(o) = h1.as_object_mut() {
        o.remove("acked_index");
    }
    std::fs::write(&sources, serde_json::to_vec_pretty(&file).unwrap()).unwrap();

    // logd takes h1's records 2.. again; the log grows consistently.
    cell.start_up();
    cell.ok(&cell.alice, &["host", "describe"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let refused = loop {
        let out = cell.nitrile(&cell.carol, &["audit", "verify", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if out.status.code() == Some(1) && v["ok"] == false {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "audit verify still passes: {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.contains("nitrile://local/host/h1") && error.contains("comes next"),
        "{refused}"
    );
    assert!(refused["index"].as_u64().is_some(), "{refused}");
    // The remembered checkpoint did not move past the broken log.
    cell.stop_up();
}
