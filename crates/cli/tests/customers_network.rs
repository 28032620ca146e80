//! A customer's day on `nitrile up --hosts 2`, as a new customer would
//! live it, through the CLI only: import an image, run two instances (they
//! land on different hosts) with the customer's SSH key, log in to one
//! through the port it publishes on its host, and from it reach the other
//! by its private address. A capture of the wire between the two hosts
//! during that session holds no trace of a marker the session sent; a
//! capture on the instance's tap inside its host's data path does. Another
//! customer's instance reaches neither. The instance identity document the
//! instance reads from its metadata service verifies with the cell's CA
//! (`nitrile instance verify-identity`) and a changed byte does not.
//! web1's image has a root disk: web1 boots with its own copy in a volume
//! under acme's key, reads the disk's file, and neither that file nor what
//! web1 writes is in the volume's file on the host; another customer cannot
//! run that image under acme's key; terminate crypto-erases the volume.
//!
//! Prints `SKIPPED: <reason>` without root, QEMU, the guest image, ssh or
//! tcpdump.

mod cell;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cell::Cell;
use sha2::Digest as _;

const MARKER: &str = "NITRILE-CUSTOMER-MARKER-8d21e4";
const ROOT_MARKER: &str = "NITRILE-ROOT-DISK-FILE-5c07a1";
const WRITTEN_MARKER: &str = "NITRILE-ROOT-DISK-WRITTEN-e93b40";
const BOOT: Duration = Duration::from_secs(300);

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
}

/// The value of `key = "..."` in a config file.
fn config_value(file: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| panic!("no {key} in {}", file.display()))
}

