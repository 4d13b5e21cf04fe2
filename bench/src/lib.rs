//! The benchmark harness of leaselock: every backend against the raw-driver floor and the
//! server's limit, measuring uncontended latency, round trips, handoff, contended throughput and
//! the cost of keeping many leases alive.
//!
//! The binary (`cargo xtask bench [BACKEND…] [OPTIONS]`) prints a table, writes a JSON document
//! and, with `--write-docs`, `BENCHMARKS.md` and its SVG charts. The library is what the binary
//! and the smoke test (`tests/smoke.rs`) share, so the harness cannot rot unnoticed.
#![forbid(unsafe_code)]

mod chart;
mod docs;
mod floor;
mod machine;
mod measure;
mod proxy;
mod report;
mod stats;
mod target;

use std::path::PathBuf;
use std::time::Duration;

pub use report::Report;
pub use target::BackendId;

/// The harness's errors are messages for a person.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// A result with the harness's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One of the five measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Measure {
    /// Uncontended acquire + release through the orchestrator, against the raw-driver floor.
    Uncontended,
    /// Round trips per acquire and per release, counted by a proxy.
    RoundTrips,
    /// Time from a holder's release to a waiting instance holding the lock.
    Handoff,
    /// Contended throughput against the server's limit for the same shape of work.
    Contention,
    /// CPU and memory of one process keeping many leases refreshed.
    Scale,
}

impl Measure {
    /// Every measure, in the order they run.
    pub const ALL: [Measure; 5] = [
        Measure::Uncontended,
        Measure::RoundTrips,
        Measure::Handoff,
        Measure::Contention,
        Measure::Scale,
    ];
}

/// What to run and how much of it. [`Config::default`] is the full benchmark;
/// [`Config::smoke`] a few cycles of everything, for the test that keeps the harness working.
#[derive(Clone, Debug)]
pub struct Config {
    /// The backends to run, in order. Default: all of them.
    pub backends: Vec<BackendId>,
    /// The measures to run. Default: all of them.
    pub measures: Vec<Measure>,
    /// Uncontended acquire + release cycles, through leaselock and by hand each. Default 1,000.
    pub cycles: usize,
    /// Cycles whose round trips are counted, through leaselock and by hand each. Default 100.
    pub round_trip_cycles: usize,
    /// Handoffs timed. Default 200.
    pub handoffs: usize,
    /// The waiter's poll interval in the handoff measure (`WaitPolicy::until(…, interval)`).
    /// Default 50 ms.
    pub poll_interval: Duration,
    /// Concurrent workers in the contended measure. Default 64.
    pub workers: usize,
    /// Keys of the spread-out contended shape. Default 1,000.
    pub keys: usize,
    /// How long each contended run lasts (leaselock, then the floor, for each shape).
    /// Default 10 s.
    pub contention_duration: Duration,
    /// The pause between contended blocks, for the connections one block closes to end on the
    /// server before the next block opens its own (64 of each would exceed PostgreSQL's default
    /// limit of 100 together). Default 1 s.
    pub block_gap: Duration,
    /// How long to wait at most, before each measure, for a quiet machine (a 500 ms window with
    /// less than a tenth of one CPU busy). Default 30 s; zero does not wait.
    pub settle: Duration,
    /// Leases held at once in the scale measure. Default 10,000.
    pub scale_leases: usize,
    /// Their lease duration (refreshed every third of it). Default 30 s.
    pub scale_lease: Duration,
    /// How long CPU and memory are watched while they are held. Default 60 s.
    pub scale_duration: Duration,
    /// The scale measure's `LockerBuilder::refresh_batch_window`. Default: `None`, the
    /// locker's own default.
    pub refresh_batch_window: Option<Duration>,
    /// Run each backend's scale measure in a fresh process of this executable (the harness's
    /// binary), so that its CPU time and resident memory are its own and not what earlier
    /// measures left behind in this process. Default: `None`, in this process.
    pub scale_in_child: Option<PathBuf>,
    /// Where the SQLite database file is created (a temporary directory inside it). Default: the
    /// system's temporary directory.
    pub scratch: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            backends: BackendId::ALL.to_vec(),
            measures: Measure::ALL.to_vec(),
            cycles: 1_000,
            round_trip_cycles: 100,
            handoffs: 200,
            poll_interval: Duration::from_millis(50),
            workers: 64,
            keys: 1_000,
            contention_duration: Duration::from_secs(10),
            block_gap: Duration::from_secs(1),
            settle: Duration::from_secs(30),
            scale_leases: 10_000,
            scale_lease: Duration::from_secs(30),
            scale_duration: Duration::from_secs(60),
            refresh_batch_window: None,
            scale_in_child: None,
            scratch: None,
        }
    }
}

impl Config {
    /// A few cycles of every measure: checks that the harness runs and reports, not speed.
    pub fn smoke() -> Self {
        Self {
            cycles: 10,
            round_trip_cycles: 3,
            handoffs: 3,
            workers: 4,
            keys: 20,
            contention_duration: Duration::from_millis(300),
            // A few connections each, far below any limit, and tests running beside it keep
            // the machine busy: neither pause would measure anything.
            block_gap: Duration::ZERO,
            settle: Duration::ZERO,
            scale_leases: 20,
            scale_lease: Duration::from_millis(1500),
            scale_duration: Duration::from_secs(1),
            ..Self::default()
        }
    }

    fn runs(&self, measure: Measure) -> bool {
        self.measures.contains(&measure)
    }
}

/// Runs the configured measures on every configured backend, reporting progress on stderr.
/// A backend whose server URL is not set is reported as skipped; a backend that fails is
/// reported with its error. Never fails as a whole: the report says what happened.
pub async fn run(config: &Config, command: &str) -> Report {
    measure::run_all(config, command).await
}
