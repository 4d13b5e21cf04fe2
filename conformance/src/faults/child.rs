//! Holder processes: the test binary run again as the hidden test `fault_child`, told by
//! environment variables what to do, reporting on stdout in lines `@@fault EVENT FIELDS…`.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leaselock::{AcquireOutcome, AcquireRequest, Error, LockKey, Locker, OwnerId, WaitPolicy};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::FaultTarget;

const ROLE_ENV: &str = "LEASELOCK_FAULT_CHILD";
const URL_ENV: &str = "LEASELOCK_FAULT_CHILD_URL";
const MARK: &str = "@@fault ";

/// What a holder process does.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Role {
    /// Acquires `key` (waiting up to a minute) through a [`Locker`] with this lease and refresh
    /// interval, then works in steps: before each step it calls
    /// [`leaselock::LockContext::ensure_held`], and appends `check PID SEQ TOKEN` before and
    /// `step PID SEQ TOKEN` after a successful check to `log` (if any). Reports `acquired TOKEN`,
    /// `step SEQ`, `lost SEQ REASON` (then exits) and, after `hold_for`, releases and reports
    /// `released`.
    Hold {
        /// The key.
        key: String,
        /// The lease duration.
        lease: Duration,
        /// The refresh interval.
        refresh: Duration,
        /// The pause between steps.
        step: Duration,
        /// How long to hold before releasing.
        hold_for: Duration,
        /// A file shared with the test, appended to in the order things happen.
        log: Option<PathBuf>,
    },
    /// Tries to acquire `key` with the backend directly every `interval` for up to `limit`.
    /// Reports `acquired TOKEN WAITED_MS` (then releases and exits) or `never`.
    Contend {
        /// The key.
        key: String,
        /// The lease duration it asks for.
        lease: Duration,
        /// Between attempts.
        interval: Duration,
        /// How long to try.
        limit: Duration,
    },
    /// Runs `sections` critical sections on `key` through a waiting [`Locker`]. In each it
    /// claims the file `inside` in `dir` (a second claimant is an overlap) and appends its
    /// fencing token to `dir/tokens`. Reports `soak DONE OVERLAPS LOST`.
    Soak {
        /// The key.
        key: String,
        /// How many sections.
        sections: u64,
        /// The shared directory.
        dir: PathBuf,
        /// The lease duration.
        lease: Duration,
    },
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

impl Role {
    fn encode(&self) -> String {
        let fields: Vec<(&str, String)> = match self {
            Role::Hold {
                key,
                lease,
                refresh,
                step,
                hold_for,
                log,
            } => vec![
                ("role", "hold".into()),
                ("key", key.clone()),
                ("lease_ms", ms(*lease)),
                ("refresh_ms", ms(*refresh)),
                ("step_ms", ms(*step)),
                ("hold_ms", ms(*hold_for)),
                (
                    "log",
                    log.as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                ),
            ],
            Role::Contend {
                key,
                lease,
                interval,
                limit,
            } => vec![
                ("role", "contend".into()),
                ("key", key.clone()),
                ("lease_ms", ms(*lease)),
                ("interval_ms", ms(*interval)),
                ("limit_ms", ms(*limit)),
            ],
            Role::Soak {
                key,
                sections,
                dir,
                lease,
            } => vec![
                ("role", "soak".into()),
                ("key", key.clone()),
                ("sections", sections.to_string()),
                ("dir", dir.display().to_string()),
                ("lease_ms", ms(*lease)),
            ],
        };
        fields
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn decode(text: &str) -> Role {
        let get = |name: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("holder role without `{name}`"))
                .to_owned()
        };
        let dur = |name: &str| Duration::from_millis(get(name).parse().expect("milliseconds"));
        match get("role").as_str() {
            "hold" => Role::Hold {
                key: get("key"),
                lease: dur("lease_ms"),
                refresh: dur("refresh_ms"),
                step: dur("step_ms"),
                hold_for: dur("hold_ms"),
                log: Some(get("log"))
                    .filter(|l| !l.is_empty())
                    .map(PathBuf::from),
            },
            "contend" => Role::Contend {
                key: get("key"),
                lease: dur("lease_ms"),
                interval: dur("interval_ms"),
                limit: dur("limit_ms"),
            },
            "soak" => Role::Soak {
                key: get("key"),
                sections: get("sections").parse().expect("a count"),
                dir: PathBuf::from(get("dir")),
                lease: dur("lease_ms"),
            },
            other => panic!("unknown holder role `{other}`"),
        }
    }
}

