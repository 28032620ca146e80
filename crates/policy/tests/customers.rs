//! Customers on the sample bundle: each is entitled to its own instances and
//! images (named `<customer>--<name>`, children of the customer's entity)
//! at the placement service, and to no other customer's; no provider
//! principal gets a customer operation.

mod common;

use common::*;
use nitrile_api::Operation::{self, *};
use nitrile_policy::{Bundle, Denied, Entitlements};

fn sample() -> Entitlements {
    Bundle::load(&sample_dir()).unwrap()
}

const INSTANCE_OPS: [Operation; 5] = [
    CustomerInstanceRun,
    CustomerInstanceDescribe,
    CustomerInstanceStop,
    CustomerInstanceStart,
    CustomerInstanceTerminate,
];
const IMAGE_OPS: [Operation; 3] = [
    CustomerImageImport,
    CustomerImageDescribe,
    CustomerImageDelete,
];

#[test]
fn a_customer_is_entitled_to_its_own_instances_and_images_at_placement() {
    let e = sample();
    let acme = principal("customer/acme");
    let ok = e
        .authorize(
            &acme,
            None,
            &INSTANCE_OPS,
            &[res("instance/acme--web1")],
            &aud("placement"),
        )
        .unwrap();
    assert_eq!(ok.group, name("customers"));
    assert_eq!(ok.policy_ids, ["customer-own-instances"]);
    let ok = e
        .authorize(
            &acme,
            None,
            &IMAGE_OPS,
            &[res("image/acme--0123456789abcdef01234567")],
            &aud("placement"),
        )
        .unwrap();
    assert_eq!(ok.policy_ids, ["customer-own-images"]);
    e.authorize(
        &acme,
        None,
        &[CustomerInstanceList, CustomerImageList],
        &[res("placement/local")],
        &aud("placement"),
    )
    .unwrap();
}

#[test]
fn a_customer_is_refused_on_another_customers_instance_and_image() {
    let e = sample();
    let acme = principal("customer/acme");
    for op in INSTANCE_OPS {
        for r in [
            "instance/globex--db",
            "instance/db",
            "instance/acmeglobex--x",
        ] {
            let err = e
                .authorize(&acme, None, &[op], &[res(r)], &aud("placement"))
                .unwrap_err();
            assert!(
                matches!(err, Denied::NotPermitted { .. }),
                "{op} {r}: {err}"
            );
        }
    }
    for op in IMAGE_OPS {
        let err = e
            .authorize(
                &acme,
                None,
                &[op],
                &[res("image/globex--0123456789abcdef01234567")],
                &aud("placement"),
            )
            .unwrap_err();
        assert!(matches!(err, Denied::NotPermitted { .. }), "{op}: {err}");
    }
    // One foreign resource among its own refuses the whole request.
    assert!(
        e.authorize(
            &acme,
            None,
            &[CustomerInstanceDescribe],
            &[res("instance/acme--web1"), res("instance/globex--db")],
            &aud("placement"),
        )
        .is_err()
    );
    // globex is entitled to its own, not to acme's.
    let globex = principal("customer/globex");
    e.authorize(
        &globex,
        None,
        &[CustomerInstanceRun],
        &[res("instance/globex--db")],
        &aud("placement"),
    )
    .unwrap();
    assert!(
        e.authorize(
            &globex,
            None,
            &[CustomerInstanceRun],
            &[res("instance/acme--web1")],
            &aud("placement"),
        )
        .is_err()
    );
}

#[test]
fn customer_operations_are_only_for_the_placement_audience() {
    let e = sample();
    let acme = principal("customer/acme");
    for audience in ["h1", "kms", "logd"] {
        assert!(
            e.authorize(
                &acme,
                None,
                &[CustomerInstanceRun],
                &[res("instance/acme--web1")],
                &aud(audience),
            )
            .is_err(),
            "{audience}"
        );
    }
    // A customer still gets no host operation on its own instance.
    assert!(
        e.authorize(
            &acme,
            None,
            &[InstanceTerminate],
            &[res("instance/acme--web1")],
            &aud("h1"),
        )
        .is_err()
    );
}

#[test]
fn no_operator_auditor_or_service_gets_a_customer_operation() {
    let e = sample();
    for p in [
        "operator/alice",
        "operator/bob",
        "auditor/carol",
        "service/placement",
        "service/deployer",
    ] {
        for op in Operation::ALL.into_iter().filter(|o| o.is_customer()) {
            let resource = match op.resource_kind() {
                nitrile_api::ResourceKind::Instance => res("instance/acme--web1"),
                nitrile_api::ResourceKind::Image => res("image/acme--0123456789abcdef01234567"),
                _ => res("placement/local"),
            };
            assert!(
                e.authorize(&principal(p), None, &[op], &[resource], &aud("placement"))
                    .is_err(),
                "{p} was granted {op}"
            );
        }
    }
}

/// The guardrail holds whatever a group's own file says: a policy granting
/// the placement group every customer operation is still forbidden.
#[test]
fn the_guardrail_forbids_a_customer_operation_a_provider_group_is_granted() {
    let dir = sample_copy();
    let extra = r#"
@id("placement-as-customer")
permit (
  principal is Nitrile::Service in Nitrile::Group::"placement",
  action in Nitrile::Action::"customer",
  resource
);
"#;
    let path = dir.path().join("placement.cedar");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}{extra}")).unwrap();
    let e = Bundle::load(dir.path()).unwrap();
    let err = e
        .authorize(
            &principal("service/placement"),
            None,
            &[CustomerInstanceTerminate],
            &[res("instance/acme--web1")],
            &aud("placement"),
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("guardrail-customer-api-only-customers"),
        "{err}"
    );
}
