//! Quotas: distinct resources per sliding window, all or nothing, durable.

mod common;

use common::*;
use nitrile_api::Operation::{HostDescribe, HostDrain, HostUndrain};
use nitrile_api::PrincipalId;
use nitrile_api::ResourceId;
use nitrile_policy::{Bundle, Quota, QuotaError, QuotaPer, QuotaStore, QuotaWindow, Quotas};
use time::{Duration, OffsetDateTime};

fn hosts(range: std::ops::Range<usize>) -> Vec<ResourceId> {
    range.map(|i| res(&format!("host/h{i}"))).collect()
}

fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
}

fn three_per_hour() -> Quotas {
    Quotas::from_quotas([Quota {
        group: name("oncall"),
        operation: HostDrain,
        max_resources: 3,
        window: QuotaWindow::parse("1h").unwrap(),
        per: QuotaPer::Group,
    }])
}

#[test]
fn distinct_resources_are_counted_and_repeats_are_free() {
    let tmp = tempfile::tempdir().unwrap();
    let store = QuotaStore::open(&tmp.path().join("quota.db")).unwrap();
    let q = three_per_hour();
    let g = name("oncall");
    let c = store
        .try_charge(&q, &g, HostDrain, &hosts(0..2), t0())
        .unwrap();
    assert_eq!((c.newly_charged, c.in_use), (2, 2));
    // h1 again (and twice in one request) does not count again.
    let c = store
        .try_charge(
            &q,
            &g,
            HostDrain,
            &[res("host/h1"), res("host/h1"), res("host/h2")],
            t0() + Duration::minutes(1),
        )
        .unwrap();
    assert_eq!((c.newly_charged, c.in_use), (1, 3));
    // All or nothing: h3 + h0 would be fine for h0, not for h3.
    let e = store
        .try_charge(
            &q,
            &g,
            HostDrain,
            &[res("host/h0"), res("host/h3")],
            t0() + Duration::minutes(2),
        )
        .unwrap_err();
    let QuotaError::Exceeded(x) = e else {
        panic!("{e:?}")
    };
    assert_eq!(
        (x.in_use, x.requested_new, x.quota.max_resources),
        (3, 1, 3)
    );
    // h0 leaving the window would not help (this request renews it); the
    // next charge to leave is h1's renewal or h2's, both at t0+1m.
    assert_eq!(x.frees_at, Some(t0() + Duration::minutes(61)));
    assert_eq!(
        x.retry_after(t0() + Duration::minutes(2)),
        Some(std::time::Duration::from_secs(59 * 60))
    );
    assert!(
        x.to_string()
            .contains("oncall host.drain at most 3 resource(s) per 1h"),
        "{x}"
    );
    // Nothing was charged by the refused request: h0 alone still fits.
    store
        .try_charge(
            &q,
            &g,
            HostDrain,
            &[res("host/h0")],
            t0() + Duration::minutes(3),
        )
        .unwrap();
    // Other operations and groups are separate (and unlimited here).
    let c = store
        .try_charge(&q, &g, HostUndrain, &hosts(0..50), t0())
        .unwrap();
    assert!(c.quota.is_none());
    store
        .try_charge(&q, &name("placement"), HostDrain, &hosts(0..50), t0())
        .unwrap();
    // A request larger than the quota can never succeed.
    let QuotaError::Exceeded(x) = store
        .try_charge(&q, &g, HostDrain, &hosts(10..14), t0() + Duration::days(1))
        .unwrap_err()
    else {
        panic!()
    };
    assert_eq!(x.frees_at, None);
}

#[test]
fn charges_survive_reopen_and_free_after_the_window() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("quota.db");
    let q = three_per_hour();
    let g = name("oncall");
    {
        let store = QuotaStore::open(&path).unwrap();
        store
            .try_charge(&q, &g, HostDrain, &hosts(0..1), t0())
            .unwrap();
        store
            .try_charge(
                &q,
                &g,
                HostDrain,
                &hosts(1..3),
                t0() + Duration::minutes(10),
            )
            .unwrap();
    }
    let store = QuotaStore::open(&path).unwrap();
    let QuotaError::Exceeded(x) = store
        .try_charge(
            &q,
            &g,
            HostDrain,
            &hosts(3..4),
            t0() + Duration::minutes(30),
        )
        .unwrap_err()
    else {
        panic!()
    };
    assert_eq!(x.in_use, 3);
    assert_eq!(x.frees_at, Some(t0() + Duration::hours(1)));
    // Just before h0 leaves the window: still exhausted.
    assert!(
        store
            .try_charge(
                &q,
                &g,
                HostDrain,
                &hosts(3..4),
                t0() + Duration::seconds(3599)
            )
            .is_err()
    );
    // At t0 + 1h, h0's charge has left the window.
    let c = store
        .try_charge(&q, &g, HostDrain, &hosts(3..4), t0() + Duration::hours(1))
        .unwrap();
    assert_eq!(c.in_use, 3);
    drop(store);
    let store = QuotaStore::open(&path).unwrap();
    assert!(
        store
            .try_charge(&q, &g, HostDrain, &hosts(4..5), t0() + Duration::hours(1))
            .is_err()
    );
    // After everything left the window, all three are free again.
    let c = store
        .try_charge(&q, &g, HostDrain, &hosts(5..8), t0() + Duration::hours(3))
        .unwrap();
    assert_eq!((c.newly_charged, c.in_use), (3, 3));
}

