//! Instance networks with real guests: the Debian guest image booted under
//! QEMU on two hosts, each host's data path in its own namespace, the
//! tunnels between them WireGuard over loopback.
//!
//! - acme's `a1` (h1) and `a2` (h2) share VNI 100: the customer logs in to
//!   `a1` with its SSH key through the port `a1` publishes on h1, and from
//!   there reaches `a2` by its private address (ping, and a TCP echo of a
//!   marker). A capture of the tunnel datagrams between the hosts holds no
//!   trace of the marker; a capture on `a1`'s tap inside h1's data path
//!   does (the positive control).
//! - globex's `b1` (h1, VNI 101) reaches none of acme's addresses (ICMP,
//!   TCP), not with a forged source address, not after taking `a1`'s MAC
//!   address; its metadata service is its own.
//! - The identity document the metadata service serves verifies with the
//!   cell's CA and names the instance.
//!
//! Prints `SKIPPED: <reason>` without root, QEMU, ssh, tcpdump, the nitrile
//! binary or the guest image.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use nitrile_api::Name;
use nitrile_api::admin::{
    AdminRequest, HostDescription, InstanceDescription, LaunchRequest, Sha256Hex,
};
use nitrile_api::network::{
    MacAddr, NetworkAttachment, NetworkRoute, NetworkUpdate, SignedIdentityDocument,
};
use nitrile_hostd::network::{NetworkConfig, tap_name};
use nitrile_hostd::{BackendName, HypervisorConfig};
use support::guest::{Namespaces, find_qemu, wait_for_line};
use support::{TestCell, is_root, nitrile_binary};

mod support;

