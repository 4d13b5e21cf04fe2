//! Many OS processes run the same migrations at once through leaselock, against real servers.
//!
//! Each scenario creates a fresh database (a random name, dropped at the end), then re-runs this
//! test binary as 8 child processes (the ignored `child` test, configured through environment
//! variables) that connect, wait for a common start instant, and run the migrations with
//! run-if-needed; then 2 more once those are done, which must find nothing to do. Every child
//! prints its outcome on stdout: what run-if-needed returned, the fencing token, the versions it
//! applied, and how many acquisitions its lock hooks saw.
//!
//! The parent checks, from the database and the outcomes (never from timing): every child
//! succeeded; exactly one ran the migrations, all of them; every migration was applied exactly
//! once (each logs a row in a table without a unique key); the token the migration code read
//! from its session is the lock's; the children that found nothing to do made no acquisition
//! attempt; and the lock's fencing counter moved exactly once per child that took the lock.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use leaselock::{
    AcquireOutcome, AcquireRequest, HookResult, Lease, LockBackend, LockHooks, LockKey, Locker,
    OwnerId, RunIfNeeded, WaitPolicy,
};
use leaselock_migrate::{refinery::GuardedRunner, sqlx::GuardedMigrator, Applied};
use sqlx::{Connection, Executor, MySqlConnection, PgConnection, Row};

const PROCESSES: usize = 8;
const LATE_PROCESSES: usize = 2;
const VERSIONS: [i64; 3] = [1, 2, 3];
const MARKER: &str = "LEASELOCK-MIGRATE-CHILD";

const ENV_MODE: &str = "LEASELOCK_MIGRATE_CHILD_MODE";
const ENV_DB_URL: &str = "LEASELOCK_MIGRATE_CHILD_DB_URL";
const ENV_LOCK_URL: &str = "LEASELOCK_MIGRATE_CHILD_LOCK_URL";
const ENV_KEY: &str = "LEASELOCK_MIGRATE_CHILD_KEY";
const ENV_START_AT: &str = "LEASELOCK_MIGRATE_CHILD_START_AT_MS";

/// One scenario at a time: each already starts 8 processes on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    SqlxPostgres,
    SqlxMysql,
    RefineryPostgres,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::SqlxPostgres => "sqlx-postgres",
            Mode::SqlxMysql => "sqlx-mysql",
            Mode::RefineryPostgres => "refinery-postgres",
        }
    }

    fn parse(name: &str) -> Self {
        [Mode::SqlxPostgres, Mode::SqlxMysql, Mode::RefineryPostgres]
            .into_iter()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("unknown mode {name}"))
    }

    fn is_mysql(self) -> bool {
        self == Mode::SqlxMysql
    }

    fn migrations_dir(self) -> std::path::PathBuf {
        let dir = match self {
            Mode::SqlxPostgres => "sqlx-postgres",
            Mode::SqlxMysql => "sqlx-mysql",
            Mode::RefineryPostgres => "refinery",
        };
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/migrations")
            .join(dir)
    }

    /// The lock backend's URL: the server's own URL (PostgreSQL advisory locks, MySQL
    /// `GET_LOCK`), or PostgreSQL's lease table for refinery, so both kinds are covered.
    fn lock_url(self, server_url: &str) -> String {
        match self {
            Mode::RefineryPostgres => {
                let mut url = url::Url::parse(server_url).expect("a valid server URL");
                url.query_pairs_mut().append_pair("strategy", "table");
                url.to_string()
            }
            _ => server_url.to_owned(),
        }
    }
}

#[test]
fn sqlx_postgres_processes_apply_each_migration_once() {
    if let Some(url) = leaselock_conformance::server_url("LEASELOCK_POSTGRES_URL") {
        scenario(Mode::SqlxPostgres, &url);
    }
}

#[test]
fn sqlx_mysql_processes_apply_each_migration_once() {
    if let Some(url) = leaselock_conformance::server_url("LEASELOCK_MYSQL_URL") {
        scenario(Mode::SqlxMysql, &url);
    }
}

