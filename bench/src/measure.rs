//! The five measures.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use leaselock::{
    async_trait, AcquireOutcome, AcquireRequest, Capabilities, HookResult, Lease, LockBackend,
    LockGuard, LockHooks, LockInfo, LockKey, LockKind, LockState, Locker, OnUnavailable,
    WaitPolicy, Wakeup,
};
use tokio::sync::mpsc;

use crate::floor::{self, Floor};
use crate::machine::{self, Machine};
use crate::proxy::{Proxy, Snapshot};
use crate::report::{
    evaluate, BackendReport, Contention, CycleLatency, Handoff, OpCount, Outcome, Report,
    RoundTrips, Scale, Settings, Throughput, Uncontended, SCHEMA,
};
use crate::stats::{median_and_mean, Latency};
use crate::target::{BackendId, Target};
use crate::{Config, Measure, Result};

/// How long the connection must stay quiet around each counted operation, so that what a call
/// leaves running (a pool's reset, a wake-up) is counted with it and not with the next.
const SETTLE: Duration = Duration::from_millis(25);
/// No single measure may take longer than this on one backend.
const MEASURE_LIMIT: Duration = Duration::from_secs(30 * 60);

pub(crate) async fn run_all(config: &Config, command: &str) -> Report {
    let started = SystemTime::now();
    let load_start = machine::loadavg();
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let scratch = match &config.scratch {
        Some(dir) => std::fs::create_dir_all(dir).and_then(|()| {
            tempfile::Builder::new()
                .prefix("leaselock-bench-")
                .tempdir_in(dir)
        }),
        None => tempfile::Builder::new()
            .prefix("leaselock-bench-")
            .tempdir(),
    }
    .expect("a scratch directory for the SQLite file");
    let fsync = machine::fsync_probe(scratch.path());
    let mut backends = Vec::new();
    for &id in &config.backends {
        backends.push(run_backend(config, id, scratch.path(), &run).await);
    }
    Report {
        schema: SCHEMA,
        started_at: machine::utc(started),
        finished_at: machine::utc(SystemTime::now()),
        command: command.to_owned(),
        machine: Machine::now(load_start, fsync),
        settings: Settings {
            measures: config
                .measures
                .iter()
                .filter_map(clap::ValueEnum::to_possible_value)
                .map(|v| v.get_name().to_owned())
                .collect(),
            cycles: config.cycles,
            round_trip_cycles: config.round_trip_cycles,
            handoffs: config.handoffs,
            poll_interval_ms: config.poll_interval.as_secs_f64() * 1e3,
            workers: config.workers,
            keys: config.keys,
            contention_duration_s: config.contention_duration.as_secs_f64(),
            settle_s: config.settle.as_secs_f64(),
            scale_leases: config.scale_leases,
            scale_lease_s: config.scale_lease.as_secs_f64(),
            scale_refresh_interval_s: config.scale_lease.as_secs_f64() / 3.0,
            scale_duration_s: config.scale_duration.as_secs_f64(),
        },
        backends,
    }
}

/// Waits (up to `config.settle`) for the machine to be quiet before a measure, and says so when
/// it was not.
async fn quiet(config: &Config, id: BackendId) {
    if config.settle.is_zero() {
        return;
    }
    let (waited, busy) = machine::settle(config.settle).await;
    if waited > Duration::from_secs(1) {
        say(
            id,
            format!(
                "waited {:.1} s for the machine to settle ({busy:.2} CPUs busy at the end)",
                waited.as_secs_f64()
            ),
        );
    }
}

fn say(id: BackendId, what: impl fmt::Display) {
    eprintln!("[{}] {what}", id.name());
}

