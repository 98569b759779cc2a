//! A throwaway PostgreSQL server for the tests of what fronts share: its
//! own cluster in a temporary folder (made by `initdb`), on an ephemeral
//! port of the loopback address, stopped and removed when dropped. Debian's
//! `postgresql` package is installed the first time if it is missing, as the
//! tests' other real components are.
//!
//! PostgreSQL refuses to run as root: as root, the cluster belongs to the
//! package's `postgres` user and the server runs as it.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

/// How long the server may take to accept connections.
const READY_BOUND: Duration = Duration::from_secs(30);

/// A running PostgreSQL server.
#[derive(Debug)]
pub struct Postgres {
    child: Child,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
}

/// The folder of the installed server's programs (the newest version's).
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// The server's programs, from Debian's package (looked for once per run).
fn programs() -> &'static Path {
    static PROGRAMS: OnceLock<PathBuf> = OnceLock::new();
    PROGRAMS.get_or_init(|| crate::from_debian("postgresql", bin_dir))
}

/// The user the server runs as: the package's `postgres` as root, else
/// whoever runs the tests.
fn server_user() -> Option<nix::unistd::User> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres").ok().flatten();
    Some(user.expect("the postgresql package's `postgres` user (PostgreSQL refuses to run as root)"))
}

/// `program` from `bin`, run as the server's user.
fn command(bin: &Path, program: &str, user: Option<&nix::unistd::User>) -> Command {
    let mut command = Command::new(bin.join(program));
    if let Some(user) = user {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    command
}

impl Postgres {
    /// Makes a cluster and starts its server on 127.0.0.1; returns once it
    /// accepts connections.
    pub fn start() -> Self {
        Self::start_on(&[])
    }

    /// [`Postgres::start`], also listening on `addresses` (and accepting
    /// connections from anywhere it listens).
    pub fn start_on(addresses: &[std::net::Ipv4Addr]) -> Self {
        let bin = programs();
        let user = server_user();
        let dir = tempfile::tempdir().expect("a folder for the cluster");
        if let Some(user) = &user {
            std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .expect("give the cluster's folder to postgres");
        }
        let data = dir.path().join("data");
        let initdb = command(bin, "initdb", user.as_ref())
            .args(["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"])
            .stdout(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(initdb.status.success(), "initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
        if !addresses.is_empty() {
            let hba = data.join("pg_hba.conf");
            let mut rules = std::fs::read_to_string(&hba).expect("pg_hba.conf");
            rules.push_str("host all all 0.0.0.0/0 trust\n");
            std::fs::write(&hba, rules).expect("write pg_hba.conf");
        }
        let listen: Vec<String> =
            std::iter::once("127.0.0.1".to_string()).chain(addresses.iter().map(|a| a.to_string())).collect();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(dir.path().join("server.log")).expect("the server's log");
        if let Some(user) = &user {
            std::os::unix::fs::chown(dir.path().join("server.log"), Some(user.uid.as_raw()), None).unwrap();
        }
        let child = command(bin, "postgres", user.as_ref())
            .args(["-D", data.to_str().unwrap(), "-p", &port.to_string(), "-k", dir.path().to_str().unwrap()])
            .args(["-c", &format!("listen_addresses={}", listen.join(",")), "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let server = Self { child, port, dir };
        let end = Instant::now() + READY_BOUND;
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return server;
            }
            assert!(
                Instant::now() < end,
                "PostgreSQL did not accept connections within {READY_BOUND:?}:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        self.url_at(std::net::Ipv4Addr::LOCALHOST)
    }

    /// The URL of its `postgres` database at `address` (one it listens on).
    pub fn url_at(&self, address: std::net::Ipv4Addr) -> String {
        format!("postgres://postgres@{address}:{}/postgres", self.port)
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs `sql` with psql, returning what it printed (unaligned, no
    /// headers), or panicking with psql's error.
    pub fn psql(&self, sql: &str) -> String {
        let bin = programs();
        let output = Command::new(bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-v", "ON_ERROR_STOP=1", "-A", "-t", "-c", sql])
            .output()
            .expect("run psql");
        assert!(output.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // A fast shutdown (SIGINT), then SIGKILL if it takes too long.
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGINT);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