const ALICE: &str = "operator/alice";
const PLACEMENT: &str = "service/placement";
const MARKER: &str = "NITRILE-WIRE-MARKER-5f3c9a";
const BOOT: Duration = Duration::from_secs(300);

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn netns(host: &str) -> String {
    format!("nitrile-g{}-{host}", std::process::id() % 100_000)
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

struct Guest {
    host: &'static str,
    instance: &'static str,
    customer: &'static str,
    vni: u32,
    address: Ipv4Addr,
    user_data: &'static str,
}

impl Guest {
    fn mac(&self) -> MacAddr {
        let vni = self.vni.to_be_bytes();
        let a = self.address.octets();
        MacAddr([0x02, 0x4e, vni[2], vni[3], a[2], a[3]])
    }
}

/// Runs `command` in the guest as root over SSH through `endpoint`, the
/// port the guest publishes: (exit status, stdout, stderr).
fn ssh(key: &Path, endpoint: &str, command: &str) -> (i32, String, String) {
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    let out = Command::new("ssh")
        .args(["-i"])
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
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tcpdump writing to `file`, in namespace `ns` if given; started when
/// it says it listens (its messages go to `file` with `.log` added).
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
    // tcpdump says "listening on ..." once its capture is open.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("listening on")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "tcpdump did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn stop_capture(mut child: Child, file: &Path) -> Vec<u8> {
    // What the kernel has queued reaches tcpdump before it is told to stop.
    std::thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = child.wait();
    println!(
        "{}: {}",
        file.display(),
        std::fs::read_to_string(file.with_extension("log")).unwrap_or_default()
    );
    std::fs::read(file).unwrap()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_reach_their_instances_across_hosts_encrypted_and_apart() {
    let (Some(qemu), Some(launcher)) = (find_qemu(), nitrile_binary()) else {
        println!(
            "SKIPPED: needs qemu-system-x86_64 and the nitrile binary next to the tests (cargo build -p nitrile-cli)"
        );
        return;
    };
    if !is_root() {
        println!("SKIPPED: needs root (QEMU's jail, the data path's namespaces, captures)");
        return;
    }
    for tool in ["ssh", "ssh-keygen", "tcpdump", "ip"] {
        if which(tool).is_none() {
            println!("SKIPPED: needs {tool} (scripts/setup.sh installs it)");
            return;
        }
    }
    let built = match nitrile_image::default_cache_dir()
        .map_err(|e| e.to_string())
        .and_then(|c| {
            nitrile_image::read_output(&nitrile_image::output_dir(&c)).map_err(|e| e.to_string())
        }) {
        Ok(b) => b,
        Err(e) => {
            println!("SKIPPED: no guest image (run scripts/guest-image.sh): {e}");
            return;
        }
    };
    let _namespaces = Namespaces(vec![netns("h1"), netns("h2")]);
    let mut cell = TestCell::new().await;
    let images = nitrile_image::ImageStore::open(cell.layout.images_dir()).unwrap();
    let image = images
        .import(&built.kernel, &built.initramfs, &built.cmdline)
        .unwrap();
    let image = Sha256Hex::from_bytes(*image.digest().as_bytes());
    for host in ["h1", "h2"] {
        let mut setup = cell.default_setup();
        setup.hypervisor = HypervisorConfig {
            backend: BackendName::Qemu,
            qemu: Some(qemu.clone()),
            vsock_daemon: None,
            vmm: Some(launcher.clone()),
        };
        setup.network = Some(NetworkConfig {
            wireguard_listen: "127.0.0.1:0".parse().unwrap(),
            ingress_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            netns: Some(netns(host)),
        });
        cell.start_host_with(host, setup).await;
    }

    // The customers' keys.
    let keys = cell.scratch("keys");
    let mut public = Vec::new();
    for who in ["acme", "globex"] {
        let key = keys.join(who);
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", who, "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(ok.success());
        public.push(std::fs::read_to_string(key.with_extension("pub")).unwrap());
    }

    let guests = [
        Guest {
            host: "h1",
            instance: "acme--a1",
            customer: "acme",
            vni: 100,
            address: Ipv4Addr::new(10, 80, 0, 10),
            user_data: "",
        },
        Guest {
            host: "h2",
            instance: "acme--a2",
            customer: "acme",
            vni: 100,
            address: Ipv4Addr::new(10, 80, 0, 11),
            // A TCP echo service on port 7777.
            user_data: "#!/bin/sh\nwhile true; do nc -l -p 7777 -e /bin/cat; done\n",
        },
        Guest {
            host: "h1",
            instance: "globex--b1",
            customer: "globex",
            vni: 101,
            address: Ipv4Addr::new(10, 80, 0, 12),
            user_data: "",
        },
    ];

    // Each host learns the other's signed announcement and the routes.
    let mut announcements = Vec::new();
    for host in ["h1", "h2"] {
        let req = AdminRequest::HostDescribe;
        let token = cell.token_for(ALICE, host, &req).await;
        let (_, body) = cell.call(ALICE, host, &req, Some(&token)).await;
        let d: HostDescription = serde_json::from_slice(&body).unwrap();
        announcements.push(d.network.unwrap().announcement);
    }
    let update = NetworkUpdate {
        peers: announcements.clone(),
        routes: guests
            .iter()
            .map(|g| NetworkRoute {
                vni: g.vni,
                address: g.address,
                host: name(g.host),
            })
            .collect(),
    };
    for host in ["h1", "h2"] {
        let req = AdminRequest::NetworkUpdate(update.clone());
        let token = cell.token_for(PLACEMENT, host, &req).await;
        let (status, body) = cell.call(PLACEMENT, host, &req, Some(&token)).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    let mut described = Vec::new();
    for g in &guests {
        let key = if g.customer == "acme" {
            &public[0]
        } else {
            &public[1]
        };
        let req = AdminRequest::InstanceLaunch(LaunchRequest {
            instance: name(g.instance),
            image,
            vcpus: 1,
            memory_mib: 256,
            volumes: vec![],
            scratch_mib: None,
            network: Some(NetworkAttachment {
                customer: name(g.customer),
                vni: g.vni,
                address: g.address,
                prefix_len: 24,
                mac: g.mac(),
                ssh_public_keys: vec![key.trim().to_owned()],
                user_data: base64::engine::general_purpose::STANDARD.encode(g.user_data),
                publish: vec![22],
            }),
        });
        let token = cell.token_for(PLACEMENT, g.host, &req).await;
        let (status, body) = cell.call(PLACEMENT, g.host, &req, Some(&token)).await;
        assert_eq!(
            status,
            200,
            "{}: {}",
            g.instance,
            String::from_utf8_lossy(&body)
        );
        let d: InstanceDescription = serde_json::from_slice(&body).unwrap();
        let net = d.network.clone().expect("launched with a NIC");
        assert_eq!(net.address, g.address);
        assert_eq!(net.published.len(), 1);
        // Metadata only: the keys and user data are not in the answer.
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("ssh-ed25519") && !text.contains("nc -l"),
            "{text}"
        );
        described.push(d);
    }
    // The journals keep the launches' rules (the published port) and
    // digests of the keys and user data, never the customer's content.
    for host in ["h1", "h2"] {
        let journal = std::fs::read(cell.host_journal(host)).unwrap();
        assert!(
            !contains(&journal, "ssh-ed25519"),
            "an SSH key in {host}'s journal"
        );
        assert!(
            !contains(&journal, "nc -l -p 7777"),
            "user data in {host}'s journal"
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode(guests[1].user_data);
        assert!(
            !contains(&journal, &encoded),
            "user data in {host}'s journal"
        );
        let records = support::journal_records(&cell.host_journal(host));
        let launches: Vec<_> = records
            .iter()
            .filter(|r| r.operations.first() == Some(&nitrile_api::Operation::InstanceLaunch))
            .filter_map(|r| r.detail.as_ref())
            .filter(|d| d.to_string().contains("\"publish\":[22]"))
            .collect();
        assert!(
            !launches.is_empty(),
            "{host}'s journal does not show the published port"
        );
    }
    for g in &guests {
        let serial = cell
            .host_config(g.host)
            .state
            .join(format!("vms/{}/serial.log", g.instance));
        let line = tokio::task::spawn_blocking(move || {
            wait_for_line(&serial, &["NITRILE-SSH-READY", "NITRILE-NET-FAILED"], BOOT)
        })
        .await
        .unwrap();
        assert_eq!(line.as_deref(), Some("NITRILE-SSH-READY"), "{}", g.instance);
    }
    let endpoint = |i: usize| {
        described[i].network.as_ref().unwrap().published[0]
            .endpoint
            .clone()
    };
    let acme_key = keys.join("acme");
    let globex_key = keys.join("globex");

    // Captures: the wire between the hosts (their tunnel ports on
    // loopback), and a1's tap inside h1's data path.
    let ports: Vec<String> = announcements
        .iter()
        .map(|a| a.endpoint.rsplit_once(':').unwrap().1.to_owned())
        .collect();
    let wire_file = cell.scratch("captures").join("wire.pcap");
    let inside_file = cell.scratch("captures").join("inside.pcap");
    let wire = capture(
        None,
        "lo",
        &format!("udp and ( port {} or port {} )", ports[0], ports[1]),
        &wire_file,
    );
    let inside = capture(
        Some(&netns("h1")),
        &tap_name(&name("acme--a1")),
        "",
        &inside_file,
    );

    // The customer logs in to a1 through its published port and reaches a2
    // by its private address.
    let a1 = endpoint(0);
    let k = acme_key.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        ssh(
            &k,
            &a1,
            &format!(
                "ping -c 2 -W 5 10.80.0.11 >/dev/null && echo ping-ok; echo {MARKER} | nc -w 5 10.80.0.11 7777"
            ),
        )
    })
    .await
    .unwrap();
    let wire_bytes = stop_capture(wire, &wire_file);
    let inside_bytes = stop_capture(inside, &inside_file);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("ping-ok"), "a1 could not ping a2: {out} {err}");
    assert!(
        out.contains(MARKER),
        "a2 did not echo the marker: {out} {err}"
    );
    // Something crossed the wire (pcap header 24 bytes, then packets)...
    assert!(
        wire_bytes.len() > 24 + 10 * 60,
        "the wire capture is empty: {} bytes",
        wire_bytes.len()
    );
    // ...none of it in the clear; on a1's tap it was.
    assert!(
        !contains(&wire_bytes, MARKER),
        "the marker crossed the wire in the clear"
    );
    assert!(
        contains(&inside_bytes, MARKER),
        "the positive control saw no marker on a1's tap ({} bytes captured)",
        inside_bytes.len()
    );

    // Another customer's key does not open a1.
    let (a1, k) = (endpoint(0), globex_key.clone());
    let (code, _, _) = tokio::task::spawn_blocking(move || ssh(&k, &a1, "true"))
        .await
        .unwrap();
    assert_ne!(code, 0, "globex's key opened acme's instance");

    // globex's b1 reaches nothing of acme's, whatever it pretends to be.
    let (b1, k) = (endpoint(2), globex_key.clone());
    let script = "\
        ping -c 2 -W 2 10.80.0.10 >/dev/null && echo reached-a1-icmp; \
        ping -c 2 -W 2 10.80.0.11 >/dev/null && echo reached-a2-icmp; \
        echo x | nc -w 3 10.80.0.11 7777 && echo reached-a2-tcp; \
        ip addr add 10.80.0.10/32 dev eth0; \
        ping -I 10.80.0.10 -c 2 -W 2 10.80.0.11 >/dev/null && echo reached-forged-source; \
        ip addr del 10.80.0.10/32 dev eth0; \
        imds get /latest/meta-data/instance-id; echo; \
        ( sleep 1; ip link set eth0 address 02:4e:00:64:00:0a; \
          ping -c 3 -W 2 10.80.0.11 >/dev/null && echo reached-spoofed-mac > /run/spoof; \
          echo done >> /run/spoof; ip link set eth0 address 02:4e:00:65:00:0c ) \
          </dev/null >/dev/null 2>&1 & \
        echo started";
    let (code, out, err) = tokio::task::spawn_blocking(move || ssh(&k, &b1, script))
        .await
        .unwrap();
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(!out.contains("reached"), "globex reached acme: {out}");
    assert!(
        out.contains("globex--b1"),
        "b1's metadata service is not its own: {out}"
    );
    let (b1, k) = (endpoint(2), globex_key.clone());
    let spoof = tokio::task::spawn_blocking(move || {
        for _ in 0..30 {
            std::thread::sleep(Duration::from_secs(2));
            let (code, out, _) = ssh(&k, &b1, "cat /run/spoof 2>/dev/null");
            if code == 0 && out.contains("done") {
                return out;
            }
        }
        String::from("no result")
    })
    .await
    .unwrap();
    assert!(
        spoof.contains("done") && !spoof.contains("reached"),
        "{spoof}"
    );

    // The identity document a1's metadata service serves verifies under the
    // cell's CA and names a1; a changed byte does not.
    let (a1, k) = (endpoint(0), acme_key.clone());
    let (code, doc, err) = tokio::task::spawn_blocking(move || {
        ssh(
            &k,
            &a1,
            "imds get /latest/dynamic/instance-identity/document",
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let signed: SignedIdentityDocument = serde_json::from_str(&doc).unwrap();
    let (identity, message, signature) = signed.decode().unwrap();
    assert_eq!(identity.instance, name("acme--a1"));
    assert_eq!(identity.host, name("h1"));
    let roots = cell.roots();
    let who = nitrile_pki::sign::verify_signed(
        &roots,
        &cell.cell,
        signed.certificate.as_bytes(),
        &message,
        &signature,
        rustls_pki_types::UnixTime::now(),
    )
    .unwrap();
    assert_eq!(who.uri(), "nitrile://local/host/h1");
    let mut changed = message.clone();
    let last = changed.len() - 2;
    changed[last] ^= 1;
    assert!(
        nitrile_pki::sign::verify_signed(
            &roots,
            &cell.cell,
            signed.certificate.as_bytes(),
            &changed,
            &signature,
            rustls_pki_types::UnixTime::now(),
        )
        .is_err()
    );

    // A restarted host agent re-adopts a1 and connects it again: its data
    // path has a new key (it is never kept), so placement gives both hosts
    // the new announcement; a1 keeps its published port.
    cell.restart_host("h1").await;
    let mut announcements = Vec::new();
    for host in ["h1", "h2"] {
        let req = AdminRequest::HostDescribe;
        let token = cell.token_for(ALICE, host, &req).await;
        let (_, body) = cell.call(ALICE, host, &req, Some(&token)).await;
        let d: HostDescription = serde_json::from_slice(&body).unwrap();
        announcements.push(d.network.unwrap().announcement);
    }
    let update = NetworkUpdate {
        peers: announcements,
        routes: update.routes.clone(),
    };
    for host in ["h1", "h2"] {
        let req = AdminRequest::NetworkUpdate(update.clone());
        let token = cell.token_for(PLACEMENT, host, &req).await;
        let (status, body) = cell.call(PLACEMENT, host, &req, Some(&token)).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    let req = AdminRequest::InstanceDescribe(name("acme--a1"));
    let token = cell.token_for(PLACEMENT, "h1", &req).await;
    let (_, body) = cell.call(PLACEMENT, "h1", &req, Some(&token)).await;
    let again: InstanceDescription = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        again.network.as_ref().unwrap().published,
        described[0].network.as_ref().unwrap().published,
        "a1's published port moved"
    );
    let (a1, k) = (endpoint(0), acme_key.clone());
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        ssh(
            &k,
            &a1,
            "ping -c 2 -W 5 10.80.0.11 >/dev/null && echo ping-ok",
        )
    })
    .await
    .unwrap();
    assert!(
        code == 0 && out.contains("ping-ok"),
        "after a restart: {out} {err}"
    );

    for g in &guests {
        let req = AdminRequest::InstanceTerminate(name(g.instance));
        let token = cell.token_for(PLACEMENT, g.host, &req).await;
        let (status, _) = cell.call(PLACEMENT, g.host, &req, Some(&token)).await;
        assert_eq!(status, 200);
        // Its keys and user data do not outlive it on the host.
        let dir = cell
            .host_config(g.host)
            .state
            .join("instances")
            .join(g.instance);
        assert!(!dir.join("network.json").exists(), "{}", g.instance);
    }
}
