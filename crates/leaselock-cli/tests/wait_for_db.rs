//! `leaselock run --wait` also waits for the database: a server that starts listening late, or a
//! database created late, is waited for within the deadline; refused credentials fail at once
//! with exit 77. Against the real servers named by `LEASELOCK_POSTGRES_URL` and
//! `LEASELOCK_MYSQL_URL` (skipped with a loud message when unset).
//!
//! A "late server" is a TCP forwarder on a free port, started by the test 3 s after `leaselock`,
//! in front of the real server. Every name the tests create (tables, databases, users) is fresh
//! and dropped at the end.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, sleep, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use leaselock_mysql::mysql_async::{self, prelude::Queryable};

const BIN: &str = env!("CARGO_BIN_EXE_leaselock");
/// How long the servers stay out of reach in these tests.
const LATE: Duration = Duration::from_secs(3);

fn fresh(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("ll_wfd_{what}_{}_{nanos:x}", std::process::id())
}

/// A port on 127.0.0.1 where nothing listens (just released by the OS).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Accepts on 127.0.0.1:`port` and forwards every connection to `upstream`, until dropped.
struct Forwarder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    fn start(port: u16, upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the forwarder's port");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client
                            .set_nonblocking(false)
                            .expect("blocking client socket");
                        if let Ok(server) = TcpStream::connect(upstream) {
                            pipe(&client, &server);
                            pipe(&server, &client);
                        }
                    }
                    Err(_) => sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies `from` to `to` on a thread of its own, then closes `to` for writing.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (mut from, mut to) = (
        from.try_clone().expect("clone"),
        to.try_clone().expect("clone"),
    );
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// `leaselock run KEY --wait WAIT -- sh -c 'touch MARKER'` against `url`, started now.
fn spawn_run(url: &str, wait: &str, marker: &Path) -> std::process::Child {
    Command::new(BIN)
        .args(["run", &fresh("key"), "--wait", wait, "--", "sh", "-c"])
        .arg(format!("touch '{}'", marker.display()))
        .env("LEASELOCK_URL", url)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start leaselock")
}

/// Waits for `child` (its `--wait` bounds it).
fn finish(child: std::process::Child) -> Output {
    child.wait_with_output().expect("wait for leaselock")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The URL with its port replaced by `port`, and `extra` appended to its query.
fn with_port(url: &str, port: u16, extra: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("a valid server URL");
    parsed.set_port(Some(port)).expect("a URL with a host");
    append(parsed.as_str(), extra)
}

fn append(url: &str, extra: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{extra}")
}

fn upstream(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).expect("a valid server URL");
    let host = parsed.host_str().expect("a host");
    let port = parsed
        .port_or_known_default()
        .unwrap_or(match parsed.scheme() {
            "mysql" | "mariadb" => 3306,
            _ => 5432,
        });
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .expect("resolve the server")
        .next()
        .expect("an address")
}

/// The server comes up 3 s after `leaselock` started: it waits, says so once, then runs the
/// command (exit 0). `storage` names the fresh tables, dropped by `cleanup` afterwards.
fn late_server(url: &str, storage: &str) {
    let port = free_port();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let marker = dir.path().join("ran");
    let child = spawn_run(&with_port(url, port, storage), "20s", &marker);
    sleep(LATE);
    assert!(
        !marker.exists(),
        "the command ran before the server was reachable"
    );
    let forwarder = Forwarder::start(port, upstream(url));
    let output = finish(child);
    drop(forwarder);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "stderr: {err}");
    assert!(marker.exists(), "the command did not run; stderr: {err}");
    let waiting: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("leaselock: cannot reach lock storage"))
        .collect();
    assert_eq!(waiting.len(), 1, "one line per reason: {err}");
    assert!(
        waiting[0].contains("connection refused") && waiting[0].contains("retrying for up to"),
        "{err}"
    );
    assert!(err.lines().all(|l| l.starts_with("leaselock: ")), "{err}");
}

#[test]
fn postgres_that_starts_late_is_waited_for() {
    let Some(url) = leaselock_conformance::server_url("LEASELOCK_POSTGRES_URL") else {
        return;
    };
    let table = fresh("pg");
    late_server(&url, &format!("table={table}&prefix={table}"));
    pg_admin(
        &url,
        &format!("DROP TABLE IF EXISTS \"{table}\", \"{table}_holders\""),
    );
}

