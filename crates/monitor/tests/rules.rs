//! Every shipped rule and built-in detector: events that fire it and events
//! that must not.

mod common;

use common::*;
use nitrile_api::Operation;
use nitrile_api::wire::RefusalStep;
use nitrile_monitor::{
    Alert, BaselineConfig, CHECKPOINT_STALL_RULE_ID, Event, IntegrityKind, JOURNAL_LAG_RULE_ID,
    Level, Monitor, MonitorConfig,
};
use nitrile_token::{ReplayCache, TokenId};
use time::Duration;

fn feed(m: &mut Monitor, events: impl IntoIterator<Item = (i64, Event)>) -> Vec<Alert> {
    let mut out = Vec::new();
    for (t, e) in events {
        out.extend(m.observe(&e, secs(t)));
    }
    out
}

#[test]
fn shipped_rules_load_with_their_ids() {
    let m = shipped();
    let mut names: Vec<&str> = m.rules().filter_map(|r| r.name.as_deref()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "nitrile_host_call",
            "nitrile_journal_integrity",
            "nitrile_many_hosts",
            "nitrile_refusal",
            "nitrile_refusal_burst",
            "nitrile_replayed_token",
            "nitrile_sensitive_operation",
        ]
    );
}

// nitrile_refusal_burst: event_count of refusals per principal, 1m, gte 10.

#[test]
fn refusal_burst_fires_on_ten_refusals_by_one_principal_within_a_minute() {
    let mut m = shipped();
    let mut h1 = Journal::host("h1");
    let mallory = operator("mallory");
    let events: Vec<_> = (0..10)
        .map(|i| {
            let step = if i % 2 == 0 {
                RefusalStep::Token
            } else {
                RefusalStep::Entitlement
            };
            (
                i * 5,
                h1.refusal(secs(i * 5), Some(&mallory), step, "expired: token expired"),
            )
        })
        .collect();
    let alerts = feed(&mut m, events);
    let burst = named(&alerts, "nitrile_refusal_burst");
    assert_eq!(burst.len(), 1, "{alerts:?}");
    let a = burst[0];
    assert_eq!(a.count, 10);
    assert_eq!(a.level, Level::High);
    assert_eq!(a.group["principal"], mallory.uri());
    assert_eq!(a.first_seen, secs(0));
    assert_eq!(a.last_seen, secs(45));
    assert_eq!(a.events.len(), 10);
    assert_eq!(a.events[9].seq, 9);
    assert_eq!(a.events[9].source, host_source("h1"));
    // The counted rule raises no alert of its own (generate: false).
    assert!(named(&alerts, "nitrile_refusal").is_empty());
}

#[test]
fn refusal_burst_does_not_fire_below_threshold_across_principals_or_spread_out() {
    let mut h1 = Journal::host("h1");
    // Nine refusals in a minute.
    let mut m = shipped();
    let mallory = operator("mallory");
    let nine: Vec<_> = (0..9)
        .map(|i| {
            (
                i,
                h1.refusal(secs(i), Some(&mallory), RefusalStep::Token, "expired: x"),
            )
        })
        .collect();
    assert!(named(&feed(&mut m, nine), "nitrile_refusal_burst").is_empty());
    // Ten refusals by ten principals.
    let mut m = shipped();
    let many: Vec<_> = (0..10)
        .map(|i| {
            let p = operator(&format!("op{i}"));
            (
                i,
                h1.refusal(secs(i), Some(&p), RefusalStep::Token, "expired: x"),
            )
        })
        .collect();
    assert!(named(&feed(&mut m, many), "nitrile_refusal_burst").is_empty());
    // Ten refusals by one principal, one every 7 s: never ten within 60 s.
    let mut m = shipped();
    let slow: Vec<_> = (0..30)
        .map(|i| {
            (
                i * 7,
                h1.refusal(
                    secs(i * 7),
                    Some(&mallory),
                    RefusalStep::Token,
                    "expired: x",
                ),
            )
        })
        .collect();
    assert!(named(&feed(&mut m, slow), "nitrile_refusal_burst").is_empty());
    // Ten admitted requests are not refusals.
    let mut m = shipped();
    let ok: Vec<_> = (0..10)
        .map(|i| {
            (
                i,
                h1.request(secs(i), &mallory, Operation::HostDescribe, "host/h1"),
            )
        })
        .collect();
    assert!(named(&feed(&mut m, ok), "nitrile_refusal_burst").is_empty());
}

