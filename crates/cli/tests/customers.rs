//! Customers on a two-host cell, through the placement service only: `nitrile
//! up --hosts 2`, an image imported by customer acme (bad uploads refused
//! with nothing left in the image store), two instances placed on different
//! hosts with their published endpoints shown, stop, start and terminate,
//! another customer refused at step entitlement (journaled), and
//! placement's journal in the audit log.

mod cell;

use std::collections::BTreeSet;
use std::path::Path;

use cell::Cell;

/// The files of the image store, by path.
fn store_files(dir: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn customers_run_their_own_instances_through_placement_on_two_hosts() {
    let built = guest_or_skip!();
    let cell = Cell::up_with_hosts(2);
    let acme = cell.customer("acme");
    let globex = cell.customer("globex");
    let kernel = built.kernel.display().to_string();
    let initramfs = built.initramfs.display().to_string();
    let cmdline = built.cmdline.as_str().to_owned();
    let before = store_files(&cell.images_dir());

    // Bad uploads: refused with a clear error, nothing left in the store.
    let tmp = tempfile::tempdir().unwrap();
    let truncated = tmp.path().join("vmlinux.truncated");
    let whole = std::fs::read(&built.kernel).unwrap();
    std::fs::write(&truncated, &whole[..whole.len() / 2]).unwrap();
    let out = cell.nitrile(
        &acme,
        &[
            "customer",
            "image",
            "import",
            "--kernel",
            truncated.to_str().unwrap(),
            "--initramfs",
            &initramfs,
            "--cmdline",
            &cmdline,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a truncated kernel was imported");
    assert!(
        err.contains("customer-image.import") && err.contains("kernel"),
        "{err}"
    );
    assert_eq!(store_files(&cell.images_dir()), before);

    let wrong = "ab".repeat(32);
    let out = cell.nitrile(
        &acme,
        &[
            "customer",
            "image",
            "import",
            "--kernel",
            &kernel,
            "--initramfs",
            &initramfs,
            "--cmdline",
            &cmdline,
            "--digest",
            &wrong,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong digest was imported");
    assert!(err.contains("digest"), "{err}");
    assert_eq!(store_files(&cell.images_dir()), before);

    let oversized = tmp.path().join("initramfs.big");
    let f = std::fs::File::create(&oversized).unwrap();
    f.set_len(nitrile_placed_api::upload::MAX_INITRAMFS + 1)
        .unwrap();
    let out = cell.nitrile(
        &acme,
        &[
            "customer",
            "image",
            "import",
            "--kernel",
            &kernel,
            "--initramfs",
            oversized.to_str().unwrap(),
            "--cmdline",
            &cmdline,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an oversized initramfs was imported");
    assert!(
        err.contains("initramfs") && err.contains("at most"),
        "{err}"
    );
    assert_eq!(store_files(&cell.images_dir()), before);

    // The sample image, imported by acme.
    let image = json(&cell.ok(
        &acme,
        &[
            "customer",
            "image",
            "import",
            "--kernel",
            &kernel,
            "--initramfs",
            &initramfs,
            "--cmdline",
            &cmdline,
            "-o",
            "json",
        ],
    ));
    let digest = image["digest"].as_str().unwrap().to_owned();
    let listed = json(&cell.ok(&acme, &["customer", "image", "list", "-o", "json"]));
    assert_eq!(listed[0]["digest"], digest.as_str());
    // globex sees none of acme's images, and cannot run one.
    let listed = json(&cell.ok(&globex, &["customer", "image", "list", "-o", "json"]));
    assert_eq!(listed.as_array().unwrap().len(), 0, "{listed}");
    let out = cell.nitrile(&globex, &["customer", "image", "describe", &digest]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step entitlement"), "{err}");

    // Two instances land on different hosts.
    let web1 = json(&cell.ok(
        &acme,
        &[
            "customer",
            "run",
            "web1",
            "--image",
            &digest,
            "--publish",
            "22",
            "-o",
            "json",
        ],
    ));
    let web2 = json(&cell.ok(
        &acme,
        &["customer", "run", "web2", "--image", &digest, "-o", "json"],
    ));
    assert_ne!(web1["host"], web2["host"], "{web1} {web2}");
    assert_eq!(web1["vni"], web2["vni"]);
    assert_ne!(web1["address"], web2["address"]);
    let published = web1["published"].as_array().unwrap();
    assert_eq!(published.len(), 1, "{web1}");
    assert_eq!(published[0]["instance_port"], 22);
    let listed = json(&cell.ok(&acme, &["customer", "list", "-o", "json"]));
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let table = cell.ok(&acme, &["customer", "list"]);
    assert!(table.contains("22->127.0.0.1:"), "{table}");
    let described = json(&cell.ok(&acme, &["customer", "describe", "web1", "-o", "json"]));
    assert_eq!(described["published"], web1["published"]);
    assert_eq!(described["state"], "running");

    // globex cannot reach acme's instance: the token service refuses its
    // token for acme's resource at step entitlement, and journals it.
    let out = cell.nitrile(
        &globex,
        &[
            "token",
            "request",
            "--op",
            "customer-instance.terminate",
            "--resource",
            "instance/acme--web1",
            "--audience",
            "placement",
        ],
    );
    assert!(
        !out.status.success(),
        "globex got a token for acme's instance"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("entitlement"), "{err}");
    let refused = cell.journal(&cell.tokend_journal()).into_iter().any(|r| {
        r["principal"] == "nitrile://local/customer/globex"
            && r["step"] == "entitlement"
            && r.to_string().contains("acme--web1")
    });
    assert!(refused, "no journaled entitlement refusal of globex");
    // And its own name space has no web1.
    let out = cell.nitrile(&globex, &["customer", "describe", "web1"]);
    assert!(!out.status.success());

    // Stop, start and terminate web2.
    let stopped = json(&cell.ok(&acme, &["customer", "stop", "web2", "-o", "json"]));
    assert_eq!(stopped["state"], "stopped");
    let started = json(&cell.ok(&acme, &["customer", "start", "web2", "-o", "json"]));
    assert_eq!(started["state"], "running");
    let gone = json(&cell.ok(
        &acme,
        &["customer", "terminate", "web2", "--yes", "-o", "json"],
    ));
    assert_eq!(gone["state"], "terminated");
    let listed = json(&cell.ok(&acme, &["customer", "list", "-o", "json"]));
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    // Every host learnt the other's tunnel endpoint and the routes.
    let placed = cell.journal(&cell.placed_journal());
    assert!(
        placed
            .iter()
            .any(|r| r.to_string().contains("customer-instance.run")),
        "placement journaled no run"
    );
    assert!(
        !placed
            .iter()
            .any(|r| r.to_string().contains("network.update to host")),
        "a network push failed: {placed:#?}"
    );
    for host in ["h1", "h2"] {
        let records = cell.journal(&cell.journal_of_host(host));
        assert!(
            records
                .iter()
                .any(|r| r.to_string().contains("network.update") && r["outcome"] == "executed"),
            "{host} got no network.update"
        );
    }
    cell.ok(&acme, &["customer", "terminate", "web1", "--yes"]);
}