#[test]
fn mariadb_that_starts_late_is_waited_for() {
    let Some(url) = leaselock_conformance::server_url("LEASELOCK_MYSQL_URL") else {
        return;
    };
    let table = fresh("my");
    late_server(&url, &format!("table={table}&prefix={table}"));
    my_drop_tables(&url, &table);
}

/// A database that does not exist yet, created 3 s later: waited for, then the command runs.
#[test]
fn mariadb_database_created_late_is_waited_for() {
    let Some(url) = leaselock_conformance::server_url("LEASELOCK_MYSQL_URL") else {
        return;
    };
    let db = fresh("db");
    let mut parsed = url::Url::parse(&url).expect("a valid server URL");
    parsed.set_path(&format!("/{db}"));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let marker = dir.path().join("ran");
    let child = spawn_run(parsed.as_str(), "20s", &marker);
    sleep(LATE);
    assert!(
        !marker.exists(),
        "the command ran before its database existed"
    );
    my_admin(&url, &[format!("CREATE DATABASE `{db}`")]);
    let output = finish(child);
    my_admin(&url, &[format!("DROP DATABASE IF EXISTS `{db}`")]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "stderr: {err}");
    assert!(marker.exists(), "the command did not run; stderr: {err}");
    let waiting: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("leaselock: cannot reach lock storage"))
        .collect();
    assert_eq!(waiting.len(), 1, "one line per reason: {err}");
    assert!(waiting[0].contains("Unknown database"), "{err}");
}

/// A wrong password is never waited for: exit 77 at once (well within `--wait 60s`), one line,
/// neither password in it, the command not run.
#[test]
fn mariadb_wrong_password_fails_at_once_with_77() {
    let Some(url) = leaselock_conformance::server_url("LEASELOCK_MYSQL_URL") else {
        return;
    };
    let user = fresh("u");
    let password = format!("Right-{}", fresh("pw"));
    let wrong = format!("Wrong-{}", fresh("pw"));
    my_admin(
        &url,
        &[format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"
        )],
    );
    let mut parsed = url::Url::parse(&url).expect("a valid server URL");
    parsed.set_username(&user).expect("a user");
    parsed.set_password(Some(&wrong)).expect("a password");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let marker = dir.path().join("ran");
    let started = Instant::now();
    let output = finish(spawn_run(parsed.as_str(), "60s", &marker));
    let took = started.elapsed();
    my_admin(&url, &[format!("DROP USER IF EXISTS '{user}'@'%'")]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(77), "stderr: {err}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    assert!(!marker.exists());
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("Access denied"), "{err}");
    assert!(!err.contains(&wrong) && !err.contains(&password), "{err}");
    assert!(err.contains(":***@"), "the URL is shown redacted: {err}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn pg_admin(url: &str, sql: &str) {
    runtime().block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        let driver = tokio::spawn(connection);
        client.batch_execute(sql).await.expect(sql);
        drop(client);
        let _ = driver.await;
    });
}

fn my_admin(url: &str, statements: &[String]) {
    let url = url.replacen("mariadb://", "mysql://", 1);
    runtime().block_on(async {
        let mut conn = mysql_async::Conn::from_url(url.as_str())
            .await
            .expect("connect to MariaDB");
        for sql in statements {
            conn.query_drop(sql.as_str()).await.expect(sql);
        }
        let _ = conn.disconnect().await;
    });
}

/// Drops every table whose name starts with `prefix` in the URL's database.
fn my_drop_tables(url: &str, prefix: &str) {
    let url = url.replacen("mariadb://", "mysql://", 1);
    runtime().block_on(async {
        let mut conn = mysql_async::Conn::from_url(url.as_str())
            .await
            .expect("connect to MariaDB");
        let tables: Vec<String> = conn
            .exec(
                "SELECT table_name FROM information_schema.tables \
                 WHERE table_schema = DATABASE() AND table_name LIKE CONCAT(?, '%')",
                (prefix,),
            )
            .await
            .expect("list tables");
        for table in tables {
            conn.query_drop(format!("DROP TABLE IF EXISTS `{table}`"))
                .await
                .expect("drop table");
        }
        let _ = conn.disconnect().await;
    });
}