async fn run_backend(
    config: &Config,
    id: BackendId,
    scratch: &std::path::Path,
    run: &str,
) -> BackendReport {
    let mut report = BackendReport::new(id);
    let url = match id.url_var() {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(url) if !url.trim().is_empty() => Some(url),
            _ => {
                eprintln!(
                    "\n#####  SKIPPED {}: {var} is not set, so it was not measured. Run \
                     `cargo xtask bench`, which starts the servers, or set {var}.  #####\n",
                    id.name()
                );
                report.status = "skipped";
                report.reason = Some(format!("{var} is not set"));
                return report;
            }
        },
    };
    let target = Target::new(id, url, scratch, run);
    say(id, "starting");
    let prepared = async {
        let server = target.server().await?;
        target.backend(None).await?.init_storage().await?;
        Ok::<_, crate::Error>(server)
    };
    match prepared.await {
        Ok(server) => {
            say(id, &server);
            report.server = Some(server);
        }
        Err(error) => {
            eprintln!("\n#####  FAILED {}: {error}  #####\n", id.name());
            report.status = "failed";
            report.reason = Some(error.to_string());
            return report;
        }
    }
    if config.runs(Measure::Uncontended) {
        quiet(config, id).await;
        report.uncontended = measured(id, "uncontended", uncontended(config, &target, run)).await;
        if let Some(u) = report.uncontended.ran() {
            say(
                id,
                format!(
                    "uncontended: p50 {:.1} µs, floor {:.1} µs, ratio {:.2}",
                    u.leaselock.cycle.p50_us, u.floor.cycle.p50_us, u.ratio_p50
                ),
            );
        }
    }
    if config.runs(Measure::RoundTrips) {
        quiet(config, id).await;
        report.round_trips = measured(id, "round trips", round_trips(config, &target, run)).await;
        if let Some(rt) = report.round_trips.ran() {
            say(
                id,
                format!(
                    "round trips: acquire {:.2}, release {:.2} ({})",
                    rt.acquire.mean, rt.release.mean, rt.unit
                ),
            );
        }
    }
    if config.runs(Measure::Handoff) {
        quiet(config, id).await;
        report.handoff = measured(id, "handoff", handoff(config, &target, run)).await;
        if let Some(h) = report.handoff.ran() {
            say(
                id,
                format!(
                    "handoff: p50 {:.1} µs, p99 {:.1} µs",
                    h.latency.p50_us, h.latency.p99_us
                ),
            );
        }
    }
    if config.runs(Measure::Contention) {
        quiet(config, id).await;
        report.contention = measured(id, "contention", contention(config, &target, run)).await;
    }
    if config.runs(Measure::Scale) {
        report.scale = if id.kind() == LockKind::Session {
            Outcome::Skipped {
                reason: format!(
                    "a session lock holds one server connection per lease: {} leases would need \
                     {} connections",
                    config.scale_leases, config.scale_leases
                ),
            }
        } else if let Some(exe) = &config.scale_in_child {
            measured(
                id,
                "scale (in a fresh process)",
                scale_in_child(exe, config, id),
            )
            .await
            .flatten()
        } else {
            measured(id, "scale", scale(config, &target, run)).await
        };
        if let Some(s) = report.scale.ran() {
            say(
                id,
                format!(
                    "scale: {:.2}% of one core, RSS {:.0} MiB, {} lost",
                    s.cpu_share_of_one_core * 100.0,
                    s.rss_window_max_mib,
                    s.lost
                ),
            );
        }
    }
    if let Err(error) = target.drop_storage().await {
        say(id, format!("could not drop this run's storage: {error}"));
    }
    report.targets = evaluate(&report);
    report
}

async fn measured<T>(
    id: BackendId,
    name: &str,
    measure: impl Future<Output = Result<T>>,
) -> Outcome<T> {
    say(id, format!("{name}…"));
    match tokio::time::timeout(MEASURE_LIMIT, measure).await {
        Ok(Ok(result)) => Outcome::Ran { result },
        Ok(Err(error)) => {
            eprintln!("\n#####  {} {name} FAILED: {error}  #####\n", id.name());
            Outcome::Failed {
                error: error.to_string(),
            }
        }
        Err(_) => Outcome::Failed {
            error: format!("did not finish within {MEASURE_LIMIT:?}"),
        },
    }
}

/// Acquire and release times of one cycle.
struct Timed {
    acquire: Duration,
    release: Duration,
}

async fn lease_cycle(locker: &Locker, key: &str) -> Result<Timed> {
    let t0 = Instant::now();
    let guard = locker
        .acquire(key)
        .await?
        .ok_or("acquire returned no guard")?;
    let t1 = Instant::now();
    let released = guard.release().await?;
    let t2 = Instant::now();
    if !released {
        return Err("release found the lease already gone".into());
    }
    Ok(Timed {
        acquire: t1 - t0,
        release: t2 - t1,
    })
}

async fn floor_cycle(floor: &mut dyn Floor, key: &str) -> Result<Timed> {
    let t0 = Instant::now();
    if !floor.lock(key).await? {
        return Err(format!("the floor found its own key `{key}` held").into());
    }
    let t1 = Instant::now();
    floor.unlock(key).await?;
    let t2 = Instant::now();
    Ok(Timed {
        acquire: t1 - t0,
        release: t2 - t1,
    })
}

