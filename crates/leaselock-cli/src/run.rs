//! `leaselock run`: a distributed flock(1).
//!
//! Acquire (waiting as asked, reporting the holder), spawn the command with the lock's identity
//! in its environment, supervise it (forward signals, stop it when the lease is lost), always
//! release, pass its exit code through.

use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leaselock::{
    validate_lease_duration, Error, HookResult, LockGuard, LockHooks, LockInfo, LockKey, LockKind,
    Locker, LockerBuilder, MemoryBackend, OwnerId, WaitPolicy,
};
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::cli::RunArgs;
use crate::commands::{key, open_ready, wait_left, StorageWait};
use crate::exit::{from_status, Failure, CANNOT_RUN, INTERNAL, SIGNALED};
use crate::logging::say;
use crate::output::{human_duration, LockView};
use crate::target::{StorageUrl, Target};
use crate::tree::{Spec, Tree};

/// "Wait as long as it takes": a year, the longest wait the orchestrator accepts.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How often the waiting message repeats.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Runs `leaselock run`; returns the exit code.
pub async fn run(storage: &StorageUrl, args: RunArgs) -> Result<u8, Failure> {
    // Everything is checked before anything is opened: bad input touches nothing.
    let Some((program, program_args)) = args.command.split_first() else {
        return Err(Failure::usage(
            "missing command: usage: leaselock run KEY [OPTIONS] -- COMMAND [ARGS]...",
        ));
    };
    let key = key(&args.key)?;
    validate_lease_duration("--ttl", args.ttl).map_err(|e| Failure::lock("", &e))?;
    if args.poll_interval < Duration::from_millis(1) {
        return Err(Failure::usage(
            "invalid --poll-interval: must be at least 1ms",
        ));
    }
    if let Some(owner) = &args.owner {
        OwnerId::new(owner.as_str()).map_err(|e| Failure::lock("", &e))?;
    }
    // A command that cannot start is found before the lock is taken (its absence is bad input,
    // not a reason to hold a lock).
    if which::which(program).is_err() {
        let name = program.to_string_lossy();
        let why = if name.contains('/') {
            "no such file, or not executable"
        } else {
            "not found in PATH, or not executable"
        };
        return Err(Failure::new(
            CANNOT_RUN,
            format!("cannot run `{name}`: {why}"),
        ));
    }
    if args
        .check
        .as_deref()
        .is_some_and(|check| check.trim().is_empty())
    {
        return Err(Failure::usage("invalid --check: must not be empty"));
    }
    let wait = wait_policy(&args);
    let reporter = Arc::new(WaitReporter::new(args.quiet, &args));
    let configure = |builder: LockerBuilder| {
        let builder = builder
            .lease_duration(args.ttl)
            .refresh(true)
            .wait(wait.clone())
            .shared_hooks(Arc::clone(&reporter) as Arc<dyn LockHooks>);
        match &args.owner {
            Some(owner) => builder.owner(owner.as_str()),
            None => builder,
        }
    };
    // The same settings over an in-memory backend: the builder's own checks, with no storage.
    configure(Locker::builder(MemoryBackend::new()))
        .build()
        .map_err(|e| Failure::lock("", &e))?;
    let target = Target::parse(&storage.url)?;
    let (url_env, url_env_remove) = storage.child_env(target.display());

    // From here on signals are ours to handle (and forward), also while waiting.
    let mut signals = Signals::install()
        .map_err(|e| Failure::new(INTERNAL, format!("cannot handle signals: {e}")))?;

    // Run only when needed: the check runs first without the lock, and once more under it.
    if let Some(check) = &args.check {
        let tree = spawn_check(check, url_env.clone(), url_env_remove, args.kill_grace)?;
        match check_outcome(check, tree, None, &mut signals, &key, args.kill_grace).await? {
            Check::Needed => {}
            Check::NotNeeded => {
                if !args.quiet {
                    say(&format!(
                        "the check says there is nothing to do; `{key}` not taken, the command \
                         not run"
                    ));
                }
                return Ok(crate::exit::OK);
            }
            Check::Failed(code) => return Ok(code),
        }
    }

    // Connecting, creating storage and waiting can all take long: a signal interrupts them.
    // Storage that cannot be reached yet is waited for within the same deadline as the lock.
    let prepare = async {
        let started = Instant::now();
        let storage_wait = match wait.timeout() {
            None => StorageWait::No,
            Some(_) if args.wait.is_none() => StorageWait::Forever,
            Some(timeout) => StorageWait::For(timeout),
        };
        let backend = open_ready(&target, storage_wait, args.poll_interval, args.quiet).await?;
        let locker = configure(Locker::builder(backend))
            .wait(wait_left(&wait, started.elapsed(), args.poll_interval))
            .build()
            .map_err(|e| Failure::lock("", &e))?;
        let kind = locker.capabilities().kind;
        Ok::<_, Failure>((kind, locker.acquire(key.as_str()).await))
    };
    let (kind, acquired) = tokio::select! {
        acquired = prepare => acquired?,
        sig = signals.recv() => {
            say(&format!("{} before `{key}` was acquired; not running the command", sig.as_str()));
            return Ok(signal_code(sig));
        }
    };
    let guard = match acquired {
        Ok(Some(guard)) => guard,
        Ok(None) => return Ok(args.conflict_exit_code),
        Err(Error::Held { holder, .. }) => {
            if !args.quiet {
                say(&held_message(&key, holder.as_deref(), &args, &reporter));
            }
            return Ok(args.conflict_exit_code);
        }
        Err(e) => return Err(Failure::lock(&format!("cannot acquire `{key}`"), &e)),
    };
    reporter.report_acquired(&key);
    tracing::info!(%key, owner = %guard.owner(), token = %guard.token(), "lock acquired; starting the command");

    // The URL goes with its password masked (or as the --url-file path): a nested `leaselock`
    // finds the same storage, and refuses a masked password with a clear message.
    let mut env = url_env;
    env.extend([
        ("LEASELOCK_KEY", key.as_str().to_owned()),
        ("LEASELOCK_OWNER", guard.owner().as_str().to_owned()),
        ("LEASELOCK_TOKEN", guard.token().to_string()),
    ]);

    if let Some(check) = &args.check {
        // Someone else may have done the work while this process waited for the lock.
        let tree = spawn_check(check, env.clone(), url_env_remove, args.kill_grace)?;
        match check_outcome(
            check,
            tree,
            Some(&guard),
            &mut signals,
            &key,
            args.kill_grace,
        )
        .await
        {
            Ok(Check::Needed) => {}
            Ok(Check::NotNeeded) => {
                release(guard, &key, left_behind(kind, args.ttl), &mut signals).await;
                if !args.quiet {
                    say(&format!(
                        "`{key}` acquired, but the check says there is nothing to do any more \
                         (another process did it); not running the command"
                    ));
                }
                return Ok(crate::exit::OK);
            }
            Ok(Check::Failed(code)) => {
                release(guard, &key, left_behind(kind, args.ttl), &mut signals).await;
                return Ok(code);
            }
            Err(failure) => {
                release(guard, &key, left_behind(kind, args.ttl), &mut signals).await;
                return Err(failure);
            }
        }
    }

    let spec = Spec {
        program,
        args: program_args,
        env,
        env_remove: url_env_remove,
        grace: args.kill_grace,
    };
    let tree = match Tree::spawn(&spec) {
        Ok(tree) => tree,
        Err(e) => {
            release(guard, &key, left_behind(kind, args.ttl), &mut signals).await;
            return Err(Failure::new(
                CANNOT_RUN,
                format!("cannot run `{}`: {e}", program.to_string_lossy()),
            ));
        }
    };

    let end = supervise(tree, Some(&guard), &mut signals, &key, args.kill_grace).await;
    let lost_before_release = guard.is_lost();
    let still_held = release(guard, &key, left_behind(kind, args.ttl), &mut signals).await;
    match end {
        Err(e) => Err(Failure::new(
            INTERNAL,
            format!("lost track of the command: {e}"),
        )),
        Ok(End::Lost { status }) => {
            say(&format!(
                "the command ended ({}) after the lease on `{key}` was lost; exiting with {}",
                describe_status(status),
                args.lost_exit_code
            ));
            Ok(args.lost_exit_code)
        }
        Ok(End::Exited(status)) => {
            if lost_before_release || still_held == Some(false) {
                say(&format!(
                    "the lease on `{key}` was lost by the time the command ended ({}); it may \
                     have run partly without the lock; exiting with {}",
                    describe_status(status),
                    args.lost_exit_code
                ));
                return Ok(args.lost_exit_code);
            }
            Ok(from_status(status))
        }
    }
}