/// One event a holder process reported, with the moment the test read it.
#[derive(Clone, Debug)]
pub struct Event {
    /// When the test read the line.
    pub at: Instant,
    /// The event's name (`acquired`, `lost`, ...).
    pub name: String,
    /// The fields after the name.
    pub fields: Vec<String>,
}

impl Event {
    /// Field `i` parsed as a number.
    pub fn num(&self, i: usize) -> u64 {
        self.fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "event `{}` lacks number field {i}: {:?}",
                    self.name, self.fields
                )
            })
    }
}

/// A holder process started by a fault case. Killed when dropped.
pub struct HolderProcess {
    child: tokio::process::Child,
    pid: i32,
    rx: mpsc::UnboundedReceiver<Event>,
    events: Vec<Event>,
    cursor: usize,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl std::fmt::Debug for HolderProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HolderProcess")
            .field("pid", &self.pid)
            .finish()
    }
}

/// The multi-threaded libfaketime library (Debian package `faketime`), or the file named by
/// `LEASELOCK_LIBFAKETIME`.
pub fn libfaketime() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LEASELOCK_LIBFAKETIME") {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let mut dirs = vec![
        PathBuf::from("/usr/lib/faketime"),
        PathBuf::from("/usr/local/lib/faketime"),
    ];
    // Debian's multiarch folders: /usr/lib/x86_64-linux-gnu/faketime and the like.
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        dirs.extend(
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("faketime")),
        );
    }
    dirs.into_iter()
        .map(|d| d.join("libfaketimeMT.so.1"))
        .find(|p| p.is_file())
}