fn cycle_latency(samples: &[Timed]) -> CycleLatency {
    let all: Vec<Duration> = samples.iter().map(|t| t.acquire + t.release).collect();
    let acquire: Vec<Duration> = samples.iter().map(|t| t.acquire).collect();
    let release: Vec<Duration> = samples.iter().map(|t| t.release).collect();
    CycleLatency {
        cycle: Latency::of(&all),
        acquire: Latency::of(&acquire),
        release: Latency::of(&release),
    }
}

/// Measure 1: the same key acquired and released `cycles` times through a fail-fast locker with
/// default settings, and by hand on one raw connection, in alternating blocks of 50 so that the
/// machine's load falls on both alike.
async fn uncontended(config: &Config, target: &Target, run: &str) -> Result<Uncontended> {
    let locker = Locker::builder(target.backend(None).await?).build()?;
    let mut floor = floor::connect(target, None).await?;
    let key = format!("bench-{run}-uncontended");
    let floor_key = format!("bench-{run}-uncontended-floor");
    for _ in 0..(config.cycles / 10).clamp(2, 50) {
        lease_cycle(&locker, &key).await?;
        floor_cycle(&mut *floor, &floor_key).await?;
    }
    let mut leaselock = Vec::with_capacity(config.cycles);
    let mut by_hand = Vec::with_capacity(config.cycles);
    let mut left = config.cycles;
    while left > 0 {
        let n = left.min(50);
        for _ in 0..n {
            leaselock.push(lease_cycle(&locker, &key).await?);
        }
        for _ in 0..n {
            by_hand.push(floor_cycle(&mut *floor, &floor_key).await?);
        }
        left -= n;
    }
    let leaselock = cycle_latency(&leaselock);
    let floor = cycle_latency(&by_hand);
    Ok(Uncontended {
        cycles: config.cycles,
        ratio_p50: leaselock.cycle.p50_us / floor.cycle.p50_us,
        ratio_p99: leaselock.cycle.p99_us / floor.cycle.p99_us,
        leaselock,
        floor,
    })
}

#[derive(Default)]
struct OpCounter {
    in_call: Vec<u64>,
    after: Vec<u64>,
    connections: Vec<u64>,
}

impl OpCounter {
    fn add(&mut self, during: Snapshot, after: Snapshot) {
        self.in_call.push(during.round_trips);
        self.after.push(after.round_trips);
        self.connections
            .push(during.connections + after.connections);
    }

    fn summary(&self) -> OpCount {
        let totals: Vec<u64> = self
            .in_call
            .iter()
            .zip(&self.after)
            .map(|(a, b)| a + b)
            .collect();
        let (median, mean) = median_and_mean(&totals);
        OpCount {
            median,
            mean,
            in_call_mean: median_and_mean(&self.in_call).1,
            after_call_mean: median_and_mean(&self.after).1,
            connections_mean: median_and_mean(&self.connections).1,
        }
    }
}

