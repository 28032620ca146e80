//! Authorization throughput with 1,000 policies: `authorize` (slice
//! evaluation) plus a durable quota charge per iteration, against the
//! baseline of one Cedar evaluation of the whole policy set.
//!
//! Run: `cargo bench -p nitrile-policy --bench authorize`.

use std::str::FromStr;
use std::time::{Duration, Instant};

use cedar_policy::{
    Authorizer, Context, Entities, EntityUid, PolicySet, Request, RestrictedExpression,
};
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId};

use nitrile_policy::{Bundle, Quota, QuotaPer, QuotaStore, QuotaWindow, Quotas};

const GROUPS: usize = 50;
const POLICIES: usize = 1000;
const ITERATIONS: usize = 4000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Row {
    name: &'static str,
    rate: f64,
    p50: Duration,
    p99: Duration,
}

fn measure(name: &'static str, n: usize, mut f: impl FnMut(usize)) -> Row {
    for i in 0..n / 10 {
        f(i);
    }
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        f(i);
        samples.push(t.elapsed());
    }
    let total = start.elapsed();
    samples.sort();
    Row {
        name,
        rate: n as f64 / total.as_secs_f64(),
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
    }
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    nitrile_policy::synth::write_bundle(dir.path(), GROUPS, POLICIES).unwrap();
    let t = Instant::now();
    let e = Bundle::load(dir.path()).unwrap();
    println!(
        "bundle: {GROUPS} groups, {} policies, loaded and validated in {:?}",
        e.policy_count(),
        t.elapsed()
    );

    // The request mix: every (operator, host) pair the bundle allows for
    // host.describe, so every iteration also charges a quota.
    let op = Operation::HostDescribe;
    let mut mix: Vec<(PrincipalId, ResourceId, Audience)> = Vec::new();
    let mut asked = 0;
    for g in 0..GROUPS {
        let p = PrincipalId::parse(&format!("nitrile://bench/operator/op{g}")).unwrap();
        for h in 0..100 {
            let r = ResourceId::parse(&format!("host/h{h}")).unwrap();
            let a = Audience::new(r.name.as_str()).unwrap();
            asked += 1;
            if e.authorize(&p, None, &[op], std::slice::from_ref(&r), &a)
                .is_ok()
            {
                mix.push((p.clone(), r, a));
            }
        }
    }
    println!(
        "request mix: {} allowed (operator, host) pairs of {asked}",
        mix.len()
    );
    assert!(!mix.is_empty());
    let ask = |i: usize| {
        let (p, r, a) = &mix[(i * 7919) % mix.len()];
        (p, r, a.clone())
    };

    let quotas = Quotas::from_quotas((0..GROUPS).map(|g| Quota {
        group: Name::new(&format!("g{g}")).unwrap(),
        operation: op,
        max_resources: 1_000_000,
        window: QuotaWindow::parse("1h").unwrap(),
        per: QuotaPer::Group,
    }));
    let store = QuotaStore::open(&dir.path().join("quota.db")).unwrap();
    let now = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();

    // Baseline: one Cedar evaluation of the whole set, entities built once.
    let mut whole = PolicySet::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "cedar") {
            let text = std::fs::read_to_string(&path).unwrap();
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            for (i, p) in PolicySet::from_str(&text).unwrap().policies().enumerate() {
                whole
                    .add(p.new_id(cedar_policy::PolicyId::new(format!("{stem}#{i}"))))
                    .unwrap();
            }
        }
    }
    let (schema, _) =
        cedar_policy::Schema::from_cedarschema_str(nitrile_policy::SCHEMA_TEXT).unwrap();
    let entities = Entities::from_json_str(
        &std::fs::read_to_string(dir.path().join("groups.json")).unwrap(),
        Some(&schema),
    )
    .unwrap();
    let authorizer = Authorizer::new();
    let action = EntityUid::from_str(&format!("Nitrile::Action::\"{}\"", op.as_str())).unwrap();
    let cedar_uid =
        |t: &str, id: &str| EntityUid::from_str(&format!("Nitrile::{t}::\"{id}\"")).unwrap();

    let rows = [
        measure("cedar: whole policy set, one evaluation", ITERATIONS, |i| {
            let (p, r, _) = ask(i);
            let host = cedar_uid("Host", r.name.as_str());
            let ctx = Context::from_pairs([(
                "host".to_owned(),
                RestrictedExpression::new_entity_uid(host.clone()),
            )])
            .unwrap();
            let req = Request::new(
                cedar_uid("Operator", p.name.as_str()),
                action.clone(),
                host,
                ctx,
                None,
            )
            .unwrap();
            std::hint::black_box(authorizer.is_authorized(&req, &whole, &entities));
        }),
        measure("authorize (group slice)", ITERATIONS, |i| {
            let (p, r, a) = ask(i);
            let _ = std::hint::black_box(e.authorize(p, None, &[op], std::slice::from_ref(r), &a));
        }),
        measure("authorize + quota charge (SQLite, FULL)", ITERATIONS, |i| {
            let (p, r, a) = ask(i);
            let ok = e
                .authorize(p, None, &[op], std::slice::from_ref(r), &a)
                .unwrap();
            store
                .try_charge(&quotas, &ok.group, op, std::slice::from_ref(r), now)
                .unwrap();
        }),
    ];
    let baseline = rows[0].rate;
    println!();
    println!(
        "{:<42} {:>10} {:>10} {:>10} {:>8}",
        "measure", "rate/s", "p50", "p99", "ratio"
    );
    for row in &rows {
        println!(
            "{:<42} {:>10.0} {:>10.1?} {:>10.1?} {:>8.2}",
            row.name,
            row.rate,
            row.p50,
            row.p99,
            row.rate / baseline
        );
    }
    println!("(ratio: rate relative to the Cedar whole-set evaluation baseline)");
}
