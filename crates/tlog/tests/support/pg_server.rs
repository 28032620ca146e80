//! A private PostgreSQL server for a test: its own data directory in a
//! temporary directory, listening only on a unix socket there, stopped
//! when dropped (also when the test panics). When the server binaries are
//! absent, [`Server::start`] prints a `SKIPPED:` line and returns `None`.
//!
//! Shared by the tests of the crates that keep a log in PostgreSQL, with
//! `#[path = ".../tlog/tests/support/pg_server.rs"] mod pg_server;`.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::Command;

use nitrile_tlog::PgStorage;

/// The server's superuser (trust authentication on the socket).
pub const SUPERUSER: &str = "nitrile";

/// Where `initdb` and `pg_ctl` are: PATH first, then the Debian layout.
fn server_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"));
    let mut debian: Vec<PathBuf> = debian.collect();
    debian.sort();
    debian.reverse();
    on_path
        .chain(debian)
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
}

/// A private PostgreSQL server, stopped on drop (also when a test panics).
pub struct Server {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
}

impl Server {
    /// Starts a server, or prints why not and returns `None`.
    pub fn start() -> Option<Self> {
        let Some(bin) = server_bin_dir() else {
            println!(
                "SKIPPED: no PostgreSQL server binaries (scripts/setup.sh --tests installs them)"
            );
            return None;
        };
        let root = nix_is_root();
        let dir = tempfile::tempdir().unwrap();
        if root {
            // initdb refuses to run as root: the server runs as `postgres`.
            let Some((uid, gid)) = user_ids("postgres") else {
                println!(
                    "SKIPPED: running as root and there is no `postgres` user to run the server as"
                );
                return None;
            };
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let server = Self {
            dir,
            bin,
            as_postgres: root,
        };
        let data = server.data();
        server.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let opts = format!(
            "-c listen_addresses='' -c unix_socket_directories={} -c fsync=on",
            server.dir.path().display()
        );
        let log = server.dir.path().join("server.log");
        server.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
        Some(server)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }

    /// A libpq connection string for database `postgres` as the superuser.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} user={SUPERUSER} dbname=postgres",
            self.dir.path().display()
        )
    }

    /// A client of database `postgres`.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.conninfo(), postgres::NoTls).unwrap()
    }

    /// The storage of log `log`.
    pub fn storage(&self, log: &str) -> PgStorage {
        PgStorage::connect(&self.conninfo(), log).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}

fn nix_is_root() -> bool {
    // The owner of a file this process creates is its effective user.
    use std::os::unix::fs::MetadataExt as _;
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().metadata().unwrap().uid() == 0
}

fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}
