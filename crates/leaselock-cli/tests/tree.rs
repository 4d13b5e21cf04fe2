//! `leaselock run` and the command's process tree: the command never outlives its lock.
//!
//! The real binary, killed and signalled the way deployments do it, on SQLite and on every
//! strategy of the real servers named by `LEASELOCK_<DB>_URL`. Every command here is a shell
//! that starts a grandchild, and records the pids of its tree in a file, so the tests can tell
//! whether any process of it is still alive.
//!
//! Timeouts only bound a broken build; the assertions are about order (no second command while
//! any process of the first tree lives) and about what is left, not about speed.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

mod common;
use common::{with_params, Done, Proc, BIN, TIMEOUT};

/// The exit code of `run` when it does not get the lock.
const NOT_ACQUIRED: i32 = 124;

struct Env {
    dir: tempfile::TempDir,
    url: String,
}

impl Env {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("locks.db").display());
        Self { dir, url }
    }

    fn server(url: String) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            url,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn spawn_env(&self, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let n = fastrand::u64(..);
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .env_remove("LEASELOCK_URL_FILE")
            .env("LEASELOCK_URL", &self.url)
            .stdin(Stdio::null());
        for (name, value) in env {
            cmd.env(name, value);
        }
        Proc::start(
            cmd,
            self.path(&format!("{n}.out")),
            self.path(&format!("{n}.err")),
        )
    }

    fn spawn(&self, args: &[&str]) -> Proc {
        self.spawn_env(args, &[])
    }

    fn run(&self, args: &[&str]) -> Done {
        self.spawn(args).wait()
    }

    fn wait_for(&self, name: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.path(name).exists() {
            assert!(Instant::now() < deadline, "{name} never appeared");
            sleep(Duration::from_millis(10));
        }
    }

    /// The pids a tree script recorded in `file`.
    fn pids(&self, file: &str) -> Vec<i32> {
        fs::read_to_string(self.path(file))
            .unwrap_or_default()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }
}

/// Whether `pid` is a live process (a zombie waiting to be reaped is not).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned();
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// Waits until none of `pids` is alive; panics with the survivors after `bound`.
fn assert_gone_within(pids: &[i32], bound: Duration, what: &str) {
    let deadline = Instant::now() + bound;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            // Do not leave them behind for the next test.
            for pid in &left {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            panic!("{what}: still alive after {bound:?}: {left:?}");
        }
        sleep(Duration::from_millis(10));
    }
}

/// A shell that records its pid and its grandchild's in `tree.pids`, then creates `started`, and
/// waits for the grandchild (which sleeps long).
const TREE: &str = "sleep 600 & echo $$ $! > tree.pids; touch started; wait";

/// A second runner's command: records in `overlap` every pid of `tree.pids` still alive (not a
/// zombie) when it starts, then creates `second-ran`.
const SECOND: &str = r#"for p in $(cat tree.pids); do
  if [ -e /proc/$p ] && ! grep -q '^State:[[:space:]]*[ZX]' /proc/$p/status 2>/dev/null; then echo $p >> overlap; fi
done; touch second-ran"#;

/// SIGKILL to `leaselock` itself while its command runs: the whole tree dies at once, and a
/// waiting runner's command never starts while any process of it is alive.
fn sigkill_leaves_no_orphan(env: &Env, label: &str, ttl: &str) {
    let key = format!("tree-kill-{label}-{}", fastrand::u64(..));
    let first = env.spawn(&["run", &key, "--ttl", ttl, "--", "sh", "-c", TREE]);
    env.wait_for("started");
    let tree = env.pids("tree.pids");
    assert_eq!(tree.len(), 2, "{label}: the shell and its grandchild");
    let second = env.spawn(&["run", &key, "--wait", "60s", "--", "sh", "-c", SECOND]);
    // The second runner is waiting (it cannot have the lock yet).
    sleep(Duration::from_millis(500));
    assert!(!env.path("second-ran").exists(), "{label}: ran while held");

    let killed_at = Instant::now();
    first.signal("KILL");
    let first = first.wait();
    assert_eq!(first.signal, Some(9), "{label}: {first:?}");
    assert_gone_within(&tree, Duration::from_secs(1), label);
    let took = killed_at.elapsed();

    let second = second.wait();
    assert_eq!(second.code, Some(0), "{label}: {second:?}");
    assert!(env.path("second-ran").exists(), "{label}");
    let overlap = fs::read_to_string(env.path("overlap")).unwrap_or_default();
    assert_eq!(
        overlap, "",
        "{label}: the second command started while these processes of the first tree lived"
    );
    eprintln!("{label}: the killed holder's tree was gone {took:?} after SIGKILL");
    for file in ["started", "tree.pids", "second-ran"] {
        let _ = fs::remove_file(env.path(file));
    }
}

