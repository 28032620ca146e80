//! `AdminRequest::parse` never panics, and whatever it accepts re-encodes to
//! the same request.

use nitrile_api::admin::{AdminRequest, MAX_ADMIN_BODY};
use proptest::prelude::*;
use serde_json::{Value, json};

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_owned()),
        Just("POST".to_owned()),
        Just("DELETE".to_owned()),
        Just("PUT".to_owned()),
        Just("get".to_owned()),
        "\\PC{0,8}",
    ]
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("v1".to_owned()),
        Just("host".to_owned()),
        Just("instances".to_owned()),
        Just("volumes".to_owned()),
        Just("attach".to_owned()),
        Just("detach".to_owned()),
        Just("drain".to_owned()),
        Just("undrain".to_owned()),
        Just("stop".to_owned()),
        Just("start".to_owned()),
        Just("console".to_owned()),
        Just("network".to_owned()),
        Just("web1".to_owned()),
        Just("..".to_owned()),
        Just(String::new()),
        "[a-z0-9-]{1,70}",
        "\\PC{0,12}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        // Mostly paths that look like the API, so that many parse.
        4 => (segment(), segment(), prop::collection::vec(segment(), 0..3)).prop_map(
            |(a, b, rest)| {
                let mut p = format!("/v1/{a}/{b}");
                if a == "v1" {
                    p = format!("/{a}/{b}");
                }
                for s in rest {
                    p.push('/');
                    p.push_str(&s);
                }
                p
            }
        ),
        2 => prop::sample::select(vec![
            "/v1/host",
            "/v1/host/drain",
            "/v1/host/undrain",
            "/v1/host/update",
            "/v1/host/attest",
            "/v1/host/shutdown",
            "/v1/instances",
            "/v1/instances/web1",
            "/v1/instances/web1/stop",
            "/v1/instances/web1/start",
            "/v1/volumes",
            "/v1/volumes/data",
            "/v1/volumes/data/attach",
            "/v1/volumes/data/detach",
            "/v1/network",
        ])
        .prop_map(str::to_owned),
        1 => "\\PC{0,40}",
    ]
}

fn launch_value() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            3 => Just("web1".to_owned()),
            1 => "[a-z0-9-]{0,66}",
            1 => "\\PC{0,6}",
        ],
        prop_oneof![3 => Just("ab".repeat(32)), 1 => "[0-9a-fA-F]{62,66}"],
        any::<u16>(),
        any::<u32>(),
        prop_oneof![
            3 => prop::collection::vec("[a-z]{1,3}", 0..3),
            1 => prop::collection::vec("[a-z]{0,3}", 0..10),
        ],
        prop::option::weighted(0.2, ("[a-z_]{1,8}", any::<bool>())),
    )
        .prop_map(|(instance, image, vcpus, memory, volumes, extra)| {
            let mut v = json!({
                "instance": instance,
                "image": image,
                "vcpus": vcpus % 40,
                "memory_mib": memory % (300 * 1024),
                "volumes": volumes,
            });
            if let Some((key, value)) = extra {
                v[key] = value.into();
            }
            v
        })
}

fn volume_value() -> impl Strategy<Value = Value> {
    (
        prop_oneof![3 => Just("data".to_owned()), 1 => "\\PC{0,6}"],
        any::<u64>(),
        prop::option::of(prop_oneof![Just("default".to_owned()), "\\PC{0,4}"]),
        prop::option::weighted(0.2, ("[a-z_]{1,8}", any::<bool>())),
    )
        .prop_map(|(volume, size, key, extra)| {
            let mut v = json!({ "volume": volume, "size_mib": size % (1 << 24) + 1 });
            if let Some(key) = key {
                v["kms_key"] = key.into();
            }
            if let Some((k, value)) = extra {
                v[k] = value.into();
            }
            v
        })
}

fn network_value() -> impl Strategy<Value = Value> {
    (
        any::<u32>(),
        any::<[u8; 4]>(),
        prop_oneof![3 => Just("h2".to_owned()), 1 => "\\PC{0,4}"],
        prop::option::weighted(0.2, ("[a-z_]{1,8}", any::<bool>())),
    )
        .prop_map(|(vni, addr, host, extra)| {
            let address = std::net::Ipv4Addr::from(addr).to_string();
            let mut v = json!({
                "peers": [],
                "routes": [{ "vni": vni % 32, "address": address, "host": host }],
            });
            if let Some((k, value)) = extra {
                v[k] = value.into();
            }
            v
        })
}

fn update_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => (0u8..20, 0u8..20, 0u8..20).prop_map(|(a, b, c)| json!({ "version": format!("{a}.{b}.{c}") })),
        1 => "\\PC{0,12}".prop_map(|v| json!({ "version": v })),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => update_value().prop_map(|v| v.to_string().into_bytes()),
        1 => prop_oneof![3 => Just("ab".repeat(16)), 1 => "[0-9a-fA-F]{0,70}"]
            .prop_map(|n| json!({ "nonce": n }).to_string().into_bytes()),
        2 => network_value().prop_map(|v| v.to_string().into_bytes()),
        3 => volume_value().prop_map(|v| v.to_string().into_bytes()),
        2 => prop_oneof![3 => Just("web1".to_owned()), 1 => "\\PC{0,4}"]
            .prop_map(|i| json!({ "instance": i }).to_string().into_bytes()),
        2 => Just(Vec::new()),
        1 => Just(b"{}".to_vec()),
        1 => Just(b" \n".to_vec()),
        3 => launch_value().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => (0usize..3).prop_map(|extra| vec![b' '; MAX_ADMIN_BODY - 1 + extra]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn parse_never_panics_and_round_trips(method in method(), path in path(), body in body()) {
        if let Ok(req) = AdminRequest::parse(&method, &path, &body) {
            prop_assert_eq!(req.method(), method.as_str());
            prop_assert_eq!(req.path(), path.clone());
            let again = AdminRequest::parse(req.method(), &req.path(), &req.body());
            prop_assert_eq!(again.as_ref(), Ok(&req));
            // The route the request names is the one its operation has.
            let route = nitrile_api::admin::ROUTES
                .iter()
                .find(|r| r.operation == req.operation());
            prop_assert!(route.is_some_and(|r| r.method == req.method()));
        }
    }
}

/// The generators reach every operation, so the round trip above is not
/// checked on refusals alone.
#[test]
fn generated_requests_reach_every_route() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = (method(), path(), body());
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20_000 {
        let (m, p, b) = strategy.new_tree(&mut runner).expect("a value").current();
        if let Ok(req) = AdminRequest::parse(&m, &p, &b) {
            seen.insert(req.operation());
        }
    }
    assert_eq!(seen.len(), nitrile_api::admin::ROUTES.len(), "{seen:?}");
}