impl HolderProcess {
    pub(crate) fn spawn(child_test: &str, role: Role, url: &str, skew: Option<&str>) -> Self {
        let exe = std::env::current_exe().expect("the test binary");
        let mut cmd = tokio::process::Command::new(exe);
        if let Some(skew) = skew {
            // libfaketime preloaded into the process itself (the `faketime` program would run it
            // as its child, out of reach of our signals). Only the wall clock moves; the monotonic
            // clock (tokio's timers, the local deadline) stays true.
            let library = libfaketime().expect("libfaketime (Debian package faketime)");
            cmd.env("LD_PRELOAD", library)
                .env("FAKETIME", skew)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_NO_CACHE", "1");
        }
        cmd.args([
            child_test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, role.encode())
        .env(URL_ENV, url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        let mut child = cmd.spawn().expect("start a holder process");
        let pid = child.id().expect("a running child") as i32;
        let (tx, rx) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("piped stdout");
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // libtest may have written `test fault_child ... ` on the same line first.
                let Some(at) = line.find(MARK) else {
                    continue;
                };
                let rest = &line[at + MARK.len()..];
                let mut parts = rest.split(' ').map(str::to_owned);
                let name = parts.next().unwrap_or_default();
                let event = Event {
                    at: Instant::now(),
                    name,
                    fields: parts.collect(),
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = Arc::clone(&stderr_tail);
        let stderr = child.stderr.take().expect("piped stderr");
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                if tail.len() >= 40 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        Self {
            child,
            pid,
            rx,
            events: Vec::new(),
            cursor: 0,
            stderr: stderr_tail,
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The last lines the process wrote on stderr (for failure messages).
    pub fn stderr_tail(&self) -> String {
        let tail = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn drain(&mut self) {
        while let Ok(event) = self.rx.try_recv() {
            self.events.push(event);
        }
    }

    /// Every event received so far.
    pub fn events(&mut self) -> &[Event] {
        self.drain();
        &self.events
    }

    /// Whether an event named `name` has been received (at any time).
    pub fn saw(&mut self, name: &str) -> bool {
        self.events().iter().any(|e| e.name == name)
    }

    /// The names of the last events, for failure messages.
    fn recent(&self) -> Vec<&str> {
        let from = self.events.len().saturating_sub(12);
        self.events[from..]
            .iter()
            .map(|e| e.name.as_str())
            .collect()
    }

    /// Waits for the next event named `name` (after those already returned by `expect`),
    /// panicking after `limit` or if the process ends first.
    pub async fn expect(&mut self, name: &str, limit: Duration) -> Event {
        let deadline = Instant::now() + limit;
        loop {
            self.drain();
            if let Some(i) = self.events[self.cursor..]
                .iter()
                .position(|e| e.name == name)
            {
                self.cursor += i + 1;
                return self.events[self.cursor - 1].clone();
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(event)) => self.events.push(event),
                Ok(None) => panic!(
                    "holder process {} ended before reporting `{name}`; its last reports: {:?}; \
                     stderr:\n{}",
                    self.pid,
                    self.recent(),
                    self.stderr_tail()
                ),
                Err(_) => panic!(
                    "holder process {} did not report `{name}` within {limit:?}; its last reports: \
                     {:?}; stderr:\n{}",
                    self.pid,
                    self.recent(),
                    self.stderr_tail()
                ),
            }
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid), signal).expect("signal the holder process");
    }

    /// SIGSTOP: the process stops where it is, threads, timers and all.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// SIGKILL, then waits until the process is gone (the kernel has closed its sockets).
    pub async fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        self.wait(Duration::from_secs(30)).await;
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait for the holder process"),
            Err(_) => panic!(
                "holder process {} did not exit within {limit:?}; stderr:\n{}",
                self.pid,
                self.stderr_tail()
            ),
        }
    }
}

fn emit(name: &str, fields: &[String]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{MARK}{name} {}", fields.join(" "));
    let _ = out.flush();
}

fn append(log: &Path, line: &str) {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the shared log");
    file.write_all(format!("{line}\n").as_bytes())
        .expect("append to the shared log");
}

/// The body of the hidden `fault_child` test: runs the role the parent put in the environment.
/// Without it (someone ran the ignored tests by hand) it does nothing.
pub fn run_child<T, S, SF>(setup: S)
where
    T: FaultTarget,
    S: FnOnce() -> SF,
    SF: Future<Output = Option<T>>,
{
    let Ok(role) = std::env::var(ROLE_ENV) else {
        eprintln!("fault_child runs only as a holder process started by a fault case");
        return;
    };
    let role = Role::decode(&role);
    let url = std::env::var(URL_ENV).expect("the holder's URL");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        // The wall clock as this process sees it (skewed or not), for the test to check.
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        emit("clock", &[wall.to_string()]);
        let target = setup().await.expect("the fault target in a holder process");
        let backend = target.connect(&url).await.expect("open the backend");
        match role {
            Role::Hold {
                key,
                lease,
                refresh,
                step,
                hold_for,
                log,
            } => hold(backend, key, lease, refresh, step, hold_for, log).await,
            Role::Contend {
                key,
                lease,
                interval,
                limit,
            } => contend(backend, key, lease, interval, limit).await,
            Role::Soak {
                key,
                sections,
                dir,
                lease,
            } => soak(backend, key, sections, dir, lease).await,
        }
    });
}