#[test]
fn sigkill_of_leaselock_kills_the_tree_sqlite() {
    let env = Env::sqlite();
    // A lease table: the second runner gets the lock one TTL later; the tree is gone long before.
    sigkill_leaves_no_orphan(&env, "sqlite", "2s");
}

fn server_strategies(var: &str, strategies: &[&str]) {
    let Some(base) = leaselock_conformance::server_url(var) else {
        return;
    };
    for &strategy in strategies {
        let env = Env::server(with_params(
            &base,
            &format!("strategy={strategy}&table=leaselock_tree_{strategy}"),
        ));
        sigkill_leaves_no_orphan(&env, strategy, "2s");
    }
}

#[test]
fn sigkill_of_leaselock_kills_the_tree_postgres() {
    server_strategies("LEASELOCK_POSTGRES_URL", &["advisory", "table"]);
}

#[test]
fn sigkill_of_leaselock_kills_the_tree_mysql() {
    server_strategies("LEASELOCK_MYSQL_URL", &["get_lock", "table"]);
}

/// Every signal that ends `leaselock` ends the tree too; the ones it handles are forwarded to
/// the whole group, and it releases the lock once the command is gone.
#[test]
fn every_signal_reaches_the_tree_or_the_tree_dies() {
    let env = Env::sqlite();
    for sig in [
        "HUP", "INT", "QUIT", "TERM", "USR1", "USR2", "ALRM", "VTALRM", "PROF", "XCPU", "ABRT",
        "SYS", "KILL",
    ] {
        let key = format!("sig-{sig}");
        // A plain sh does not ignore SIGINT/SIGQUIT of a non-interactive parent: trap nothing.
        let proc = env.spawn(&["run", &key, "--", "sh", "-c", TREE]);
        env.wait_for("started");
        let tree = env.pids("tree.pids");
        proc.signal(sig);
        let done = proc.wait();
        assert_gone_within(&tree, Duration::from_secs(2), sig);
        assert_ne!(done.code, Some(0), "{sig}: {done:?}");
        assert!(
            !done.stderr.contains("panicked") && !done.stderr.contains("RUST_BACKTRACE"),
            "{sig}: {done:?}"
        );
        for file in ["started", "tree.pids"] {
            let _ = fs::remove_file(env.path(file));
        }
    }
}

/// A forwarded SIGTERM reaches a grandchild that handles it: it finishes its work, the command
/// exits on its own, and the lock is released.
#[test]
fn sigterm_and_sigint_reach_a_grandchild() {
    let env = Env::sqlite();
    for sig in ["TERM", "INT"] {
        // In the foreground of the outer shell: a non-interactive shell starts its `&` jobs with
        // SIGINT ignored, and a signal ignored on entry cannot be trapped.
        let script = format!(
            "sh -c 'trap \"echo {sig} > got; exit 0\" {sig}; touch started; while :; do sleep 0.05; done'; \
             echo parent-done > parent"
        );
        let proc = env.spawn(&["run", "fwd", "--", "sh", "-c", &script]);
        env.wait_for("started");
        proc.signal(sig);
        let done = proc.wait();
        assert_eq!(
            fs::read_to_string(env.path("got"))
                .unwrap_or_default()
                .trim(),
            sig,
            "{done:?}"
        );
        let _ = fs::remove_file(env.path("got"));
        let _ = fs::remove_file(env.path("started"));
        let status = env.run(&["status", "fwd", "--json"]);
        assert!(status.stdout.contains("\"free\""), "{status:?}");
    }
}

/// `nohup leaselock run …` survives SIGHUP, as `nohup flock …` does, and so does its command.
#[test]
fn a_signal_inherited_as_ignored_stays_ignored() {
    let env = Env::sqlite();
    let mut cmd = Command::new("nohup");
    cmd.args([
        BIN,
        "run",
        "hup",
        "--",
        "sh",
        "-c",
        "touch started; while [ ! -e stop ]; do sleep 0.05; done; echo survived > result",
    ])
    .current_dir(env.dir.path())
    .env("LEASELOCK_URL", &env.url)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    env.wait_for("started");
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    sleep(Duration::from_millis(300));
    fs::write(env.path("stop"), "").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        fs::read_to_string(env.path("result")).unwrap().trim(),
        "survived"
    );
}

