//! The fault cases: plain async functions over [`Faults`]. Each panics on failure.
//!
//! Every assertion is about correctness (who holds the lock, in which order things happened,
//! which tokens were handed out), never about speed: time limits only keep a broken backend from
//! hanging the run, and the bounds of the recovery cases (a lease plus a refresh interval) carry
//! a generous allowance for a loaded machine.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leaselock::{
    AcquireOutcome, AcquireRequest, Capabilities, ExpiryClock, HookResult, Lease, LockBackend,
    LockHooks, LockKey, LockKind, Locker, OwnerId, WaitPolicy,
};

use super::child::{libfaketime, Role};
use super::Faults;
use crate::support::fresh_key;

/// The lease of lease-based holders in these cases.
const LEASE: Duration = Duration::from_secs(2);
/// Their refresh interval.
const REFRESH: Duration = Duration::from_millis(500);
/// Session locks do not expire; their "lease" only paces liveness checks.
const SESSION_LEASE: Duration = Duration::from_secs(3);
/// How often session holders check their session.
const SESSION_REFRESH: Duration = Duration::from_secs(1);
/// What a loaded two-core machine may add to a bound (polling, scheduling).
const SLACK: Duration = Duration::from_secs(5);
/// The longest wait for a holder's report before the case counts as hung.
const HANG: Duration = Duration::from_secs(120);
/// A lease that never runs out during a case.
const LONG: Duration = Duration::from_secs(120);

/// The number of critical sections of the soak: `LEASELOCK_SOAK_SECTIONS`, default 240 (a short
/// run for CI; `cargo xtask chaos` runs 10,000).
pub fn soak_sections() -> u64 {
    std::env::var("LEASELOCK_SOAK_SECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(240)
}

/// The number of soak processes: `LEASELOCK_SOAK_PROCESSES`, default (and at least) 8.
pub fn soak_processes() -> u64 {
    std::env::var("LEASELOCK_SOAK_PROCESSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
        .max(8)
}

/// How long the soak may take before it counts as hung.
pub fn soak_limit() -> Duration {
    Duration::from_secs(120) + Duration::from_millis(100) * soak_sections() as u32
}

/// Prints a figure for RELIABILITY.md on stderr and appends it to `LEASELOCK_FAULT_REPORT`.
fn report(backend: &str, case: &str, figures: String) {
    let line = format!("leaselock-fault: {backend} {case} {figures}");
    eprintln!("{line}");
    if let Ok(path) = std::env::var("LEASELOCK_FAULT_REPORT") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{line}");
        }
    }
}

/// A case that does not apply says so.
fn not_applicable(backend: &str, case: &str, why: &str) {
    eprintln!("leaselock-fault: {backend} {case} does not apply: {why}");
}

fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

fn owner(name: &str) -> OwnerId {
    OwnerId::new(format!("{name}-{}", uuid::Uuid::new_v4().simple())).expect("an owner")
}

fn request(key: &LockKey, owner: &OwnerId, ttl: Duration) -> AcquireRequest {
    AcquireRequest::new(key.clone(), owner.clone(), ttl).expect("a request")
}

fn is_session(caps: &Capabilities) -> bool {
    caps.kind == LockKind::Session
}

/// The lease and refresh interval of holders on this backend.
fn timing(caps: &Capabilities) -> (Duration, Duration) {
    if is_session(caps) {
        (SESSION_LEASE, SESSION_REFRESH)
    } else {
        (LEASE, REFRESH)
    }
}

/// Tries `request` every `every` until acquired, returning the lease and the instant the
/// acquisition returned; panics after `limit`. Errors (a server coming back) are retried.
async fn acquire_polling(
    backend: &dyn LockBackend,
    request: &AcquireRequest,
    every: Duration,
    limit: Duration,
) -> (Lease, Instant) {
    let started = Instant::now();
    let mut last_error = None;
    loop {
        match backend.try_acquire(request).await {
            Ok(AcquireOutcome::Acquired(lease)) => return (lease, Instant::now()),
            Ok(AcquireOutcome::Held(_)) => {}
            Err(error) => last_error = Some(error),
        }
        assert!(
            started.elapsed() < limit,
            "`{}` was not acquired within {limit:?} (last error: {last_error:?})",
            request.key()
        );
        tokio::time::sleep(every).await;
    }
}

