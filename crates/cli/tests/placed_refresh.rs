//! Placement's announcement refresh, on a cell of `nitrile up --hosts 2`
//! run as separate processes: host h2's agent is killed and started again
//! (a new tunnel key, so a new signed announcement), and without any
//! customer call placement notices it at its next refresh and pushes
//! `network.update` to every host, journaling what changed.

mod cell;

use std::time::{Duration, Instant};

use cell::{Cell, free_port, set_line, set_section_line};

/// Longest the test waits for a refresh (the period is 1 s here).
const REFRESH_WAIT: Duration = Duration::from_secs(90);

/// h2's announced tunnel key, from `nitrile host describe` as alice.
fn tunnel_key(cell: &Cell, host: &str) -> String {
    let out = cell.ok(
        &cell.alice,
        &["host", "describe", "--host", host, "-o", "json"],
    );
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    d["network"]["announcement"]["wireguard_public_key"]
        .as_str()
        .unwrap_or_else(|| panic!("{host} announces no tunnel key: {d}"))
        .to_owned()
}

/// The `network.update` calls host `host` executed, by its journal.
fn updates_taken(cell: &Cell, host: &str) -> usize {
    cell.journal(&cell.journal_of_host(host))
        .iter()
        .filter(|r| r.to_string().contains("network.update") && r["outcome"] == "executed")
        .count()
}

/// Waits (bounded) until `f` holds.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + REFRESH_WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_restarted_host_s_new_announcement_reaches_the_other_host_at_the_next_refresh() {
    let mut cell = Cell::up_with_hosts(2);
    cell.stop_up();
    // h2 on a fixed port (it was on port 0), known to placement and alice;
    // placement refreshing every second.
    let h2 = format!("127.0.0.1:{}", free_port());
    let h2_config = cell.dir_of_host("h2").join("hostd.toml");
    set_line(&h2_config, "listen", &h2);
    set_section_line(&cell.placed_config(), "hosts", "h2", &h2);
    set_section_line(&cell.alice, "hosts", "h2", &h2);
    let placed_config = cell.placed_config();
    let text = std::fs::read_to_string(&placed_config).unwrap();
    assert!(text.contains("network_refresh_secs = 10\n"), "{text}");
    std::fs::write(
        &placed_config,
        text.replace("network_refresh_secs = 10\n", "network_refresh_secs = 1\n"),
    )
    .unwrap();

    cell.start_tokend();
    cell.start_kms();
    cell.start_hostd();
    let h2_args = ["hostd", "--config", h2_config.to_str().unwrap()];
    cell.start_service("h2", &h2_args, " serving on ");
    cell.start_service(
        "placed",
        &["placed", "--config", placed_config.to_str().unwrap()],
        "serving on",
    );

    // placement's start-up push: each host learns the other.
    wait_until("h1 and h2 take placement's first network.update", || {
        updates_taken(&cell, "h1") > 0 && updates_taken(&cell, "h2") > 0
    });
    let old_key = tunnel_key(&cell, "h2");
    let taken_before = updates_taken(&cell, "h1");
    let refreshes = |cell: &Cell, key: &str| {
        cell.journal(&cell.placed_journal())
            .iter()
            .filter(|r| {
                let reason = r["reason"].as_str().unwrap_or_default();
                reason.starts_with("network refresh:") && reason.contains(key)
            })
            .count()
    };
    assert_eq!(refreshes(&cell, &old_key), 0, "a refresh before any change");

    // h2's agent dies and comes back with a new tunnel key.
    cell.kill_service("h2");
    cell.start_service("h2", &h2_args, " serving on ");
    let new_key = tunnel_key(&cell, "h2");
    assert_ne!(
        new_key, old_key,
        "a restarted host agent kept its tunnel key"
    );

    // No customer call: only the refresh can tell h1.
    wait_until("placement journals a refresh for h2's new key", || {
        refreshes(&cell, &new_key) > 0
    });
    wait_until("h1 takes another network.update", || {
        updates_taken(&cell, "h1") > taken_before
    });
    let record = cell
        .journal(&cell.placed_journal())
        .into_iter()
        .find(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("network refresh:") && s.contains(&new_key))
        })
        .unwrap();
    assert_eq!(record["outcome"], "executed", "{record}");
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .contains("pushed to 2 of 2 hosts"),
        "{record}"
    );
    assert_eq!(refreshes(&cell, &old_key), 0);

    // Nothing changes any more: the refresh pushes no more.
    let settled = updates_taken(&cell, "h1");
    let journaled = cell.journal(&cell.placed_journal()).len();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        updates_taken(&cell, "h1"),
        settled,
        "a push without a change"
    );
    assert_eq!(cell.journal(&cell.placed_journal()).len(), journaled);
}