/// A lost lease ends the whole tree, grandchildren included, and `run` exits with 75.
#[test]
fn a_lost_lease_kills_the_whole_tree() {
    let env = Env::sqlite();
    let proc = env.spawn(&[
        "run",
        "lose",
        "--ttl",
        "3s",
        "--kill-grace",
        "1s",
        "--",
        "sh",
        "-c",
        // The grandchild ignores SIGTERM: only SIGKILL after the grace ends it.
        "sh -c 'trap \"\" TERM; sleep 600' & echo $$ $! > tree.pids; touch started; wait",
    ]);
    env.wait_for("started");
    let tree = env.pids("tree.pids");
    let broke = env.run(&["release", "lose", "--force"]);
    assert_eq!(broke.code, Some(0), "{broke:?}");
    let done = proc.wait();
    assert_eq!(done.code, Some(75), "{done:?}");
    assert_gone_within(&tree, Duration::from_secs(1), "lost lease");
}

/// Processes the command leaves running when it exits are stopped before the lock is released.
#[test]
fn processes_left_behind_are_stopped_before_the_release() {
    let env = Env::sqlite();
    let done = env.run(&[
        "run",
        "left",
        "--kill-grace",
        "1s",
        "--",
        "sh",
        "-c",
        "sleep 600 & echo $! > tree.pids; sh -c 'trap \"\" TERM; sleep 601' & echo $! >> tree.pids; exit 3",
    ]);
    assert_eq!(done.code, Some(3), "{done:?}");
    let left = env.pids("tree.pids");
    assert_eq!(left.len(), 2);
    assert!(
        left.iter().all(|p| !alive(*p)),
        "run returned while these still ran: {left:?}"
    );
    // Two, or three when the trapping shell does not exec its `sleep`.
    assert!(done.stderr.contains("processes running"), "{done:?}");
}

