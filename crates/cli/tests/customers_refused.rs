//! What placement refuses, on `nitrile up --hosts 2` with a sample bundle
//! whose per-customer quota of `customer-instance.run` is 2 (edited and
//! signed again by the cell's two local reviewers): an operator gets no
//! token for placement (token service, step entitlement) and a call with
//! a token she does have is refused by placement itself (journaled); acme
//! cannot run globex's image (step entitlement, journaled); acme's third
//! run is refused at step quota while globex, another principal of the
//! same group, still runs; and placement's journal reaches the audit log.

mod cell;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cell::Cell;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Gives `<state>/entitlements` a quota of `max` runs per customer per
/// hour, raises its serial and has both local reviewers sign it again.
fn set_run_quota(cell: &Cell, max: u32) {
    let bundle = cell.state.join("entitlements");
    let quotas = bundle.join("quotas.toml");
    let text = std::fs::read_to_string(&quotas).unwrap();
    let run = "operation = \"customer-instance.run\"\nmax_resources = 8\n";
    assert!(text.contains(run), "{text}");
    std::fs::write(
        &quotas,
        text.replace(
            run,
            &format!("operation = \"customer-instance.run\"\nmax_resources = {max}\n"),
        ),
    )
    .unwrap();
    let serial = bundle.join("bundle.toml");
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.contains("serial = 1\n"), "{text}");
    std::fs::write(&serial, text.replace("serial = 1\n", "serial = 2\n")).unwrap();
    for name in ["reviewer-1", "reviewer-2"] {
        let key = cell.state.join("reviewers").join(format!("{name}.key"));
        let out = std::process::Command::new(cell::NITRILE)
            .args(["entitlements", "sign", "--key"])
            .arg(&key)
            .args(["--reviewer", name])
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Calls placement's `GET /v1/instances` with alice's certificate and
/// `token`; the status and body.
fn call_placement_as_alice(cell: &Cell, token: &str) -> (u16, String) {
    let client = nitrile_cell::ClientConfig::load(&cell.customer("acme")).unwrap();
    let addr = client
        .endpoints
        .placement
        .clone()
        .expect("endpoints.placement");
    let pki = cell.state.join("pki");
    let roots = nitrile_pki::tls::CaRoots::load(&pki.join("ca.pem")).unwrap();
    let me = nitrile_pki::tls::TlsIdentity::load(
        &pki.join("operator-alice.pem"),
        &pki.join("operator-alice.key"),
    )
    .unwrap();
    let tls = nitrile_pki::tls::client_config(&roots, &me).unwrap();
    let placement =
        nitrile_placed_api::placement_principal(&nitrile_api::Name::new("local").unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = nitrile_net::Client::connect(&addr, &placement, Arc::clone(&tls))
            .await
            .unwrap();
        let req = http::Request::builder()
            .method(http::Method::GET)
            .uri("/v1/instances")
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(bytes::Bytes::new())
            .unwrap();
        let resp = c.send(req).await.unwrap();
        (
            resp.status.as_u16(),
            String::from_utf8_lossy(&resp.body).into_owned(),
        )
    })
}