#[test]
fn refinery_postgres_processes_apply_each_migration_once() {
    if let Some(url) = leaselock_conformance::server_url("LEASELOCK_POSTGRES_URL") {
        scenario(Mode::RefineryPostgres, &url);
    }
}

/// What one child reported.
#[derive(Debug)]
struct Report {
    outcome: String,
    /// The token in what the run returned (zero unless it ran).
    token: u64,
    /// The token of the lock the child took, as its hooks saw it (zero if none).
    lock_token: u64,
    versions: Vec<i64>,
    before_acquire: u32,
    acquired: u32,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn scenario(mode: Mode, server_url: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let rt = runtime();
    let db = format!(
        "ll_migrate_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    rt.block_on(admin(mode, server_url, &format!("CREATE DATABASE {db}")));
    let _drop = DropDatabase {
        mode,
        server_url,
        db: &db,
    };
    let mut db_url = url::Url::parse(server_url).expect("a valid server URL");
    db_url.set_path(&format!("/{db}"));
    let db_url = db_url.to_string();
    let key = format!("leaselock-migrate-test/{}/{db}", mode.name());
    let lock_url = mode.lock_url(server_url);

    let start_at = now_ms() + 3000;
    let first = spawn_children(mode, PROCESSES, &db_url, &lock_url, &key, start_at);
    let late = spawn_children(mode, LATE_PROCESSES, &db_url, &lock_url, &key, 0);
    let all: Vec<&Report> = first.iter().chain(&late).collect();

    // Exactly one child ran the migrations, all of them.
    let ran: Vec<&&Report> = all.iter().filter(|r| r.outcome == "ran").collect();
    assert_eq!(ran.len(), 1, "exactly one process migrates: {all:#?}");
    assert_eq!(ran[0].versions, VERSIONS, "it applies every migration");
    assert_eq!(ran[0].token, ran[0].lock_token, "under the lock it took");
    // The others found nothing to do, before or once holding the lock.
    for report in &all {
        assert!(
            ["ran", "not-needed", "not-needed-once-locked"].contains(&report.outcome.as_str()),
            "unexpected outcome: {report:?}"
        );
        match report.outcome.as_str() {
            "not-needed" => assert!(
                report.before_acquire == 0 && report.acquired == 0,
                "a process that found nothing to do must not touch the lock: {report:?}"
            ),
            _ => assert!(
                report.before_acquire == 1 && report.acquired == 1,
                "a process that needed the lock takes it once: {report:?}"
            ),
        }
    }
    // Processes started after the migrations had finished return without the lock.
    for report in &late {
        assert_eq!(report.outcome, "not-needed", "a late process: {report:?}");
    }

    // The database: every migration applied exactly once, the token seen by the migration code.
    let (history, applications) = rt.block_on(read_database(mode, &db_url));
    assert_eq!(history, VERSIONS, "the migration history");
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for (migration, _) in &applications {
        *counts.entry(*migration).or_default() += 1;
    }
    for version in VERSIONS {
        assert_eq!(
            counts.get(&version),
            Some(&1),
            "migration {version} applied exactly once: {applications:?}"
        );
    }
    let seen_token = applications
        .iter()
        .find(|(migration, _)| *migration == 3)
        .and_then(|(_, token)| *token);
    assert_eq!(
        seen_token,
        Some(ran[0].token as i64),
        "the migration code reads the fencing token of the lock it runs under"
    );

    // The lock: its fencing counter moved once per process that took the lock, and never for
    // the ones that found nothing to do.
    let takers = all.iter().filter(|r| r.acquired == 1).count() as u64;
    let next = rt.block_on(next_token(mode, &lock_url, &key));
    assert_eq!(
        next,
        takers + 1,
        "acquisitions of the lock: {takers} processes took it"
    );
    let mut tokens: Vec<u64> = all
        .iter()
        .filter(|r| r.acquired == 1)
        .map(|r| r.lock_token)
        .collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len() as u64, takers, "distinct tokens: {all:#?}");

    let mut summary: HashMap<&str, usize> = HashMap::new();
    for report in &all {
        *summary.entry(report.outcome.as_str()).or_default() += 1;
    }
    eprintln!("{}: {summary:?}", mode.name());
}

/// Drops the scenario's database at the end, also when an assertion failed.
struct DropDatabase<'a> {
    mode: Mode,
    server_url: &'a str,
    db: &'a str,
}

