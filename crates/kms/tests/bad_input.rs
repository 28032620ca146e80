//! Bad input to every endpoint of the key service (unknown fields, wrong
//! sizes, names with `../`, NUL, 10 kB names, wrong methods, query
//! strings) gets a 4xx with a clear reason and a journal record, and
//! creates nothing: no key, no volume record, no file.

mod svc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use nitrile_api::Operation;
use nitrile_api::wire::{Refusal, RefusalStep};
use nitrile_audit::RecordKind;
use svc::{Cell, send};

fn b64(n: usize) -> String {
    STANDARD.encode(vec![7u8; n])
}

#[tokio::test]
async fn claim3_bad_input_to_every_endpoint_is_refused_with_a_4xx_journaled_and_creates_nothing() {
    let cell = Cell::new();
    let running = cell.start().await;
    let long = "a".repeat(10 * 1024);
    let nul = "a\\u0000b";
    // Tokens that would be good for the well-formed requests, so that the
    // refusals are the input's, not the token's.
    let host_token = cell.token(
        "service/placement",
        "h1",
        &[
            Operation::VolumeCreate,
            Operation::VolumeAttach,
            Operation::VolumeDelete,
        ],
        &["volume/v1"],
    );
    let key_token = cell.token(
        "customer/acme",
        "kms",
        &[Operation::KmsKeyCreate, Operation::KmsKeyDisable],
        &["kms-key/k1"],
    );
    let unwrap_body = |wrapped: usize, recipient: usize| {
        format!(
            r#"{{"wrapped_key":"{}","recipient":"{}"}}"#,
            b64(wrapped),
            b64(recipient)
        )
    };
    let cases: Vec<(&str, &str, String, String, u16)> = vec![
        // generate
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/v1".into(),
            r#"{"kms_key":"default","size_mib":64}"#.into(),
            400,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/v1".into(),
            r#"{"kms_key":"../default"}"#.into(),
            400,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/v1".into(),
            format!(r#"{{"kms_key":"{nul}"}}"#),
            400,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/v1".into(),
            format!(r#"{{"kms_key":"{long}"}}"#),
            413,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/v1".into(),
            "not json".into(),
            400,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/..".into(),
            r#"{"kms_key":"default"}"#.into(),
            400,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/..%2Fkeys%2Fdefault".into(),
            r#"{"kms_key":"default"}"#.into(),
            400,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/a%00b".into(),
            r#"{"kms_key":"default"}"#.into(),
            400,
        ),
        (
            "host/h1",
            "POST",
            format!("/v1/volume-keys/{long}"),
            r#"{"kms_key":"default"}"#.into(),
            400,
        ),
        (
            "host/h1",
            "GET",
            "/v1/volume-keys/v1".into(),
            String::new(),
            405,
        ),
        // unwrap: wrong sizes, unknown fields
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/v1/unwrap".into(),
            unwrap_body(100, 31),
            400,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/v1/unwrap".into(),
            unwrap_body(100, 33),
            400,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/v1/unwrap".into(),
            unwrap_body(226, 32),
            400,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/v1/unwrap".into(),
            unwrap_body(0, 32),
            400,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/v1/unwrap".into(),
            unwrap_body(2000, 32),
            400,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/v1/unwrap".into(),
            format!(
                r#"{{"wrapped_key":"{}","recipient":"{}","extra":true}}"#,
                b64(100),
                b64(32)
            ),
            400,
        ),
        (
            "host/h1",
            "POST",
            "/v1/volume-keys/../unwrap".into(),
            unwrap_body(100, 32),
            400,
        ),
        // destroy
        (
            "host/h1",
            "DELETE",
            "/v1/volume-keys/v1".into(),
            r#"{"force":true}"#.into(),
            400,
        ),
        (
            "host/h1",
            "DELETE",
            "/v1/volume-keys/%00".into(),
            String::new(),
            400,
        ),
        // key management
        (
            "customer/acme",
            "POST",
            "/v1/keys".into(),
            r#"{"name":"k1","material":"AAAA"}"#.into(),
            400,
        ),
        (
            "customer/acme",
            "POST",
            "/v1/keys".into(),
            r#"{"name":"../k1"}"#.into(),
            400,
        ),
        (
            "customer/acme",
            "POST",
            "/v1/keys".into(),
            format!(r#"{{"name":"{nul}"}}"#),
            400,
        ),
        (
            "customer/acme",
            "POST",
            "/v1/keys".into(),
            format!(r#"{{"name":"{}"}}"#, "a".repeat(3000)),
            400,
        ),
        (
            "customer/acme",
            "POST",
            "/v1/keys".into(),
            format!(r#"{{"name":"{long}"}}"#),
            413,
        ),
        (
            "customer/acme",
            "GET",
            "/v1/keys/..".into(),
            String::new(),
            400,
        ),
        (
            "customer/acme",
            "GET",
            format!("/v1/keys/{long}"),
            String::new(),
            400,
        ),
        (
            "customer/acme",
            "POST",
            "/v1/keys/k1/disable".into(),
            r#"{"now":true}"#.into(),
            400,
        ),
        (
            "customer/acme",
            "POST",
            "/v1/keys/%2e%2e/enable".into(),
            String::new(),
            400,
        ),
        (
            "customer/acme",
            "POST",
            "/v1/keys/k1/schedule-deletion".into(),
            r#"{"days":"seven"}"#.into(),
            400,
        ),
        (
            "customer/acme",
            "POST",
            "/v1/keys/k1/schedule-deletion".into(),
            r#"{"days":7,"x":1}"#.into(),
            400,
        ),
        (
            "customer/acme",
            "POST",
            "/v1/keys/k1/cancel-deletion".into(),
            "[]".into(),
            400,
        ),
        (
            "customer/acme",
            "GET",
            "/v1/keys?owner=acme".into(),
            String::new(),
            400,
        ),
        (
            "customer/acme",
            "DELETE",
            "/v1/keys/k1".into(),
            String::new(),
            405,
        ),
        (
            "customer/acme",
            "POST",
            "/v1/keys/k1/export".into(),
            String::new(),
            404,
        ),
        (
            "customer/acme",
            "GET",
            "/v1/volume-keys".into(),
            String::new(),
            404,
        ),
    ];
    for (who, method, path, body, status) in &cases {
        let token = if who.starts_with("host/") {
            &host_token
        } else {
            &key_token
        };
        let mut client = cell.raw(&running, who).await;
        let resp = send(&mut client, method, path, Some(token), body.as_bytes()).await;
        let shown = format!(
            "{method} {} {}",
            &path[..path.len().min(60)],
            &body[..body.len().min(60)]
        );
        assert_eq!(resp.status.as_u16(), *status, "{shown}: {:?}", resp.body);
        let refusal: Refusal = serde_json::from_slice(&resp.body).expect("a refusal body");
        assert_eq!(refusal.step, RefusalStep::Request, "{shown}");
        assert!(refusal.reason.len() > 10, "{shown}: {}", refusal.reason);
        assert!(
            refusal.reason.len() <= nitrile_api::admin::MAX_REASON_LEN * 4,
            "{shown}"
        );
        let records = cell.journal();
        let seq = refusal.audit_seq.expect("journaled") as usize;
        assert_eq!(seq, records.len(), "{shown}");
        let record = &records[seq - 1];
        assert_eq!(record.kind, RecordKind::Refusal, "{shown}");
        assert_eq!(record.step, Some(RefusalStep::Request), "{shown}");
        assert_eq!(
            record.principal.as_ref().map(|p| p.to_string()),
            Some(svc::p(who).to_string())
        );
        let detail = record.detail.as_ref().unwrap();
        assert_eq!(detail["method"], *method, "{shown}");
        assert!(detail["path"].as_str().unwrap().len() <= nitrile_gate::MAX_RECORDED_PATH * 4);
    }
    // Nothing was made: the default key alone, no volume record, no file.
    assert!(running.kms.list_volumes().is_empty());
    let keys: Vec<String> = running
        .kms
        .list_keys()
        .iter()
        .map(|k| k.name.to_string())
        .collect();
    assert_eq!(keys, ["kms-key/default"]);
    let store = cell.config.store_dir();
    assert_eq!(std::fs::read_dir(store.join("volumes")).unwrap().count(), 0);
    let mut files: Vec<String> = std::fs::read_dir(store.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["default.json", "default.key"]);
    // Nothing ran: no request record besides the default key's own.
    let requests = cell
        .journal()
        .into_iter()
        .filter(|r| r.kind == RecordKind::Request && r.principal != Some(svc::p("service/kms")))
        .count();
    assert_eq!(requests, 0);
    running.stop().await;
}

#[tokio::test]
async fn a_body_larger_than_the_server_reads_is_refused_and_journaled() {
    let cell = Cell::new();
    let running = cell.start().await;
    let mut client = cell.raw(&running, "host/h1").await;
    let body = vec![b' '; nitrile_net::MAX_BODY + 1];
    let resp = send(&mut client, "POST", "/v1/volume-keys/v1", None, &body).await;
    assert_eq!(resp.status.as_u16(), 413);
    let last = cell.journal().pop().unwrap();
    assert_eq!(last.kind, RecordKind::Refusal);
    assert_eq!(last.step, Some(RefusalStep::Request));
    assert!(last.reason.unwrap().starts_with("unreadable_body"));
    running.stop().await;
}