#[test]
fn placement_refuses_operators_other_customers_images_and_runs_beyond_the_quota() {
    let built = guest_or_skip!();
    let mut cell = Cell::up_with_hosts(2);
    cell.stop_up();
    set_run_quota(&cell, 2);
    cell.start_up();
    let acme = cell.customer("acme");
    let globex = cell.customer("globex");

    // An operator gets no token for placement's customer API ...
    let out = cell.nitrile(
        &cell.alice,
        &[
            "token",
            "request",
            "--op",
            "customer-instance.list",
            "--resource",
            "placement/local",
            "--audience",
            "placement",
        ],
    );
    assert!(!out.status.success(), "alice got a placement token");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("entitlement"), "{err}");
    assert!(
        cell.journal(&cell.tokend_journal()).iter().any(|r| {
            r["principal"] == "nitrile://local/operator/alice"
                && r["step"] == "entitlement"
                && r.to_string().contains("customer-instance.list")
        }),
        "tokend journaled no refusal of alice"
    );
    // ... and placement refuses her with a token she does have.
    let token = cell.ok(
        &cell.alice,
        &[
            "token",
            "request",
            "--op",
            "host.describe",
            "--resource",
            "host/h1",
            "--audience",
            "h1",
        ],
    );
    let (status, body) = call_placement_as_alice(&cell, token.trim());
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not a customer"), "{body}");
    let refused: Vec<serde_json::Value> = cell
        .journal(&cell.placed_journal())
        .into_iter()
        .filter(|r| r["principal"] == "nitrile://local/operator/alice")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert_eq!(refused[0]["step"], "entitlement", "{refused:#?}");
    assert!(
        refused[0].to_string().contains("customer-instance.list"),
        "{refused:#?}"
    );

    // acme cannot run globex's image.
    let cmdline = built.cmdline.as_str();
    let mine = cell.import_image(&acme, &built, cmdline, None);
    let theirs = cell.import_image(&globex, &built, &format!("{cmdline} globex=1"), None);
    assert_ne!(mine, theirs);
    // (Named q1: the token service charged the quota for instance/acme--q1
    // when it issued the token; the run below charges the same resource.)
    let out = cell.nitrile(&acme, &["customer", "run", "q1", "--image", &theirs]);
    assert!(!out.status.success(), "acme ran globex's image");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step entitlement"), "{err}");
    let refusal = cell
        .journal(&cell.placed_journal())
        .into_iter()
        .find(|r| {
            r["principal"] == "nitrile://local/customer/acme"
                && r["outcome"] == "failed"
                && r.to_string().contains("not_image_owner")
        })
        .expect("placement journaled no refusal of acme's run of globex's image");
    assert_eq!(refusal["detail"]["step"], "entitlement", "{refusal}");
    let listed = json(&cell.ok(&acme, &["customer", "list", "-o", "json"]));
    assert_eq!(listed.as_array().unwrap().len(), 0, "{listed}");

    // The quota: two runs of acme, the third refused at step quota; globex
    // still runs.
    for name in ["q1", "q2"] {
        cell.ok(&acme, &["customer", "run", name, "--image", &mine]);
    }
    let out = cell.nitrile(&acme, &["customer", "run", "q3", "--image", &mine]);
    assert!(!out.status.success(), "acme ran beyond its quota");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("quota"), "{err}");
    assert!(
        cell.journal(&cell.tokend_journal()).iter().any(|r| {
            r["principal"] == "nitrile://local/customer/acme"
                && r["step"] == "quota"
                && r.to_string().contains("acme--q3")
        }),
        "tokend journaled no quota refusal of acme"
    );
    let g1 = json(&cell.ok(
        &globex,
        &["customer", "run", "g1", "--image", &theirs, "-o", "json"],
    ));
    assert_eq!(g1["state"], "running", "{g1}");

    // Placement's journal reaches the audit log: carol sees its records of
    // acme's runs, shipped by service/placement, and the log verifies.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = cell.ok(
            &cell.carol,
            &[
                "audit",
                "tail",
                "--principal",
                "customer/acme",
                "-o",
                "json",
            ],
        );
        let shipped = out.lines().map(json).any(|e| {
            e["source"] == "nitrile://local/service/placement"
                && e.to_string().contains("customer-instance.run")
                && e.to_string().contains("acme--q2")
        });
        if shipped {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "placement's records never reached the log: {out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let verified = json(&cell.ok(&cell.carol, &["audit", "verify", "-o", "json"]));
    assert_eq!(verified["ok"], true, "{verified}");

    for (config, name) in [(&acme, "q1"), (&acme, "q2"), (&globex, "g1")] {
        cell.ok(config, &["customer", "terminate", name, "--yes"]);
    }
}
