//! Authorization decisions, explanations and semantic diffs on the sample
//! bundle and variations of it.

mod common;

use common::*;
use nitrile_api::Operation::*;
use nitrile_policy::{Bundle, Change, Denied, Entitlements, diff};

fn sample() -> Entitlements {
    Bundle::load(&sample_dir()).unwrap()
}

#[test]
fn oncall_operator_may_describe_and_drain_fleet_hosts() {
    let e = sample();
    let alice = principal("operator/alice");
    let ok = e
        .authorize(
            &alice,
            None,
            &[HostDescribe, HostDrain],
            &[res("host/h1")],
            &aud("h1"),
        )
        .unwrap();
    assert_eq!(ok.group, name("oncall"));
    assert_eq!(ok.policy_ids, ["oncall-describe-hosts", "oncall-drain"]);
    let ok = e
        .authorize(
            &alice,
            Some(&name("oncall")),
            &[InstanceDescribe],
            &[res("instance/i-7")],
            &aud("h2"),
        )
        .unwrap();
    assert_eq!(ok.policy_ids, ["oncall-describe-instances"]);
}

#[test]
fn oncall_operator_is_denied_everything_else() {
    let e = sample();
    let alice = principal("operator/alice");
    // Not a fleet host.
    let d = e
        .authorize(
            &alice,
            None,
            &[HostDrain],
            &[res("host/h1"), res("host/h9")],
            &aud("h9"),
        )
        .unwrap_err();
    match &d {
        Denied::NotPermitted { tried, .. } => {
            assert_eq!(tried.len(), 1);
            assert_eq!(tried[0].group, name("oncall"));
            assert_eq!(tried[0].resource, res("host/h9"));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        d.to_string()
            .contains("host.drain on host/h9 is not permitted"),
        "{d}"
    );
    // Instance lifecycle, software updates and the audit log.
    assert!(
        e.authorize(
            &alice,
            None,
            &[InstanceTerminate],
            &[res("instance/i-1")],
            &aud("h1")
        )
        .is_err()
    );
    let d = e
        .authorize(&alice, None, &[HostUpdate], &[res("host/h1")], &aud("h1"))
        .unwrap_err();
    assert!(
        d.to_string()
            .contains("forbidden by guardrail-update-only-deployer"),
        "{d}"
    );
    assert!(
        e.authorize(
            &alice,
            None,
            &[AuditRead],
            &[res("log/local")],
            &aud("logd")
        )
        .is_err()
    );
    // Instances on a host outside the fleet.
    assert!(
        e.authorize(
            &alice,
            None,
            &[InstanceDescribe],
            &[res("instance/i-1")],
            &aud("h9")
        )
        .is_err()
    );
    // A group alice is not in.
    assert!(matches!(
        e.authorize(
            &alice,
            Some(&name("placement")),
            &[InstanceList],
            &[res("host/h1")],
            &aud("h1")
        ),
        Err(Denied::NotAMember { .. })
    ));
}

#[test]
fn services_and_auditors_get_only_their_own_grants() {
    let e = sample();
    let placement = principal("service/placement");
    let ok = e
        .authorize(
            &placement,
            None,
            &[InstanceStop, InstanceStart, InstanceTerminate],
            &[res("instance/i-1"), res("instance/i-2")],
            &aud("h2"),
        )
        .unwrap();
    assert_eq!(ok.group, name("placement"));
    assert!(
        e.authorize(
            &placement,
            None,
            &[HostDrain],
            &[res("host/h1")],
            &aud("h1")
        )
        .is_err()
    );

    let deployer = principal("service/deployer");
    assert!(
        e.authorize(
            &deployer,
            None,
            &[HostUpdate],
            &[res("host/h1")],
            &aud("h1")
        )
        .is_ok()
    );
    assert!(
        e.authorize(
            &deployer,
            None,
            &[InstanceLaunch],
            &[res("host/h1")],
            &aud("h1")
        )
        .is_err()
    );

    let carol = principal("auditor/carol");
    assert!(
        e.authorize(
            &carol,
            None,
            &[AuditRead],
            &[res("log/local")],
            &aud("logd")
        )
        .is_ok()
    );
    assert!(
        e.authorize(
            &carol,
            None,
            &[AuditRead],
            &[res("log/other")],
            &aud("logd")
        )
        .is_err()
    );
    assert!(
        e.authorize(&carol, None, &[HostDescribe], &[res("host/h1")], &aud("h1"))
            .is_err()
    );
}

#[test]
fn principals_without_entitlement_and_malformed_requests_are_denied() {
    let e = sample();
    for p in [
        "operator/mallory",
        "host/h1",
        "service/tokend",
        "auditor/alice",
    ] {
        let d = e
            .authorize(
                &principal(p),
                None,
                &[HostDescribe],
                &[res("host/h1")],
                &aud("h1"),
            )
            .unwrap_err();
        assert!(matches!(d, Denied::NoEntitlement { .. }), "{p}: {d:?}");
        assert!(e.groups_of(&principal(p)).is_empty());
    }
    let alice = principal("operator/alice");
    assert_eq!(
        e.authorize(&alice, None, &[], &[res("host/h1")], &aud("h1")),
        Err(Denied::EmptyRequest)
    );
    assert_eq!(
        e.authorize(&alice, None, &[HostDescribe], &[], &aud("h1")),
        Err(Denied::EmptyRequest)
    );
    assert!(matches!(
        e.authorize(
            &alice,
            None,
            &[HostDescribe, InstanceDescribe],
            &[res("host/h1")],
            &aud("h1")
        ),
        Err(Denied::KindMismatch {
            operation: InstanceDescribe,
            ..
        })
    ));
}

#[test]
fn group_choice_takes_the_first_group_that_allows_everything() {
    let dir = sample_copy();
    // bob is also in placement; oncall comes later in name order than
    // deployer but deployer allows nothing bob asks for.
    edit(
        dir.path(),
        "groups.json",
        "\"id\": \"bob\"}, \"attrs\": {},\n   \"parents\": [{\"type\": \"Nitrile::Group\", \"id\": \"oncall\"}]",
        "\"id\": \"bob\"}, \"attrs\": {},\n   \"parents\": [{\"type\": \"Nitrile::Group\", \"id\": \"oncall\"}, {\"type\": \"Nitrile::Group\", \"id\": \"deployer\"}]",
    );
    let e = Bundle::load(dir.path()).unwrap();
    let bob = principal("operator/bob");
    assert_eq!(e.groups_of(&bob), vec![name("deployer"), name("oncall")]);
    let ok = e
        .authorize(&bob, None, &[HostDrain], &[res("host/h2")], &aud("h2"))
        .unwrap();
    assert_eq!(ok.group, name("oncall"));
    let d = e
        .authorize(&bob, None, &[InstanceLaunch], &[res("host/h2")], &aud("h2"))
        .unwrap_err();
    match d {
        Denied::NotPermitted { tried, .. } => {
            let groups: Vec<_> = tried.iter().map(|t| t.group.clone()).collect();
            assert_eq!(groups, vec![name("deployer"), name("oncall")]);
        }
        other => panic!("{other:?}"),
    }
    // Bob in deployer may not update hosts: the guardrail wants a service,
    // and deployer's own permit does too.
    assert!(
        e.authorize(
            &bob,
            Some(&name("deployer")),
            &[HostUpdate],
            &[res("host/h1")],
            &aud("h1")
        )
        .is_err()
    );
}

#[test]
fn forbids_win_and_are_named() {
    let dir = sample_copy();
    std::fs::write(
        dir.path().join("freeze.cedar"),
        "@id(\"freeze-h2\")\nforbid (principal in Nitrile::Group::\"oncall\", action == Nitrile::Action::\"host.drain\", resource == Nitrile::Host::\"h2\");\n",
    )
    .unwrap();
    let e = Bundle::load(dir.path()).unwrap();
    let alice = principal("operator/alice");
    assert!(
        e.authorize(&alice, None, &[HostDrain], &[res("host/h1")], &aud("h1"))
            .is_ok()
    );
    let d = e
        .authorize(&alice, None, &[HostDrain], &[res("host/h2")], &aud("h2"))
        .unwrap_err();
    assert!(d.to_string().contains("forbidden by freeze-h2"), "{d}");

    let x = e.explain(&alice, HostDrain, &res("host/h2"), &aud("h2"));
    assert_eq!(x.groups.len(), 1);
    let g = &x.groups[0];
    assert!(!g.allowed);
    assert_eq!(
        g.permits.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        ["oncall-drain"]
    );
    assert_eq!(g.forbids.len(), 1);
    assert_eq!(g.forbids[0].to_string(), "freeze-h2 (freeze.cedar:1:1)");
    // The slice holds oncall's ten, freeze-h2 and the seven guardrails.
    assert_eq!(g.slice_policies, 18);
}

#[test]
fn rollouts_are_on_call_operators_and_host_updates_the_deployers() {
    use nitrile_api::Operation::{DeploymentAbort, DeploymentDescribe, DeploymentStart};
    let e = sample();
    let deployment = res("deployment/local");
    let deployer = aud("deployer");
    for op in [DeploymentStart, DeploymentDescribe, DeploymentAbort] {
        e.authorize(
            &principal("operator/alice"),
            None,
            &[op],
            std::slice::from_ref(&deployment),
            &deployer,
        )
        .unwrap();
        assert!(
            e.authorize(
                &principal("auditor/carol"),
                None,
                &[op],
                std::slice::from_ref(&deployment),
                &deployer
            )
            .is_err(),
            "{op}"
        );
    }
    // The deployment service itself starts no rollout, and neither does a
    // customer.
    for p in ["service/deployer", "customer/acme", "service/placement"] {
        assert!(
            e.authorize(
                &principal(p),
                None,
                &[DeploymentStart],
                std::slice::from_ref(&deployment),
                &deployer
            )
            .is_err(),
            "{p}"
        );
    }
    // It updates and describes fleet hosts; operators do neither update.
    e.authorize(
        &principal("service/deployer"),
        None,
        &[HostUpdate],
        &[res("host/h2")],
        &aud("h2"),
    )
    .unwrap();
    e.authorize(
        &principal("service/deployer"),
        None,
        &[nitrile_api::Operation::HostDescribe],
        &[res("host/h2")],
        &aud("h2"),
    )
    .unwrap();
    assert!(
        e.authorize(
            &principal("operator/alice"),
            None,
            &[HostUpdate],
            &[res("host/h2")],
            &aud("h2")
        )
        .is_err()
    );
}

#[test]
fn explain_names_policies_with_file_and_line() {
    let e = sample();
    let x = e.explain(
        &principal("operator/alice"),
        HostUpdate,
        &res("host/h1"),
        &aud("h1"),
    );
    assert!(!x.groups[0].allowed);
    assert!(x.groups[0].permits.is_empty());
    assert_eq!(
        x.groups[0].forbids[0].to_string(),
        "guardrail-update-only-deployer (guardrails.cedar:5:1)"
    );
    let x = e.explain(
        &principal("service/placement"),
        InstanceLaunch,
        &res("host/h1"),
        &aud("h1"),
    );
    assert!(x.groups[0].allowed);
    assert_eq!(
        x.groups[0].permits[0].to_string(),
        "placement-hosts (placement.cedar:4:1)"
    );
    let x = e.explain(
        &principal("operator/zed"),
        HostDescribe,
        &res("host/h1"),
        &aud("h1"),
    );
    assert!(x.groups.is_empty());
    assert!(matches!(
        x.refused_early,
        Some(Denied::NoEntitlement { .. })
    ));
}

#[test]
fn diff_shows_exactly_the_added_and_removed_grants() {
    let old = sample();
    let dir = sample_copy();
    // oncall may now drain, but no longer undrain.
    edit(
        dir.path(),
        "oncall.cedar",
        "[Nitrile::Action::\"host.drain\", Nitrile::Action::\"host.undrain\"]",
        "[Nitrile::Action::\"host.drain\", Nitrile::Action::\"instance.launch\"]",
    );
    let new = Bundle::load(dir.path()).unwrap();
    let lines: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "- oncall  host.undrain  resource-set fleet  (operator only)",
            "+ oncall  instance.launch  resource-set fleet  (operator only)",
        ]
    );
    let back: Vec<String> = diff(&new, &old).iter().map(ToString::to_string).collect();
    assert_eq!(
        back,
        [
            "+ oncall  host.undrain  resource-set fleet  (operator only)",
            "- oncall  instance.launch  resource-set fleet  (operator only)",
        ]
    );
    assert!(diff(&new, &old).iter().any(|c| c.change == Change::Removed));
}

