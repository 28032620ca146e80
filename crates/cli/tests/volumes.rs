//! The volume verbs against the real binary and a whole cell (`nitrile up`:
//! the key service `nitrile kms` and the host agent as processes of their
//! own, the host's config naming the key service and the cell's volume
//! store): `nitrile volume create|list|describe|delete` and the
//! `instance launch --volume` shorthand, what they print, what they are
//! refused, and the records the host agent and the key service journal for
//! them. No guest is booted: the launch here is refused for its image after
//! its volume was created, which is the case the shorthand must report.

// The test prints for the person running it; the rule that everything goes
// through the output layer is for the binary.
#![allow(clippy::disallowed_macros)]

use nitrile_api::admin::{VolumeDescription, VolumeList, VolumeState};
use serde_json::Value;

mod cell;
use cell::Cell;

const PLACEMENT: &str = "nitrile://local/service/placement";

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// For each request record of `principal` asking for exactly
/// `operations` on exactly `resources` (in any order), in journal order:
/// the record and the outcome journaled for it (`executed`, `failed`), or
/// `none` when there is none.
fn requests<'a>(
    journal: &'a [Value],
    principal: &str,
    operations: &[&str],
    resources: &[&str],
) -> Vec<(&'a Value, String)> {
    let sorted = |v: Vec<String>| {
        let mut v = v;
        v.sort();
        v
    };
    let strings = |v: &Value| -> Vec<String> {
        sorted(
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        )
    };
    let want_ops = sorted(operations.iter().map(|s| (*s).to_owned()).collect());
    let want_res = sorted(resources.iter().map(|s| (*s).to_owned()).collect());
    journal
        .iter()
        .filter(|r| {
            r["kind"] == "request"
                && r["principal"] == principal
                && strings(&r["operations"]) == want_ops
                && strings(&r["resources"]) == want_res
        })
        .map(|req| {
            let outcome = journal
                .iter()
                .find(|r| r["kind"] == "outcome" && r["request_id"] == req["request_id"])
                .and_then(|r| r["outcome"].as_str())
                .unwrap_or("none")
                .to_owned();
            (req, outcome)
        })
        .collect()
}

/// The outcomes of the placement service's requests for `operation` on
/// `resource`, in journal order.
fn outcomes(journal: &[Value], operation: &str, resource: &str) -> Vec<String> {
    requests(journal, PLACEMENT, &[operation], &[resource])
        .into_iter()
        .map(|(_, o)| o)
        .collect()
}

