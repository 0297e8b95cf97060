//! A real S3 server for the integration tests: `s3s-fs`, a minimal S3 implementation
//! that keeps a bucket as a directory and each object as a file in it, so a test can
//! see what is stored with ordinary file tools.
//!
//! The binary is `S3S_FS_BIN` if set, else `s3s-fs` on `PATH`, else
//! `../shared/tools/s3s-fs` beside the repository. Without one, a test that needs it
//! prints how to install it and skips; with `CI=true` it fails instead.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to get the server when it is missing.
pub const INSTALL: &str = "cargo install --locked s3s-fs@0.14.1 --features binary";

pub const ACCESS_KEY: &str = "ebsfs-test-key";
pub const SECRET_KEY: &str = "ebsfs-test-secret";
pub const BUCKET: &str = "ebsfs-test";
/// Key prefix of the store in the bucket (`url = "s3://BUCKET/PREFIX"`).
pub const PREFIX: &str = "store";

/// `request_timeout_seconds` of the test daemons: short, so that a failing request
/// shows quickly.
pub const REQUEST_TIMEOUT_SECONDS: u64 = 2;

/// `lease_seconds` of the test daemons. A collection deletes only within a quarter
/// of the lease, less the longest a request can take with its retries
/// (4 × `REQUEST_TIMEOUT_SECONDS` + 5 s = 13 s): a shorter lease deletes nothing.
/// 64 s leaves 3 s for the deletions, and renewals every 8 s.
pub const LEASE_SECONDS: u64 = 64;

/// Where the `s3s-fs` binary is, or why there is none.
pub fn find_binary() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("S3S_FS_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "S3S_FS_BIN names {}, which is not a file",
                bin.display()
            ))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("s3s-fs"))
                .find(|bin| bin.is_file())
        })
        .unwrap_or_default();
    if let Some(bin) = on_path {
        return Ok(bin);
    }
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/s3s-fs");
    if shared.is_file() {
        return Ok(shared);
    }
    Err(format!(
        "no s3s-fs S3 server: not in S3S_FS_BIN, not on PATH, not at {}; install it with \
         `{INSTALL}` (about 5 minutes)",
        shared.display()
    ))
}

/// A port on the loopback interface that nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// A running `s3s-fs` on a free loopback port, serving a temporary directory that
/// holds bucket [`BUCKET`]. Killed when dropped.
pub struct S3Server {
    bin: PathBuf,
    pub port: u16,
    /// The server's root: buckets are its subdirectories.
    pub root: tempfile::TempDir,
    log: PathBuf,
    child: Option<Child>,
}

