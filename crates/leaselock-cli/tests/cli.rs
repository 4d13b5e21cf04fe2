//! The real `leaselock` binary against SQLite files in temporary directories, and against the
//! real servers named by `LEASELOCK_<DB>_URL` (skipped with a loud message when unset).
//!
//! No assertion depends on timing: waits are bounded by generous timeouts only so that a broken
//! build fails instead of hanging.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{with_params, Done, Proc, BIN, TIMEOUT};

/// A password that must never appear in any output.
const SECRET: &str = "Sup3rSecretPw";

/// A temporary directory with its own lock database.
struct Env {
    dir: tempfile::TempDir,
    /// The LEASELOCK_URL of every command.
    url: String,
    /// Where each process's stdout/stderr go (files, not pipes: an orphaned grandchild holding
    /// a pipe open would block reading it).
    logs: tempfile::TempDir,
    seq: AtomicUsize,
}

impl Env {
    /// Locks in an SQLite file in a fresh directory.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("locks.db").display());
        Self::with(dir, url)
    }

    /// Locks at `url`, commands running in a fresh directory.
    fn with_url(url: String) -> Self {
        Self::with(tempfile::tempdir().expect("tempdir"), url)
    }

    fn with(dir: tempfile::TempDir, url: String) -> Self {
        Self {
            dir,
            url,
            logs: tempfile::tempdir().expect("tempdir"),
            seq: AtomicUsize::new(0),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    /// `leaselock ARGS` in this directory; `url`: `None` leaves LEASELOCK_URL unset (the default
    /// URL, in this directory).
    fn command(&self, url: Option<&str>, args: &[&str]) -> (Command, PathBuf, PathBuf) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let out = self.logs.path().join(format!("{n}.out"));
        let err = self.logs.path().join(format!("{n}.err"));
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .env_remove("LEASELOCK_URL")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).expect("stdout file"))
            .stderr(fs::File::create(&err).expect("stderr file"));
        if let Some(url) = url {
            cmd.env("LEASELOCK_URL", url);
        }
        (cmd, out, err)
    }

    fn spawn_with(&self, url: Option<&str>, args: &[&str]) -> Proc {
        let (mut cmd, out, err) = self.command(url, args);
        Proc {
            child: cmd.spawn().expect("spawn leaselock"),
            out,
            err,
        }
    }

    fn spawn(&self, args: &[&str]) -> Proc {
        self.spawn_with(Some(&self.url()), args)
    }

    fn run(&self, args: &[&str]) -> Done {
        self.spawn(args).wait()
    }

    fn run_with(&self, url: Option<&str>, args: &[&str]) -> Done {
        self.spawn_with(url, args).wait()
    }

    fn wait_for_file(&self, name: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.path(name).exists() {
            assert!(Instant::now() < deadline, "{name} never appeared");
            sleep(Duration::from_millis(20));
        }
    }

    /// `leaselock status KEY --json`, its exit code checked against the state it shows (0
    /// held, 1 expired, 3 free).
    fn status(&self, key: &str) -> Value {
        let done = self.run(&["status", key, "--json"]);
        let status = done.json();
        let code = match status["state"].as_str() {
            Some("held") => 0,
            Some("expired") => 1,
            Some("free") => 3,
            _ => panic!("no state: {done:?}"),
        };
        assert_eq!(done.code, Some(code), "{done:?}");
        status
    }

    /// `leaselock key KEY --json`.
    fn native(&self, key: &str) -> Value {
        let done = self.run(&["key", key, "--json"]);
        assert_eq!(done.code, Some(0), "{done:?}");
        done.json()
    }

    /// Starts `leaselock run KEY EXTRA... -- sh -c SCRIPT` and waits until the script has
    /// created `started` (it must).
    fn hold(&self, key: &str, extra: &[&str], script: &str) -> Proc {
        let mut args = vec!["run", key];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", script]);
        let proc = self.spawn(&args);
        self.wait_for_file("started");
        proc
    }
}

fn assert_one_line_error(done: &Done, what: &str) {
    let stderr = done.stderr.trim_end();
    assert_eq!(
        stderr.lines().count(),
        1,
        "{what}: expected a one-line error, got {stderr:?}"
    );
    assert!(
        stderr.starts_with("leaselock: "),
        "{what}: unexpected error format {stderr:?}"
    );
}

/// A script that holds the lock until the file `stop` appears.
const HOLD_UNTIL_STOP: &str = "touch started; while [ ! -e stop ]; do sleep 0.05; done";

#[test]
fn eight_processes_never_overlap_and_lose_no_update() {
    contend(&Env::new(), "shared-counter", 8);
}