#[test]
fn the_volume_verbs_create_list_describe_and_crypto_erase_through_a_whole_cell() {
    let cell = Cell::up();
    let p = &cell.placement;
    let alice = &cell.alice;
    let store = cell.state.join("volumes");

    // create, as JSON and as a table.
    let json = cell.ok(
        p,
        &["volume", "create", "data", "--size", "16M", "-o", "json"],
    );
    let data: VolumeDescription = serde_json::from_str(&json).unwrap();
    assert_eq!(data.volume.as_str(), "data");
    assert_eq!((data.size_mib, data.kms_key.as_str()), (16, "default"));
    assert_eq!(
        (data.state, data.attachment.as_ref()),
        (VolumeState::Available, None)
    );
    assert!(["luks", "xts"].contains(&data.format.as_str()), "{data:?}");
    let table = cell.ok(p, &["volume", "create", "logs", "--size", "1G"]);
    for line in [
        "volume       logs",
        "size         1 GiB",
        "state        available",
        "attached to  -",
        "kms key      kms-key/default",
    ] {
        assert!(table.lines().any(|l| l == line), "{line:?} not in\n{table}");
    }
    // `nitrile up` gave the host agent the cell's volume store.
    assert!(store.join("data").is_dir() && store.join("logs").is_dir());

    // list and describe: metadata, which the on-call operator may read too.
    let list = cell.ok(alice, &["volume", "list"]);
    let mut lines = list.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("VOLUME")
            && header.contains("ATTACHED TO")
            && header.contains("KMS KEY"),
        "{list}"
    );
    let row = lines
        .find(|l| l.starts_with("data "))
        .unwrap_or_else(|| panic!("{list}"));
    for cell_text in ["16 MiB", "available", "default", data.format.as_str()] {
        assert!(row.contains(cell_text), "{cell_text:?} not in {row:?}");
    }
    let list: VolumeList =
        serde_json::from_str(&cell.ok(alice, &["volume", "list", "-o", "json"])).unwrap();
    let ids: Vec<&str> = list.volumes.iter().map(|v| v.volume.as_str()).collect();
    assert_eq!(ids, ["data", "logs"]);
    let described: VolumeDescription =
        serde_json::from_str(&cell.ok(alice, &["volume", "describe", "data", "-o", "json"]))
            .unwrap();
    assert_eq!(described, data);

    // The on-call operator may not delete: the token service refuses, and
    // nothing reaches the host.
    let out = cell.nitrile(alice, &["volume", "delete", "data", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("tokend refused") && err.contains("step entitlement"),
        "{err}"
    );

    // An id in use, a key the key service does not have: refused by the
    // host, naming the step and the audit record; nothing is made.
    let out = cell.nitrile(p, &["volume", "create", "data", "--size", "16M"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("host h1 refused volume.create at step state") && err.contains("audit record"),
        "{err}"
    );
    let out = cell.nitrile(
        p,
        &[
            "volume",
            "create",
            "other",
            "--size",
            "16M",
            "--kms-key",
            "nosuch",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("host h1 refused volume.create") && err.contains("nosuch"),
        "{err}"
    );
    assert!(!store.join("other").exists());

    // Bad sizes and ids are usage errors: no token is asked for.
    for args in [
        &["volume", "create", "x", "--size", "0"][..],
        &["volume", "create", "x", "--size", "17T"],
        &["volume", "create", "x"],
        &["volume", "create", "../x", "--size", "1M"],
        &["volume", "attach", "data"],
    ] {
        let out = cell.nitrile(p, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }

    // The launch shorthand: `new=8M` is created first, then the launch
    // (with `data` too and the volume token) is refused for its image. The
    // error says that `new` was created and is kept, and how to delete it.
    let unknown_image = "cd".repeat(32);
    let out = cell.nitrile(
        p,
        &[
            "instance",
            "launch",
            "web1",
            "--image",
            &unknown_image,
            "--volume",
            "new=8M",
            "--volume",
            "data",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("host h1 refused instance.launch at step state")
            && err.contains("volume new was created for it on host h1")
            && err.contains("`nitrile volume delete new --host h1`")
            && !err.contains("volume data was created"),
        "{err}"
    );
    for (id, size) in [("new", 8), ("data", 16)] {
        let v: VolumeDescription =
            serde_json::from_str(&cell.ok(p, &["volume", "describe", id, "-o", "json"])).unwrap();
        assert_eq!(
            (v.size_mib, v.state),
            (size, VolumeState::Available),
            "{id}"
        );
    }
    // A launch whose sizes are wrong makes no volume at all.
    let out = cell.nitrile(
        p,
        &[
            "instance",
            "launch",
            "web2",
            "--image",
            &unknown_image,
            "--volume",
            "never=8M",
            "--vcpus",
            "0",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!store.join("never").exists());

    // A start describes the instance first (to learn its volumes).
    let out = cell.nitrile(p, &["instance", "start", "ghost"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("host h1 refused instance.describe at step state"),
        "{err}"
    );

    // delete: not on a terminal, so no question; the answer says deleted,
    // the volume and its files are gone.
    let deleted: VolumeDescription =
        serde_json::from_str(&cell.ok(p, &["volume", "delete", "data", "-o", "json"])).unwrap();
    assert_eq!(
        (deleted.volume.as_str(), deleted.state),
        ("data", VolumeState::Deleted)
    );
    let table = cell.ok(p, &["volume", "delete", "new"]);
    assert!(
        table.lines().any(|l| l == "state        deleted"),
        "{table}"
    );
    assert!(!store.join("data").exists() && !store.join("new").exists());
    let out = cell.nitrile(p, &["volume", "describe", "data"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("host h1 refused volume.describe at step state"),
        "{}",
        stderr(&out)
    );
    let list: VolumeList =
        serde_json::from_str(&cell.ok(p, &["volume", "list", "-o", "json"])).unwrap();
    let ids: Vec<&str> = list.volumes.iter().map(|v| v.volume.as_str()).collect();
    assert_eq!(ids, ["logs"]);

    // The host journaled each call before it ran, and how it ended: the
    // second create of `data` and the create under a missing key failed,
    // and the launch, whose request record names the grants of both its
    // tokens (the launch on the host, volume.attach on both volumes, the
    // volume token's id in its detail), did not run.
    let host = cell.journal(&cell.host_journal());
    assert_eq!(
        outcomes(&host, "volume.create", "volume/data"),
        ["executed", "failed"]
    );
    for (op, volume) in [
        ("volume.create", "volume/logs"),
        ("volume.create", "volume/new"),
        ("volume.delete", "volume/data"),
        ("volume.delete", "volume/new"),
    ] {
        assert_eq!(outcomes(&host, op, volume), ["executed"], "{op} {volume}");
    }
    assert_eq!(outcomes(&host, "volume.create", "volume/other"), ["failed"]);
    let launch = requests(
        &host,
        PLACEMENT,
        &["instance.launch", "volume.attach"],
        &["host/h1", "volume/new", "volume/data"],
    );
    assert_eq!(launch.len(), 1, "{host:#?}");
    let (record, outcome) = &launch[0];
    assert_eq!(outcome, "failed");
    assert!(
        record["detail"]["second_token_id"].is_string(),
        "{record:#}"
    );
    // Nothing of alice's reached the host but reads.
    assert!(
        !host
            .iter()
            .any(|r| r["principal"] == "nitrile://local/operator/alice"
                && r["operations"] == serde_json::json!(["volume.delete"])),
        "alice's refused delete reached the host"
    );

    // The key service journaled making and destroying the keys.
    let kms: Vec<String> = cell
        .journal(&cell.state.join("kms/journal"))
        .iter()
        .map(Value::to_string)
        .collect();
    for (op, volume) in [
        ("volume.create", "volume/data"),
        ("volume.delete", "volume/data"),
        ("volume.delete", "volume/new"),
    ] {
        assert!(
            kms.iter().any(|r| r.contains(op) && r.contains(volume)),
            "the key service's journal has no {op} of {volume}"
        );
    }
    cell.verify_journal(&cell.host_journal());
}