/// Measure 2: the backend and the floor talk to the server through a counting proxy; each
/// operation runs between quiet periods, and everything sent from its start until the quiet
/// period after it counts as its own.
async fn round_trips(config: &Config, target: &Target, run: &str) -> Result<RoundTrips> {
    let fixed = |unit, method: &str, acquire: f64, release: f64| {
        let count = |n: f64| OpCount {
            median: n,
            mean: n,
            in_call_mean: n,
            ..OpCount::default()
        };
        RoundTrips {
            unit,
            method: method.to_owned(),
            samples: 0,
            acquire: count(acquire),
            release: count(release),
            floor_lock: count(acquire),
            floor_unlock: count(release),
        }
    };
    match target.id {
        BackendId::Memory => {
            return Ok(fixed(
                "none",
                "in-process: no I/O (a mutex-guarded map and a watch channel)",
                0.0,
                0.0,
            ))
        }
        BackendId::Sqlite => {
            return Ok(fixed(
                "statements",
                "read off the backend's code, not counted at run time (no network): acquire is \
                 one INSERT … ON CONFLICT DO UPDATE … RETURNING (plus a SELECT of the holder \
                 when held), release one UPDATE, each inside BEGIN IMMEDIATE … COMMIT on the \
                 blocking thread pool",
                1.0,
                1.0,
            ))
        }
        _ => {}
    }
    let proxy = Proxy::start(target.upstream().await?).await?;
    let locker = Locker::builder(target.backend(Some(proxy.addr())).await?).build()?;
    let mut floor = floor::connect(target, Some(proxy.addr())).await?;
    let key = format!("bench-{run}-round-trips");
    let floor_key = format!("bench-{run}-round-trips-floor");
    for _ in 0..3 {
        lease_cycle(&locker, &key).await?;
        floor_cycle(&mut *floor, &floor_key).await?;
    }
    let (mut acquire, mut release) = (OpCounter::default(), OpCounter::default());
    let (mut lock, mut unlock) = (OpCounter::default(), OpCounter::default());
    for _ in 0..config.round_trip_cycles {
        tokio::time::sleep(SETTLE).await;
        let s0 = proxy.snapshot();
        let guard = locker
            .acquire(&key)
            .await?
            .ok_or("acquire returned no guard")?;
        let s1 = proxy.snapshot();
        tokio::time::sleep(SETTLE).await;
        let s2 = proxy.snapshot();
        if !guard.release().await? {
            return Err("release found the lease already gone".into());
        }
        let s3 = proxy.snapshot();
        tokio::time::sleep(SETTLE).await;
        let s4 = proxy.snapshot();
        acquire.add(s1 - s0, s2 - s1);
        release.add(s3 - s2, s4 - s3);

        let s0 = proxy.snapshot();
        if !floor.lock(&floor_key).await? {
            return Err("the floor found its own key held".into());
        }
        let s1 = proxy.snapshot();
        tokio::time::sleep(SETTLE).await;
        let s2 = proxy.snapshot();
        floor.unlock(&floor_key).await?;
        let s3 = proxy.snapshot();
        tokio::time::sleep(SETTLE).await;
        let s4 = proxy.snapshot();
        lock.add(s1 - s0, s2 - s1);
        unlock.add(s3 - s2, s4 - s3);
    }
    Ok(RoundTrips {
        unit: "round trips",
        method: "counted by a TCP proxy between the client and the server: a burst of \
                 client→server bytes after a server reply (or on a new connection) is one round \
                 trip; each operation counts what was sent from its start until the connection \
                 had been quiet for 25 ms after it"
            .into(),
        samples: config.round_trip_cycles,
        acquire: acquire.summary(),
        release: release.summary(),
        floor_lock: lock.summary(),
        floor_unlock: unlock.summary(),
    })
}

/// Tells the harness when a waiter has failed an attempt and starts waiting.
struct RetrySignal(mpsc::UnboundedSender<()>);

#[async_trait]
impl LockHooks for RetrySignal {
    async fn retry(&self, _key: &LockKey, _attempt: u32, _holder: Option<&LockInfo>) -> HookResult {
        let _ = self.0.send(());
        Ok(())
    }
}

/// Measure 3: a holder (one backend instance) releases while a waiter (another instance, as
/// another process would) waits through the orchestrator with `WaitPolicy::until(30 s, poll)`.
/// The release comes at a random moment of the waiter's poll interval; the time runs from the
/// release call to the waiter's acquire returning.
async fn handoff(config: &Config, target: &Target, run: &str) -> Result<Handoff> {
    let holder = Locker::builder(target.backend(None).await?).build()?;
    let (tx, mut waiting) = mpsc::unbounded_channel();
    let waiter = Locker::builder(target.backend(None).await?)
        .wait(WaitPolicy::until(
            Duration::from_secs(30),
            config.poll_interval,
        ))
        .hooks(RetrySignal(tx))
        .build()?;
    let key = format!("bench-{run}-handoff");
    let warm = 2;
    let mut samples = Vec::with_capacity(config.handoffs);
    for i in 0..(warm + config.handoffs) {
        let guard = holder
            .acquire(&key)
            .await?
            .ok_or("the holder could not acquire")?;
        while waiting.try_recv().is_ok() {}
        let task = {
            let (waiter, key) = (waiter.clone(), key.clone());
            tokio::spawn(async move {
                let outcome = waiter.acquire(&key).await;
                (outcome, Instant::now())
            })
        };
        tokio::time::timeout(Duration::from_secs(30), waiting.recv())
            .await
            .map_err(|_| "the waiter never started waiting")?
            .ok_or("the waiter's hook is gone")?;
        let pause = config.poll_interval.mul_f64(fastrand::f64()) + Duration::from_millis(1);
        tokio::time::sleep(pause).await;
        let released_at = Instant::now();
        if !guard.release().await? {
            return Err("the holder's release found the lease gone".into());
        }
        let (outcome, holding_at) = task.await?;
        let guard = outcome?.ok_or("the waiter gave up")?;
        if i >= warm {
            samples.push(holding_at.saturating_duration_since(released_at));
        }
        guard.release().await?;
    }
    // The floor: the same pauses, then the two statements by hand, back to back.
    let (mut first, mut second) = (
        floor::connect(target, None).await?,
        floor::connect(target, None).await?,
    );
    let key = format!("bench-{run}-handoff-floor");
    let mut floor_samples = Vec::with_capacity(config.handoffs);
    for i in 0..(warm + config.handoffs) {
        if !first.lock(&key).await? {
            return Err("the floor's holder could not lock".into());
        }
        let pause = config.poll_interval.mul_f64(fastrand::f64()) + Duration::from_millis(1);
        tokio::time::sleep(pause).await;
        let released_at = Instant::now();
        first.unlock(&key).await?;
        if !second.lock(&key).await? {
            return Err("the floor's waiter could not lock a released key".into());
        }
        let holding_at = Instant::now();
        if i >= warm {
            floor_samples.push(holding_at.saturating_duration_since(released_at));
        }
        second.unlock(&key).await?;
        // The roles alternate, so neither connection is always the one that sat idle.
        std::mem::swap(&mut first, &mut second);
    }
    Ok(Handoff {
        poll_interval_ms: config.poll_interval.as_secs_f64() * 1e3,
        release_notifications: holder.capabilities().release_notifications,
        latency: Latency::of(&samples),
        floor: Latency::of(&floor_samples),
    })
}