/// `processes` processes `leaselock run` one key, each doing a read-modify-write of a counter
/// file with a pause inside; checks the count, that no two critical sections overlapped, and
/// that fencing tokens increased from one section to the next.
fn contend(env: &Env, key: &str, processes: usize) {
    fs::write(env.path("counter"), "0\n").unwrap();
    // A read-modify-write with a pause inside: without mutual exclusion updates get lost, and
    // the start/end markers of two sections interleave.
    let script = r#"echo "start $LEASELOCK_TOKEN" >> log
n=$(cat counter)
sleep 0.05
echo $((n+1)) > counter
echo "end $LEASELOCK_TOKEN" >> log"#;
    let procs: Vec<Proc> = (0..processes)
        .map(|_| {
            env.spawn(&[
                "run", key, "--wait", "3m", "--ttl", "20s", "-q", "--", "sh", "-c", script,
            ])
        })
        .collect();
    for proc in procs {
        let done = proc.wait();
        assert_eq!(done.code, Some(0), "{done:?}");
    }
    let counter = fs::read_to_string(env.path("counter")).unwrap();
    assert_eq!(counter.trim(), processes.to_string(), "lost updates");
    let log = fs::read_to_string(env.path("log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2 * processes, "{log}");
    let mut last_token = 0u64;
    for pair in lines.chunks(2) {
        let start = pair[0].strip_prefix("start ").expect(&log);
        let end = pair[1].strip_prefix("end ").expect(&log);
        assert_eq!(start, end, "critical sections overlapped:\n{log}");
        let token: u64 = start.parse().expect("fencing token");
        assert!(token > last_token, "fencing tokens must increase:\n{log}");
        last_token = token;
    }
    assert_eq!(env.status(key)["state"], "free");
}

#[test]
fn no_wait_on_a_held_key_exits_with_the_conflict_code() {
    let env = Env::new();
    let holder = env.hold("busy", &[], HOLD_UNTIL_STOP);

    let done = env.run(&["run", "busy", "--no-wait", "--", "touch", "ran"]);
    assert_eq!(done.code, Some(124), "{done:?}");
    assert_one_line_error(&done, "conflict");
    assert!(done.stderr.contains("held by"), "{done:?}");
    assert!(
        done.stderr.contains(&format!("pid {}", holder.pid())),
        "{done:?}"
    );
    assert!(!env.path("ran").exists(), "the command must not run");

    let done = env.run(&["run", "busy", "-n", "-E", "42", "--", "true"]);
    assert_eq!(done.code, Some(42), "{done:?}");
    let done = env.run(&["run", "busy", "--wait", "0", "--", "true"]);
    assert_eq!(done.code, Some(124), "--wait 0 means --no-wait: {done:?}");
    let done = env.run(&["run", "busy", "--wait", "300ms", "--", "true"]);
    assert_eq!(done.code, Some(124), "--wait timing out: {done:?}");
    assert!(done.stderr.contains("gave up"), "{done:?}");
    let done = env.run(&["run", "busy", "-n", "-E", "1", "--", "true"]);
    assert_eq!(done.code, Some(1), "flock's code on request: {done:?}");
    let done = env.run(&["run", "busy", "-n", "--quiet", "--", "true"]);
    assert_eq!(done.code, Some(124), "{done:?}");
    assert_eq!(done.stderr, "", "--quiet prints nothing on conflict");

    fs::write(env.path("stop"), "").unwrap();
    let done = holder.wait();
    assert_eq!(done.code, Some(0), "{done:?}");
    let done = env.run(&["run", "busy", "--no-wait", "--", "touch", "ran"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert!(env.path("ran").exists());
}

#[test]
fn a_waiter_runs_once_the_holder_is_done() {
    let env = Env::new();
    let holder = env.hold("queue", &[], HOLD_UNTIL_STOP);
    let waiter = env.spawn(&["run", "queue", "--", "sh", "-c", "echo waited > waited"]);
    // The waiter reports who holds the lock before it gets it.
    let deadline = Instant::now() + TIMEOUT;
    while !fs::read_to_string(&waiter.err)
        .unwrap_or_default()
        .contains("waiting")
    {
        assert!(Instant::now() < deadline, "the waiter never said it waits");
        sleep(Duration::from_millis(20));
    }
    assert!(!env.path("waited").exists(), "ran while the lock was held");
    fs::write(env.path("stop"), "").unwrap();
    assert_eq!(holder.wait().code, Some(0));
    let done = waiter.wait();
    assert_eq!(done.code, Some(0), "{done:?}");
    assert!(
        done.stderr.contains("acquired `queue` after waiting"),
        "{done:?}"
    );
    assert_eq!(fs::read_to_string(env.path("waited")).unwrap(), "waited\n");
}

#[test]
fn exit_codes_and_environment_pass_through() {
    let env = Env::new();
    let done = env.run(&["run", "codes", "--", "sh", "-c", "exit 7"]);
    assert_eq!(done.code, Some(7), "{done:?}");
    let done = env.run(&["run", "codes", "--", "true"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    let done = env.run(&["run", "codes", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(done.code, Some(128 + 15), "killed by SIGTERM: {done:?}");
    let done = env.run(&["run", "codes", "--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(done.code, Some(128 + 9), "killed by SIGKILL: {done:?}");
    let done = env.run(&["run", "codes", "--", "./no-such-command"]);
    assert_eq!(done.code, Some(69), "{done:?}");
    assert_one_line_error(&done, "cannot run");

    let done = env.run(&[
        "run",
        "codes",
        "--",
        "sh",
        "-c",
        r#"echo "$LEASELOCK_KEY|$LEASELOCK_OWNER|$LEASELOCK_TOKEN"; echo out-of-child"#,
    ]);
    assert_eq!(done.code, Some(0), "{done:?}");
    let mut lines = done.stdout.lines();
    let fields: Vec<&str> = lines.next().unwrap().split('|').collect();
    assert_eq!(fields[0], "codes");
    assert!(!fields[1].is_empty(), "owner");
    let token: u64 = fields[2].parse().expect("numeric fencing token");
    assert!(token > 0);
    assert_eq!(lines.next(), Some("out-of-child"));
    let done = env.run(&["run", "codes", "--", "sh", "-c", "echo $LEASELOCK_TOKEN"]);
    assert!(
        done.stdout.trim().parse::<u64>().unwrap() > token,
        "{done:?}"
    );
    // Every run released the lock, whatever its exit.
    assert_eq!(env.status("codes")["state"], "free");
}

#[test]
fn a_killed_holder_leaves_a_lock_that_if_stale_breaks_once_stale() {
    let env = Env::new();
    let holder = env.hold(
        "crashy",
        &["--ttl", "5s"],
        "echo $$ > child.pid; touch started; exec sleep 120",
    );
    let holder_pid = holder.pid();
    let before = env.status("crashy");
    assert_eq!(before["state"], "held", "{before}");
    assert_eq!(before["lock"]["pid"], holder_pid, "{before}");
    let token = before["lock"]["token"].as_u64().unwrap();

    // While the holder lives it refreshes its lease: --if-stale refuses.
    let done = env.run(&["release", "crashy", "--force", "--if-stale"]);
    assert_eq!(done.code, Some(1), "{done:?}");
    assert_one_line_error(&done, "refusal");
    assert_eq!(env.status("crashy")["state"], "held");

    holder.kill_hard();
    // The lock is still there (held until its lease runs out, then expired).
    let after = env.status("crashy");
    assert!(
        after["state"] == "held" || after["state"] == "expired",
        "{after}"
    );
    assert_eq!(after["lock"]["owner"], before["lock"]["owner"]);
    let text = env.run(&["status", "crashy"]);
    assert!(
        text.stdout.contains(&format!("pid:         {holder_pid}")),
        "{text:?}"
    );

    // Once stale, --if-stale breaks it; until then it refuses (exit 1) and changes nothing.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let done = env.run(&["release", "crashy", "--force", "--if-stale", "--json"]);
        match done.code {
            Some(0) => {
                let json = done.json();
                assert_eq!(json["action"], "released", "{json}");
                assert_eq!(json["before"]["state"], "expired", "{json}");
                assert_eq!(json["removed"]["token"], token, "{json}");
                break;
            }
            Some(1) => assert_eq!(done.json()["action"], "refused"),
            _ => panic!("unexpected: {done:?}"),
        }
        assert!(Instant::now() < deadline, "the lease never became stale");
        sleep(Duration::from_millis(200));
    }
    assert_eq!(env.status("crashy")["state"], "free");

    // The orphaned command keeps running without the lock (nothing can tell it); clean up.
    let child_pid = fs::read_to_string(env.path("child.pid")).unwrap();
    let _ = Command::new("kill").arg(child_pid.trim()).status();

    // The next holder gets a larger fencing token.
    let done = env.run(&["run", "crashy", "--", "sh", "-c", "echo $LEASELOCK_TOKEN"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert!(done.stdout.trim().parse::<u64>().unwrap() > token);
}

#[test]
fn a_lost_lease_stops_the_command_with_the_lost_code() {
    let env = Env::new();
    // A command that ignores SIGTERM: it gets SIGKILL after the grace period.
    let holder = env.hold(
        "fragile",
        &["--ttl", "5s", "--kill-grace", "500ms"],
        "trap '' TERM; touch started; while :; do sleep 0.1; done",
    );
    let done = env.run(&["release", "fragile", "--force"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert!(done.stdout.contains("broke `fragile`"), "{done:?}");
    let done = holder.wait();
    assert_eq!(done.code, Some(75), "{done:?}");
    assert!(done.stderr.contains("lost"), "{done:?}");
    assert!(done.stderr.contains("SIGKILL"), "{done:?}");

    // A command that stops on SIGTERM, with a chosen exit code.
    fs::remove_file(env.path("started")).unwrap();
    let holder = env.hold(
        "fragile",
        &["--ttl", "5s", "--lost-exit-code", "99"],
        "trap 'echo stopped > stopped; exit 0' TERM; touch started; while :; do sleep 0.05; done",
    );
    assert_eq!(env.run(&["release", "fragile", "--force"]).code, Some(0));
    let done = holder.wait();
    assert_eq!(done.code, Some(99), "{done:?}");
    assert_eq!(
        fs::read_to_string(env.path("stopped")).unwrap(),
        "stopped\n"
    );
    assert_eq!(env.status("fragile")["state"], "free");
}

#[test]
fn sigterm_is_forwarded_and_the_lock_released() {
    let env = Env::new();
    let holder = env.hold(
        "graceful",
        &[],
        "trap 'echo got-term > term; exit 3' TERM; touch started; while :; do sleep 0.05; done",
    );
    let status = Command::new("kill")
        .args(["-TERM", &holder.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let done = holder.wait();
    assert_eq!(done.code, Some(3), "the command's own exit code: {done:?}");
    assert_eq!(fs::read_to_string(env.path("term")).unwrap(), "got-term\n");
    assert_eq!(env.status("graceful")["state"], "free");
}

#[test]
fn json_output_parses() {
    let env = Env::new();
    let holder = env.hold("report", &["--ttl", "30s"], HOLD_UNTIL_STOP);

    let status = env.status("report");
    assert_eq!(status["key"], "report");
    assert_eq!(status["backend"], "sqlite");
    assert_eq!(status["url"], env.url());
    assert_eq!(status["state"], "held");
    let lock = &status["lock"];
    assert_eq!(lock["pid"], holder.pid());
    assert!(lock["owner"]
        .as_str()
        .unwrap()
        .contains(&holder.pid().to_string()));
    assert!(lock["host"].is_string());
    assert!(lock["token"].as_u64().unwrap() >= 1);
    assert!(lock["acquired_at"].as_str().unwrap().ends_with('Z'));
    assert!(lock["expires_at"].as_str().unwrap().ends_with('Z'));
    assert!(lock["remaining_ms"].as_u64().unwrap() <= 30_000);

    let done = env.run(&["list", "--json"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    let list = done.json();
    let locks = list["locks"].as_array().unwrap();
    assert_eq!(locks.len(), 1, "{list}");
    assert_eq!(locks[0]["key"], "report");
    assert_eq!(locks[0]["token"], lock["token"]);
    let table = env.run(&["list"]);
    assert!(table.stdout.starts_with("KEY"), "{table:?}");
    assert!(table.stdout.contains("report"), "{table:?}");

    let done = env.run(&["release", "report", "--force", "--dry-run", "--json"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    let dry = done.json();
    assert_eq!(dry["action"], "would_release", "{dry}");
    assert_eq!(dry["before"]["lock"]["token"], lock["token"]);
    assert!(dry["removed"].is_null());
    assert_eq!(
        env.status("report")["state"],
        "held",
        "a dry run breaks nothing"
    );

    let done = env.run(&["release", "report", "--force", "--json"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    let released = done.json();
    assert_eq!(released["action"], "released", "{released}");
    assert_eq!(released["removed"]["token"], lock["token"]);
    assert_eq!(
        holder.wait().code,
        Some(75),
        "the holder learns it lost the lease"
    );

    let done = env.run(&["release", "report", "--force", "--json"]);
    assert_eq!(done.json()["action"], "none");
    let done = env.run(&["list", "--json"]);
    assert_eq!(done.json()["locks"], Value::Array(vec![]));
}

#[test]
fn the_default_url_needs_no_setup() {
    let env = Env::new();
    let done = env.run_with(None, &["run", "demo", "--", "echo", "hi"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert_eq!(done.stdout, "hi\n");
    assert!(
        env.path("leaselock.db").exists(),
        "sqlite://leaselock.db in the current directory"
    );
    let done = env.run_with(None, &["check"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    let done = env.run_with(None, &["init"]);
    assert_eq!(done.code, Some(0), "init is idempotent: {done:?}");
    let done = env.run_with(None, &["status", "demo", "--json"]);
    assert_eq!(done.json()["url"], "sqlite://leaselock.db");
}

#[test]
fn check_names_what_is_missing() {
    let env = Env::new();
    let done = env.run(&["check"]);
    assert_eq!(done.code, Some(66), "{done:?}");
    assert_one_line_error(&done, "check");
    assert!(done.stderr.contains("leaselock init"), "{done:?}");
    assert!(!env.path("locks.db").exists(), "check creates nothing");

    // A database file without the table.
    assert_eq!(
        env.run(&["--url", &format!("{}?table=other", env.url()), "init"])
            .code,
        Some(0)
    );
    let done = env.run(&["check"]);
    assert_eq!(done.code, Some(66), "{done:?}");
    assert_one_line_error(&done, "check");
    assert!(done.stderr.contains("not initialized"), "{done:?}");

    assert_eq!(env.run(&["init"]).code, Some(0));
    let done = env.run(&["check"]);
    assert_eq!(done.code, Some(0), "{done:?}");

    // Storage that cannot be opened at all.
    let done = env.run(&[
        "--url",
        "sqlite:///nonexistent-dir/x/locks.db",
        "status",
        "k",
    ]);
    assert_eq!(done.code, Some(66), "{done:?}");
    assert_one_line_error(&done, "unopenable storage");
}

#[test]
fn bad_input_exits_2_with_one_line_and_touches_nothing() {
    let env = Env::new();
    let long_key = "k".repeat(256);
    let secret_url = format!("postgres://app:{SECRET}@127.0.0.1:1/db?strategy=nope");
    let cases: Vec<Vec<&str>> = vec![
        vec![
            "--url",
            "mongodb://u:pw@localhost/db?collection=bad-name",
            "run",
            "k",
            "--",
            "true",
        ],
        vec![
            "--url",
            "mongodb+srv://u:pw@cluster.example.com/1db",
            "list",
        ],
        vec!["--url", "dynamodb://bad-name", "list"],
        vec![
            "--url",
            "dynamodb://locks?region=us-east-1&colour=blue",
            "status",
            "k",
        ],
        vec!["--url", "dynamodb://locks?max_clock_skew=soon", "key", "k"],
        vec!["--url", "dynamodb://AKID:secret@locks", "init"],
        vec!["--url", "bogus://x", "status", "k"],
        vec!["--url", "not a url", "list"],
        vec!["--url", "sqlite://", "list"],
        vec!["--url", "sqlite://x.db?table=bad-name", "status", "k"],
        vec!["--url", "sqlite://x.db?colour=blue", "init"],
        vec!["--url", &secret_url, "status", "k"],
        vec!["run", "k"],
        vec!["run", "k", "--"],
        vec!["run", "k", "echo", "hi"],
        vec!["run", "", "--", "true"],
        vec!["run", &long_key, "--", "true"],
        vec!["status", ""],
        vec!["key", ""],
        vec!["key"],
        vec![
            "--url",
            "mysql://root:pw@db/app?strategy=advisory",
            "key",
            "k",
        ],
        vec!["release", "", "--force"],
        vec!["run", "k", "--ttl", "5parsecs", "--", "true"],
        vec!["run", "k", "--ttl", "0s", "--", "true"],
        vec!["run", "k", "--ttl", "5ms", "--", "true"],
        vec!["run", "k", "--wait", "banana", "--", "true"],
        vec!["run", "k", "--no-wait", "--wait", "1s", "--", "true"],
        vec!["run", "k", "--poll-interval", "0s", "--", "true"],
        vec!["run", "k", "--owner", "", "--", "true"],
        vec!["run", "k", "-E", "256", "--", "true"],
        vec!["release", "k"],
        vec!["frobnicate"],
    ];
    for args in &cases {
        let done = env.run_with(None, args);
        assert_eq!(done.code, Some(2), "{args:?}: {done:?}");
        assert_one_line_error(&done, &format!("{args:?}"));
        assert_eq!(done.stdout, "", "{args:?}");
        assert!(!done.stderr.contains(SECRET), "{args:?} leaked: {done:?}");
    }
    let left: Vec<_> = fs::read_dir(env.dir.path()).unwrap().collect();
    assert!(left.is_empty(), "bad input created files: {left:?}");
}

#[test]
fn credentials_are_never_printed() {
    let env = Env::new();
    for url in [
        format!("postgres://app:{SECRET}@127.0.0.1:1/db"),
        format!("mysql://root:{SECRET}@127.0.0.1:1/db"),
        format!("mongodb://root:{SECRET}@127.0.0.1:1/db?serverSelectionTimeoutMS=500"),
    ] {
        for args in [
            vec!["-vvv", "status", "k", "--json"],
            vec!["-vvv", "check"],
            vec!["-vvv", "run", "k", "-n", "--", "true"],
        ] {
            let done = env.run_with(Some(&url), &args);
            assert_ne!(done.code, Some(0), "{url} {args:?}: {done:?}");
            assert!(!done.stderr.contains(SECRET), "{args:?} leaked: {done:?}");
            assert!(!done.stdout.contains(SECRET), "{args:?} leaked: {done:?}");
        }
    }
    // `key` shows no password either.
    let done = env.run_with(
        Some(&format!("mongodb://root:{SECRET}@127.0.0.1:1/db")),
        &["key", "k", "--json"],
    );
    assert_eq!(done.code, Some(0), "{done:?}");
    assert!(!done.stdout.contains(SECRET), "{done:?}");
    assert_eq!(done.json()["url"], "mongodb://root:***@127.0.0.1:1/db");
    // `--help` does not show LEASELOCK_URL's value.
    let done = env.run_with(Some(&format!("postgres://app:{SECRET}@h/db")), &["--help"]);
    assert_eq!(done.code, Some(0));
    assert!(!done.stdout.contains(SECRET), "{done:?}");
    assert!(done.stdout.contains("Exit codes"), "{done:?}");
}

/// A key no other test (or earlier run) uses, for shared servers.
fn fresh_key(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("cli-{name}-{}-{nanos}", std::process::id())
}

/// Both PostgreSQL strategies through the command.
#[test]
fn postgres_strategies_through_the_command() {
    let Some(base) = leaselock_conformance::server_url("LEASELOCK_POSTGRES_URL") else {
        return;
    };
    server_strategies(&base, &["table", "advisory"]);
}

/// Both MySQL/MariaDB strategies through the command.
#[test]
fn mysql_strategies_through_the_command() {
    let Some(base) = leaselock_conformance::server_url("LEASELOCK_MYSQL_URL") else {
        return;
    };
    server_strategies(&base, &["table", "get_lock"]);
}

/// For each strategy of a server backend: [`through_the_command`].
fn server_strategies(base: &str, strategies: &[&str]) {
    for &strategy in strategies {
        let env = Env::with_url(with_params(
            base,
            &format!("strategy={strategy}&table=leaselock_cli_{strategy}"),
        ));
        through_the_command(&env, strategy);
    }
}

/// MongoDB through the command, in its own collection.
#[test]
fn mongodb_through_the_command() {
    let Some(base) = leaselock_conformance::server_url("LEASELOCK_MONGODB_URL") else {
        return;
    };
    through_the_command(
        &Env::with_url(with_params(&base, "collection=leaselock_cli")),
        "mongodb",
    );
}

/// DynamoDB through the command, in its own table.
#[test]
fn dynamodb_through_the_command() {
    let Some(base) = leaselock_conformance::server_url("LEASELOCK_DYNAMODB_URL") else {
        return;
    };
    through_the_command(
        &Env::with_url(dynamodb_table(&base, "leaselock_cli")),
        "dynamodb",
    );
}

/// `base`, a `dynamodb://TABLE?...` URL, with another table.
fn dynamodb_table(base: &str, table: &str) -> String {
    let mut url = url::Url::parse(base).expect("LEASELOCK_DYNAMODB_URL is a URL");
    url.set_host(Some(table)).expect("a table name as host");
    url.to_string()
}

/// A server backend through the command: mutual exclusion of several processes, the conflict
/// code, status, list, `--if-stale` refusing a live lock, and a forced release that stops the
/// holder.
fn through_the_command(env: &Env, label: &str) {
    let key = fresh_key(label);
    contend(env, &key, 4);

    let holder = env.hold(&key, &["--ttl", "5s"], HOLD_UNTIL_STOP);
    let done = env.run(&["run", &key, "--no-wait", "--", "touch", "ran"]);
    assert_eq!(done.code, Some(124), "{label}: {done:?}");
    assert!(done.stderr.contains("held by"), "{label}: {done:?}");
    assert!(
        !env.path("ran").exists(),
        "{label}: the command must not run"
    );
    let status = env.status(&key);
    assert_eq!(status["state"], "held", "{label}: {status}");
    assert_eq!(status["lock"]["pid"], holder.pid(), "{label}: {status}");
    assert_eq!(
        env.native(&key)["backend"],
        status["backend"],
        "{label}: `key` names the backend as `status` does"
    );
    let done = env.run(&["list", "--json"]);
    assert_eq!(done.code, Some(0), "{label}: {done:?}");
    let list = done.json();
    let listed: Vec<&Value> = list["locks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|lock| lock["key"] == key.as_str())
        .collect();
    assert_eq!(listed.len(), 1, "{label}: {list}");
    assert_eq!(
        listed[0]["token"], status["lock"]["token"],
        "{label}: {list}"
    );
    let table = env.run(&["list"]);
    assert!(table.stdout.contains(&key), "{label}: {table:?}");
    let done = env.run(&["release", &key, "--force", "--if-stale"]);
    assert_eq!(
        done.code,
        Some(1),
        "{label}: a live lock is not stale: {done:?}"
    );
    let done = env.run(&["release", &key, "--force", "--json"]);
    assert_eq!(done.code, Some(0), "{label}: {done:?}");
    assert_eq!(done.json()["action"], "released", "{label}");
    let done = holder.wait();
    assert_eq!(done.code, Some(75), "{label}: {done:?}");
    assert_eq!(env.status(&key)["state"], "free", "{label}");
    fs::remove_file(env.path("started")).unwrap();
}

/// A current-thread runtime for the database clients that look at the server's side.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// A key that needs escaping in SQL (a quote, a backslash) and is no plain `GET_LOCK` name.
fn awkward_key(name: &str) -> String {
    format!(r"it's\{}", fresh_key(name))
}

/// `leaselock key` names what the database locks: while `run` holds a key, the query it prints
/// finds the holder with the database's own tools, and after the release finds no holder.
/// `look` runs the query and returns the holder it shows, if any.
fn key_finds_the_holder(env: &Env, key: &str, look: impl Fn(&Value) -> Option<String>) {
    assert_eq!(env.run(&["init"]).code, Some(0));
    let native = env.native(key);
    assert_eq!(native["key"], key, "{native}");
    assert_eq!(look(&native), None, "nobody holds it yet: {native}");
    let holder = env.hold(key, &["--ttl", "20s"], HOLD_UNTIL_STOP);
    let owner = env.status(key)["lock"]["owner"]
        .as_str()
        .unwrap()
        .to_owned();
    let found = look(&native).unwrap_or_else(|| panic!("the lock is not where {native} says"));
    assert!(
        found == owner || found.parse::<u64>().is_ok(),
        "{found} is neither the owner {owner} nor a session id"
    );
    fs::write(env.path("stop"), "").unwrap();
    assert_eq!(holder.wait().code, Some(0));
    assert_eq!(look(&native), None, "released: {native}");
    fs::remove_file(env.path("started")).unwrap();
    fs::remove_file(env.path("stop")).unwrap();
}

#[test]
fn key_shows_where_sqlite_keeps_the_lock() {
    let env = Env::new();
    let key = awkward_key("sqlite");
    let native = env.native(&key);
    assert_eq!(native["backend"], "sqlite", "{native}");
    assert_eq!(native["table"], "leaselock_locks", "{native}");
    assert!(!env.path("locks.db").exists(), "`key` opens nothing");
    let done = env.run(&["key", &key]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert!(done.stdout.contains("inspect:"), "{done:?}");
    let file = env.path(native["file"].as_str().unwrap());
    key_finds_the_holder(&env, &key, |native| {
        let db = rusqlite::Connection::open(&file).expect("open the database");
        let sql = native["inspect"].as_str().unwrap();
        match db.query_row(sql, [], |row| row.get::<_, Option<String>>("owner")) {
            Ok(owner) => owner,
            Err(rusqlite::Error::QueryReturnedNoRows) => None,
            Err(e) => panic!("{sql}: {e}"),
        }
    });
}

#[test]
fn key_shows_the_native_name_without_connecting() {
    let env = Env::new();
    // Nothing listens on port 1: `key` answers at once all the same.
    let started = Instant::now();
    let pg = env.run_with(
        Some("postgres://app:pw@127.0.0.1:1/app"),
        &["key", "migrations", "--json"],
    );
    assert_eq!(pg.code, Some(0), "{pg:?}");
    let pg = pg.json();
    // The documented example of `leaselock_postgres::advisory_key`.
    assert_eq!(pg["advisory_key"], -7_738_434_545_972_184_409_i64, "{pg}");
    assert_eq!(pg["backend"], "postgres-advisory", "{pg}");
    assert_eq!(pg["url"], "postgres://app:***@127.0.0.1:1/app", "{pg}");
    let text = env.run_with(
        Some("postgres://app:pw@127.0.0.1:1/app"),
        &["key", "migrations"],
    );
    assert!(
        text.stdout.contains("advisory key:  -7738434545972184409"),
        "{text:?}"
    );
    let my = env.run_with(
        Some("mysql://root@127.0.0.1:1/app"),
        &["key", "Migrations", "--json"],
    );
    assert_eq!(my.code, Some(0), "{my:?}");
    // The documented example of `leaselock_mysql::lock_name`.
    assert_eq!(
        my.json()["lock_name"],
        "leaselock:migrations#87abf4a5a8f7b086"
    );
    let mongo = env.run_with(Some("mongodb://127.0.0.1:1/ops"), &["key", "k", "--json"]);
    assert_eq!(mongo.json()["collection"], "leaselock_locks", "{mongo:?}");
    let dynamo = env.run_with(
        Some("dynamodb://locks?endpoint=http://127.0.0.1:1&region=us-east-1"),
        &["key", "k", "--json"],
    );
    assert_eq!(dynamo.json()["table"], "locks", "{dynamo:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "`key` must not try to connect"
    );
    // Nor does it create the default database file.
    let done = env.run_with(None, &["key", "k"]);
    assert_eq!(done.code, Some(0), "{done:?}");
    let left: Vec<_> = fs::read_dir(env.dir.path()).unwrap().collect();
    assert!(left.is_empty(), "`key` created files: {left:?}");
}

#[test]
fn key_shows_what_postgres_locks() {
    let Some(base) = leaselock_conformance::server_url("LEASELOCK_POSTGRES_URL") else {
        return;
    };
    for strategy in ["advisory", "table"] {
        let env = Env::with_url(with_params(
            &base,
            &format!("strategy={strategy}&table=leaselock_cli_{strategy}"),
        ));
        key_finds_the_holder(&env, &awkward_key(strategy), |native| {
            let sql = native["inspect"].as_str().unwrap().to_owned();
            let rows = block_on(async {
                let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
                    .await
                    .expect("connect to PostgreSQL");
                tokio::spawn(connection);
                client.simple_query(&sql).await.expect(&sql)
            });
            let rows: Vec<_> = rows
                .into_iter()
                .filter_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
                    _ => None,
                })
                .collect();
            assert!(rows.len() <= 1, "{sql}");
            let row = rows.first()?;
            match strategy {
                // The advisory lock in pg_locks: its holder's session.
                "advisory" => row.get("pid").map(str::to_owned),
                _ => row.get("owner").map(str::to_owned),
            }
        });
    }
}

#[test]
fn key_shows_what_mysql_locks() {
    use leaselock_mysql::mysql_async::{self, prelude::Queryable};
    let Some(base) = leaselock_conformance::server_url("LEASELOCK_MYSQL_URL") else {
        return;
    };
    for strategy in ["get_lock", "table"] {
        let env = Env::with_url(with_params(
            &base,
            &format!("strategy={strategy}&table=leaselock_cli_{strategy}"),
        ));
        let key = awkward_key(strategy);
        if strategy == "get_lock" {
            let name = env.native(&key)["lock_name"].as_str().unwrap().to_owned();
            assert!(name.len() <= 64 && name.contains('#'), "{name}");
        }
        key_finds_the_holder(&env, &key, |native| {
            let sql = native["inspect"].as_str().unwrap().to_owned();
            block_on(async {
                let pool = mysql_async::Pool::new(base.as_str());
                let mut conn = pool.get_conn().await.expect("connect to MySQL");
                let row: Option<mysql_async::Row> =
                    conn.query_first(sql.as_str()).await.expect(&sql);
                drop(conn);
                pool.disconnect().await.expect("disconnect");
                let row = row?;
                match strategy {
                    // IS_USED_LOCK: the holder's connection id, or NULL.
                    "get_lock" => row
                        .get::<Option<u64>, _>(0)
                        .flatten()
                        .map(|id| id.to_string()),
                    _ => row
                        .get::<Option<Vec<u8>>, _>("owner")
                        .flatten()
                        .map(|owner| String::from_utf8(owner).unwrap()),
                }
            })
        });
    }
}

#[test]
fn key_shows_where_mongodb_keeps_the_lock() {
    use mongodb::bson::Document;
    let Some(base) = leaselock_conformance::server_url("LEASELOCK_MONGODB_URL") else {
        return;
    };
    let env = Env::with_url(with_params(&base, "collection=leaselock_cli"));
    key_finds_the_holder(&env, &awkward_key("mongodb"), |native| {
        block_on(async {
            let client = mongodb::Client::with_uri_str(&base).await.expect("client");
            let collection = client
                .database(native["database"].as_str().unwrap())
                .collection::<Document>(native["collection"].as_str().unwrap());
            let mut filter = Document::new();
            filter.insert(
                native["key_field"].as_str().unwrap(),
                native["key"].as_str().unwrap(),
            );
            let found = collection
                .find_one(filter)
                .await
                .expect("find the lock document")?;
            found.get_str("owner").ok().map(str::to_owned)
        })
    });
}

#[test]
fn key_shows_where_dynamodb_keeps_the_lock() {
    let Some(base) = leaselock_conformance::server_url("LEASELOCK_DYNAMODB_URL") else {
        return;
    };
    let url = dynamodb_table(&base, "leaselock_cli");
    let env = Env::with_url(url.clone());
    key_finds_the_holder(&env, &awkward_key("dynamodb"), |native| {
        let statement = native["inspect"].as_str().unwrap().to_owned();
        block_on(async {
            let config = leaselock_dynamodb::DynamoDbConfig::from_url(&url).unwrap();
            let backend = leaselock_dynamodb::DynamoDbBackend::connect(config)
                .await
                .expect("client");
            // The PartiQL statement `key` printed.
            let output = backend
                .client()
                .execute_statement()
                .statement(&statement)
                .send()
                .await
                .expect(&statement);
            let items = output.items();
            assert!(items.len() <= 1, "{statement}");
            let owner = items.first()?.get("owner")?;
            Some(owner.as_s().expect("owner is a string").clone())
        })
    });
}
