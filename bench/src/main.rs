//! `leaselock-bench`: measures every backend against the raw-driver floor and the server's
//! limit. Usually run as `cargo xtask bench [BACKEND…] [OPTIONS]`, which starts the servers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use leaselock_bench::{BackendId, Config, Measure};

/// The repository root (the bench crate's parent).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench lives in the workspace")
        .to_path_buf()
}

#[derive(Parser, Debug)]
#[command(
    name = "leaselock-bench",
    about = "Benchmarks leaselock's backends against the raw-driver floor and the server's limit",
    after_help = "Server URLs come from LEASELOCK_POSTGRES_URL, LEASELOCK_MYSQL_URL, \
                  LEASELOCK_MONGODB_URL and LEASELOCK_DYNAMODB_URL; a backend whose URL is not \
                  set is reported as skipped. `cargo xtask bench` starts the servers and sets them."
)]
struct Cli {
    /// Backends to run (default: all): memory, sqlite, postgres-advisory, postgres-table,
    /// mysql-get-lock, mysql-table, mongodb, dynamodb; `postgres` and `mysql` select both of
    /// theirs.
    backends: Vec<String>,
    /// Measures to run (default: all), comma-separated.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Measure>,
    /// Uncontended cycles, through leaselock and by hand each.
    #[arg(long, default_value_t = 1000)]
    cycles: usize,
    /// Cycles whose round trips are counted.
    #[arg(long, default_value_t = 100)]
    round_trip_cycles: usize,
    /// Handoffs timed.
    #[arg(long, default_value_t = 200)]
    handoffs: usize,
    /// The waiter's poll interval in the handoff measure.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Concurrent workers in the contended measure.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Keys of the spread-out contended shape (the other has one key).
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// How long each contended run lasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    contention_duration: Duration,
    /// Leases held at once in the scale measure.
    #[arg(long, default_value_t = 10_000)]
    scale_leases: usize,
    /// Their lease duration (refreshed every third of it).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    scale_lease: Duration,
    /// How long CPU and memory are watched.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    scale_duration: Duration,
    /// The refresh batch window of the scale measure's locker (default: the locker's own).
    #[arg(long, value_parser = humantime::parse_duration)]
    refresh_batch_window: Option<Duration>,
    /// Where the JSON document goes.
    #[arg(long, default_value_os_t = root().join("target/bench/results.json"))]
    json: PathBuf,
    /// Also write BENCHMARKS.md and docs/bench/*.svg (into --docs-root).
    #[arg(long)]
    write_docs: bool,
    /// Where BENCHMARKS.md and docs/bench/ are written.
    #[arg(long, default_value_os_t = root())]
    docs_root: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let mut backends = Vec::new();
    for name in &cli.backends {
        match BackendId::select(name) {
            Some(ids) => {
                for id in ids {
                    if !backends.contains(&id) {
                        backends.push(id);
                    }
                }
            }
            None => {
                let known: Vec<&str> = BackendId::ALL.iter().map(|b| b.name()).collect();
                eprintln!(
                    "leaselock-bench: unknown backend `{name}`; known: {}, postgres, mysql",
                    known.join(", ")
                );
                return ExitCode::from(2);
            }
        }
    }
    let mut config = Config {
        backends: if backends.is_empty() {
            BackendId::ALL.to_vec()
        } else {
            backends
        },
        measures: if cli.only.is_empty() {
            Measure::ALL.to_vec()
        } else {
            cli.only.clone()
        },
        cycles: cli.cycles.max(1),
        round_trip_cycles: cli.round_trip_cycles.max(1),
        handoffs: cli.handoffs.max(1),
        poll_interval: cli.poll_interval,
        workers: cli.workers.max(1),
        keys: cli.keys.max(1),
        contention_duration: cli.contention_duration,
        block_gap: leaselock_bench::Config::default().block_gap,
        settle: leaselock_bench::Config::default().settle,
        scale_leases: cli.scale_leases.max(1),
        scale_lease: cli.scale_lease,
        scale_duration: cli.scale_duration,
        refresh_batch_window: cli.refresh_batch_window,
        scale_in_child: None,
        scratch: Some(root().join("target/bench")),
    };
    // Scale alone on one backend is already a fresh process; otherwise give it one.
    if config.measures.contains(&Measure::Scale)
        && (config.measures.len() > 1 || config.backends.len() > 1)
    {
        config.scale_in_child = std::env::current_exe().ok();
    }
    let command = std::env::var("LEASELOCK_BENCH_COMMAND").unwrap_or_else(|_| {
        let args: Vec<String> = std::env::args().skip(1).collect();
        format!(
            "cargo run --release -p leaselock-bench -- {}",
            args.join(" ")
        )
        .trim_end()
        .to_owned()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let report = runtime.block_on(leaselock_bench::run(&config, &command));
    println!("{}", report.table());
    let mut failed = false;
    if let Err(e) = report.write_json(&cli.json) {
        eprintln!("leaselock-bench: cannot write {}: {e}", cli.json.display());
        failed = true;
    } else {
        eprintln!("leaselock-bench: wrote {}", cli.json.display());
    }
    if cli.write_docs {
        match report.write_docs(&cli.docs_root) {
            Ok(()) => eprintln!(
                "leaselock-bench: wrote {} and {}",
                cli.docs_root.join("BENCHMARKS.md").display(),
                cli.docs_root.join("docs/bench").display()
            ),
            Err(e) => {
                eprintln!("leaselock-bench: cannot write the docs: {e}");
                failed = true;
            }
        }
    }
    for line in report.incomplete() {
        eprintln!("leaselock-bench: !!! {line}");
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