// nitrile_many_hosts: value_count of host per principal, 10m, gte 5.

#[test]
fn many_hosts_fires_when_a_principal_calls_five_hosts_within_ten_minutes() {
    let mut m = shipped();
    let alice = operator("alice");
    let mut alerts = Vec::new();
    for (i, h) in ["h1", "h2", "h3", "h2", "h4", "h1", "h5"]
        .iter()
        .enumerate()
    {
        let mut j = Journal::host(h);
        let t = i as i64 * 90;
        alerts.extend(m.observe(
            &j.request(
                secs(t),
                &alice,
                Operation::InstanceList,
                &format!("host/{h}"),
            ),
            secs(t),
        ));
    }
    let fired = named(&alerts, "nitrile_many_hosts");
    assert_eq!(fired.len(), 1, "{alerts:?}");
    assert_eq!(fired[0].count, 5);
    assert_eq!(fired[0].group["principal"], alice.uri());
    assert_eq!(fired[0].last_seen, secs(6 * 90));
    assert!(named(&alerts, "nitrile_host_call").is_empty());
}

#[test]
fn many_hosts_does_not_fire_for_four_hosts_other_principals_or_slow_sweeps() {
    let alice = operator("alice");
    let call = |m: &mut Monitor, who: &nitrile_api::PrincipalId, h: &str, t: i64| {
        let mut j = Journal::host(h);
        m.observe(
            &j.request(secs(t), who, Operation::HostDescribe, &format!("host/{h}")),
            secs(t),
        )
    };
    // Four hosts, many calls each.
    let mut m = shipped();
    let mut alerts = Vec::new();
    for i in 0..40 {
        alerts.extend(call(&mut m, &alice, &format!("h{}", i % 4), i));
    }
    assert!(named(&alerts, "nitrile_many_hosts").is_empty());
    // Five hosts, five principals.
    let mut m = shipped();
    for i in 0..5 {
        alerts.extend(call(
            &mut m,
            &operator(&format!("op{i}")),
            &format!("h{i}"),
            i,
        ));
    }
    assert!(named(&alerts, "nitrile_many_hosts").is_empty());
    // Five hosts, one every three minutes: at most four within ten minutes.
    let mut m = shipped();
    for i in 0..5 {
        alerts.extend(call(&mut m, &alice, &format!("h{i}"), i * 180));
    }
    assert!(named(&alerts, "nitrile_many_hosts").is_empty());
    // Token grants for five hosts are tokend records, not host calls.
    let mut m = shipped();
    let mut tokend = Journal::of(TOKEND);
    for i in 0..5 {
        let e = tokend.grant(secs(i), &alice, Operation::HostDescribe, &format!("h{i}"));
        alerts.extend(m.observe(&e, secs(i)));
    }
    assert!(named(&alerts, "nitrile_many_hosts").is_empty());
}

// nitrile_sensitive_operation.

#[test]
fn sensitive_operation_fires_on_terminate_drain_and_update() {
    let mut m = shipped();
    let mut h1 = Journal::host("h1");
    let placement = principal("nitrile://c1/service/placement");
    for (op, res) in [
        (Operation::InstanceTerminate, "instance/i-1"),
        (Operation::HostDrain, "host/h1"),
        (Operation::HostUpdate, "host/h1"),
    ] {
        let e = h1.request(secs(0), &placement, op, res);
        let alerts = m.observe(&e, secs(0));
        let fired = named(&alerts, "nitrile_sensitive_operation");
        assert_eq!(fired.len(), 1, "{op}");
        assert_eq!(fired[0].count, 1);
        assert_eq!(fired[0].events[0].seq, e.origin().seq);
        assert_eq!(fired[0].level, Level::High);
    }
}

