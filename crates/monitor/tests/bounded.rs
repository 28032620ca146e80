//! Property tests: observe and tick never panic on any event sequence, and
//! the state stays within its bounds; the rule parser never panics.

mod common;

use common::*;
use nitrile_api::Operation;
use nitrile_api::wire::RefusalStep;
use nitrile_monitor::{
    BaselineConfig, Event, IntegrityKind, MAX_ALERT_EVENTS, Monitor, MonitorConfig, parse_rules,
};
use proptest::prelude::*;

const MAX_GROUPS: usize = 8;
const MAX_KEYS: usize = 16;
const MAX_SOURCES: usize = 4;

#[derive(Debug, Clone)]
enum Input {
    Request {
        host: u16,
        who: u16,
        op: usize,
    },
    Refusal {
        host: u16,
        who: Option<u16>,
        step: usize,
        replay: bool,
    },
    Grant {
        host: u16,
        who: u16,
        op: usize,
    },
    Integrity {
        host: u16,
        kind: usize,
        seq: u64,
    },
    Checkpoint {
        size: u64,
    },
    Head {
        host: u16,
        head: u64,
        shipped: u64,
    },
    Tick,
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        4 => (any::<u16>(), any::<u16>(), 0..Operation::ALL.len())
            .prop_map(|(host, who, op)| Input::Request { host, who, op }),
        4 => (any::<u16>(), proptest::option::of(any::<u16>()), 0..4usize, any::<bool>())
            .prop_map(|(host, who, step, replay)| Input::Refusal { host, who, step, replay }),
        1 => (any::<u16>(), any::<u16>(), 0..Operation::ALL.len())
            .prop_map(|(host, who, op)| Input::Grant { host, who, op }),
        1 => (any::<u16>(), 0..4usize, any::<u64>())
            .prop_map(|(host, kind, seq)| Input::Integrity { host, kind, seq }),
        1 => (0..50u64).prop_map(|size| Input::Checkpoint { size }),
        1 => (any::<u16>(), any::<u64>(), any::<u64>())
            .prop_map(|(host, head, shipped)| Input::Head { host, head, shipped }),
        1 => Just(Input::Tick),
    ]
}

fn event(i: &Input, t: i64) -> Option<Event> {
    let at = secs(t);
    let host = |h: u16| format!("h{}", h % 64);
    let who = |w: u16| operator(&format!("op{}", w % 512));
    Some(match i {
        Input::Request {
            host: h,
            who: w,
            op,
        } => {
            let op = Operation::ALL[*op];
            let res = match op.resource_kind() {
                nitrile_api::ResourceKind::Host => format!("host/{}", host(*h)),
                nitrile_api::ResourceKind::Log => "log/c1".to_owned(),
                _ => "instance/i-1".to_owned(),
            };
            Journal::host(&host(*h)).request(at, &who(*w), op, &res)
        }
        Input::Refusal {
            host: h,
            who: w,
            step,
            replay,
        } => {
            let steps = [
                RefusalStep::Token,
                RefusalStep::Tls,
                RefusalStep::Entitlement,
                RefusalStep::Quota,
            ];
            let reason = if *replay {
                "replayed: again"
            } else {
                "expired: late"
            };
            let p = w.map(who);
            Journal::host(&host(*h)).refusal(at, p.as_ref(), steps[*step], reason)
        }
        Input::Grant {
            host: h,
            who: w,
            op,
        } => Journal::of(TOKEND).grant(at, &who(*w), Operation::ALL[*op], &host(*h)),
        Input::Integrity { host: h, kind, seq } => {
            let kinds = [
                IntegrityKind::Gap,
                IntegrityKind::ChainBreak,
                IntegrityKind::WrongSource,
                IntegrityKind::Oversized,
            ];
            Event::integrity(kinds[*kind], &host_source(&host(*h)), *seq, "x")
        }
        Input::Checkpoint { size } => Event::checkpoint("c1.nitrile/log", *size, at),
        Input::Head {
            host: h,
            head,
            shipped,
        } => Event::journal_head(&host_source(&host(*h)), *head, *shipped),
        Input::Tick => return None,
    })
}

fn small_monitor() -> Monitor {
    Monitor::load(rules_dir())
        .unwrap()
        .with_config(MonitorConfig {
            baseline: Some(BaselineConfig {
                max_keys: MAX_KEYS,
                floor: 2,
                warmup_minutes: 1,
                ..BaselineConfig::default()
            }),
            max_groups_per_rule: MAX_GROUPS,
            max_sources: MAX_SOURCES,
            ..MonitorConfig::default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn observe_never_panics_and_state_stays_bounded(
        steps in proptest::collection::vec((input(), 0i64..90), 1..400),
        start in -1_000_000i64..1_000_000,
    ) {
        let mut m = small_monitor();
        let correlations = 2;
        let mut t = start;
        for (i, dt) in &steps {
            // Time mostly moves forward, sometimes steps back.
            t += dt - 5;
            let alerts = match event(i, t) {
                Some(e) => m.observe(&e, secs(t)),
                None => m.tick(secs(t)),
            };
            for a in &alerts {
                prop_assert!(a.events.len() <= MAX_ALERT_EVENTS);
                serde_json::to_string(a).unwrap();
            }
            let s = m.state_size();
            prop_assert!(s.groups <= correlations * MAX_GROUPS, "{s:?}");
            // Below each threshold (10 refusals, 5 hosts) per group.
            prop_assert!(s.entries <= s.groups * 10, "{s:?}");
            prop_assert!(s.baseline_keys <= MAX_KEYS, "{s:?}");
            prop_assert!(s.sources <= MAX_SOURCES, "{s:?}");
        }
    }

    #[test]
    fn the_parser_never_panics_on_arbitrary_text(text in ".{0,400}") {
        let _ = parse_rules("f.yml", &text);
    }

    #[test]
    fn the_parser_never_panics_on_mutated_rules(
        cut in 0usize..2000,
        insert in "[ -~\n]{0,20}",
        file in 0usize..5,
    ) {
        let mut names: Vec<_> = std::fs::read_dir(rules_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yml"))
            .collect();
        names.sort();
        let text = std::fs::read_to_string(&names[file % names.len()]).unwrap();
        let mut at = cut.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let mutated = format!("{}{}{}", &text[..at], insert, &text[at..]);
        let _ = parse_rules("f.yml", &mutated);
    }
}
