//! The command line, as clap parses it.

use std::ffi::OsString;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Run any command under a distributed lock; show and break locks.
///
/// The lock lives in a database picked by --url (or LEASELOCK_URL). The default is an SQLite file
/// `leaselock.db` in the current directory, so `leaselock run demo -- echo hi` works with no
/// setup; point every process that should exclude the others at the same URL.
#[derive(Debug, Parser)]
#[command(
    name = "leaselock",
    version,
    about = "Run any command under a distributed lock; show and break locks",
    after_help = crate::exit::TABLE,
    propagate_version = true
)]
pub struct Cli {
    /// Where locks live: sqlite://FILE (relative to the current directory),
    /// sqlite:///ABSOLUTE/FILE (optional ?table=NAME), postgres://USER:PASSWORD@HOST/DB
    /// (?strategy=advisory|table), mysql://USER:PASSWORD@HOST/DB (?strategy=get_lock|table),
    /// mongodb://USER:PASSWORD@HOST/DB (or mongodb+srv://; ?collection=NAME),
    /// dynamodb://TABLE?endpoint=URL&region=NAME (credentials from the AWS configuration chain).
    /// Passwords are never printed. Default: sqlite://leaselock.db.
    #[arg(
        long,
        env = "LEASELOCK_URL",
        hide_env_values = true,
        global = true,
        value_name = "URL"
    )]
    pub url: Option<String>,

    /// Read the URL from the first line of FILE instead, so that its password appears neither
    /// on the command line (`ps`) nor in the environment. Conflicts with --url/LEASELOCK_URL.
    #[arg(long, env = "LEASELOCK_URL_FILE", global = true, value_name = "FILE")]
    pub url_file: Option<std::path::PathBuf>,

    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command while holding the lock KEY (like flock(1), across machines).
    ///
    /// Acquires KEY (waiting as asked), runs COMMAND in its own process group with
    /// LEASELOCK_KEY, LEASELOCK_OWNER, LEASELOCK_TOKEN (the fencing token) and LEASELOCK_URL
    /// (password masked) in its environment, keeps the lease refreshed, and always releases it.
    ///
    /// The command never outlives the lock. SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2
    /// and SIGALRM are forwarded to its whole process group (a signal inherited as ignored, as
    /// under nohup, stays ignored). If leaselock itself dies (SIGKILL, any other signal), the
    /// whole group is killed with SIGKILL at once. If the lease is lost, the group gets SIGTERM,
    /// then SIGKILL after --kill-grace, and leaselock exits with --lost-exit-code (75).
    /// Processes the command leaves running when it exits get SIGTERM, then SIGKILL after
    /// --kill-grace, before the lock is released. Otherwise the command's exit code is passed
    /// through (128+N when it was killed by signal N).
    #[command(after_help = crate::exit::TABLE)]
    Run(RunArgs),

    /// Show the state of the lock KEY: holder, host/pid, fencing token, times.
    ///
    /// The exit code tells the state (see below), so a script can branch on it. Only reads:
    /// opens the storage read-only, creates nothing, and fails (exit 66) when the storage does
    /// not exist.
    #[command(after_help = crate::exit::STATUS_TABLE)]
    Status(StatusArgs),

    /// List the locks held now (with --all, expired leases too).
    ///
    /// Only reads: opens the storage read-only, creates nothing, and fails (exit 66) when the
    /// storage does not exist.
    List(ListArgs),

    /// Break the lock KEY whoever holds it (requires --force).
    ///
    /// Shows what it breaks. With --if-stale it breaks only a lease that has expired (its holder
    /// stopped refreshing it: crashed, killed, cut off), and refuses (exit 1) while the lease is
    /// still being refreshed. With --dry-run it only shows what it would do.
    #[command(after_help = crate::exit::TABLE)]
    Release(ReleaseArgs),

    /// Create the lock storage (table) if it is missing, then check it. Safe to run any number
    /// of times.
    ///
    /// Fails (exit 66) when the storage is there but not usable, for example a table of that name
    /// with other columns, or a view.
    Init(InitArgs),

    /// Check that the lock storage is reachable and initialized; say what is missing (exit 66,
    /// or 77 when the credentials or a permission are refused).
    ///
    /// Only reads: opens the storage read-only and creates nothing.
    Check(CheckArgs),

    /// Show the database's own name for the lock KEY, without connecting to anything.
    ///
    /// For PostgreSQL advisory locks, the 64-bit advisory key (a stable hash of the prefix and
    /// the key) and its pg_locks columns; for MySQL GET_LOCK, the lock name; for tables,
    /// collections and DynamoDB, where the key is stored. Also prints a query that shows the
    /// lock with the database's own tools.
    Key(KeyArgs),
}