#[test]
fn sensitive_operation_does_not_fire_on_other_operations_refusals_grants_or_outcomes() {
    let mut m = shipped();
    let mut h1 = Journal::host("h1");
    let mut tokend = Journal::of(TOKEND);
    let alice = operator("alice");
    let mut alerts = Vec::new();
    for op in [
        Operation::HostDescribe,
        Operation::InstanceStop,
        Operation::HostUndrain,
    ] {
        alerts.extend(m.observe(&h1.request(secs(0), &alice, op, "host/h1"), secs(0)));
    }
    alerts.extend(m.observe(
        &h1.refusal(
            secs(0),
            Some(&alice),
            RefusalStep::Entitlement,
            "not_entitled: no",
        ),
        secs(0),
    ));
    alerts.extend(m.observe(
        &tokend.grant(secs(0), &alice, Operation::HostDrain, "h1"),
        secs(0),
    ));
    alerts.extend(m.observe(
        &h1.outcome(
            secs(0),
            &alice,
            Operation::InstanceTerminate,
            "instance/i-1",
        ),
        secs(0),
    ));
    assert!(
        named(&alerts, "nitrile_sensitive_operation").is_empty(),
        "{alerts:?}"
    );
}

// nitrile_replayed_token.

/// The refusal reason a host journals for a replayed token: the replay
/// cache's own error, written `code: message` as admission does.
fn replay_reason() -> String {
    let cache = ReplayCache::new(16);
    let id = TokenId::from_bytes([7; 16]);
    let _first = cache.check_and_record(&id, secs(300), secs(0)).unwrap();
    let e = cache.check_and_record(&id, secs(300), secs(1)).unwrap_err();
    format!("{}: {e}", e.code())
}

#[test]
fn replayed_token_fires_on_a_replay_refusal() {
    let mut m = shipped();
    let mut h1 = Journal::host("h1");
    let e = h1.refusal(
        secs(1),
        Some(&operator("bob")),
        RefusalStep::Token,
        &replay_reason(),
    );
    let alerts = m.observe(&e, secs(1));
    let fired = named(&alerts, "nitrile_replayed_token");
    assert_eq!(fired.len(), 1, "{alerts:?}");
    assert_eq!(fired[0].events, vec![e.origin().clone()]);
}

#[test]
fn replayed_token_does_not_fire_on_other_token_refusals_or_words() {
    let mut m = shipped();
    let mut h1 = Journal::host("h1");
    let bob = operator("bob");
    let cache = ReplayCache::new(16);
    let expired = cache
        .check_and_record(&TokenId::from_bytes([1; 16]), secs(0), secs(1))
        .unwrap_err();
    let mut alerts = Vec::new();
    for (step, reason) in [
        (RefusalStep::Token, format!("{}: {expired}", expired.code())),
        (
            RefusalStep::Token,
            "bad_signature: replayed: not really".to_owned(),
        ),
        (RefusalStep::State, "replayed: wrong step".to_owned()),
    ] {
        alerts.extend(m.observe(&h1.refusal(secs(1), Some(&bob), step, &reason), secs(1)));
    }
    assert!(
        named(&alerts, "nitrile_replayed_token").is_empty(),
        "{alerts:?}"
    );
}

// nitrile_journal_integrity.

#[test]
fn journal_integrity_fires_on_every_kind_of_break() {
    let mut m = shipped();
    for kind in [
        IntegrityKind::Gap,
        IntegrityKind::ChainBreak,
        IntegrityKind::WrongSource,
        IntegrityKind::JournalReplaced,
        IntegrityKind::Oversized,
    ] {
        let e = Event::integrity(kind, &host_source("h2"), 41, "expected seq 40");
        let alerts = m.observe(&e, secs(0));
        let fired = named(&alerts, "nitrile_journal_integrity");
        assert_eq!(fired.len(), 1, "{kind:?}");
        assert_eq!(fired[0].level, Level::Critical);
        assert_eq!(fired[0].events[0].seq, 41);
    }
}

#[test]
fn journal_integrity_does_not_fire_on_heads_checkpoints_or_records() {
    let mut m = shipped();
    let mut alerts = m.observe(&Event::journal_head(&host_source("h2"), 10, 10), secs(0));
    alerts.extend(m.observe(&Event::checkpoint("c1.nitrile/log", 10, secs(0)), secs(0)));
    let mut h2 = Journal::host("h2");
    alerts.extend(m.observe(
        &h2.request(secs(0), &operator("a"), Operation::HostDescribe, "host/h2"),
        secs(0),
    ));
    assert!(named(&alerts, "nitrile_journal_integrity").is_empty());
}

// Built-in: journal lag.

/// The journal lag alerts of a tick at second `t` (the checkpoint detector
/// also runs, and has no checkpoints in these tests).
fn lag(m: &mut Monitor, t: i64) -> Vec<Alert> {
    m.tick(secs(t))
        .into_iter()
        .filter(|a| a.rule_id.as_str() == JOURNAL_LAG_RULE_ID)
        .collect()
}