impl S3Server {
    /// Starts a server, or says why it cannot and returns `None` (a skip); with
    /// `CI=true` a missing binary panics instead.
    pub fn launch() -> Option<S3Server> {
        let bin = match find_binary() {
            Ok(bin) => bin,
            Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI=true but {why}")
            }
            Err(why) => {
                eprintln!("skipping: {why}");
                return None;
            }
        };
        let root = tempfile::Builder::new()
            .prefix("ebsfs-s3")
            .tempdir()
            .expect("tempdir");
        fs::create_dir(root.path().join(BUCKET)).expect("mkdir bucket");
        let log = root.path().join("s3s-fs.log");
        let mut server = S3Server {
            bin,
            port: 0,
            root,
            log,
            child: None,
        };
        // Another process may take the port between asking and binding: try others.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn(Duration::from_secs(30)) {
                return Some(server);
            }
        }
        panic!(
            "s3s-fs did not start on a free port:\n{}",
            server.log_text()
        );
    }

    /// Starts the server again after [`S3Server::stop`], on the same port and data.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "start of a running s3s-fs");
        // The port may stay busy for a moment after the kill.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.spawn(Duration::from_secs(30)) {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not start again on port {}:\n{}",
                self.port,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills the server (as if the machine serving it went away); data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Spawns the server and waits until it answers HTTP; false if it exited first.
    fn spawn(&mut self, timeout: Duration) -> bool {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("s3s-fs log");
        let child = Command::new(&self.bin)
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--access-key")
            .arg(ACCESS_KEY)
            .arg("--secret-key")
            .arg(SECRET_KEY)
            .arg(self.root.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if self.answers() {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                self.child = None;
                return false;
            }
            if start.elapsed() > timeout {
                self.stop();
                panic!(
                    "s3s-fs did not answer on port {} within {timeout:?}:\n{}",
                    self.port,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether an HTTP request to the server gets an HTTP answer (any status).
    fn answers(&self) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        let mut head = [0u8; 5];
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_exact(&mut head).is_ok()
            && &head == b"HTTP/"
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// What the server printed.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory holding the store's objects (`BUCKET/PREFIX`).
    pub fn store_dir(&self) -> PathBuf {
        self.root.path().join(BUCKET).join(PREFIX)
    }

    /// Every object of the store whose name starts with `kind/` (`packs`, `pages`,
    /// `snapshots`, `hosts`, `meta`, `deleted`), as (name below the prefix, bytes).
    pub fn objects(&self, kind: &str) -> Vec<(String, u64)> {
        let mut found = Vec::new();
        let base = self.store_dir();
        walk(&base.join(kind), &mut |path, len| {
            let name = path
                .strip_prefix(&base)
                .expect("below the store")
                .to_string_lossy()
                .into_owned();
            found.push((name, len));
        });
        found.sort();
        found
    }

    /// Bytes of the store's objects named `kind/…`.
    pub fn bytes(&self, kind: &str) -> u64 {
        self.objects(kind).iter().map(|(_, len)| len).sum()
    }

    /// Every object name of the store (below the prefix).
    pub fn all_objects(&self) -> Vec<String> {
        let mut found = Vec::new();
        let base = self.store_dir();
        walk(&base, &mut |path, _| {
            found.push(
                path.strip_prefix(&base)
                    .expect("below the store")
                    .to_string_lossy()
                    .into_owned(),
            );
        });
        found.sort();
        found
    }

    /// The environment a daemon needs to reach this server.
    pub fn credentials(&self) -> [(&'static str, &'static str); 2] {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ]
    }

    /// A daemon's configuration using this server's bucket, as host `host`.
    pub fn config(&self, host: &str) -> StoreConfig {
        StoreConfig {
            host: host.to_string(),
            endpoint: self.endpoint(),
            top: String::new(),
            store: String::new(),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Calls `found` with every regular file under `dir` and its length. s3s-fs keeps its
/// own bookkeeping (in-progress uploads, metadata) in names starting with `.`: those
/// are not objects.
fn walk(dir: &Path, found: &mut dyn FnMut(&Path, u64)) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        match entry.metadata() {
            Ok(meta) if meta.is_dir() => walk(&path, found),
            Ok(meta) if meta.is_file() => found(&path, meta.len()),
            _ => {}
        }
    }
}

/// The `config.toml` of a daemon that keeps its snapshots in an [`S3Server`]'s
/// bucket: its own `host_id`, listings every second, no grace period, a short lease
/// and request timeout (see [`LEASE_SECONDS`]).
pub struct StoreConfig {
    pub host: String,
    pub endpoint: String,
    /// More top-level lines (`hydrate = false`).
    pub top: String,
    /// More `[store]` lines (`key_file = "…"`).
    pub store: String,
}

impl StoreConfig {
    pub fn top(mut self, line: &str) -> StoreConfig {
        self.top.push_str(line);
        self.top.push('\n');
        self
    }

    pub fn store(mut self, line: &str) -> StoreConfig {
        self.store.push_str(line);
        self.store.push('\n');
        self
    }

    pub fn endpoint(mut self, endpoint: &str) -> StoreConfig {
        self.endpoint = endpoint.to_string();
        self
    }

    pub fn render(&self) -> String {
        format!(
            "host_id = \"{host}\"\n{top}\n[store]\nurl = \"s3://{BUCKET}/{PREFIX}\"\n\
             endpoint = \"{endpoint}\"\nregion = \"us-east-1\"\npath_style = true\n\
             poll_seconds = 1\ngc_grace_seconds = 0\nlease_seconds = {LEASE_SECONDS}\n\
             request_timeout_seconds = {REQUEST_TIMEOUT_SECONDS}\n{store}",
            host = self.host,
            top = self.top,
            endpoint = self.endpoint,
            store = self.store,
        )
    }
}
