//! Commands that only look never create, `init` verifies what it made, `list --all` shows stale
//! leases, `status` exits per state, `init`/`check --json`: the real `leaselock` binary against
//! SQLite files in temporary directories and the real servers named by `LEASELOCK_<DB>_URL`
//! (skipped loudly when unset, a failure under CI=true).
//!
//! No assertion depends on timing: waits are bounded by generous timeouts only so that a broken
//! build fails instead of hanging.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{with_params, Done, Proc, BIN, TIMEOUT};

impl Done {
    /// Exit `code` with exactly one line on stderr, leaselock's own, containing every one of
    /// `needles`.
    fn fails_with(&self, code: i32, needles: &[&str], what: &str) {
        assert_eq!(self.code, Some(code), "{what}: {self:?}");
        let stderr = self.stderr.trim_end();
        assert_eq!(stderr.lines().count(), 1, "{what}: one line: {self:?}");
        assert!(stderr.starts_with("leaselock: "), "{what}: {self:?}");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{what}: no {needle:?} in {stderr:?}"
            );
        }
    }
}

/// Commands run in a fresh directory against `url`.
struct Env {
    dir: tempfile::TempDir,
    url: String,
    logs: tempfile::TempDir,
    seq: AtomicUsize,
}

impl Env {
    /// `sqlite://NAME` in a fresh directory (relative: the commands run there).
    fn sqlite(name: &str) -> Self {
        Self::with_url(format!("sqlite://{name}"))
    }

    fn with_url(url: String) -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            url,
            logs: tempfile::tempdir().expect("tempdir"),
            seq: AtomicUsize::new(0),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn spawn(&self, args: &[&str]) -> Proc {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let out = self.logs.path().join(format!("{n}.out"));
        let err = self.logs.path().join(format!("{n}.err"));
        let child = Command::new(BIN)
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .env("LEASELOCK_URL", &self.url)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).expect("stdout file"))
            .stderr(fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("spawn leaselock");
        Proc { child, out, err }
    }

    fn run(&self, args: &[&str]) -> Done {
        self.spawn(args).wait()
    }

    /// `status KEY --json`: the state, its exit code checked (0 held, 1 expired, 3 free); and
    /// the same for the text form (read separately: the state may change in between).
    fn state(&self, key: &str) -> String {
        let code_of = |state: &str| match state {
            "held" => 0,
            "expired" => 1,
            "free" => 3,
            other => panic!("no state: {other:?}"),
        };
        let done = self.run(&["status", key, "--json"]);
        let state = done.json()["state"].as_str().unwrap_or_default().to_owned();
        assert_eq!(done.code, Some(code_of(&state)), "{done:?}");
        let text = self.run(&["status", key]);
        let shown = text
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("state:"))
            .unwrap_or_else(|| panic!("no state line: {text:?}"))
            .trim();
        assert_eq!(text.code, Some(code_of(shown)), "{text:?}");
        state
    }

    /// Leaves an expired lease on `key`: `run --ttl 1s` killed with SIGKILL while its command
    /// runs, then waits until `status` says expired (exit 1).
    fn leave_expired(&self, key: &str) {
        let started = format!("started-{key}").replace(['/', ' '], "_");
        let script = format!("touch {started}; sleep 5");
        let holder = self.spawn(&["run", key, "--ttl", "1s", "--", "sh", "-c", &script]);
        let deadline = Instant::now() + TIMEOUT;
        while !self.path(&started).exists() {
            assert!(Instant::now() < deadline, "the holder never started");
            sleep(Duration::from_millis(20));
        }
        holder.kill_hard();
        while self.state(key) != "expired" {
            assert!(Instant::now() < deadline, "the lease never expired");
            sleep(Duration::from_millis(200));
        }
    }

    /// Starts `run KEY -- sh -c 'touch FILE; wait for stop-FILE'`, returning once it holds.
    fn hold(&self, key: &str) -> (Proc, String) {
        let name = format!("held-{}", self.seq.fetch_add(1, Ordering::Relaxed));
        let script = format!("touch {name}; while [ ! -e stop-{name} ]; do sleep 0.05; done");
        let holder = self.spawn(&["run", key, "--ttl", "60s", "--", "sh", "-c", &script]);
        let deadline = Instant::now() + TIMEOUT;
        while !self.path(&name).exists() {
            assert!(Instant::now() < deadline, "the holder never started");
            sleep(Duration::from_millis(20));
        }
        (holder, name)
    }

    fn stop(&self, (holder, name): (Proc, String)) {
        fs::write(self.path(&format!("stop-{name}")), "").unwrap();
        let done = holder.wait();
        assert_eq!(done.code, Some(0), "{done:?}");
    }
}