#[test]
fn journal_lag_fires_when_shipping_stays_behind_longer_than_allowed() {
    let mut m = shipped();
    let h3 = host_source("h3");
    m.observe(&Event::journal_head(&h3, 100, 50), secs(0));
    // Shipping moves, but never reaches the head it had at second 0.
    m.observe(&Event::journal_head(&h3, 120, 90), secs(20));
    assert!(lag(&mut m, 29).is_empty());
    let alerts = lag(&mut m, 31);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let a = &alerts[0];
    assert_eq!(a.rule_id.as_str(), JOURNAL_LAG_RULE_ID);
    assert_eq!(a.group["source"], h3);
    assert_eq!(a.count, 30);
    assert_eq!(a.first_seen, secs(0));
    // Once per episode.
    assert!(lag(&mut m, 40).is_empty());
    // Caught up, then behind again: a new episode.
    m.observe(&Event::journal_head(&h3, 130, 130), secs(41));
    m.observe(&Event::journal_head(&h3, 140, 130), secs(42));
    assert_eq!(lag(&mut m, 73).len(), 1);
}

#[test]
fn journal_lag_does_not_fire_when_shipping_keeps_up() {
    let mut m = shipped();
    let h3 = host_source("h3");
    // Always behind under load, but each head is shipped within 10 s.
    for i in 0..12 {
        let head = 100 + i * 50;
        m.observe(
            &Event::journal_head(&h3, head, head - 40),
            secs(i as i64 * 10),
        );
    }
    for t in [29, 60, 110, 125] {
        assert!(lag(&mut m, t).is_empty(), "at {t}");
    }
}

// Built-in: checkpoint not advancing.

fn checkpoint_monitor() -> Monitor {
    shipped().with_config(MonitorConfig {
        checkpoint_interval: Duration::seconds(1),
        max_checkpoint_age: Duration::seconds(10),
        checkpoint_stall_intervals: 5,
        baseline: None,
        ..MonitorConfig::default()
    })
}

#[test]
fn checkpoint_stall_fires_when_records_arrive_and_size_does_not_grow() {
    let mut m = checkpoint_monitor();
    let mut h1 = Journal::host("h1");
    let origin = "c1.nitrile/log";
    m.observe(&Event::checkpoint(origin, 10, secs(0)), secs(0));
    m.observe(
        &h1.request(secs(1), &operator("a"), Operation::HostDescribe, "host/h1"),
        secs(1),
    );
    let mut alerts = Vec::new();
    for t in 1..10 {
        // Checkpoints keep coming, with the same size.
        m.observe(&Event::checkpoint(origin, 10, secs(t)), secs(t));
        alerts.extend(m.tick(secs(t)));
    }
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].rule_id.as_str(), CHECKPOINT_STALL_RULE_ID);
    assert_eq!(alerts[0].group["problem"], "size_not_growing");
    assert_eq!(alerts[0].first_seen, secs(1));
    assert_eq!(alerts[0].count, 10);
}

#[test]
fn checkpoint_stall_fires_when_no_checkpoint_is_published() {
    let mut m = checkpoint_monitor();
    // No checkpoint for longer than the log's longest interval (10 s) and
    // the slack (5 intervals of 1 s).
    m.observe(&Event::checkpoint("c1.nitrile/log", 3, secs(0)), secs(0));
    assert!(m.tick(secs(15)).is_empty());
    let alerts = m.tick(secs(16));
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].group["problem"], "no_checkpoint");
    // And a monitor that never saw one, from its first tick.
    let mut m = checkpoint_monitor();
    assert!(m.tick(secs(0)).is_empty());
    assert!(m.tick(secs(15)).is_empty());
    assert_eq!(m.tick(secs(16)).len(), 1);
}

#[test]
fn checkpoint_stall_fires_when_size_goes_back() {
    let mut m = checkpoint_monitor();
    m.observe(&Event::checkpoint("c1.nitrile/log", 10, secs(0)), secs(0));
    let alerts = m.observe(&Event::checkpoint("c1.nitrile/log", 9, secs(1)), secs(1));
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].group["problem"], "size_decreased");
}