/// `--check`: not needed → the lock is never taken (a held lock does not matter); needed → the
/// work runs exactly once across 8 processes started together.
#[test]
fn check_runs_the_work_only_when_needed() {
    let env = Env::sqlite();
    // Held by someone else, but nothing to do: exit 0 at once, without waiting or conflicting.
    let holder = env.spawn(&[
        "run",
        "migrate",
        "--",
        "sh",
        "-c",
        "touch started; while [ ! -e stop ]; do sleep 0.05; done",
    ]);
    env.wait_for("started");
    let done = env.run(&[
        "run",
        "migrate",
        "--no-wait",
        "--check",
        "echo \"${LEASELOCK_TOKEN:-none}\" > check-token; exit 0",
        "--",
        "touch",
        "worked",
    ]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert!(!env.path("worked").exists());
    assert_eq!(
        fs::read_to_string(env.path("check-token")).unwrap().trim(),
        "none",
        "the first check runs without the lock"
    );
    fs::write(env.path("stop"), "").unwrap();
    assert_eq!(holder.wait().code, Some(0));

    // Needed: 8 at once; the work (which takes a while) runs once, the others find it done.
    let runners: Vec<Proc> = (0..8)
        .map(|_| {
            env.spawn(&[
                "run",
                "migrate",
                "--wait",
                "60s",
                "--check",
                "test -e migrated",
                "--",
                "sh",
                "-c",
                "echo \"$LEASELOCK_TOKEN\" >> applied; sleep 0.3; touch migrated",
            ])
        })
        .collect();
    for runner in runners {
        let done = runner.wait();
        assert_eq!(done.code, Some(0), "{done:?}");
    }
    let applied = fs::read_to_string(env.path("applied")).unwrap();
    assert_eq!(applied.lines().count(), 1, "applied by: {applied}");

    // A failing check: its code, nothing run.
    let done = env.run(&["run", "other", "--check", "exit 9", "--", "touch", "x"]);
    assert_eq!(done.code, Some(9), "{done:?}");
    assert!(!env.path("x").exists());
}

/// The command's environment: the key, owner and token, and the URL with its password masked;
/// a nested `leaselock` given the masked URL refuses it clearly; `--url-file` keeps the
/// password off the command line and out of the environment.
#[test]
fn no_secret_reaches_the_command() {
    let env = Env::sqlite();
    let secret_url = "postgres://app:Sup3rSecretPw@127.0.0.1:1/app";
    let proc = env.spawn_env(
        &["key", "k"],
        &[("LEASELOCK_URL", secret_url)], // `key` connects to nothing
    );
    let done = proc.wait();
    assert_eq!(done.code, Some(0), "{done:?}");
    assert!(!done.stdout.contains("Sup3rSecretPw"), "{done:?}");

    // The URL reaches the command masked; a nested leaselock refuses the mask.
    fs::write(env.path("url"), format!("{}\n", env.url)).unwrap();
    let done = env.run(&[
        "run",
        "env",
        "--",
        "sh",
        "-c",
        "env | grep ^LEASELOCK_ | sort",
    ]);
    assert_eq!(done.code, Some(0), "{done:?}");
    assert!(
        done.stdout.contains(&format!("LEASELOCK_URL={}", env.url)),
        "{done:?}"
    );
    let masked = "postgres://app:***@127.0.0.1:1/app";
    let nested = env.spawn_env(&["status", "k"], &[("LEASELOCK_URL", masked)]);
    let done = nested.wait();
    assert_eq!(done.code, Some(2), "{done:?}");
    assert!(done.stderr.contains("--url-file"), "{done:?}");

    // --url-file: the command gets the file's path, not the URL.
    let secret_file = env.path("secret-url");
    fs::write(&secret_file, format!("{}\n", env.url)).unwrap();
    let file = secret_file.to_str().unwrap();
    let mut cmd = Command::new(BIN);
    let out = cmd
        .args(["--url-file", file, "run", "f", "--", "sh", "-c"])
        .arg("env | grep ^LEASELOCK_URL; leaselock_status=$(\"$0\" status f --json) && echo nested-ok")
        .arg(BIN)
        .current_dir(env.dir.path())
        .env_remove("LEASELOCK_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout} {:?}", out.stderr);
    assert!(
        stdout.contains(&format!("LEASELOCK_URL_FILE={file}")),
        "{stdout}"
    );
    assert!(!stdout.contains("LEASELOCK_URL="), "{stdout}");
    assert!(stdout.contains("nested-ok"), "{stdout}");

    // Both ways at once is a usage error.
    let done = env
        .spawn_env(&["--url-file", file, "status", "k"], &[])
        .wait();
    assert_eq!(done.code, Some(2), "{done:?}");
}

/// Exit codes a deploy script can tell apart: not acquired (124), lost (75, above), the
/// command's own failure, a command that cannot start (69, before the lock is taken).
#[test]
fn exit_codes_tell_the_cases_apart() {
    let env = Env::sqlite();
    let holder = env.spawn(&[
        "run",
        "codes",
        "--",
        "sh",
        "-c",
        "touch started; while [ ! -e stop ]; do sleep 0.05; done",
    ]);
    env.wait_for("started");
    let done = env.run(&["run", "codes", "--wait", "200ms", "--", "true"]);
    assert_eq!(done.code, Some(NOT_ACQUIRED), "{done:?}");
    let done = env.run(&["run", "codes", "-n", "-E", "1", "--", "true"]);
    assert_eq!(done.code, Some(1), "{done:?}");
    // A missing command is found before the lock is even tried: 69, not 124.
    let done = env.run(&["run", "codes", "-n", "--", "./no-such-command"]);
    assert_eq!(done.code, Some(69), "{done:?}");
    fs::write(env.path("stop"), "").unwrap();
    assert_eq!(holder.wait().code, Some(0));
    let done = env.run(&["run", "codes", "--", "sh", "-c", "exit 1"]);
    assert_eq!(done.code, Some(1), "{done:?}");
}

/// While `leaselock` is stopped (SIGSTOP, SIGTSTP) it cannot refresh the lease: the command is
/// stopped too, and continued when `leaselock` is, as long as the lease survived.
#[test]
fn a_stopped_leaselock_stops_its_command() {
    let env = Env::sqlite();
    let proc = env.spawn(&[
        "run",
        "paused",
        "--ttl",
        "60s",
        "--",
        "sh",
        "-c",
        "touch started; i=0; while [ $i -lt 40 ]; do echo $i >> ticks; sleep 0.05; i=$((i+1)); done",
    ]);
    env.wait_for("started");
    proc.signal("STOP");
    // The supervisor looks at its parent every 100 ms; give it ample time, then watch.
    sleep(Duration::from_secs(1));
    let ticks = || {
        fs::read_to_string(env.path("ticks"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let before = ticks();
    sleep(Duration::from_secs(1));
    let during = ticks();
    proc.signal("CONT");
    let done = proc.wait();
    assert_eq!(done.code, Some(0), "{done:?}");
    assert_eq!(
        before, during,
        "the command ran on while leaselock was stopped"
    );
    assert_eq!(ticks(), 40, "continued to the end");
}