impl Drop for DropDatabase<'_> {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {}", self.db);
        runtime().block_on(admin(self.mode, self.server_url, &sql));
    }
}

/// Runs one statement on the server's own database.
async fn admin(mode: Mode, server_url: &str, sql: &str) {
    if mode.is_mysql() {
        let mut conn = MySqlConnection::connect(server_url).await.expect("connect");
        conn.execute(sql).await.expect(sql);
    } else {
        let mut conn = PgConnection::connect(server_url).await.expect("connect");
        conn.execute(sql).await.expect(sql);
    }
}

/// The migration history's versions and the `applications` log (migration, token).
async fn read_database(mode: Mode, db_url: &str) -> (Vec<i64>, Vec<(i64, Option<i64>)>) {
    let log = "SELECT CAST(migration AS SIGNED), token FROM applications ORDER BY migration";
    match mode {
        Mode::SqlxMysql => {
            let mut conn = MySqlConnection::connect(db_url).await.expect("connect");
            let history: Vec<i64> = sqlx::query_scalar(
                "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap();
            let rows = sqlx::query(log).fetch_all(&mut conn).await.unwrap();
            let applications = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            (history, applications)
        }
        Mode::SqlxPostgres | Mode::RefineryPostgres => {
            let mut conn = PgConnection::connect(db_url).await.expect("connect");
            let history_sql = match mode {
                Mode::SqlxPostgres => {
                    "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version"
                }
                _ => "SELECT CAST(version AS BIGINT) FROM refinery_schema_history ORDER BY version",
            };
            let history: Vec<i64> = sqlx::query_scalar(history_sql)
                .fetch_all(&mut conn)
                .await
                .unwrap();
            let rows = sqlx::query(
                "SELECT CAST(migration AS BIGINT), token FROM applications ORDER BY migration",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap();
            let applications = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            (history, applications)
        }
    }
}

/// Acquires and releases `key` once: the token it gets is one more than the acquisitions so
/// far (every leaselock backend counts acquisitions of a key by one).
async fn next_token(mode: Mode, lock_url: &str, key: &str) -> u64 {
    let backend = lock_backend(mode, lock_url).await;
    let request = AcquireRequest::new(
        LockKey::new(key).unwrap(),
        OwnerId::new("processes-test").unwrap(),
        Duration::from_secs(30),
    )
    .unwrap();
    let AcquireOutcome::Acquired(lease) = backend.try_acquire(&request).await.unwrap() else {
        panic!("`{key}` is still held after every process finished");
    };
    assert!(backend.release(&lease).await.unwrap());
    lease.token.get()
}

async fn lock_backend(mode: Mode, lock_url: &str) -> Arc<dyn LockBackend> {
    if mode.is_mysql() {
        leaselock_mysql::from_url(lock_url).await.unwrap()
    } else {
        leaselock_postgres::from_url(lock_url).await.unwrap()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Starts `n` children at once and collects their reports.
fn spawn_children(
    mode: Mode,
    n: usize,
    db_url: &str,
    lock_url: &str,
    key: &str,
    start_at: u64,
) -> Vec<Report> {
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..n)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "child",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(ENV_MODE, mode.name())
                .env(ENV_DB_URL, db_url)
                .env(ENV_LOCK_URL, lock_url)
                .env(ENV_KEY, key)
                .env(ENV_START_AT, start_at.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn a child")
        })
        .collect();
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "a child failed ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let line = stdout
                .lines()
                .find_map(|l| l.split_once(MARKER).map(|(_, report)| report))
                .unwrap_or_else(|| panic!("no report from a child:\n{stdout}"));
            parse_report(line)
        })
        .collect()
}

fn parse_report(line: &str) -> Report {
    let fields: HashMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .collect();
    let versions = fields["versions"];
    Report {
        outcome: fields["outcome"].to_owned(),
        token: fields["token"].parse().unwrap(),
        lock_token: fields["lock_token"].parse().unwrap(),
        versions: if versions.is_empty() {
            Vec::new()
        } else {
            versions.split(',').map(|v| v.parse().unwrap()).collect()
        },
        before_acquire: fields["before_acquire"].parse().unwrap(),
        acquired: fields["acquired"].parse().unwrap(),
    }
}