#[test]
fn the_sample_bundle_quota_limits_oncall_drains_to_twenty_an_hour() {
    let e = Bundle::load(&sample_dir()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let store = QuotaStore::open(&tmp.path().join("q.db")).unwrap();
    let g = name("oncall");
    for i in 0..20 {
        store
            .try_charge(e.quotas(), &g, HostDrain, &hosts(i..i + 1), t0())
            .unwrap();
    }
    assert!(
        store
            .try_charge(e.quotas(), &g, HostDrain, &hosts(20..21), t0())
            .is_err()
    );
    assert!(
        store
            .try_charge(e.quotas(), &g, HostDescribe, &hosts(20..40), t0())
            .is_ok()
    );
}

#[test]
fn concurrent_charges_never_exceed_the_quota_and_are_all_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("quota.db");
    let q = Quotas::from_quotas([Quota {
        group: name("oncall"),
        operation: HostDrain,
        max_resources: 50,
        window: QuotaWindow::parse("1h").unwrap(),
        per: QuotaPer::Group,
    }]);
    let store = std::sync::Arc::new(QuotaStore::open(&path).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            let q = q.clone();
            std::thread::spawn(move || {
                let mut ok = 0;
                for i in 0..10 {
                    let h = hosts(t * 10 + i..t * 10 + i + 1);
                    match store.try_charge(&q, &name("oncall"), HostDrain, &h, t0()) {
                        Ok(_) => ok += 1,
                        Err(QuotaError::Exceeded(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                ok
            })
        })
        .collect();
    let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(granted, 50);
    drop(store);
    // Every granted charge is in the file: a new host is refused after reopen,
    // and it frees after the window.
    let store = QuotaStore::open(&path).unwrap();
    let err = store
        .try_charge(&q, &name("oncall"), HostDrain, &hosts(100..101), t0())
        .unwrap_err();
    assert!(matches!(err, QuotaError::Exceeded(_)), "{err}");
    let later = t0() + Duration::hours(1) + Duration::seconds(1);
    store
        .try_charge(&q, &name("oncall"), HostDrain, &hosts(100..101), later)
        .unwrap();
}

/// Drains at most 5 hosts an hour, undrains at most `undrains`.
fn drains_and_undrains(undrains: u32) -> Quotas {
    Quotas::from_quotas([
        Quota {
            group: name("oncall"),
            operation: HostDrain,
            max_resources: 5,
            window: QuotaWindow::parse("1h").unwrap(),
            per: QuotaPer::Group,
        },
        Quota {
            group: name("oncall"),
            operation: HostUndrain,
            max_resources: undrains,
            window: QuotaWindow::parse("1h").unwrap(),
            per: QuotaPer::Group,
        },
    ])
}

#[test]
fn a_request_refused_by_its_second_quota_charges_nothing_of_its_first() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("quota.db");
    let q = drains_and_undrains(1);
    let g = name("oncall");
    let both = [HostDrain, HostUndrain];
    let store = QuotaStore::open(&path).unwrap();
    let charged = store
        .try_charge_request(&q, &g, &both, &hosts(1..2), t0())
        .unwrap();
    assert_eq!(charged.len(), 2);
    assert!(charged.iter().all(|c| c.in_use == 1));

    // The drain of h2 fits its quota, the undrain does not: nothing is charged.
    let err = store
        .try_charge_request(&q, &g, &both, &hosts(2..3), t0())
        .unwrap_err();
    let QuotaError::Exceeded(x) = err else {
        panic!("{err:?}")
    };
    assert_eq!(x.quota.operation, HostUndrain);
    assert_eq!(store.in_use(&q, &g, HostDrain, t0()).unwrap(), 1);
    assert_eq!(store.in_use(&q, &g, HostUndrain, t0()).unwrap(), 1);
    // Nor in the file.
    drop(store);
    let store = QuotaStore::open(&path).unwrap();
    assert_eq!(store.in_use(&q, &g, HostDrain, t0()).unwrap(), 1);
    // The refusal of the first operation is reported as such, and charges
    // nothing either.
    let tight = Quotas::from_quotas([Quota {
        max_resources: 1,
        ..q.get(&g, HostDrain).unwrap().clone()
    }]);
    let err = store
        .try_charge_request(&tight, &g, &both, &hosts(3..4), t0())
        .unwrap_err();
    assert!(
        matches!(&err, QuotaError::Exceeded(x) if x.quota.operation == HostDrain),
        "{err:?}"
    );
    assert_eq!(store.in_use(&q, &g, HostDrain, t0()).unwrap(), 1);
}

#[test]
fn concurrent_requests_for_two_operations_are_charged_all_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("quota.db");
    let q = drains_and_undrains(3);
    let g = name("oncall");
    let store = std::sync::Arc::new(QuotaStore::open(&path).unwrap());
    // 16 requests, each for its own host, race for 3 undrains; the 5
    // drains would let more through if charges were made one by one.
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (store, q, g) = (store.clone(), q.clone(), g.clone());
            std::thread::spawn(move || {
                match store.try_charge_request(
                    &q,
                    &g,
                    &[HostDrain, HostUndrain],
                    &hosts(i..i + 1),
                    t0(),
                ) {
                    Ok(_) => true,
                    Err(QuotaError::Exceeded(_)) => false,
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    let granted = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(granted, 3);
    assert_eq!(store.in_use(&q, &g, HostDrain, t0()).unwrap(), 3);
    assert_eq!(store.in_use(&q, &g, HostUndrain, t0()).unwrap(), 3);
    drop(store);
    let store = QuotaStore::open(&path).unwrap();
    assert_eq!(store.in_use(&q, &g, HostDrain, t0()).unwrap(), 3);
    assert_eq!(store.in_use(&q, &g, HostUndrain, t0()).unwrap(), 3);
}

/// A quota per principal counts each member of the group apart: one
/// customer using up its own quota leaves another's whole, and the group's
/// counter is not the principal's.
#[test]
fn a_quota_per_principal_counts_each_principal_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let store = QuotaStore::open(&tmp.path().join("q.db")).unwrap();
    let g = name("customers");
    let q = Quotas::from_quotas([Quota {
        group: g.clone(),
        operation: HostDrain,
        max_resources: 2,
        window: QuotaWindow::parse("1h").unwrap(),
        per: QuotaPer::Principal,
    }]);
    let acme = PrincipalId::parse("nitrile://c/customer/acme").unwrap();
    let globex = PrincipalId::parse("nitrile://c/customer/globex").unwrap();
    let charge = |p: &PrincipalId, r: std::ops::Range<usize>| {
        store.try_charge_request_as(&q, &g, p, &[HostDrain], &hosts(r), t0())
    };
    charge(&acme, 0..2).unwrap();
    let err = charge(&acme, 2..3).unwrap_err();
    assert!(matches!(err, QuotaError::Exceeded(_)), "{err:?}");
    assert!(err.to_string().contains("for each principal"), "{err}");
    // globex has its own two, acme's charges notwithstanding.
    charge(&globex, 5..7).unwrap();
    assert!(matches!(
        charge(&globex, 7..8),
        Err(QuotaError::Exceeded(_))
    ));
    assert_eq!(store.in_use_as(&q, &g, &acme, HostDrain, t0()).unwrap(), 2);
    assert_eq!(
        store.in_use_as(&q, &g, &globex, HostDrain, t0()).unwrap(),
        2
    );
    // Without the principal the group counts as one: stricter, and not the
    // principals' counters.
    assert_eq!(store.in_use(&q, &g, HostDrain, t0()).unwrap(), 0);
    store
        .try_charge(&q, &g, HostDrain, &hosts(10..12), t0())
        .unwrap();
    assert!(
        store
            .try_charge(&q, &g, HostDrain, &hosts(12..13), t0())
            .is_err()
    );
    // Durable per principal: a reopened store still refuses acme's third.
    drop(store);
    let store = QuotaStore::open(&tmp.path().join("q.db")).unwrap();
    assert_eq!(store.in_use_as(&q, &g, &acme, HostDrain, t0()).unwrap(), 2);
    assert!(matches!(
        store.try_charge_request_as(&q, &g, &acme, &[HostDrain], &hosts(3..4), t0()),
        Err(QuotaError::Exceeded(_))
    ));
}