async fn hold(
    backend: Arc<dyn leaselock::LockBackend>,
    key: String,
    lease: Duration,
    refresh: Duration,
    step: Duration,
    hold_for: Duration,
    log: Option<PathBuf>,
) {
    let locker = Locker::builder(backend)
        .lease_duration(lease)
        .refresh_interval(refresh)
        .wait(WaitPolicy::until(
            Duration::from_secs(60),
            Duration::from_millis(20),
        ))
        .build()
        .expect("a locker");
    let guard = locker
        .acquire(&key)
        .await
        .expect("acquire")
        .expect("acquired");
    let token = guard.token().get();
    let pid = std::process::id();
    emit("acquired", &[token.to_string()]);
    let started = Instant::now();
    let mut seq: u64 = 0;
    loop {
        seq += 1;
        if let Some(log) = &log {
            append(log, &format!("check {pid} {seq} {token}"));
        }
        match guard.ensure_held().await {
            Ok(()) => {
                if let Some(log) = &log {
                    append(log, &format!("step {pid} {seq} {token}"));
                }
                emit("step", &[seq.to_string()]);
            }
            Err(Error::Lost { reason, .. }) => {
                if let Some(log) = &log {
                    append(log, &format!("lost {pid} {seq} {token}"));
                }
                emit("lost", &[seq.to_string(), reason.replace(' ', "_")]);
                return;
            }
            Err(other) => emit("check-error", &[other.to_string().replace(' ', "_")]),
        }
        if started.elapsed() >= hold_for {
            let held = guard.release().await.unwrap_or(false);
            emit("released", &[held.to_string()]);
            return;
        }
        tokio::time::sleep(step).await;
    }
}

async fn contend(
    backend: Arc<dyn leaselock::LockBackend>,
    key: String,
    lease: Duration,
    interval: Duration,
    limit: Duration,
) {
    let owner = OwnerId::generate();
    let request =
        AcquireRequest::new(LockKey::new(key).expect("a key"), owner, lease).expect("a request");
    let started = Instant::now();
    emit("started", &[]);
    loop {
        match backend.try_acquire(&request).await {
            Ok(AcquireOutcome::Acquired(lease)) => {
                let waited = started.elapsed();
                emit("acquired", &[lease.token.get().to_string(), ms(waited)]);
                let _ = backend.release(&lease).await;
                return;
            }
            Ok(AcquireOutcome::Held(_)) => {}
            Err(error) => emit("error", &[error.to_string().replace(' ', "_")]),
        }
        if started.elapsed() >= limit {
            emit("never", &[]);
            return;
        }
        tokio::time::sleep(interval).await;
    }
}

async fn soak(
    backend: Arc<dyn leaselock::LockBackend>,
    key: String,
    sections: u64,
    dir: PathBuf,
    lease: Duration,
) {
    let locker = Locker::builder(backend)
        .lease_duration(lease)
        .wait(
            WaitPolicy::until(Duration::from_secs(3600), Duration::from_millis(5))
                .with_jitter(Duration::from_millis(5)),
        )
        .build()
        .expect("a locker");
    // Eight of these start at once against a server other tests use too: retry what may pass.
    let started = Instant::now();
    while let Err(error) = locker.init_storage().await {
        assert!(
            error.is_retryable() && started.elapsed() < Duration::from_secs(60),
            "init storage: {error}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let overlaps = Arc::new(AtomicU64::new(0));
    let mut done = 0u64;
    let mut lost = 0u64;
    let mut errors = 0u64;
    while done + lost < sections {
        let (dir, overlaps) = (dir.clone(), Arc::clone(&overlaps));
        let outcome = locker
            .run(&key, |lock| async move {
                let inside = dir.join("inside");
                let claimed = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&inside)
                    .is_ok();
                if !claimed {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                append(&dir.join("tokens"), &lock.token().get().to_string());
                tokio::task::yield_now().await;
                if claimed {
                    std::fs::remove_file(&inside).expect("leave the critical section");
                }
            })
            .await;
        match outcome {
            Ok(Some(())) => done += 1,
            Ok(None) => unreachable!("the default policy errors instead of returning None"),
            Err(Error::Lost { .. }) => lost += 1,
            Err(error) => {
                errors += 1;
                assert!(errors < 100, "too many errors in the soak; last: {error}");
                eprintln!("soak: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    emit(
        "soak",
        &[
            done.to_string(),
            overlaps.load(Ordering::SeqCst).to_string(),
            lost.to_string(),
            errors.to_string(),
        ],
    );
}