/// Counts of one side of a contended run.
#[derive(Default)]
struct Tally {
    attempts: AtomicU64,
    acquired: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    statements: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, error: impl fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let text = error.to_string();
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() < 5 && !samples.contains(&text) {
            samples.push(text);
        }
    }

    fn throughput(&self, elapsed: Duration, with_statements: bool) -> Throughput {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let attempts = self.attempts.load(Ordering::Relaxed);
        let acquired = self.acquired.load(Ordering::Relaxed);
        Throughput {
            attempts,
            acquired,
            refused: self.refused.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            error_samples: self
                .samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            elapsed_s: secs,
            cycles_per_s: attempts as f64 / secs,
            acquired_per_s: acquired as f64 / secs,
            statements: with_statements.then(|| self.statements.load(Ordering::Relaxed)),
        }
    }
}

/// Runs `f` once per item, at most `limit` at a time.
async fn for_each_limited<T, F, Fut>(items: Vec<T>, limit: usize, f: F) -> Result<()>
where
    T: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for item in items {
        if set.len() >= limit {
            set.join_next().await.expect("not empty")??;
        }
        set.spawn(f(item));
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    Ok(())
}

/// Measure 4: `workers` tasks acquire a random key of `keys` and release it at once, as fast as
/// they can, through one fail-fast locker (`OnUnavailable::ReturnNone`, so a held key is an
/// answer, not an error) over one backend instance, as one process would; then the same with
/// `workers` raw connections issuing the floor statements. Every key is acquired once before
/// the clock starts, so rows exist as they would in a running system.
async fn contention(config: &Config, target: &Target, run: &str) -> Result<Vec<Contention>> {
    let mut shapes = Vec::new();
    for keys in [config.keys, 1] {
        let names: Arc<Vec<String>> = Arc::new(
            (0..keys)
                .map(|i| format!("bench-{run}-contention-{keys}-{i}"))
                .collect(),
        );
        let floor_names: Arc<Vec<String>> = Arc::new(
            (0..keys)
                .map(|i| format!("bench-{run}-contention-{keys}-floor-{i}"))
                .collect(),
        );
        let contended_locker = || async {
            Ok::<_, crate::Error>(
                Locker::builder(target.backend_for(config.workers).await?)
                    .on_unavailable(OnUnavailable::ReturnNone)
                    .build()?,
            )
        };
        {
            let locker = contended_locker().await?;
            for_each_limited(names.to_vec(), 16, move |name| {
                let locker = locker.clone();
                async move { lease_cycle(&locker, &name).await.map(|_| ()) }
            })
            .await?;
            let mut floor = floor::connect(target, None).await?;
            for name in floor_names.iter() {
                floor_cycle(&mut *floor, name).await?;
            }
        }
        // Alternating blocks, as in the uncontended measure, so that a machine whose speed
        // drifts (other tenants, the disk) drifts under both sides alike. Each block opens its
        // own connections (outside the clock), and closes them before the other side's: the
        // two sides together would need more than a server's default connection limit.
        let (lease_tally, floor_tally) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
        let (mut lease_time, mut floor_time) = (Duration::ZERO, Duration::ZERO);
        let block = config.contention_duration / CONTENTION_BLOCKS;
        for _ in 0..CONTENTION_BLOCKS {
            let locker = contended_locker().await?;
            lease_time += lease_block(&locker, &names, &lease_tally, config.workers, block).await;
            drop(locker);
            tokio::time::sleep(config.block_gap).await;
            let mut floors = Vec::with_capacity(config.workers);
            for _ in 0..config.workers {
                floors.push(connect_floor(target).await?);
            }
            floor_time += floor_block(floors, &floor_names, &floor_tally, block).await;
            tokio::time::sleep(config.block_gap).await;
        }
        let leaselock = lease_tally.throughput(lease_time, false);
        let by_hand = floor_tally.throughput(floor_time, true);
        let statements = by_hand.statements.unwrap_or(0) as f64;
        let per_cycle = statements / (by_hand.attempts.max(1) as f64);
        let limit = statements / by_hand.elapsed_s / per_cycle.max(1e-9);
        say(
            target.id,
            format!(
                "contention {}×{keys}: {:.0} cycles/s ({} errors), server limit {:.0} cycles/s",
                config.workers, leaselock.cycles_per_s, leaselock.errors, limit
            ),
        );
        shapes.push(Contention {
            workers: config.workers,
            keys,
            ratio: leaselock.cycles_per_s / limit.max(1e-9),
            server_limit_cycles_per_s: limit,
            leaselock,
            floor: by_hand,
        });
    }
    Ok(shapes)
}

