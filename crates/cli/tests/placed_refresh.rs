//! Placement's announcement refresh, on a cell of `nitrile up --hosts 2`
//! run as separate processes: host h2's agent is killed and started again
//! (a new tunnel key, so a new signed announcement), and without any
//! customer call placement notices it at its next refresh and pushes
//! `network.update` to every host, journaling what changed. When h2 comes
//! back and finds an instance's published port taken, it publishes it on
//! another; placement's refresh lists h2's instances, so what the customer
//! sees without asking the host again is where the port is now.

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

/// A cell of `nitrile up --hosts 2` run again as separate processes, h2 on
/// a fixed port and placement refreshing every second; h2's arguments.
fn restartable_cell() -> (Cell, Vec<String>) {
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
    // Placement on a fixed port too, which the customer's config names.
    let placed = format!("127.0.0.1:{}", free_port());
    set_line(&placed_config, "listen", &placed);
    set_section_line(&cell.customer("acme"), "endpoints", "placement", &placed);
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
    let h2_args = vec![
        "hostd".to_owned(),
        "--config".to_owned(),
        h2_config.to_str().unwrap().to_owned(),
    ];
    start_h2(&mut cell, &h2_args);
    cell.start_service(
        "placed",
        &["placed", "--config", placed_config.to_str().unwrap()],
        "serving on",
    );
    (cell, h2_args)
}

fn start_h2(cell: &mut Cell, args: &[String]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cell.start_service("h2", &args, " serving on ");
}

#[test]
fn a_restarted_host_s_new_announcement_reaches_the_other_host_at_the_next_refresh() {
    let (mut cell, h2_args) = restartable_cell();

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
    start_h2(&mut cell, &h2_args);
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

#[test]
fn a_port_published_anew_by_a_restarted_host_is_what_the_customer_sees() {
    let built = guest_or_skip!();
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
        cell::skipped("instance networks (published ports) need root");
        return;
    }
    let (mut cell, h2_args) = restartable_cell();
    let acme = cell.customer("acme");
    let digest = cell.import_image(&acme, &built, built.cmdline.as_str(), None);
    let run = |cell: &Cell, name: &str| -> serde_json::Value {
        let out = cell.ok(
            &acme,
            &[
                "customer",
                "run",
                name,
                "--image",
                &digest,
                "--publish",
                "22",
                "-o",
                "json",
            ],
        );
        serde_json::from_str(&out).unwrap()
    };
    let listed = |cell: &Cell, name: &str| -> String {
        let out = cell.ok(&acme, &["customer", "list", "-o", "json"]);
        let all: serde_json::Value = serde_json::from_str(&out).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .map(|i| {
                i["published"][0]["endpoint"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    let w1 = run(&cell, "w1");
    let w2 = run(&cell, "w2");
    assert_eq!(w2["host"], "h2", "{w1} {w2}");
    let before = w2["published"][0]["endpoint"].as_str().unwrap().to_owned();
    assert_eq!(listed(&cell, "w2"), before);

    // h2's agent dies (its VM lives on); its port is taken meanwhile.
    cell.kill_service("h2");
    let squatter = std::net::TcpListener::bind(&before)
        .unwrap_or_else(|e| panic!("cannot take {before}: {e}"));
    start_h2(&mut cell, &h2_args);

    // Without any customer call, the list shows where the port is now, and
    // it is what h2 itself says.
    let deadline = Instant::now() + REFRESH_WAIT;
    while listed(&cell, "w2").is_empty() || listed(&cell, "w2") == before {
        if Instant::now() > deadline {
            let described = cell.nitrile(&acme, &["customer", "describe", "w2", "-o", "json"]);
            panic!(
                "placement never recorded w2's new endpoint (was {before}, listed {}); \
                 the host says: {} {}",
                listed(&cell, "w2"),
                String::from_utf8_lossy(&described.stdout),
                String::from_utf8_lossy(&described.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let now = listed(&cell, "w2");
    let described: serde_json::Value =
        serde_json::from_str(&cell.ok(&acme, &["customer", "describe", "w2", "-o", "json"]))
            .unwrap();
    assert_eq!(
        described["published"][0]["endpoint"],
        now.as_str(),
        "{described}"
    );
    assert_eq!(described["state"], "running", "{described}");
    drop(squatter);
    for name in ["w1", "w2"] {
        cell.ok(&acme, &["customer", "terminate", name, "--yes"]);
    }
}