#[test]
fn checkpoint_stall_does_not_fire_while_checkpoints_advance_or_nothing_arrives() {
    let mut m = checkpoint_monitor();
    let mut h1 = Journal::host("h1");
    let mut alerts = Vec::new();
    for t in 0..30 {
        m.observe(
            &h1.request(secs(t), &operator("a"), Operation::HostDescribe, "host/h1"),
            secs(t),
        );
        // Each second's checkpoint covers the records before it.
        m.observe(
            &Event::checkpoint("c1.nitrile/log", t as u64 + 1, secs(t)),
            secs(t),
        );
        alerts.extend(m.tick(secs(t)));
    }
    // Idle log: same size, published every second, no records.
    for t in 30..60 {
        m.observe(&Event::checkpoint("c1.nitrile/log", 30, secs(t)), secs(t));
        alerts.extend(m.tick(secs(t)));
    }
    // Idle log that publishes only every max_checkpoint_age (10 s), ticked
    // every second.
    for t in 60..120 {
        if t % 10 == 0 {
            m.observe(&Event::checkpoint("c1.nitrile/log", 30, secs(t)), secs(t));
        }
        alerts.extend(m.tick(secs(t)));
    }
    assert!(alerts.is_empty(), "{alerts:?}");
}

// Built-in: call-rate baseline.

fn baseline_monitor() -> Monitor {
    shipped().with_config(MonitorConfig {
        baseline: Some(BaselineConfig {
            floor: 20,
            warmup_minutes: 10,
            ..BaselineConfig::default()
        }),
        ..MonitorConfig::default()
    })
}

/// `per_minute` host.describe calls by `who` on h1 in each minute of
/// `minutes`.
fn calls(m: &mut Monitor, who: &str, minutes: std::ops::Range<i64>, per_minute: i64) -> Vec<Alert> {
    let mut h1 = Journal::host("h1");
    let p = operator(who);
    let mut alerts = Vec::new();
    for minute in minutes {
        for i in 0..per_minute {
            let t = minute * 60 + i * 60 / per_minute;
            let e = h1.request(secs(t), &p, Operation::HostDescribe, "host/h1");
            alerts.extend(m.observe(&e, secs(t)));
        }
    }
    alerts
}

#[test]
fn baseline_fires_when_a_principal_calls_far_above_its_own_rate() {
    let mut m = baseline_monitor();
    assert!(
        named(
            &calls(&mut m, "alice", 0..30, 6),
            "nitrile_call_rate_baseline"
        )
        .is_empty()
    );
    let alerts = calls(&mut m, "alice", 30..31, 120);
    let fired = named(&alerts, "nitrile_call_rate_baseline");
    assert_eq!(fired.len(), 1, "once per minute");
    assert_eq!(fired[0].group["principal"], operator("alice").uri());
    assert_eq!(fired[0].group["operation"], "host.describe");
    assert!(fired[0].count >= 20 && fired[0].count < 120);
    assert_eq!(fired[0].first_seen, secs(30 * 60));
}

#[test]
fn baseline_does_not_fire_on_a_steady_rate_or_a_busy_newcomer_during_warmup() {
    let mut m = baseline_monitor();
    assert!(
        named(
            &calls(&mut m, "alice", 0..60, 40),
            "nitrile_call_rate_baseline"
        )
        .is_empty()
    );
    // A busy principal that has always been busy.
    assert!(
        named(
            &calls(&mut m, "bob", 0..5, 200),
            "nitrile_call_rate_baseline"
        )
        .is_empty()
    );
}

#[test]
fn alerts_serialize_with_stable_field_names() {
    let mut m = shipped();
    let mut h1 = Journal::host("h1");
    let e = h1.request(secs(0), &operator("a"), Operation::HostDrain, "host/h1");
    let alerts = m.observe(&e, secs(0));
    let json = alerts[0].to_json();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "count",
            "events",
            "first_seen",
            "group",
            "last_seen",
            "level",
            "rule_id",
            "rule_name",
            "title",
        ]
    );
    assert_eq!(v["level"], "high");
    assert_eq!(v["first_seen"], "2030-01-01T00:00:00Z");
    assert_eq!(v["events"][0]["source"], host_source("h1"));
    assert_eq!(v["events"][0]["seq"], 0);
    let back: Alert = serde_json::from_str(&json).unwrap();
    assert_eq!(back, alerts[0]);
}