/// Counts the lock hooks' acquisition attempts and acquisitions in one child.
#[derive(Default)]
struct Counts {
    before_acquire: AtomicU32,
    acquired: AtomicU32,
    token: AtomicU64,
}

#[leaselock::async_trait]
impl LockHooks for Counts {
    async fn before_acquire(&self, _key: &LockKey, _owner: &OwnerId) -> HookResult {
        self.before_acquire.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn acquired(&self, lease: &Lease) -> HookResult {
        self.acquired.fetch_add(1, Ordering::SeqCst);
        self.token.store(lease.token.get(), Ordering::SeqCst);
        Ok(())
    }
}

#[test]
#[ignore = "a child process of the scenarios above"]
fn child() {
    let mode = Mode::parse(&std::env::var(ENV_MODE).expect("run by a scenario"));
    runtime().block_on(child_main(mode));
}

async fn child_main(mode: Mode) {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let (db_url, lock_url, key) = (var(ENV_DB_URL), var(ENV_LOCK_URL), var(ENV_KEY));
    let start_at: u64 = var(ENV_START_AT).parse().unwrap();

    let counts = Arc::new(Counts::default());
    let locker = Locker::builder(lock_backend(mode, &lock_url).await)
        .wait(
            WaitPolicy::until(Duration::from_secs(120), Duration::from_millis(100))
                .with_jitter(Duration::from_millis(50)),
        )
        .shared_hooks(counts.clone())
        .build()
        .unwrap();
    locker.init_storage().await.unwrap();

    // Connect first, then start together.
    let dir = mode.migrations_dir();
    let outcome = match mode {
        Mode::SqlxPostgres => {
            let pool = sqlx::PgPool::connect(&db_url).await.unwrap();
            let guarded = guarded_migrator(&dir, &key).await;
            wait_until(start_at).await;
            guarded.run(&locker, &pool).await
        }
        Mode::SqlxMysql => {
            let pool = sqlx::MySqlPool::connect(&db_url).await.unwrap();
            let guarded = guarded_migrator(&dir, &key).await;
            wait_until(start_at).await;
            guarded.run(&locker, &pool).await
        }
        Mode::RefineryPostgres => {
            let (mut client, connection) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let runner = refinery::Runner::new(&refinery::load_sql_migrations(&dir).unwrap());
            let guarded = GuardedRunner::new(runner).key(&key).unwrap();
            wait_until(start_at).await;
            guarded.run(&locker, &mut client).await
        }
    };
    let outcome = outcome.unwrap_or_else(|e| panic!("the guarded run failed: {e}"));
    let (name, applied) = match outcome {
        RunIfNeeded::Ran(applied) => ("ran", Some(applied)),
        RunIfNeeded::NotNeeded => ("not-needed", None),
        RunIfNeeded::NotNeededOnceLocked => ("not-needed-once-locked", None),
        RunIfNeeded::Unavailable => ("unavailable", None),
    };
    let (token, versions) = match applied {
        Some(Applied {
            token, versions, ..
        }) => (
            token.get(),
            versions
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        None => (0, String::new()),
    };
    println!(
        "{MARKER} outcome={name} token={token} lock_token={} versions={versions} before_acquire={} acquired={}",
        counts.token.load(Ordering::SeqCst),
        counts.before_acquire.load(Ordering::SeqCst),
        counts.acquired.load(Ordering::SeqCst),
    );
}

async fn guarded_migrator(dir: &std::path::Path, key: &str) -> GuardedMigrator {
    let migrator = sqlx::migrate::Migrator::new(dir.to_path_buf())
        .await
        .unwrap();
    let guarded = GuardedMigrator::new(migrator).key(key).unwrap();
    assert!(!guarded.migrator().locking, "sqlx's own lock is off");
    guarded
}

async fn wait_until(start_at_ms: u64) {
    let now = now_ms();
    if start_at_ms > now {
        tokio::time::sleep(Duration::from_millis(start_at_ms - now)).await;
    }
}
