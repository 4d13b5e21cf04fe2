//! leaselock's tables next to an application's schema: `?schema=` on the PostgreSQL advisory
//! strategy keeps them out of `public`, a database of their own keeps MySQL's `GET_LOCK` tables
//! out of the application's, and a session lock whose tables a migration dropped is reported as
//! what it is (freed with the connection), not as a lease that "will expire". Against the
//! servers named by `LEASELOCK_POSTGRES_URL` and `LEASELOCK_MYSQL_URL` (skipped with a loud
//! message when unset); every schema, database and table is fresh and dropped at the end.

use std::process::{Command, Output, Stdio};

use leaselock_mysql::mysql_async::{self, prelude::Queryable};
use std::time::{SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_leaselock");

fn fresh(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("ll_sch_{what}_{}_{nanos:x}", std::process::id())
}

fn with_query(url: &str, extra: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{extra}")
}

fn leaselock(url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("LEASELOCK_URL", url)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run leaselock")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `sql` on the server; returns the first column of every row, as text.
fn psql(url: &str, sql: &str) -> Vec<String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect to PostgreSQL");
            let driver = tokio::spawn(connection);
            let mut values = Vec::new();
            for message in client.simple_query(sql).await.expect(sql) {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                    values.push(row.get(0).unwrap_or_default().to_owned());
                }
            }
            drop(client);
            let _ = driver.await;
            values
        })
}

/// `run` with `?schema=NAME` on the advisory strategy: the counter and holder tables are made
/// in that schema and not in `public`, the lock works (two runs, increasing tokens), `key`
/// names the schema.
#[test]
fn advisory_tables_go_to_the_schema_of_the_url() {
    let Some(url) = leaselock_conformance::server_url("LEASELOCK_POSTGRES_URL") else {
        return;
    };
    let schema = fresh("schema");
    let table = fresh("adv");
    let storage = with_query(
        &url,
        &format!("schema={schema}&table={table}&prefix={table}"),
    );
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let done = leaselock(
            &storage,
            &[
                "run",
                "k",
                "--no-wait",
                "--",
                "sh",
                "-c",
                "echo $LEASELOCK_TOKEN",
            ],
        );
        assert_eq!(done.status.code(), Some(0), "{}", text(&done.stderr));
        assert_eq!(text(&done.stderr), "");
        tokens.push(text(&done.stdout).trim().parse::<u64>().expect("a token"));
    }
    assert!(tokens[1] > tokens[0], "{tokens:?}");
    let mut in_schema = psql(
        &url,
        &format!("SELECT tablename FROM pg_tables WHERE schemaname = '{schema}' ORDER BY 1"),
    );
    in_schema.sort();
    assert_eq!(in_schema, [table.clone(), format!("{table}_holders")]);
    let elsewhere = psql(
        &url,
        &format!(
            "SELECT schemaname FROM pg_tables WHERE tablename LIKE '{table}%' \
             AND schemaname <> '{schema}'"
        ),
    );
    assert!(elsewhere.is_empty(), "{elsewhere:?}");
    let key = leaselock(&storage, &["key", "k", "--json"]);
    assert!(text(&key.stdout).contains(&format!("\"schema\": \"{schema}\"")));
    psql(&url, &format!("DROP SCHEMA \"{schema}\" CASCADE"));
}