/// What a `--check` command said.
enum Check {
    /// Exit 1: the work is to be done.
    Needed,
    /// Exit 0: nothing to do.
    NotNeeded,
    /// Any other status: the check itself failed; exit with this code.
    Failed(u8),
}

/// Starts the `--check` command (`sh -c CHECK`) in its own supervised process group.
fn spawn_check(
    check: &str,
    env: Vec<(&'static str, String)>,
    env_remove: &[&'static str],
    grace: Duration,
) -> Result<Tree, Failure> {
    let sh = std::ffi::OsString::from("/bin/sh");
    let args = [
        std::ffi::OsString::from("-c"),
        std::ffi::OsString::from(check),
    ];
    Tree::spawn(&Spec {
        program: &sh,
        args: &args,
        env,
        env_remove,
        grace,
    })
    .map_err(|e| Failure::new(CANNOT_RUN, format!("cannot run the check `{check}`: {e}")))
}

async fn check_outcome(
    check: &str,
    tree: Tree,
    guard: Option<&LockGuard>,
    signals: &mut Signals,
    key: &LockKey,
    grace: Duration,
) -> Result<Check, Failure> {
    let end = supervise(tree, guard, signals, key, grace)
        .await
        .map_err(|e| Failure::new(INTERNAL, format!("lost track of the check: {e}")))?;
    let status = match end {
        End::Exited(status) => status,
        End::Lost { status } => {
            return Err(Failure::new(
                crate::exit::LOST,
                format!(
                    "the lease on `{key}` was lost while the check ran ({})",
                    describe_status(status)
                ),
            ))
        }
    };
    Ok(match from_status(status) {
        0 => Check::NotNeeded,
        1 => Check::Needed,
        code => {
            say(&format!(
                "the check `{check}` failed ({}); not running the command (a check exits 0 \
                 when there is nothing to do, 1 when there is)",
                describe_status(status)
            ));
            Check::Failed(code)
        }
    })
}

fn wait_policy(args: &RunArgs) -> WaitPolicy {
    let jitter = args.poll_interval / 2;
    match args.wait {
        _ if args.no_wait => WaitPolicy::fail_fast(),
        Some(wait) if wait.is_zero() => WaitPolicy::fail_fast(),
        Some(wait) => WaitPolicy::until(wait, args.poll_interval).with_jitter(jitter),
        None => WaitPolicy::until(FOREVER, args.poll_interval).with_jitter(jitter),
    }
}

fn held_message(
    key: &LockKey,
    holder: Option<&LockInfo>,
    args: &RunArgs,
    reporter: &WaitReporter,
) -> String {
    let holder = holder.map_or_else(
        || "another owner".to_owned(),
        |h| LockView::new(h).holder_line(),
    );
    let waits = !(args.no_wait || args.wait.is_some_and(|w| w.is_zero()));
    match reporter.waited() {
        Some(waited) if waits => {
            format!(
                "`{key}` is still held by {holder}; gave up after {}",
                human_duration(waited)
            )
        }
        _ => format!("`{key}` is held by {holder}"),
    }
}

/// What becomes of a lock whose release failed or was abandoned, for messages: a lease expires
/// within `ttl`; a session lock ends with leaselock's connection, which closes as it exits.
fn left_behind(kind: LockKind, ttl: Duration) -> String {
    match kind {
        LockKind::Session => "it is a session lock, freed when leaselock's connection closes as \
                              it exits"
            .to_owned(),
        LockKind::Lease => format!("the lease expires within {}", human_duration(ttl)),
    }
}

/// Releases the lock, warning when that fails. `Some(was_held)` on success. A signal received
/// meanwhile abandons the release; `left_behind` says what then becomes of the lock.
async fn release(
    guard: LockGuard,
    key: &LockKey,
    left_behind: String,
    signals: &mut Signals,
) -> Option<bool> {
    let outcome = tokio::select! {
        outcome = guard.release() => outcome,
        sig = signals.recv() => {
            say(&format!(
                "{} while releasing `{key}`; giving up: {left_behind}",
                sig.as_str()
            ));
            return None;
        }
    };
    match outcome {
        Ok(was_held) => Some(was_held),
        Err(e) => {
            say(&format!(
                "could not release `{key}`: {}; {left_behind}",
                crate::exit::describe(&e)
            ));
            None
        }
    }
}

/// How the command ended.
enum End {
    /// On its own (or after a forwarded signal), with the lease held throughout.
    Exited(ExitStatus),
    /// After the lease was lost and it was told to stop.
    Lost { status: ExitStatus },
}

/// Waits for the command's tree, forwarding signals to its group, and stops the group (SIGTERM,
/// then SIGKILL after `grace`) when the lease is lost.
async fn supervise(
    mut tree: Tree,
    guard: Option<&LockGuard>,
    signals: &mut Signals,
    key: &LockKey,
    grace: Duration,
) -> std::io::Result<End> {
    let lost_signal = guard.map(|guard| guard.lost().clone());
    let mut lost = false;
    let mut kill_at: Option<Instant> = None;
    // While leaselock is stopped the supervisor stops the command; when leaselock is continued
    // the command is continued only if the lease survived the pause.
    let mut continued = signal(SignalKind::from_raw(Signal::SIGCONT as i32))?;
    let mut continue_again: Option<Instant> = None;
    loop {
        tokio::select! {
            Some(()) = continued.recv() => {
                let held = match guard {
                    Some(guard) if !lost => matches!(
                        tokio::time::timeout(grace, guard.ensure_held()).await,
                        Ok(Ok(()))
                    ),
                    _ => true,
                };
                if !held && !lost {
                    lost = true;
                    say(&format!(
                        "the lease on `{key}` did not survive while leaselock was stopped; \
                         sending SIGTERM to the command's process group, SIGKILL in {}",
                        human_duration(grace)
                    ));
                    tree.signal(Signal::SIGTERM);
                    kill_at = Some(Instant::now() + grace);
                }
                tree.signal(Signal::SIGCONT);
                // Once more after the supervisor's next look at leaselock: it may have decided
                // to stop the command just before leaselock was continued.
                continue_again = Some(Instant::now() + crate::tree::PARENT_POLL * 3);
            }
            _ = sleep_until(continue_again), if continue_again.is_some() => {
                continue_again = None;
                tree.signal(Signal::SIGCONT);
            }
            status = tree.wait() => {
                let status = status?;
                return Ok(if lost { End::Lost { status } } else { End::Exited(status) });
            }
            reason = wait_lost(lost_signal.as_ref()), if !lost => {
                lost = true;
                say(&format!(
                    "the lease on `{key}` was lost while the command ran ({reason}); sending \
                     SIGTERM to its process group, SIGKILL in {}",
                    human_duration(grace)
                ));
                tree.signal(Signal::SIGTERM);
                kill_at = Some(Instant::now() + grace);
            }
            _ = sleep_until(kill_at), if kill_at.is_some() => {
                say(&format!(
                    "the command did not exit within {} of SIGTERM; sending SIGKILL to its \
                     process group",
                    human_duration(grace)
                ));
                tree.signal(Signal::SIGKILL);
                kill_at = None;
            }
            sig = signals.recv() => {
                tracing::info!(signal = sig.as_str(), "forwarding signal to the command's process group");
                tree.signal(sig);
            }
        }
    }
}

async fn wait_lost(lost: Option<&leaselock::LostSignal>) -> String {
    match lost {
        Some(lost) => lost.wait().await.to_string(),
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn signal_code(sig: Signal) -> u8 {
    SIGNALED.saturating_add(u8::try_from(sig as i32).unwrap_or(127))
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(sig) => format!("killed by {}", sig.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => status.to_string(),
    }
}

/// The signals leaselock handles while it waits and while the command runs: every signal of
/// [`crate::tree::FORWARDED`] that was not inherited as ignored.
struct Signals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        let mut streams = Vec::new();
        for sig in crate::tree::handled_signals() {
            streams.push((sig, signal(SignalKind::from_raw(sig as i32))?));
        }
        Ok(Self { streams })
    }

    /// The next signal received.
    async fn recv(&mut self) -> Signal {
        std::future::poll_fn(|cx| {
            for (sig, stream) in &mut self.streams {
                if let std::task::Poll::Ready(Some(())) = stream.poll_recv(cx) {
                    return std::task::Poll::Ready(*sig);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// Tells the user on stderr, every few seconds, who holds the lock while `run` waits for it.
struct WaitReporter {
    quiet: bool,
    limit: String,
    state: Mutex<ReportState>,
    reported: AtomicBool,
}

#[derive(Default)]
struct ReportState {
    started: Option<Instant>,
    last: Option<Instant>,
}

impl WaitReporter {
    fn new(quiet: bool, args: &RunArgs) -> Self {
        let limit = match args.wait {
            Some(wait) => format!("up to {}", human_duration(wait)),
            None => "as long as it takes".to_owned(),
        };
        Self {
            quiet,
            limit,
            state: Mutex::new(ReportState::default()),
            reported: AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ReportState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long the acquisition has waited so far.
    fn waited(&self) -> Option<Duration> {
        self.state().started.map(|s| s.elapsed())
    }

    fn report_acquired(&self, key: &LockKey) {
        if self.reported.load(Ordering::Relaxed) {
            let waited = self.waited().unwrap_or_default();
            say(&format!(
                "acquired `{key}` after waiting {}",
                human_duration(waited)
            ));
        }
    }
}

#[leaselock::async_trait]
impl LockHooks for WaitReporter {
    async fn before_acquire(&self, _key: &LockKey, _owner: &OwnerId) -> HookResult {
        self.state().started = Some(Instant::now());
        Ok(())
    }

    async fn retry(&self, key: &LockKey, _attempt: u32, holder: Option<&LockInfo>) -> HookResult {
        if self.quiet {
            return Ok(());
        }
        let now = Instant::now();
        let (first, waited) = {
            let mut state = self.state();
            if state
                .last
                .is_some_and(|last| now.duration_since(last) < REPORT_EVERY)
            {
                return Ok(());
            }
            let first = state.last.is_none();
            state.last = Some(now);
            (first, state.started.map(|s| now.duration_since(s)))
        };
        let holder = holder.map_or_else(
            || "an owner it could not name (or the storage is busy)".to_owned(),
            |h| LockView::new(h).holder_line(),
        );
        if first {
            say(&format!(
                "`{key}` is held by {holder}; waiting {}",
                self.limit
            ));
        } else {
            say(&format!(
                "still waiting for `{key}` ({} so far), held by {holder}",
                human_duration(waited.unwrap_or_default())
            ));
        }
        self.reported.store(true, Ordering::Relaxed);
        Ok(())
    }
}