/// Blocks each side of a contended run is split into, alternating leaselock and the floor.
pub(crate) const CONTENTION_BLOCKS: u32 = 5;

/// A floor connection, retried for a while when the server refuses it: the previous block's
/// connections may still be ending on the server, and counting against its connection limit.
async fn connect_floor(target: &Target) -> Result<Box<dyn Floor>> {
    let mut attempt = 0;
    loop {
        match floor::connect(target, None).await {
            Ok(floor) => return Ok(floor),
            Err(error) if attempt < 20 => {
                attempt += 1;
                tracing::debug!(%error, attempt, "floor connection refused; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// `workers` tasks cycling through `locker` for `length`; how long they took.
async fn lease_block(
    locker: &Locker,
    names: &Arc<Vec<String>>,
    tally: &Arc<Tally>,
    workers: usize,
    length: Duration,
) -> Duration {
    let deadline = Instant::now() + length;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (locker, names, tally) = (locker.clone(), Arc::clone(names), Arc::clone(tally));
        set.spawn(async move {
            while Instant::now() < deadline {
                // Lets the other workers run even when the backend never waits (memory).
                tokio::task::yield_now().await;
                let key = &names[fastrand::usize(..names.len())];
                tally.attempts.fetch_add(1, Ordering::Relaxed);
                match locker.acquire(key).await {
                    Ok(Some(guard)) => match guard.release().await {
                        Ok(true) => {
                            tally.acquired.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => tally.error("release found the lease already gone"),
                        Err(e) => tally.error(e),
                    },
                    Ok(None) => {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.error(e),
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    started.elapsed()
}

/// One task per floor connection issuing the floor statements for `length` (the connections
/// close at the end); how long they took.
async fn floor_block(
    floors: Vec<Box<dyn Floor>>,
    names: &Arc<Vec<String>>,
    tally: &Arc<Tally>,
    length: Duration,
) -> Duration {
    let deadline = Instant::now() + length;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for mut floor in floors {
        let (names, tally) = (Arc::clone(names), Arc::clone(tally));
        set.spawn(async move {
            while Instant::now() < deadline {
                tokio::task::yield_now().await;
                let key = &names[fastrand::usize(..names.len())];
                tally.attempts.fetch_add(1, Ordering::Relaxed);
                tally.statements.fetch_add(1, Ordering::Relaxed);
                match floor.lock(key).await {
                    Ok(true) => {
                        tally.statements.fetch_add(1, Ordering::Relaxed);
                        match floor.unlock(key).await {
                            Ok(()) => {
                                tally.acquired.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => tally.error(e),
                        }
                    }
                    Ok(false) => {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.error(e),
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    started.elapsed()
}

/// Measure 5 in a fresh process of the harness (`exe BACKEND --only scale`), so that its CPU
/// time and memory are its own, not what earlier measures left in this process's heap.
async fn scale_in_child(
    exe: &std::path::Path,
    config: &Config,
    id: BackendId,
) -> Result<Outcome<Scale>> {
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("scale.json");
    let status = tokio::process::Command::new(exe)
        .arg(id.name())
        .args(["--only", "scale", "--json"])
        .arg(&json)
        .arg("--scale-leases")
        .arg(config.scale_leases.to_string())
        .arg("--scale-lease")
        .arg(humantime::format_duration(config.scale_lease).to_string())
        .arg("--scale-duration")
        .arg(humantime::format_duration(config.scale_duration).to_string())
        .args(config.refresh_batch_window.iter().flat_map(|window| {
            [
                "--refresh-batch-window".to_owned(),
                humantime::format_duration(*window).to_string(),
            ]
        }))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await?;
    if !status.success() {
        return Err(format!("the scale process failed: {status}").into());
    }
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    Ok(serde_json::from_value(doc["backends"][0]["scale"].clone())?)
}

/// A backend that counts the refreshes going through it.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn LockBackend>,
    refreshes: AtomicU64,
    refresh_errors: AtomicU64,
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl LockBackend for Counting {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn init_storage(&self) -> leaselock::Result<()> {
        self.inner.init_storage().await
    }
    async fn check_storage(&self) -> leaselock::Result<()> {
        self.inner.check_storage().await
    }
    async fn try_acquire(&self, request: &AcquireRequest) -> leaselock::Result<AcquireOutcome> {
        self.inner.try_acquire(request).await
    }
    async fn refresh(&self, lease: &Lease) -> leaselock::Result<Lease> {
        let outcome = self.inner.refresh(lease).await;
        match &outcome {
            Ok(_) => self.refreshes.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.refresh_errors.fetch_add(1, Ordering::Relaxed),
        };
        outcome
    }
    async fn refresh_many(&self, leases: &[Lease]) -> Vec<leaselock::Result<Lease>> {
        let outcomes = self.inner.refresh_many(leases).await;
        for outcome in &outcomes {
            match outcome {
                Ok(_) => self.refreshes.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.refresh_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
        outcomes
    }
    async fn verify(&self, lease: &Lease) -> leaselock::Result<bool> {
        self.inner.verify(lease).await
    }
    async fn release(&self, lease: &Lease) -> leaselock::Result<bool> {
        self.inner.release(lease).await
    }
    async fn status(&self, key: &LockKey) -> leaselock::Result<LockState> {
        self.inner.status(key).await
    }
    async fn list(&self) -> leaselock::Result<Vec<LockInfo>> {
        self.inner.list().await
    }
    async fn list_with_expired(&self) -> leaselock::Result<Vec<LockState>> {
        self.inner.list_with_expired().await
    }
    async fn force_release(&self, key: &LockKey) -> leaselock::Result<Option<LockInfo>> {
        self.inner.force_release(key).await
    }
    async fn release_expired(&self) -> leaselock::Result<u64> {
        self.inner.release_expired().await
    }
    async fn watch_release(&self, key: &LockKey) -> leaselock::Result<Option<Wakeup>> {
        self.inner.watch_release(key).await
    }
    fn watch_lost(&self, lease: &Lease) -> Option<Wakeup> {
        self.inner.watch_lost(lease)
    }
    async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}

/// Measure 5: one locker acquires `scale_leases` keys (32 at a time) with a `scale_lease`
/// lease and the refresh daemon on (a refresh every third of the lease), then holds them for
/// `scale_duration`, while this process's CPU time (`/proc/self/stat` utime + stime) and
/// resident memory (`VmRSS`, sampled every second) are read. Nothing else runs meanwhile.
async fn scale(config: &Config, target: &Target, run: &str) -> Result<Scale> {
    let counting = Arc::new(Counting {
        inner: target.backend(None).await?,
        refreshes: AtomicU64::new(0),
        refresh_errors: AtomicU64::new(0),
    });
    let mut builder = Locker::builder(Arc::clone(&counting)).lease_duration(config.scale_lease);
    if let Some(window) = config.refresh_batch_window {
        builder = builder.refresh_batch_window(window);
    }
    let locker = builder.build()?;
    let rss_before = machine::rss_mib();
    let acquiring = Instant::now();
    let guards: Arc<Mutex<Vec<LockGuard>>> = Arc::default();
    // A backend that cannot keep up (refreshes of the leases already held starving the next
    // acquisitions) must not stall the run: hold what was acquired by then, and say so.
    let limit = (config.scale_duration * 2).max(Duration::from_secs(180));
    let progress = {
        let (guards, id, n) = (Arc::clone(&guards), target.id, config.scale_leases);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                let held = guards.lock().unwrap_or_else(|p| p.into_inner()).len();
                say(id, format!("scale: {held} of {n} leases acquired so far"));
            }
        })
    };
    let acquisition = {
        let (locker, guards) = (locker.clone(), Arc::clone(&guards));
        let names: Vec<String> = (0..config.scale_leases)
            .map(|i| format!("bench-{run}-scale-{i}"))
            .collect();
        tokio::time::timeout(
            limit,
            for_each_limited(names, 32, move |name| {
                let (locker, guards) = (locker.clone(), Arc::clone(&guards));
                async move {
                    let guard = locker
                        .acquire(&name)
                        .await?
                        .ok_or("acquire returned no guard")?;
                    guards.lock().unwrap_or_else(|p| p.into_inner()).push(guard);
                    Ok(())
                }
            }),
        )
        .await
    };
    progress.abort();
    let acquire_s = acquiring.elapsed().as_secs_f64();
    let acquired = guards.lock().unwrap_or_else(|p| p.into_inner()).len();
    match acquisition {
        Ok(outcome) => outcome?,
        Err(_) => say(
            target.id,
            format!(
                "scale: only {acquired} of {} leases acquired in {limit:?}; holding those",
                config.scale_leases
            ),
        ),
    }
    let lost_before_window = guards
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|g| g.is_lost())
        .count();
    say(
        target.id,
        format!(
            "scale: {acquired} leases acquired in {acquire_s:.1} s ({lost_before_window} already \
             lost); watching for {:?}",
            config.scale_duration
        ),
    );
    let rss_start = machine::rss_mib();
    let mut rss_max = rss_start;
    let refreshes_start = counting.refreshes.load(Ordering::Relaxed);
    let errors_start = counting.refresh_errors.load(Ordering::Relaxed);
    let cpu_start = machine::cpu_seconds();
    let window_start = Instant::now();
    while window_start.elapsed() < config.scale_duration {
        let left = config.scale_duration.saturating_sub(window_start.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        rss_max = rss_max.max(machine::rss_mib());
    }
    let cpu_s = machine::cpu_seconds() - cpu_start;
    let window = window_start.elapsed().as_secs_f64();
    let rss_end = machine::rss_mib();
    let refreshes = counting.refreshes.load(Ordering::Relaxed) - refreshes_start;
    let refresh_errors = counting.refresh_errors.load(Ordering::Relaxed) - errors_start;
    let guards = std::mem::take(&mut *guards.lock().unwrap_or_else(|p| p.into_inner()));
    let lost = guards.iter().filter(|g| g.is_lost()).count();
    // The window's figures are taken: a server that cannot answer the releases afterwards
    // (each one waits at most the locker's release timeout) is reported, not a failed measure.
    let failed_releases = Arc::new(AtomicU64::new(0));
    let first_failure: Arc<Mutex<Option<String>>> = Arc::default();
    let (failed, first) = (Arc::clone(&failed_releases), Arc::clone(&first_failure));
    for_each_limited(guards, 32, move |guard| {
        let (failed, first) = (Arc::clone(&failed), Arc::clone(&first));
        async move {
            if let Err(error) = guard.release().await {
                failed.fetch_add(1, Ordering::Relaxed);
                first
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| error.to_string());
            }
            Ok(())
        }
    })
    .await?;
    let failed_releases = failed_releases.load(Ordering::Relaxed);
    if failed_releases > 0 {
        let first = first_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        say(
            target.id,
            format!(
                "scale: !!! {failed_releases} of {acquired} releases failed after the window                  (first: {first}); their leases expire on their own"
            ),
        );
    }
    Ok(Scale {
        leases: config.scale_leases,
        acquired,
        lost_before_window,
        lease_duration_s: config.scale_lease.as_secs_f64(),
        refresh_interval_s: config.scale_lease.as_secs_f64() / 3.0,
        refresh_batch_window_s: locker.refresh_batch_window().as_secs_f64(),
        acquire_s,
        window_s: window,
        cpu_s,
        cpu_share_of_one_core: cpu_s / window,
        rss_before_mib: rss_before,
        rss_window_start_mib: rss_start,
        rss_window_max_mib: rss_max,
        rss_window_end_mib: rss_end,
        refreshes,
        refresh_errors,
        refreshes_per_s: refreshes as f64 / window,
        lost,
    })
}