/// The command drops the holder table of the session lock it runs under (as a careless
/// migration would): the release fails, and the message says the session lock ends with
/// leaselock's connection, never that it "will expire".
#[test]
fn a_failed_release_of_a_session_lock_does_not_promise_an_expiry() {
    let Some(url) = leaselock_conformance::server_url("LEASELOCK_POSTGRES_URL") else {
        return;
    };
    let schema = fresh("rel");
    let storage = with_query(&url, &format!("schema={schema}&prefix={schema}"));
    let init = leaselock(&storage, &["init"]);
    assert_eq!(init.status.code(), Some(0), "{}", text(&init.stderr));
    // The command holds the lock until the test, having dropped the table, creates `go`.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let go = dir.path().join("go");
    let started = dir.path().join("started");
    let script = format!(
        "touch '{}'; while [ ! -e '{}' ]; do sleep 0.05; done",
        started.display(),
        go.display()
    );
    let child = Command::new(BIN)
        .args(["run", "k", "--no-wait", "--", "sh", "-c", &script])
        .env("LEASELOCK_URL", &storage)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start leaselock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the command never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    psql(
        &url,
        &format!("DROP TABLE \"{schema}\".leaselock_advisory_holders"),
    );
    std::fs::write(&go, "").expect("signal the command");
    let done = child.wait_with_output().expect("wait for leaselock");
    let err = text(&done.stderr);
    psql(&url, &format!("DROP SCHEMA \"{schema}\" CASCADE"));
    let line = err
        .lines()
        .find(|l| l.starts_with("leaselock: could not release `k`"))
        .unwrap_or_else(|| panic!("no release failure reported: {err}"));
    assert!(line.contains("session lock"), "{line}");
    assert!(!line.contains("expire"), "{line}");
}

/// Runs `sql` on the MySQL/MariaDB server; returns the first column of every row.
fn mysql(url: &str, sql: &str) -> Vec<String> {
    let url = url.replacen("mariadb://", "mysql://", 1);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(async {
            let mut conn = mysql_async::Conn::from_url(url.as_str())
                .await
                .expect("connect to MariaDB");
            let values: Vec<String> = conn.query(sql).await.expect(sql);
            let _ = conn.disconnect().await;
            values
        })
}

/// MySQL/MariaDB: a database of leaselock's own in the URL's path holds the `GET_LOCK`
/// strategy's counter and holder tables; the application's database gets none.
#[test]
fn get_lock_tables_go_to_the_database_of_the_url() {
    let Some(url) = leaselock_conformance::server_url("LEASELOCK_MYSQL_URL") else {
        return;
    };
    let db = fresh("db");
    let app_db = url::Url::parse(&url)
        .expect("a valid server URL")
        .path()
        .trim_start_matches('/')
        .to_owned();
    mysql(&url, &format!("CREATE DATABASE `{db}`"));
    let mut own = url::Url::parse(&url).expect("a valid server URL");
    own.set_path(&format!("/{db}"));
    let storage = with_query(own.as_str(), &format!("prefix={db}"));
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let done = leaselock(
            &storage,
            &[
                "run",
                "k",
                "--no-wait",
                "--",
                "sh",
                "-c",
                "echo $LEASELOCK_TOKEN",
            ],
        );
        assert_eq!(done.status.code(), Some(0), "{}", text(&done.stderr));
        tokens.push(text(&done.stdout).trim().parse::<u64>().expect("a token"));
    }
    assert!(tokens[1] > tokens[0], "{tokens:?}");
    let mut tables = mysql(
        &url,
        &format!(
            "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
             WHERE table_schema = '{db}'"
        ),
    );
    tables.sort();
    mysql(&url, &format!("DROP DATABASE `{db}`"));
    assert_eq!(
        tables,
        ["leaselock_get_locks", "leaselock_get_locks_holders"]
    );
    // The key's lock name has no row in the application's database's counter table.
    let native = text(&leaselock(&storage, &["key", "k", "--json"]).stdout);
    let lock_name = native
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"lock_name\": \""))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no lock_name in {native}"))
        .to_owned();
    let app_has_counters = mysql(
        &url,
        &format!(
            "SELECT CAST(count(*) AS CHAR) FROM information_schema.tables \
             WHERE table_schema = '{app_db}' AND table_name = 'leaselock_get_locks'"
        ),
    );
    if !app_db.is_empty() && app_has_counters == ["1"] {
        let rows = mysql(
            &url,
            &format!(
                "SELECT CAST(count(*) AS CHAR) FROM `{app_db}`.leaselock_get_locks \
                 WHERE lock_name = '{lock_name}'"
            ),
        );
        assert_eq!(rows, ["0"], "{lock_name}");
    }
}