fn tap_of(instance: &str) -> String {
    let h = sha2::Sha256::digest(instance.as_bytes());
    format!(
        "nt{}",
        h.iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn ssh(key: &Path, endpoint: &str, command: &str) -> (bool, String, String) {
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    let out = Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args([
            "-p",
            port,
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=20",
            "-o",
            "LogLevel=ERROR",
            &format!("root@{host}"),
            command,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tcpdump (in namespace `ns` if given) writing to `file`, once it listens.
fn capture(ns: Option<&str>, iface: &str, filter: &str, file: &Path) -> Child {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "tcpdump"]);
            c
        }
        None => Command::new("tcpdump"),
    };
    let log = file.with_extension("log");
    let child = cmd
        .args([
            "-i",
            iface,
            "--immediate-mode",
            "-U",
            "-s",
            "0",
            "-Z",
            "root",
            "-w",
        ])
        .arg(file)
        .args(filter.split_whitespace())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("listening on")
    {
        assert!(Instant::now() < deadline, "tcpdump did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn stop_capture(child: Child, file: &Path) -> Vec<u8> {
    std::thread::sleep(Duration::from_millis(500));
    cell::signal(child.id(), nix::sys::signal::Signal::SIGINT);
    let mut child = child;
    let _ = child.wait();
    std::fs::read(file).unwrap()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn a_customer_logs_in_and_reaches_its_other_instance_over_an_encrypted_wire() {
    let built = guest_or_skip!();
    for tool in ["ssh", "ssh-keygen", "tcpdump", "ip", "mke2fs"] {
        if !which(tool) {
            cell::skipped(&format!("needs {tool} (scripts/setup.sh installs it)"));
            return;
        }
    }
    let cell = Cell::up_with_hosts(2);
    let acme = cell.customer("acme");
    let globex = cell.customer("globex");
    let keys = cell.root().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for who in ["acme", "globex"] {
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", who, "-f"])
            .arg(keys.join(who))
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let acme_key = keys.join("acme");
    let globex_key = keys.join("globex");
    let echo = keys.join("echo.sh");
    std::fs::write(
        &echo,
        "#!/bin/sh\nwhile true; do nc -l -p 7777 -e /bin/cat; done\n",
    )
    .unwrap();

    // A root disk: an ext4 file system of 16 MiB holding one file.
    let root_files = keys.join("root-files");
    std::fs::create_dir_all(&root_files).unwrap();
    std::fs::write(root_files.join("marker"), format!("{ROOT_MARKER}\n")).unwrap();
    let root_disk = keys.join("root.img");
    std::fs::File::create(&root_disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let made = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&root_files)
        .arg(&root_disk)
        .status()
        .unwrap();
    assert!(made.success());

    // The image, imported by each customer; and with the root disk.
    let import = |config: &Path, root: Option<&Path>| {
        cell.import_image(config, &built, built.cmdline.as_str(), root)
    };
    let digest = import(&acme, None);
    assert_eq!(import(&globex, None), digest, "content-addressed");
    let rooted = import(&acme, Some(&root_disk));
    assert_ne!(rooted, digest, "the root disk is part of the digest");
    assert_eq!(import(&globex, Some(&root_disk)), rooted);
    cell.ok(&acme, &["kms-key", "create", "acme-root"]);

    // Without a key of its own named, a root disk image does not run;
    // globex cannot run it under acme's key (the key service refuses
    // placement's use of it for a volume of globex's); neither leaves a
    // volume or an instance behind.
    let refused = |config: &Path, name: &str, extra: &[&str]| {
        let mut args = vec!["customer", "run", name, "--image", &rooted];
        args.extend_from_slice(extra);
        let out = cell.nitrile(config, &args);
        assert!(!out.status.success(), "{name} ran");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&acme, "nokey", &[]);
    assert!(
        err.contains("kms_key_needed") || err.contains("--kms-key"),
        "{err}"
    );
    let err = refused(&globex, "steal", &["--kms-key", "acme-root"]);
    assert!(err.contains("customer's key"), "{err}");
    let volumes = cell.root().join("state/volumes");
    for gone in ["acme--nokey-root", "globex--steal-root"] {
        assert!(!volumes.join(gone).exists(), "{gone} left behind");
    }
    let listed = json(&cell.ok(&globex, &["customer", "list", "-o", "json"]));
    assert_eq!(listed.as_array().unwrap().len(), 0, "{listed}");

    let run = |config: &Path, name: &str, key: &Path, extra: &[&str]| {
        let image = if name == "web1" { &rooted } else { &digest };
        let mut args = vec!["customer", "run", name, "--image", image, "--ssh-key"];
        let pubkey = key.with_extension("pub");
        args.push(pubkey.to_str().unwrap());
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", "json"]);
        json(&cell.ok(config, &args))
    };
    let web1 = run(
        &acme,
        "web1",
        &acme_key,
        &["--publish", "22", "--kms-key", "acme-root"],
    );
    assert_eq!(web1["root_volume"]["volume"], "acme--web1-root", "{web1}");
    assert_eq!(web1["root_volume"]["kms_key"], "acme-root", "{web1}");
    let web2 = run(
        &acme,
        "web2",
        &acme_key,
        &["--publish", "22", "--user-data", echo.to_str().unwrap()],
    );
    assert_ne!(web1["host"], web2["host"], "{web1} {web2}");
    let db1 = run(&globex, "db1", &globex_key, &["--publish", "22"]);
    let endpoint =
        |v: &serde_json::Value| v["published"][0]["endpoint"].as_str().unwrap().to_owned();
    let host_of = |v: &serde_json::Value| v["host"].as_str().unwrap().to_owned();
    let web2_addr = web2["address"].as_str().unwrap().to_owned();
    let web1_addr = web1["address"].as_str().unwrap().to_owned();

    let state = cell.root().join("state");
    for (v, instance) in [
        (&web1, "acme--web1"),
        (&web2, "acme--web2"),
        (&db1, "globex--db1"),
    ] {
        let serial = state
            .join("hosts")
            .join(host_of(v))
            .join("vms")
            .join(instance)
            .join("serial.log");
        assert!(
            cell::wait_for_line(&serial, "NITRILE-SSH-READY", BOOT),
            "{instance} did not come up: {}",
            String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default())
        );
    }

    // The wire between the hosts: their tunnel ports on loopback, from
    // what each host announces in `host describe`.
    let alice = cell.root().join("state/clients/operator-alice.toml");
    let mut ports = Vec::new();
    for host in ["h1", "h2"] {
        let d = json(&cell.ok(&alice, &["host", "describe", "--host", host, "-o", "json"]));
        let ep = d["network"]["announcement"]["endpoint"].as_str().unwrap();
        ports.push(ep.rsplit_once(':').unwrap().1.to_owned());
    }
    let web1_host = host_of(&web1);
    let netns = config_value(
        &state.join("hosts").join(&web1_host).join("hostd.toml"),
        "netns",
    );
    let captures = cell.root().join("captures");
    std::fs::create_dir_all(&captures).unwrap();
    let (wire_file, inside_file) = (captures.join("wire.pcap"), captures.join("inside.pcap"));
    let wire = capture(
        None,
        "lo",
        &format!("udp and ( port {} or port {} )", ports[0], ports[1]),
        &wire_file,
    );
    let inside = capture(Some(&netns), &tap_of("acme--web1"), "", &inside_file);

    let (ok, out, err) = ssh(
        &acme_key,
        &endpoint(&web1),
        &format!(
            "ping -c 2 -W 5 {web2_addr} >/dev/null && echo ping-ok; echo {MARKER} | nc -w 5 {web2_addr} 7777"
        ),
    );
    let wire_bytes = stop_capture(wire, &wire_file);
    let inside_bytes = stop_capture(inside, &inside_file);
    assert!(ok, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("ping-ok"),
        "web1 did not reach web2: {out} {err}"
    );
    assert!(out.contains(MARKER), "web2 did not echo: {out} {err}");
    assert!(wire_bytes.len() > 24 + 10 * 60, "nothing crossed the wire");
    assert!(
        !contains(&wire_bytes, MARKER),
        "the marker crossed the wire in the clear"
    );
    assert!(
        contains(&inside_bytes, MARKER),
        "the positive control saw no marker"
    );

    // globex's db1 reaches none of acme's instances (each customer's
    // network has the same range: db1 may hold web1's address in its own
    // network, so only acme's other addresses are tried), and globex's key
    // opens none of them.
    let db1_addr = db1["address"].as_str().unwrap().to_owned();
    let targets: Vec<&String> = [&web1_addr, &web2_addr]
        .into_iter()
        .filter(|a| **a != db1_addr)
        .collect();
    assert!(!targets.is_empty());
    let mut script = String::new();
    for a in &targets {
        script.push_str(&format!(
            "ping -c 2 -W 2 {a} >/dev/null && echo reached-icmp-{a}; \
             echo x | nc -w 3 {a} 7777 && echo reached-tcp-{a}; "
        ));
    }
    script.push_str("imds get /latest/meta-data/instance-id");
    let (ok, out, _) = ssh(&globex_key, &endpoint(&db1), &script);
    assert!(ok, "{out}");
    assert!(!out.contains("reached"), "globex reached acme: {out}");
    assert!(out.contains("globex--db1"), "{out}");
    let (ok, _, _) = ssh(&globex_key, &endpoint(&web1), "true");
    assert!(!ok, "globex's key opened acme's instance");

    // web1's identity document, checked with the CA alone.
    let (ok, doc, err) = ssh(
        &acme_key,
        &endpoint(&web1),
        "imds get /latest/dynamic/instance-identity/document",
    );
    assert!(ok, "{err}");
    let doc_file = cell.root().join("identity.json");
    std::fs::write(&doc_file, &doc).unwrap();
    let ca: PathBuf = state.join("pki/ca.pem");
    // The CA certificate of the customer's client config, by default.
    let verified = cell.ok(
        &acme,
        &["instance", "verify-identity", doc_file.to_str().unwrap()],
    );
    assert!(verified.contains("acme--web1"), "{verified}");
    assert!(
        verified.contains(&format!("nitrile://local/host/{web1_host}")),
        "{verified}"
    );
    let mut v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let sig = v["signature"].as_str().unwrap().to_owned();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    v["signature"] = format!("{flipped}{}", &sig[1..]).into();
    std::fs::write(&doc_file, v.to_string()).unwrap();
    let out = cell.nitrile(
        &acme,
        &[
            "instance",
            "verify-identity",
            doc_file.to_str().unwrap(),
            "--ca",
            ca.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "a changed signature verified");

    // web1's root disk: the file is there, and what web1 writes stays;
    // neither is in the volume's file on the host, which is under acme's
    // key.
    let (ok, out, err) = ssh(
        &acme_key,
        &endpoint(&web1),
        &format!(
            "cat /mnt/rootdisk/marker && echo {WRITTEN_MARKER} > /mnt/rootdisk/written && sync"
        ),
    );
    let web1_serial = state
        .join("hosts")
        .join(&web1_host)
        .join("vms/acme--web1/serial.log");
    let serial_text =
        || String::from_utf8_lossy(&std::fs::read(&web1_serial).unwrap_or_default()).into_owned();
    assert!(
        ok,
        "stdout: {out}\nstderr: {err}\nserial: {}",
        serial_text()
    );
    assert!(out.contains(ROOT_MARKER), "the root disk's file: {out}");
    let root_volume = volumes.join("acme--web1-root");
    let record = json(&std::fs::read_to_string(root_volume.join("volume.json")).unwrap());
    assert_eq!(record["kms_key"], "acme-root", "{record}");
    let ciphertext = std::fs::read(root_volume.join("disk.img")).unwrap();
    assert!(ciphertext.len() > 1 << 20);
    for m in [ROOT_MARKER, WRITTEN_MARKER] {
        assert!(
            !contains(&ciphertext, m),
            "{m} in the clear in the volume file"
        );
    }
    let key_record = state.join("kms/store/volumes/acme--web1-root.json");
    assert!(
        key_record.exists(),
        "no key record at {}",
        key_record.display()
    );

    for (config, name) in [(&acme, "web1"), (&acme, "web2"), (&globex, "db1")] {
        cell.ok(config, &["customer", "terminate", name, "--yes"]);
    }
    // Terminated, web1's root volume is crypto-erased: its key record at
    // the key service and its ciphertext are gone.
    assert!(!key_record.exists(), "the volume's key survived terminate");
    assert!(!root_volume.exists(), "the volume survived terminate");
}