/// Every file under `dir` (recursively) with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.push((path.clone(), Vec::new()));
            out.extend(snapshot(&path));
        } else {
            out.push((path.clone(), fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

/// A name no other test (or earlier run) uses, for shared servers.
fn fresh(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("ro_{name}_{}_{}", std::process::id(), nanos % 1_000_000_000)
}

const LOOKERS: &[&[&str]] = &[
    &["status", "k"],
    &["status", "k", "--json"],
    &["list"],
    &["list", "--all", "--json"],
    &["release", "k", "--force", "--dry-run"],
    &["release", "k", "--force"],
];

#[test]
fn looking_at_a_mistyped_sqlite_path_creates_nothing() {
    let env = Env::sqlite("typo.db");
    for args in LOOKERS {
        env.run(args).fails_with(
            66,
            &["sqlite://typo.db does not exist", "leaselock init"],
            &format!("{args:?}"),
        );
        assert!(!env.path("typo.db").exists(), "{args:?} created the file");
    }
    let done = env.run(&["check"]);
    done.fails_with(66, &["does not exist", "leaselock init"], "check");
    assert!(snapshot(env.dir.path()).is_empty(), "nothing at all");
    // In a directory that does not exist either: the same, and no directory appears.
    let env = Env::sqlite("no/such/dir/locks.db");
    env.run(&["status", "k"])
        .fails_with(66, &["does not exist"], "missing dir");
    assert!(snapshot(env.dir.path()).is_empty());
}

#[test]
fn a_directory_or_a_foreign_file_is_refused_and_left_alone() {
    let env = Env::sqlite("locks.db");
    fs::create_dir(env.path("locks.db")).unwrap();
    fs::write(env.path("locks.db/inside"), "x").unwrap();
    let foreign = Env::sqlite("notes.txt");
    fs::write(
        foreign.path("notes.txt"),
        "These are my notes, not a database. ".repeat(20),
    )
    .unwrap();
    for (env, needle) in [
        (&env, "locks.db is a directory"),
        (&foreign, "notes.txt: file is not a database"),
    ] {
        let before = snapshot(env.dir.path());
        let mut commands: Vec<&[&str]> = LOOKERS.to_vec();
        commands.extend([&["check"][..], &["init"], &["run", "k", "--", "true"]]);
        for args in commands {
            env.run(args)
                .fails_with(66, &[needle], &format!("{args:?}"));
        }
        let done = env.run(&["check", "--json"]);
        assert_eq!(done.code, Some(66), "{done:?}");
        let json = done.json();
        assert_eq!(json["ok"], false, "{json}");
        assert!(json["error"].as_str().unwrap().contains(needle), "{json}");
        assert_eq!(snapshot(env.dir.path()), before, "something changed");
    }
}

#[test]
fn a_read_only_database_file_is_read_and_never_written() {
    let env = Env::sqlite("locks.db");
    assert_eq!(env.run(&["init"]).code, Some(0));
    env.leave_expired("stale");
    let path = env.path("locks.db");
    // Fold the write-ahead log into the file, so that its bytes are the whole database.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let before = fs::read(&path).unwrap();
    let mut perms = fs::metadata(&path).unwrap().permissions();
    perms.set_readonly(true);
    fs::set_permissions(&path, perms).unwrap();

    assert_eq!(env.state("stale"), "expired");
    assert_eq!(env.state("other"), "free");
    let done = env.run(&["list", "--all", "--json"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert_eq!(done.json()["locks"][0]["state"], "expired");
    let done = env.run(&["release", "stale", "--force", "--dry-run"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert_eq!(env.run(&["check"]).code, Some(0));
    assert_eq!(fs::read(&path).unwrap(), before, "a look changed the file");

    // Writing to a file the user may not write: the permission bits bind only for a user
    // other than root, so as root the commands run as `nobody` (through setpriv).
    let set_mode = |path: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    };
    // The binary, where `nobody` may run it (the build directory may be in a home it may not
    // enter).
    let bin_dir = tempfile::tempdir().expect("tempdir");
    let as_user: Vec<String> = if fs::OpenOptions::new().write(true).open(&path).is_ok() {
        if Command::new("setpriv").arg("--version").output().is_err() {
            let message = "the write-refusal part of this test needs setpriv (util-linux) to \
                           run leaselock as another user than root";
            assert!(!leaselock_conformance::is_ci(), "{message}");
            eprintln!("\n#####  NOT RUN: {message}.  #####\n");
            return;
        }
        let bin = bin_dir.path().join("leaselock");
        fs::copy(BIN, &bin).expect("copy the binary");
        set_mode(bin_dir.path(), 0o755);
        set_mode(&bin, 0o755);
        let bin = bin.to_string_lossy().into_owned();
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &bin,
        ]
        .map(str::to_owned)
        .to_vec()
    } else {
        vec![BIN.to_owned()]
    };
    let run_as = |args: &[&str]| -> Done {
        let mut command = as_user.clone();
        command.extend(args.iter().map(|a| a.to_string()));
        let n = env.seq.fetch_add(1, Ordering::Relaxed);
        let (out, err) = (
            env.logs.path().join(format!("u{n}.out")),
            env.logs.path().join(format!("u{n}.err")),
        );
        let child = Command::new(&command[0])
            .args(&command[1..])
            .current_dir(env.dir.path())
            .env_remove("RUST_LOG")
            .env("LEASELOCK_URL", &env.url)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .expect("spawn");
        Proc { child, out, err }.wait()
    };
    // A directory the user may not write: SQLite cannot make the WAL index beside the file.
    // (The readers above left theirs, with nothing in the log: no connection is open now.)
    for side in ["locks.db-wal", "locks.db-shm"] {
        if env.path(side).exists() {
            assert_eq!(
                fs::metadata(env.path("locks.db-wal"))
                    .map(|m| m.len())
                    .unwrap_or(0),
                0
            );
            fs::remove_file(env.path(side)).unwrap();
        }
    }
    set_mode(env.dir.path(), 0o555);
    let done = run_as(&["status", "stale"]);
    done.fails_with(
        77,
        &["locks.db: cannot be read by this user"],
        "read-only directory",
    );
    // A directory the user may write, the file read-only: reads work, writes fail clearly.
    set_mode(env.dir.path(), 0o777);
    let done = run_as(&["status", "stale"]);
    assert_eq!(done.code, Some(1), "expired: {done:?}");
    for args in [
        &["release", "stale", "--force"][..],
        &["run", "k", "--", "true"],
    ] {
        // Refused permission: 77, which no wait retries.
        run_as(args).fails_with(77, &["readonly database"], &format!("{args:?}"));
    }
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "a refused write changed the file"
    );
}

/// `init` over storage it cannot use: exit 66, one line naming it, `--json` too, nothing changed.
fn init_refuses(env: &Env, needles: &[&str]) {
    env.run(&["init"]).fails_with(66, needles, "init");
    let done = env.run(&["init", "--json"]);
    assert_eq!(done.code, Some(66), "{done:?}");
    let json = done.json();
    assert_eq!(json["ok"], false, "{json}");
    for needle in needles {
        assert!(json["error"].as_str().unwrap().contains(needle), "{json}");
    }
    assert_eq!(done.stderr.lines().count(), 1, "{done:?}");
    let done = env.run(&["check", "--json"]);
    assert_eq!(done.code, Some(66), "{done:?}");
    assert_eq!(done.json()["ok"], false, "{done:?}");
    assert_ne!(env.run(&["status", "k"]).code, Some(3), "never `free`");
}

#[test]
fn sqlite_init_refuses_a_table_with_other_columns_or_a_view() {
    for (schema, needles) in [
        (
            "CREATE TABLE leaselock_locks (id INTEGER PRIMARY KEY, name TEXT);",
            &[
                "not usable after init",
                "`leaselock_locks` is not a leaselock lock table",
            ][..],
        ),
        (
            "CREATE TABLE t (x); CREATE VIEW leaselock_locks AS SELECT x FROM t;",
            &["not usable after init", "`leaselock_locks` is a view"],
        ),
    ] {
        let env = Env::sqlite("locks.db");
        let path = env.path("locks.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(schema)
            .unwrap();
        let read_schema = || -> Vec<String> {
            let conn = rusqlite::Connection::open(&path).unwrap();
            let mut stmt = conn
                .prepare("SELECT sql FROM sqlite_schema ORDER BY name")
                .unwrap();
            let rows = stmt.query_map([], |r| r.get(0)).unwrap();
            rows.map(Result::unwrap).collect()
        };
        let before = read_schema();
        init_refuses(&env, needles);
        assert_eq!(read_schema(), before, "the schema changed");
    }
}

#[test]
fn init_and_check_speak_json() {
    let env = Env::sqlite("locks.db");
    let done = env.run(&["check", "--json"]);
    assert_eq!(done.code, Some(66), "{done:?}");
    let json = done.json();
    assert_eq!(json["ok"], false);
    assert_eq!(json["url"], "sqlite://locks.db");
    assert!(json["error"].as_str().unwrap().contains("does not exist"));
    assert!(!env.path("locks.db").exists(), "check creates nothing");

    let done = env.run(&["init", "--json"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert_eq!(done.stderr, "");
    let json = done.json();
    assert_eq!(
        (&json["ok"], &json["backend"], &json["error"]),
        (&Value::Bool(true), &Value::from("sqlite"), &Value::Null),
        "{json}"
    );
    let done = env.run(&["check", "--json"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert_eq!(done.json()["ok"], true);
    // Without --json: one line of text.
    let done = env.run(&["init"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert!(done.stdout.starts_with("lock storage ready"), "{done:?}");
}

/// `status` exit codes per state, and `list --all` with an expired lease and its age, beside a
/// held lock; plain `list` shows only the held one.
fn states_and_stale_leases(env: &Env, label: &str) {
    let stale = format!("{label}-stale");
    let held = format!("{label}-held");
    assert_eq!(env.state(&stale), "free", "{label}");
    env.leave_expired(&stale);
    let holder = env.hold(&held);
    assert_eq!(env.state(&held), "held", "{label}");

    let done = env.run(&["list", "--json"]);
    assert_eq!(done.code, Some(0), "{label}: {done:?}");
    let keys: Vec<Value> = done.json()["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["key"].clone())
        .collect();
    assert!(
        keys.contains(&Value::from(held.as_str())),
        "{label}: {done:?}"
    );
    assert!(
        !keys.contains(&Value::from(stale.as_str())),
        "{label}: {done:?}"
    );

    let done = env.run(&["list", "--all", "--json"]);
    assert_eq!(done.code, Some(0), "{label}: {done:?}");
    let json = done.json();
    assert_eq!(json["all"], true);
    let find = |key: &str| -> Value {
        json["locks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["key"] == key)
            .unwrap_or_else(|| panic!("{label}: {key} not listed: {json}"))
            .clone()
    };
    let expired = find(&stale);
    assert_eq!(expired["state"], "expired", "{label}: {expired}");
    assert_eq!(expired["remaining_ms"], 0, "{label}: {expired}");
    assert!(expired["expired_ago_ms"].is_u64(), "{label}: {expired}");
    assert!(expired["expired_ago"].is_string(), "{label}: {expired}");
    let live = find(&held);
    assert_eq!(live["state"], "held", "{label}: {live}");
    assert!(live["expired_ago_ms"].is_null(), "{label}: {live}");

    let table = env.run(&["list", "--all"]);
    assert_eq!(table.code, Some(0), "{label}: {table:?}");
    assert!(table.stdout.starts_with("KEY"), "{label}: {table:?}");
    let row = |key: &str| {
        table
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("{label}: no row for {key}: {table:?}"))
            .to_owned()
    };
    let stale_row = row(&stale);
    assert!(stale_row.contains(" expired "), "{label}: {stale_row}");
    assert!(
        stale_row.trim_end().ends_with(" ago"),
        "{label}: {stale_row}"
    );
    assert!(row(&held).contains(" held "), "{label}: {table:?}");
    env.stop(holder);
    assert_eq!(env.state(&held), "free", "{label}");
}

#[test]
fn sqlite_status_codes_and_list_all() {
    let env = Env::sqlite("locks.db");
    assert_eq!(env.run(&["init"]).code, Some(0));
    states_and_stale_leases(&env, "sqlite");
}

// ---- Servers --------------------------------------------------------------------------------

/// A server backend: status and list on storage that does not exist exit 66 and create
/// nothing (a later `check` still finds it missing), then the states and stale leases.
fn server_storage(base: &str, label: &str, lease_based: bool) {
    let env = Env::with_url(base.to_owned());
    for args in LOOKERS {
        env.run(args).fails_with(
            66,
            &["is not initialized", "leaselock init"],
            &format!("{label} {args:?}"),
        );
    }
    env.run(&["check"])
        .fails_with(66, &["not initialized"], label);
    let done = env.run(&["init", "--json"]);
    assert_eq!(done.code, Some(0), "{label}: {done:?}");
    assert_eq!(done.json()["ok"], true, "{label}");
    assert_eq!(env.run(&["check", "--json"]).json()["ok"], true, "{label}");
    if lease_based {
        states_and_stale_leases(&env, label);
    } else {
        // Session locks leave nothing behind: a killed holder's lock is free at once.
        let (holder, _) = env.hold("s");
        assert_eq!(env.state("s"), "held", "{label}");
        holder.kill_hard();
        let deadline = Instant::now() + TIMEOUT;
        while env.state("s") != "free" {
            assert!(
                Instant::now() < deadline,
                "{label}: the session lock stayed"
            );
            sleep(Duration::from_millis(100));
        }
        let done = env.run(&["list", "--all", "--json"]);
        assert_eq!(done.json()["locks"], Value::Array(vec![]), "{label}");
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

#[test]
fn postgres_storage_is_never_created_by_a_look() {
    let Some(base) = leaselock_conformance::server_url("LEASELOCK_POSTGRES_URL") else {
        return;
    };
    let table = fresh("pg_table");
    server_storage(
        &with_params(&base, &format!("strategy=table&table={table}")),
        "postgres-table",
        true,
    );
    let counters = fresh("pg_adv");
    server_storage(
        &with_params(&base, &format!("strategy=advisory&table={counters}")),
        "postgres-advisory",
        false,
    );
    // Wrong columns, and a view of that name.
    let (wrong, view) = (fresh("pg_wrong"), fresh("pg_view"));
    block_on(async {
        let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "CREATE TABLE {wrong} (id int PRIMARY KEY, name text); \
                 CREATE VIEW {view} AS SELECT 1 AS x;"
            ))
            .await
            .expect("create");
    });
    for t in [&wrong, &view] {
        let env = Env::with_url(with_params(&base, &format!("strategy=table&table={t}")));
        init_refuses(&env, &[t.as_str()]);
    }
    block_on(async {
        let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "DROP TABLE {wrong}; DROP VIEW {view}; DROP TABLE IF EXISTS {table}; \
                 DROP TABLE IF EXISTS {counters}; DROP TABLE IF EXISTS {counters}_holders;"
            ))
            .await
            .expect("drop");
    });
}

#[test]
fn mysql_storage_is_never_created_by_a_look() {
    let Some(base) = leaselock_conformance::server_url("LEASELOCK_MYSQL_URL") else {
        return;
    };
    let table = fresh("my_table");
    server_storage(
        &with_params(&base, &format!("strategy=table&table={table}")),
        "mysql-table",
        true,
    );
    let counters = fresh("my_getlock");
    server_storage(
        &with_params(&base, &format!("strategy=get_lock&table={counters}")),
        "mysql-get-lock",
        false,
    );
    let (wrong, view) = (fresh("my_wrong"), fresh("my_view"));
    let sql = |statements: String| {
        let base = base.clone();
        block_on(async move {
            use mysql_async::prelude::Queryable;
            let pool = mysql_async::Pool::from_url(base.as_str()).expect("url");
            let mut conn = pool.get_conn().await.expect("connect");
            conn.query_drop(statements).await.expect("statement");
            drop(conn);
            pool.disconnect().await.expect("disconnect");
        })
    };
    sql(format!(
        "CREATE TABLE {wrong} (id INT PRIMARY KEY, name TEXT); \
         CREATE VIEW {view} AS SELECT 1 AS x;"
    ));
    for t in [&wrong, &view] {
        let env = Env::with_url(with_params(&base, &format!("strategy=table&table={t}")));
        init_refuses(&env, &[&format!("`{t}`"), "not usable after init"]);
    }
    sql(format!(
        "DROP TABLE {wrong}; DROP VIEW {view}; DROP TABLE IF EXISTS {table}; \
         DROP TABLE IF EXISTS {counters}; DROP TABLE IF EXISTS {counters}_holders;"
    ));
}

#[test]
fn mongodb_storage_is_never_created_by_a_look() {
    let Some(base) = leaselock_conformance::server_url("LEASELOCK_MONGODB_URL") else {
        return;
    };
    let collection = fresh("mongo");
    server_storage(
        &with_params(&base, &format!("collection={collection}")),
        "mongodb",
        true,
    );
    block_on(async {
        let client = mongodb::Client::with_uri_str(&base).await.expect("client");
        let database = client
            .default_database()
            .unwrap_or_else(|| client.database("leaselock"));
        database
            .collection::<mongodb::bson::Document>(&collection)
            .drop()
            .await
            .expect("drop the collection");
        client.shutdown().await;
    });
}

#[test]
fn dynamodb_storage_is_never_created_by_a_look() {
    let Some(base) = leaselock_conformance::server_url("LEASELOCK_DYNAMODB_URL") else {
        return;
    };
    let mut url = url::Url::parse(&base).expect("LEASELOCK_DYNAMODB_URL is a URL");
    url.set_host(Some(&fresh("dynamo"))).expect("a table name");
    server_storage(url.as_str(), "dynamodb", true);
}