/// `leaselock run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The lock's name: any non-empty UTF-8 string of at most 255 bytes.
    pub key: String,

    /// Lease duration: how long the lock outlives a holder that stops refreshing it (crashed,
    /// killed with SIGKILL, cut off). Refreshed every third of it while the command runs.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub ttl: Duration,

    /// Wait at most this long for the lock (`30s`, `5m`; `0` means --no-wait). Default: wait
    /// as long as it takes, like flock(1). Storage that cannot be reached yet (refused, timed
    /// out, database not created yet, server starting) is waited for within the same time;
    /// refused credentials or permissions fail at once (exit 77).
    #[arg(short, long, value_parser = parse_duration, value_name = "DURATION", conflicts_with = "no_wait")]
    pub wait: Option<Duration>,

    /// Fail at once (exit 1, or --conflict-exit-code) if the lock is held.
    #[arg(short = 'n', long, visible_alias = "nonblock")]
    pub no_wait: bool,

    /// Exit code when the lock is held and --no-wait is given, or --wait runs out (flock(1)
    /// uses 1: `-E 1` for scripts written for flock).
    #[arg(short = 'E', long, default_value_t = crate::exit::NOT_ACQUIRED, value_name = "CODE")]
    pub conflict_exit_code: u8,

    /// Exit code when the lease is lost while the command runs.
    #[arg(long, default_value_t = crate::exit::LOST, value_name = "CODE")]
    pub lost_exit_code: u8,

    /// After the lease is lost, or after the command exited leaving processes running: how long
    /// they have to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub kill_grace: Duration,

    /// While waiting: how often to try again (plus up to half of it at random).
    #[arg(long, default_value = "250ms", value_parser = parse_duration, value_name = "DURATION")]
    pub poll_interval: Duration,

    /// The owner id to hold the lock as. Default: HOST-PID-UUID, which `status` shows as host
    /// and pid.
    #[arg(long, value_name = "OWNER")]
    pub owner: Option<String>,

    /// Print nothing of our own while waiting or when the lock is held; errors still go to
    /// stderr.
    #[arg(short, long)]
    pub quiet: bool,

    /// Run only when needed: run CHECK (with `sh -c`) first without the lock. Exit 0 means
    /// there is nothing to do: leaselock exits 0 without taking the lock. Exit 1 means the work
    /// is needed: leaselock acquires the lock, runs CHECK again under it (another process may
    /// have just done the work) and runs COMMAND only if it still exits 1. Any other exit code
    /// is a failed check: leaselock exits with it and runs nothing.
    #[arg(long, value_name = "CHECK")]
    pub check: Option<String>,

    /// The command to run and its arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// `leaselock status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The lock's name.
    pub key: String,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `leaselock list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Also show expired leases nobody has taken over yet (stale locks: their holders stopped
    /// refreshing them), with how long ago they expired.
    #[arg(short, long)]
    pub all: bool,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `leaselock init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Print JSON instead of text (also on failure, besides the message on stderr).
    #[arg(long)]
    pub json: bool,
}

/// `leaselock check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print JSON instead of text (also on failure, besides the message on stderr).
    #[arg(long)]
    pub json: bool,
}

/// `leaselock key`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The lock's name.
    pub key: String,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `leaselock release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The lock's name.
    pub key: String,

    /// Required: breaking a lock held by someone else is never implicit.
    #[arg(long)]
    pub force: bool,

    /// Break it only if its lease has expired; refuse (exit 1) while it is being refreshed.
    #[arg(long)]
    pub if_stale: bool,

    /// Only show what would be broken.
    #[arg(long)]
    pub dry_run: bool,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Parses a human duration: `30s`, `5m`, `1h 30m`, `250ms`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{e} (expected a duration such as 30s, 5m or 250ms)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn run_takes_the_command_after_dashes() {
        let cli = Cli::try_parse_from(["leaselock", "run", "k", "--ttl", "5s", "--", "echo", "-n"])
            .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.key, "k");
        assert_eq!(run.ttl, Duration::from_secs(5));
        assert_eq!(run.command, ["echo", "-n"]);
        assert!(Cli::try_parse_from(["leaselock", "run", "k", "echo"]).is_err());
        assert!(
            Cli::try_parse_from(["leaselock", "run", "k", "-n", "--wait", "1s", "--", "x"])
                .is_err()
        );
    }
}