/// Opens a backend, retrying while a server that has just started refuses.
async fn connect_retrying(f: &Faults, url: &str) -> Arc<dyn LockBackend> {
    let started = Instant::now();
    loop {
        match f.target().connect(url).await {
            Ok(backend) => return backend,
            Err(error) if started.elapsed() < Duration::from_secs(60) => {
                eprintln!("connect: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => panic!("cannot open the backend: {error}"),
        }
    }
}

async fn init_retrying(backend: &dyn LockBackend) {
    let started = Instant::now();
    loop {
        match backend.init_storage().await {
            Ok(()) => return,
            Err(error) if started.elapsed() < Duration::from_secs(60) => {
                eprintln!("init_storage: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => panic!("cannot initialize storage: {error}"),
        }
    }
}

/// Records the instant each guard's lost signal fired (the `lease_lost` hook runs right after
/// the signal is set).
#[derive(Clone, Default)]
struct LostClock {
    at: Arc<Mutex<HashMap<u64, Instant>>>,
}

#[leaselock::async_trait]
impl LockHooks for LostClock {
    async fn lease_lost(&self, lease: &Lease, _reason: &str) -> HookResult {
        let now = Instant::now();
        self.at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(lease.token.get())
            .or_insert(now);
        Ok(())
    }
}

impl LostClock {
    /// The instant the lost signal of `token` fired; waits briefly for the hook, which runs just
    /// after the signal is set.
    async fn when(&self, token: u64) -> Instant {
        for _ in 0..500 {
            if let Some(at) = self.get(token) {
                return at;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the lease_lost hook of token {token} did not run");
    }

    fn get(&self, token: u64) -> Option<Instant> {
        self.at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&token)
            .copied()
    }
}

/// A holder process is killed with SIGKILL (no release, no goodbye): the lock is free again within
/// a lease plus one refresh interval, and for session locks at once (well before the lease the
/// holder asked for, so it was the session's end that freed it). The next owner gets a higher
/// fencing token.
pub async fn holder_killed_frees_lock(f: Faults) {
    let t = f.target();
    let url = t.url();
    let probe = t.connect(&url).await.expect("connect");
    let caps = probe.capabilities();
    let session = is_session(&caps);
    // A session holder asks for a long lease: if the lock came free within it, the session did it.
    let (lease, refresh) = if session {
        (Duration::from_secs(30), SESSION_REFRESH)
    } else {
        (LEASE, REFRESH)
    };
    let key = fresh_key("fault_kill");
    let mut holder = f.spawn(
        Role::Hold {
            key: key.to_string(),
            lease,
            refresh,
            step: Duration::from_millis(100),
            hold_for: HANG,
            log: None,
        },
        &url,
        None,
    );
    let token = holder.expect("acquired", HANG).await.num(0);
    holder.expect("step", HANG).await;
    tokio::time::sleep(refresh * 2).await; // a few refreshes
    let req = request(&key, &owner("after-kill"), LONG);
    match probe.try_acquire(&req).await.expect("try_acquire") {
        AcquireOutcome::Held(_) => {}
        AcquireOutcome::Acquired(lease) => {
            panic!("a live holder's lock was granted to another owner: {lease:?}")
        }
    }
    let killed = Instant::now();
    holder.kill().await;
    let bound = if session {
        SLACK
    } else {
        lease + refresh + SLACK
    };
    let (next, at) = acquire_polling(&*probe, &req, Duration::from_millis(10), bound + HANG).await;
    let recovery = at - killed;
    assert!(
        next.token.get() > token,
        "fencing token {} after the killed holder's {token}",
        next.token
    );
    assert!(
        recovery <= bound,
        "the killed holder's lock came free only after {recovery:?}; the bound is {:?} ({})",
        bound,
        if session {
            "a session lock is freed when its session ends"
        } else {
            "a lease plus one refresh interval, plus an allowance for a loaded machine"
        }
    );
    report(
        caps.backend,
        "holder_killed",
        format!(
            "recovery={} lease={} refresh={} tokens={token}->{}",
            secs(recovery),
            secs(lease),
            secs(refresh),
            next.token
        ),
    );
    assert!(probe.release(&next).await.expect("release"));
}

/// Lines of the shared log of a paused holder and the owner that took over.
fn read_log(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').map(str::to_owned).collect())
        .collect()
}

/// A holder process is paused with SIGSTOP for longer than its lease, then resumed with SIGCONT.
///
/// Lease backends: another owner takes the lock meanwhile, with a higher fencing token, and the
/// resumed holder's guard reports the lease lost before the holder does any more work: every
/// step of work it logs after the takeover was checked before the takeover (a step already
/// under way when the pause hit, which the fencing token covers), and at most one such.
///
/// Session backends: the paused holder's session lives on, so nobody else gets the lock while it
/// is paused; after it resumes it either still holds it or is told it lost it, never both.
pub async fn holder_paused_loses_lease(f: Faults) {
    let t = f.target();
    let url = t.url();
    let probe = t.connect(&url).await.expect("connect");
    let caps = probe.capabilities();
    let (lease, refresh) = timing(&caps);
    let key = fresh_key("fault_pause");
    let dir = tempfile::tempdir().expect("a temp dir");
    let log = dir.path().join("log");
    let mut holder = f.spawn(
        Role::Hold {
            key: key.to_string(),
            lease,
            refresh,
            step: Duration::from_millis(100),
            hold_for: HANG,
            log: Some(log.clone()),
        },
        &url,
        None,
    );
    let token = holder.expect("acquired", HANG).await.num(0);
    holder.expect("step", HANG).await;
    let req = request(&key, &owner("while-paused"), LONG);
    holder.pause();
    let paused = Instant::now();

    if is_session(&caps) {
        // Its session is alive (the kernel still answers for it): nobody else gets the lock.
        let mut attempts = 0;
        while paused.elapsed() < lease + refresh * 2 {
            match probe.try_acquire(&req).await.expect("try_acquire") {
                AcquireOutcome::Held(_) => attempts += 1,
                AcquireOutcome::Acquired(lease) => {
                    panic!("a paused holder's session lock was granted to another owner: {lease:?}")
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Counted before the resume: a resumed holder past its deadline reports its loss at
        // once, and that report must not be counted as already there.
        let before = holder.events().len();
        holder.resume();
        // Either it goes on working or it is told of a loss; both are safe. Which, is reported.
        let outcome = tokio::time::timeout(HANG, async {
            loop {
                let events = holder.events();
                if let Some(e) = events[before..]
                    .iter()
                    .find(|e| e.name == "step" || e.name == "lost")
                {
                    return e.name.clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the resumed holder neither worked nor reported a loss");
        report(
            caps.backend,
            "holder_paused",
            format!(
                "paused={} refused_attempts={attempts} after_resume={outcome} token={token}",
                secs(paused.elapsed())
            ),
        );
        holder.kill().await;
        return;
    }

    let (taken, taken_at) = acquire_polling(
        &*probe,
        &req,
        Duration::from_millis(10),
        lease + refresh + HANG,
    )
    .await;
    // Logged before the holder resumes: everything it logs later comes after this line.
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .and_then(|mut f| {
            use std::io::Write;
            writeln!(f, "taken 0 0 {}", taken.token)
        })
        .expect("log the takeover");
    assert!(
        taken.token.get() > token,
        "the new owner's token {} must be above the paused holder's {token}",
        taken.token
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.resume();
    let lost = holder.expect("lost", HANG).await;
    let lost_seq = lost.num(0);
    let status = holder.wait(HANG).await;
    assert!(status.success(), "the holder process failed: {status}");

    let lines = read_log(&log);
    let taken_line = lines
        .iter()
        .position(|l| l[0] == "taken")
        .expect("the takeover is logged");
    let checked_before: std::collections::HashSet<&str> = lines[..taken_line]
        .iter()
        .filter(|l| l[0] == "check")
        .map(|l| l[2].as_str())
        .collect();
    let steps_after: Vec<&Vec<String>> = lines[taken_line..]
        .iter()
        .filter(|l| l[0] == "step")
        .collect();
    for step in &steps_after {
        assert!(
            checked_before.contains(step[2].as_str()),
            "the resumed holder did work (step {}) after checking its lease AFTER the takeover: \
             the guard did not report the loss first. Log:\n{lines:?}",
            step[2]
        );
    }
    assert!(
        steps_after.len() <= 1,
        "more than one step after the takeover: {steps_after:?}"
    );
    assert!(
        probe.verify(&taken).await.expect("verify"),
        "the new owner still holds the lock after the old one resumed"
    );
    report(
        caps.backend,
        "holder_paused",
        format!(
            "takeover_after_pause={} tokens={token}->{} lost_at_step={lost_seq} \
             steps_in_flight_after_takeover={}",
            secs(taken_at - paused),
            taken.token,
            steps_after.len()
        ),
    );
    assert!(probe.release(&taken).await.expect("release"));
}

/// The holder is cut off from the server by a proxy that drops every byte silently (no reset, no
/// close). Its lost signal fires, and it fires before any other owner acquires the lock: the
/// instant the signal fired and the instant another owner's acquisition returned are recorded in
/// this process and compared (an ordering, not a speed). For lease backends the signal fires at
/// the holder's local deadline; for session locks when its liveness checks have failed for a
/// lease duration, and the server keeps the session (the lock) until the partition ends with a
/// reset. Four other owners poll every 2 ms from the moment of the cut, so one of them acquires
/// within milliseconds of the server letting anyone in.
pub async fn partitioned_holder_loses_first(f: Faults) {
    partition(f, true).await;
}

/// The holder is cut off from the server by a silent partition, as in
/// [`partitioned_holder_loses_first`]: its lost signal fires without any answer from the server,
/// and afterwards another owner gets the lock with a higher fencing token. (The order of the two
/// instants is not checked here.)
pub async fn partitioned_holder_is_told(f: Faults) {
    partition(f, false).await;
}

async fn partition(f: Faults, strict: bool) {
    let t = f.target();
    let Some((via_proxy, proxy)) = t.proxied_backend().await.expect("a proxied backend") else {
        let caps = t.connect(&t.url()).await.expect("connect").capabilities();
        not_applicable(caps.backend, "partitioned_holder", "no network to cut");
        return;
    };
    let direct = t.connect(&t.url()).await.expect("connect");
    let caps = direct.capabilities();
    let session = is_session(&caps);
    let (lease, refresh) = timing(&caps);
    let lost_clock = LostClock::default();
    let locker = Locker::builder(Arc::clone(&via_proxy))
        .lease_duration(lease)
        .refresh_interval(refresh)
        .hooks(lost_clock.clone())
        .build()
        .expect("a locker");
    let key = fresh_key("fault_partition");
    let guard = locker
        .acquire(key.as_str())
        .await
        .expect("acquire through the proxy")
        .expect("acquired");
    let token = guard.token().get();
    tokio::time::sleep(refresh * 2).await; // refreshes pass through the proxy
    assert!(!guard.is_lost(), "lost before the partition");

    proxy.set(crate::proxy::ProxyMode::Blackhole);
    let cut = Instant::now();
    // Other owners try hard, directly, from the moment of the cut: several connections polling
    // every few milliseconds, so one of them acquires as soon as the server lets anyone.
    let (pollers, every) = if caps.expiry_clock == ExpiryClock::WaiterMonotonic {
        (1, Duration::from_millis(20))
    } else {
        (4, Duration::from_millis(2))
    };
    let (won_tx, mut won_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut poll_tasks = Vec::new();
    for i in 0..pollers {
        let backend = if i == 0 {
            Arc::clone(&direct)
        } else {
            t.connect(&t.url()).await.expect("connect")
        };
        let req = request(&key, &owner("other-side"), LONG);
        let won = won_tx.clone();
        poll_tasks.push(tokio::spawn(async move {
            let (lease, at) = acquire_polling(&*backend, &req, every, LONG + HANG).await;
            let _ = won.send((lease, at, backend));
        }));
    }
    drop(won_tx);
    tokio::time::timeout(lease + HANG, guard.lost().wait())
        .await
        .expect("the partitioned holder's lost signal never fired");
    let lost_at = lost_clock.when(token).await;
    if session {
        // The server still has the holder's session (nothing reached it): the lock stays held
        // until the partition ends. End it with resets, as a dying network path would.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            won_rx.is_empty(),
            "the lock was granted while the partitioned holder's session was alive"
        );
        proxy.set(crate::proxy::ProxyMode::Reset);
    }
    let (next, acquired_at, winner) = won_rx.recv().await.expect("a contender acquired");
    for task in &poll_tasks {
        task.abort();
    }
    assert!(
        !strict || lost_at < acquired_at,
        "another owner acquired the lock {:?} BEFORE the partitioned holder's lost signal fired \
         (lost {:?} after the cut, acquired {:?} after the cut): two owners at once",
        lost_at.saturating_duration_since(acquired_at),
        lost_at - cut,
        acquired_at - cut
    );
    assert!(next.token.get() > token);
    let margin = if acquired_at > lost_at {
        secs(acquired_at - lost_at)
    } else {
        format!("-{}", secs(lost_at - acquired_at))
    };
    report(
        caps.backend,
        if strict {
            "partitioned_holder"
        } else {
            "partitioned_holder_told"
        },
        format!(
            "lost_after_cut={} other_acquired_after_cut={} margin={margin} lease={}",
            secs(lost_at - cut),
            secs(acquired_at - cut),
            secs(lease)
        ),
    );
    proxy.set(crate::proxy::ProxyMode::Reset);
    drop(guard); // lost: nothing to release
    assert!(winner.release(&next).await.expect("release"));
}

/// The work asks its guard whether the lock is still held ([`leaselock::LockContext::ensure_held`],
/// the check before each write) right after a silent partition cut the holder off. The answer is
/// an error (the lease is lost, or the backend cannot tell), and it comes by the time the guard
/// itself knows the lease is gone: its local deadline, a lease after the last successful refresh
/// (the bound allows a refresh interval and 5 s more), not whenever the driver gives up.
pub async fn partitioned_holder_check_returns(f: Faults) {
    let t = f.target();
    let Some((via_proxy, proxy)) = t.proxied_backend().await.expect("a proxied backend") else {
        let caps = t.connect(&t.url()).await.expect("connect").capabilities();
        not_applicable(caps.backend, "partitioned_check", "no network to cut");
        return;
    };
    let caps = via_proxy.capabilities();
    let (lease, refresh) = timing(&caps);
    let locker = Locker::builder(Arc::clone(&via_proxy))
        .lease_duration(lease)
        .refresh_interval(refresh)
        .build()
        .expect("a locker");
    let key = fresh_key("fault_partition_check");
    let guard = locker
        .acquire(key.as_str())
        .await
        .expect("acquire through the proxy")
        .expect("acquired");
    tokio::time::sleep(refresh * 2).await;
    guard
        .ensure_held()
        .await
        .expect("held before the partition");
    proxy.set(crate::proxy::ProxyMode::Blackhole);
    let cut = Instant::now();
    let limit = lease + refresh + SLACK;
    let outcome = tokio::time::timeout(limit + HANG, guard.ensure_held()).await;
    let took = cut.elapsed();
    proxy.set(crate::proxy::ProxyMode::Reset);
    let Ok(outcome) = outcome else {
        panic!(
            "ensure_held() did not return within {:?} of a partition: the work hangs for as long \
             as the partition lasts",
            limit + HANG
        )
    };
    assert!(
        took <= limit,
        "ensure_held() answered {took:?} after the partition began, long after the guard's own \
         deadline (a {lease:?} lease; bound {limit:?}): the work stalled although the guard knew \
         the lease was gone ({outcome:?})"
    );
    assert!(
        outcome.is_err(),
        "ensure_held() said the lock is held while nothing reached the server"
    );
    report(
        caps.backend,
        "partitioned_check",
        format!(
            "ensure_held_returned_after={} outcome={}",
            secs(took),
            match outcome {
                Err(leaselock::Error::Lost { .. }) => "lost",
                Err(_) => "error",
                Ok(()) => "held",
            }
        ),
    );
}

/// One owner's time believing it holds the lock: from its acquisition's return to the moment it
/// stopped (its release call, or its lost signal).
#[derive(Debug)]
struct Tenure {
    owner: usize,
    token: u64,
    start: Instant,
    end: Instant,
    lost: bool,
}

/// Owners cycling on `key` until `stop`: acquire (waiting), hold until lost or for `hold`,
/// release. Returns every tenure.
async fn cycle_owners(
    backends: Vec<Arc<dyn LockBackend>>,
    key: LockKey,
    lease: Duration,
    refresh: Duration,
    hold: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<Tenure> {
    let tenures = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, backend) in backends.into_iter().enumerate() {
        let (key, stop, tenures) = (key.clone(), Arc::clone(&stop), Arc::clone(&tenures));
        tasks.push(tokio::spawn(async move {
            let lost_clock = LostClock::default();
            let locker = Locker::builder(backend)
                .lease_duration(lease)
                .refresh_interval(refresh)
                .release_timeout(Duration::from_secs(2))
                .wait(
                    WaitPolicy::until(Duration::from_secs(2), Duration::from_millis(50))
                        .with_jitter(Duration::from_millis(20)),
                )
                .hooks(lost_clock.clone())
                .build()
                .expect("a locker");
            while !stop.load(Ordering::SeqCst) {
                let guard = match locker.acquire(key.as_str()).await {
                    Ok(Some(guard)) => guard,
                    _ => continue, // held by another, or the server is away: try again
                };
                let start = Instant::now();
                let token = guard.token().get();
                let lost = tokio::time::timeout(hold, guard.lost().wait())
                    .await
                    .is_ok();
                let end = if lost {
                    lost_clock.when(token).await
                } else {
                    Instant::now()
                };
                // A release can fail while the server is away; the lease then runs out.
                let _ = guard.release().await;
                tenures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Tenure {
                        owner: i,
                        token,
                        start,
                        end,
                        lost,
                    });
            }
        }));
    }
    for task in tasks {
        task.await.expect("an owner task");
    }
    let mut tenures = std::mem::take(&mut *tenures.lock().unwrap_or_else(|p| p.into_inner()));
    tenures.sort_by_key(|t| t.start);
    tenures
}

/// The server restarts while a lock is held.
///
/// Leases are 5 s here, after a warm-up of the fresh server. First a long outage (longer than a
/// lease): the holder is told (its lost signal fires: at its local deadline, or at once when its
/// session ends), and an owner waiting meanwhile gets the lock only after that, with a higher
/// token. Then three owners cycle on one key through two quick restarts, which the leases
/// outlast: no two of them ever believe they hold the lock at the same moment, and tokens keep
/// increasing. Runs against a separate server the case starts
/// itself ([`super::FaultTarget::start_server`]), never the shared one.
pub async fn server_restart_no_double_owner(f: Faults) {
    let t = f.target();
    let Some(server) = t.start_server().await else {
        let caps = t.connect(&t.url()).await.expect("connect").capabilities();
        not_applicable(
            caps.backend,
            "server_restart",
            "no separate server to restart",
        );
        return;
    };
    let url = server.url().to_owned();
    let setup = connect_retrying(&f, &url).await;
    init_retrying(&*setup).await;
    let caps = setup.capabilities();
    // A server just started can be slow at first (DynamoDB Local's JVM): warm it up, and give
    // leases 5 s, so that only the outage, never a slow first request, ends the holder's lease.
    let warm_up = fresh_key("fault_restart_warm_up");
    for _ in 0..5 {
        let req = request(&warm_up, &owner("warm-up"), LONG);
        let (lease, _) = acquire_polling(&*setup, &req, Duration::from_millis(20), HANG).await;
        let _ = setup.release(&lease).await;
    }
    let (lease, refresh) = if is_session(&caps) {
        timing(&caps)
    } else {
        (Duration::from_secs(5), REFRESH)
    };

    // 1. A long outage: the holder is told, the waiter gets the lock after that.
    let key = fresh_key("fault_restart");
    let lost_clock = LostClock::default();
    let holder = Locker::builder(connect_retrying(&f, &url).await)
        .lease_duration(lease)
        .refresh_interval(refresh)
        .release_timeout(Duration::from_secs(2))
        .hooks(lost_clock.clone())
        .build()
        .expect("a locker");
    let guard = holder
        .acquire(key.as_str())
        .await
        .expect("acquire")
        .expect("acquired");
    let token = guard.token().get();
    let waiter = Locker::builder(connect_retrying(&f, &url).await)
        .lease_duration(LONG)
        .wait(WaitPolicy::until(HANG, Duration::from_millis(20)))
        .build()
        .expect("a locker");
    let waiting = {
        let key = key.clone();
        tokio::spawn(async move {
            let guard = waiter.acquire(key.as_str()).await;
            (guard, Instant::now())
        })
    };
    tokio::time::sleep(refresh * 2).await;
    assert!(!guard.is_lost());
    assert!(!waiting.is_finished(), "granted while held");
    let stopped = Instant::now();
    server.stop().await;
    tokio::time::timeout(lease + HANG, guard.lost().wait())
        .await
        .expect("the holder was not told that the server went away with its lock");
    let lost_at = lost_clock.when(token).await;
    // Stay down past the holder's lease, then come back.
    let down_until = stopped + lease + Duration::from_secs(1);
    tokio::time::sleep_until(tokio::time::Instant::from_std(down_until)).await;
    server.start().await;
    let restarted = Instant::now();
    let (next, acquired_at) = waiting.await.expect("the waiter");
    let next = next
        .expect("the waiter's acquisition after the restart")
        .expect("acquired");
    assert!(
        lost_at < acquired_at,
        "the waiter acquired before the holder was told of its loss"
    );
    assert!(
        next.token().get() > token,
        "token {} after {token}: fencing went back across a restart",
        next.token()
    );
    report(
        caps.backend,
        "server_restart_outage",
        format!(
            "told_after_stop={} waiter_acquired_after_restart={} tokens={token}->{}",
            secs(lost_at - stopped),
            secs(acquired_at - restarted),
            next.token()
        ),
    );
    let _ = next.release().await;
    drop(guard);

    // 2. Quick restarts under contention. The 5 s leases outlast a quick restart: this part is
    // about the restart itself (sessions end, connections break, refreshes fail and retry), not
    // about expiry, which the outage above covered.
    let key = fresh_key("fault_restart_cycle");
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(connect_retrying(&f, &url).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let owners = tokio::spawn(cycle_owners(
        backends,
        key,
        lease,
        refresh,
        Duration::from_millis(400),
        Arc::clone(&stop),
    ));
    let mut restarts = Vec::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stopping = Instant::now();
        server.stop().await;
        let stopped = Instant::now();
        server.start().await;
        restarts.push((stopping, stopped, Instant::now()));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let tenures = owners.await.expect("the owners");
    assert!(
        tenures.len() >= 2,
        "the owners got the lock only {} times around two restarts",
        tenures.len()
    );
    for pair in tenures.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            a.end <= b.start,
            "two owners at once around a restart: owner {} (token {}) until {:?} after owner {} \
             (token {}) started: {a:?} then {b:?} (restarts at {restarts:?})",
            a.owner,
            a.token,
            a.end - b.start,
            b.owner,
            b.token
        );
        assert!(b.token > a.token, "tokens went back: {tenures:?}");
    }
    report(
        caps.backend,
        "server_restart_cycles",
        format!(
            "restarts=2 tenures={} told_lost={} overlaps=0",
            tenures.len(),
            tenures.iter().filter(|t| t.lost).count()
        ),
    );
}

/// Checks that a process started with `skew` (`+30s`, `-30s`) really sees its wall clock
/// shifted: its first report is its clock.
async fn assert_skewed(process: &mut super::HolderProcess, skew: &str) {
    let event = process.expect("clock", HANG).await;
    let ours = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as f64;
    let theirs = event.num(0) as f64;
    let want: f64 = skew
        .trim_end_matches('s')
        .parse::<f64>()
        .expect("a skew in seconds")
        * 1000.0;
    let off = theirs - ours;
    assert!(
        (off - want).abs() < 10_000.0,
        "the process was to see its clock {skew} off, but it is {:.1}s off",
        off / 1000.0
    );
}

/// Under a wall clock skewed by `skew`, against a backend whose expiry is decided by the
/// database's clock (or by nothing, for session locks): a skewed holder keeps its lock against a
/// true-clock contender, its death still frees the lock within a lease plus a refresh interval,
/// and a skewed contender never takes a live holder's lock.
async fn skew_database_clock(f: &Faults, url: &str, skew: &str) -> String {
    let probe = f.target().connect(url).await.expect("connect");
    let caps = probe.capabilities();
    let session = is_session(&caps);
    // Leases long enough that only a clock bug, never a slow machine, ends one early: a holder
    // whose -30 s clock decided its expiry would lose it at once, a +30 s one would keep it 30 s
    // too long.
    let (lease, refresh) = if session {
        timing(&caps)
    } else {
        (Duration::from_secs(5), REFRESH)
    };

    // (a) The holder's clock is skewed.
    let key = fresh_key("fault_skew_holder");
    let mut holder = f.spawn(
        Role::Hold {
            key: key.to_string(),
            lease,
            refresh,
            step: Duration::from_millis(100),
            hold_for: HANG,
            log: None,
        },
        url,
        Some(skew),
    );
    assert_skewed(&mut holder, skew).await;
    let token = holder.expect("acquired", HANG).await.num(0);
    let req = request(&key, &owner("true-clock"), LONG);
    let watch_from = Instant::now();
    let mut refused = 0;
    while watch_from.elapsed() < Duration::from_secs(4) {
        match probe.try_acquire(&req).await.expect("try_acquire") {
            AcquireOutcome::Held(_) => refused += 1,
            AcquireOutcome::Acquired(lease) => panic!(
                "double grant: a holder with its clock skewed by {skew} still held the lock, \
                 and it was granted to an owner with a true clock: {lease:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !holder.saw("lost"),
        "the skewed ({skew}) holder lost a lease it kept refreshing"
    );
    let killed = Instant::now();
    holder.kill().await;
    let bound = if session {
        SLACK
    } else {
        lease + refresh + SLACK
    };
    let (next, at) = acquire_polling(&*probe, &req, Duration::from_millis(10), bound + HANG).await;
    assert!(next.token.get() > token);
    assert!(
        at - killed <= bound,
        "the dead skewed ({skew}) holder's lock came free only after {:?} (bound {bound:?})",
        at - killed
    );
    assert!(probe.release(&next).await.expect("release"));

    // (b) A contender's clock is skewed; the holder's is true.
    let key = fresh_key("fault_skew_contender");
    let locker = Locker::builder(Arc::clone(&probe))
        .lease_duration(lease)
        .refresh_interval(refresh)
        .build()
        .expect("a locker");
    let guard = locker
        .acquire(key.as_str())
        .await
        .expect("acquire")
        .expect("acquired");
    let mut contender = f.spawn(
        Role::Contend {
            key: key.to_string(),
            lease,
            interval: Duration::from_millis(20),
            limit: Duration::from_secs(4),
        },
        url,
        Some(skew),
    );
    assert_skewed(&mut contender, skew).await;
    contender.expect("started", HANG).await;
    let outcome = tokio::time::timeout(HANG, async {
        loop {
            if contender.saw("acquired") {
                return "acquired";
            }
            if contender.saw("never") {
                return "never";
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the skewed contender finished");
    assert_eq!(
        outcome, "never",
        "double grant: a contender with its clock skewed by {skew} took a live holder's lock"
    );
    assert!(!guard.is_lost());
    assert!(guard.release().await.expect("release"));
    format!(
        "skew{skew}: refused={refused} recovery_after_kill={} skewed_contender=refused",
        secs(at - killed)
    )
}

/// Under a skewed wall clock, DynamoDB's takeover still waits a whole lease: it watches the
/// record unchanged for a lease on the waiter's monotonic clock, whatever anyone's wall clock
/// says. Both a skewed dead holder and a skewed waiter are tried.
async fn skew_waiter_monotonic(f: &Faults, url: &str, skew: &str) -> String {
    let probe = f.target().connect(url).await.expect("connect");
    let (lease, refresh) = (LEASE, REFRESH);
    let hold = |key: &LockKey| Role::Hold {
        key: key.to_string(),
        lease,
        refresh,
        step: Duration::from_millis(100),
        hold_for: HANG,
        log: None,
    };

    // (a) The dead holder's clock was skewed; the waiter's is true.
    let key = fresh_key("fault_skew_holder");
    let mut holder = f.spawn(hold(&key), url, Some(skew));
    assert_skewed(&mut holder, skew).await;
    let token = holder.expect("acquired", HANG).await.num(0);
    holder.expect("step", HANG).await;
    holder.kill().await;
    let waiter = f.target().connect(url).await.expect("connect");
    let started = Instant::now();
    let req = request(&key, &owner("true-clock"), LONG);
    let (next, at) = acquire_polling(
        &*waiter,
        &req,
        Duration::from_millis(20),
        lease + refresh + SLACK + HANG,
    )
    .await;
    let waited = at - started;
    assert!(
        waited >= lease,
        "the waiter took over after {waited:?}, less than a whole lease ({lease:?}), from a \
         holder whose clock was skewed by {skew}"
    );
    assert!(next.token.get() > token);
    assert!(waiter.release(&next).await.expect("release"));

    // (b) The waiter's clock is skewed; the dead holder's was true.
    let key = fresh_key("fault_skew_waiter");
    let mut holder = f.spawn(hold(&key), url, None);
    let token = holder.expect("acquired", HANG).await.num(0);
    holder.expect("step", HANG).await;
    holder.kill().await;
    let mut contender = f.spawn(
        Role::Contend {
            key: key.to_string(),
            lease: LONG,
            interval: Duration::from_millis(20),
            limit: lease + refresh + SLACK + HANG,
        },
        url,
        Some(skew),
    );
    assert_skewed(&mut contender, skew).await;
    let acquired = contender.expect("acquired", lease + HANG * 2).await;
    let skewed_waited = Duration::from_millis(acquired.num(1));
    assert!(acquired.num(0) > token);
    assert!(
        skewed_waited >= lease,
        "a waiter with its clock skewed by {skew} took over after {skewed_waited:?}, less than a \
         whole lease ({lease:?})"
    );
    drop(probe);
    format!(
        "skew{skew}: takeover_from_skewed_holder={} skewed_waiter_takeover={} lease={}",
        secs(waited),
        secs(skewed_waited),
        secs(lease)
    )
}

/// The wall clock of a holder process (or of a contender) is skewed by +30 s and by -30 s with
/// libfaketime. Backends whose database clock decides expiry (and session locks) never grant a
/// live holder's lock to anyone, and free a dead holder's lock within a lease plus a refresh
/// interval; DynamoDB's takeover still waits a whole lease. Needs libfaketime (Debian package
/// `faketime`), preloaded into the holder processes. Does not apply where the expiry clock is
/// each process's own ([`super::FaultTarget::clock_is_per_process`]).
pub async fn clock_skew_no_double_grant(f: Faults) {
    let t = f.target();
    let url = t.url();
    let caps = t.connect(&url).await.expect("connect").capabilities();
    if t.clock_is_per_process() {
        not_applicable(
            caps.backend,
            "clock_skew",
            "the expiry clock is each process's own clock (one host, one clock)",
        );
        return;
    }
    if libfaketime().is_none() {
        assert!(
            !crate::is_ci(),
            "libfaketime (Debian package faketime) is missing, and under CI=true every fault case \
             is required"
        );
        eprintln!(
            "\n#####  SKIPPED: clock_skew_no_double_grant needs libfaketime \
             (apt-get install faketime).  #####\n"
        );
        return;
    }
    let results = if caps.expiry_clock == ExpiryClock::WaiterMonotonic {
        let (a, b) = tokio::join!(
            skew_waiter_monotonic(&f, &url, "+30s"),
            skew_waiter_monotonic(&f, &url, "-30s")
        );
        [a, b]
    } else {
        let (a, b) = tokio::join!(
            skew_database_clock(&f, &url, "+30s"),
            skew_database_clock(&f, &url, "-30s")
        );
        [a, b]
    };
    report(caps.backend, "clock_skew", results.join(" "));
}

/// At least eight OS processes run contended critical sections on one key (240 in all by
/// default; `LEASELOCK_SOAK_SECTIONS`, 10,000 with `cargo xtask chaos`): no two sections ever
/// overlap (each claims a marker file that must not exist), every section runs, none loses its
/// lease, and the fencing tokens, in the order the sections ran, strictly increase.
pub async fn soak_across_processes(f: Faults) {
    let t = f.target();
    let url = t.url();
    let caps = t.connect(&url).await.expect("connect").capabilities();
    let sections = soak_sections();
    let processes = soak_processes();
    let dir = tempfile::tempdir().expect("a temp dir");
    let key = fresh_key("fault_soak");
    let started = Instant::now();
    let mut children: Vec<_> = (0..processes)
        .map(|i| {
            let share = sections / processes + u64::from(i < sections % processes);
            f.spawn(
                Role::Soak {
                    key: key.to_string(),
                    sections: share,
                    dir: dir.path().to_path_buf(),
                    lease: Duration::from_secs(5),
                },
                &url,
                None,
            )
        })
        .collect();
    let (mut done, mut overlaps, mut lost, mut errors) = (0, 0, 0, 0);
    for child in &mut children {
        let event = child.expect("soak", soak_limit()).await;
        done += event.num(0);
        overlaps += event.num(1);
        lost += event.num(2);
        errors += event.num(3);
        let status = child.wait(HANG).await;
        assert!(status.success(), "a soak process failed: {status}");
    }
    let elapsed = started.elapsed();
    let tokens: Vec<u64> = std::fs::read_to_string(dir.path().join("tokens"))
        .expect("the token log")
        .lines()
        .map(|l| l.parse().expect("a token"))
        .collect();
    let regressions = tokens.windows(2).filter(|w| w[1] <= w[0]).count();
    report(
        caps.backend,
        "soak",
        format!(
            "processes={processes} sections={} overlaps={overlaps} token_regressions={regressions} \
             lost={lost} retried_errors={errors} elapsed={} rate={:.0}/s",
            tokens.len(),
            secs(elapsed),
            tokens.len() as f64 / elapsed.as_secs_f64()
        ),
    );
    assert_eq!(overlaps, 0, "critical sections overlapped");
    assert_eq!(regressions, 0, "fencing tokens went back: {tokens:?}");
    assert_eq!(lost, 0, "sections lost their lease");
    assert_eq!(done, sections, "every section ran");
    assert_eq!(tokens.len() as u64, sections);
}