#[test]
fn text_only_changes_are_no_change_in_access() {
    let old = sample();
    let dir = sample_copy();
    // Reformat and rename a policy, split an action list into two policies.
    edit(
        dir.path(),
        "oncall.cedar",
        "@id(\"oncall-drain\")",
        "// reworded\n@id(\"oncall-drain-undrain\")",
    );
    edit(
        dir.path(),
        "placement.cedar",
        "action in [Nitrile::Action::\"instance.launch\", Nitrile::Action::\"instance.list\"],\n  resource in Nitrile::ResourceSet::\"fleet\"\n);",
        "action == Nitrile::Action::\"instance.launch\",\n  resource in Nitrile::ResourceSet::\"fleet\"\n);\npermit (principal is Nitrile::Service in Nitrile::Group::\"placement\", action == Nitrile::Action::\"instance.list\", resource in Nitrile::ResourceSet::\"fleet\");",
    );
    let new = Bundle::load(dir.path()).unwrap();
    assert_ne!(old.digest(), new.digest());
    assert!(diff(&old, &new).is_empty(), "{:?}", diff(&old, &new));
}

#[test]
fn diff_reports_membership_and_host_level_grants() {
    let old = sample();
    let dir = sample_copy();
    edit(
        dir.path(),
        "groups.json",
        "\"id\": \"carol\"}, \"attrs\": {},\n   \"parents\": [{\"type\": \"Nitrile::Group\", \"id\": \"auditor\"}]",
        "\"id\": \"carol\"}, \"attrs\": {},\n   \"parents\": [{\"type\": \"Nitrile::Group\", \"id\": \"auditor\"}]},\n  {\"uid\": {\"type\": \"Nitrile::Operator\", \"id\": \"dave\"}, \"attrs\": {},\n   \"parents\": [{\"type\": \"Nitrile::Group\", \"id\": \"oncall\"}]",
    );
    std::fs::write(
        dir.path().join("freeze.cedar"),
        "forbid (principal in Nitrile::Group::\"oncall\", action == Nitrile::Action::\"host.drain\", resource == Nitrile::Host::\"h2\");\n",
    )
    .unwrap();
    let new = Bundle::load(dir.path()).unwrap();
    let lines: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
    // Every fleet host but h2 (forbidden now) is granted one by one.
    let mut expected = vec!["- oncall  host.drain  resource-set fleet  (operator only)".to_owned()];
    expected.extend(
        [1, 3, 4, 5, 6, 7, 8].map(|h| format!("+ oncall  host.drain  host h{h}  (operator only)")),
    );
    expected.push("+ member  operator/dave  in group oncall".to_owned());
    assert_eq!(lines, expected);
}
