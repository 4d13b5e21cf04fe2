//! Exit codes and the one error type of the command.
//!
//! The command's own status passes through when it ran (128+N when it was killed by signal N).
//! What leaselock itself reports has codes a deploy script can tell from the command's usual
//! failures: 124 when `run` did not get the lock (timeout(1)'s "timed out"; flock(1) uses 1,
//! `-E 1` restores it), 75 when the lease was lost while the command ran, and sysexits.h values
//! for the rest (66 when the lock storage cannot be opened, 69 when the command cannot be
//! started). Bad usage is 2, as for every clap program.

use std::error::Error as StdError;
use std::fmt;

/// Success.
pub const OK: u8 = 0;
/// `release --if-stale` refused to break a live lease.
pub const CONFLICT: u8 = 1;
/// `run` did not get the lock: `--no-wait` found it held, or `--wait` ran out (`timeout(1)`'s
/// "timed out" code, distinct from a command's usual failures; `-E` changes it, `-E 1` is
/// flock's).
pub const NOT_ACQUIRED: u8 = 124;
/// Bad usage or input: unknown scheme, malformed URL, missing command, invalid key or duration.
/// Nothing was touched.
pub const USAGE: u8 = 2;
/// The lock storage cannot be opened, reached, created or used (sysexits `EX_NOINPUT`, flock's
/// "cannot open lock file"), and `check` found storage missing or inaccessible.
pub const STORAGE: u8 = 66;
/// The command could not be started: not found, not executable (sysexits `EX_UNAVAILABLE`, as
/// flock).
pub const CANNOT_RUN: u8 = 69;
/// An internal error of leaselock itself (sysexits `EX_SOFTWARE`).
pub const INTERNAL: u8 = 70;
/// The lease was lost while the command ran; the command was stopped (sysexits `EX_TEMPFAIL`;
/// `--lost-exit-code` changes it).
pub const LOST: u8 = 75;
/// The lock storage refused the credentials or the operation: authentication failed, a
/// privilege or file permission is missing (sysexits `EX_NOPERM`). Never waited for, also not
/// with `--wait`: an operator must fix the credentials or grants.
pub const DENIED: u8 = 77;
/// A command (or leaselock itself, while waiting) ended by signal N exits with `SIGNALED + N`,
/// as shells report it.
pub const SIGNALED: u8 = 128;

/// The exit-code table printed by `--help` and kept in the README.
pub const TABLE: &str = "\
Exit codes:
  0        success (for `run`: the command exited 0, or --check found nothing to do)
  1        `release --if-stale` refused to break a live lease
  2        bad usage or input (unknown scheme, malformed URL, missing `--` command,
           invalid key or duration); nothing was touched
  66       lock storage cannot be opened, reached, created or used; `check` failed
  69       the command could not be started (not found, not executable); checked
           before the lock is taken
  70       internal error
  75       the lease was lost while the command ran; the command's process group was
           stopped (change with --lost-exit-code)
  77       the lock storage refused the credentials or a permission; never waited for
  124      `run` did not get the lock: --no-wait found it held, or --wait ran out
           (change with -E/--conflict-exit-code; `-E 1` is flock's code)
  128+N    the command (or leaselock while waiting) was killed by signal N
  other    the command's own exit code, passed through";

/// `status`: the key is held now (a live lease or session lock).
pub const STATUS_HELD: u8 = 0;
/// `status`: the key's last lease expired and nobody has taken it over or cleared it (its
/// holder stopped refreshing it: crashed, killed, cut off); anyone may take it. As an LSB init
/// script's "program is dead and the pid file exists".
pub const STATUS_EXPIRED: u8 = 1;
/// `status`: nobody holds the key. As an LSB init script's "program is not running".
pub const STATUS_FREE: u8 = 3;

/// The exit codes of `status`, printed by `leaselock status --help` and kept in the README.
pub const STATUS_TABLE: &str = "\
Exit codes of `status` (also with --json; as LSB init scripts' `status`):
  0        held: someone holds the lock now
  1        expired: the last holder's lease expired (it stopped refreshing it) and
           nobody has taken it over yet; anyone may take it
  2        bad usage or input; nothing was touched
  3        free: nobody holds it
  66       the lock storage cannot be opened, reached or used, or does not exist
           (nothing is created: run `leaselock init`)";

/// A failure that ends the command: an exit code and a one-line message for stderr.
#[derive(Debug)]
pub struct Failure {
    /// The process exit code.
    pub code: u8,
    /// What went wrong, one line, credentials already redacted by the caller's display URL.
    pub message: String,
}

impl Failure {
    /// A failure with `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: one_line(&message.into()),
        }
    }

    /// Bad usage or input: exit 2.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(USAGE, message)
    }

    /// A failed lock operation, with the exit code its kind calls for and `context` in front.
    pub fn lock(context: &str, error: &leaselock::Error) -> Self {
        let mut message = describe(error);
        if matches!(error, leaselock::Error::NotInitialized { .. }) && !message.contains("init") {
            message.push_str(" (run `leaselock init`)");
        }
        let message = if context.is_empty() {
            message
        } else {
            format!("{context}: {message}")
        };
        Self::new(code_for(error), message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The exit code for a lock error.
pub fn code_for(error: &leaselock::Error) -> u8 {
    match error {
        leaselock::Error::InvalidInput { .. } => USAGE,
        leaselock::Error::Held { .. } => CONFLICT,
        leaselock::Error::Lost { .. } => LOST,
        leaselock::Error::Denied { .. } => DENIED,
        _ => STORAGE,
    }
}

/// An error and its sources on one line, skipping sources whose text is already included.
pub fn describe(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    one_line(&text)
}

/// Collapses line breaks and runs of whitespace so a message fits on one line.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The exit code of a process that ended with `status`: its code, or 128+N when killed by
/// signal N.
pub fn from_status(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        // Unix exit codes are 0..=255.
        return u8::try_from(code & 0xff).unwrap_or(INTERNAL);
    }
    match status.signal() {
        Some(signal) => SIGNALED.saturating_add(u8::try_from(signal).unwrap_or(127)),
        None => INTERNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    #[test]
    fn statuses() {
        assert_eq!(from_status(ExitStatus::from_raw(0)), 0);
        assert_eq!(from_status(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(from_status(ExitStatus::from_raw(15)), 143); // SIGTERM
        assert_eq!(from_status(ExitStatus::from_raw(9)), 137); // SIGKILL
    }

    #[test]
    fn one_liners() {
        assert_eq!(one_line("a\n  b\tc \n"), "a b c");
        let err = leaselock::LockKey::new("").unwrap_err();
        let failure = Failure::lock("", &err);
        assert_eq!(failure.code, USAGE);
        assert_eq!(failure.message, "invalid key: must not be empty");
        let lost = leaselock::Error::lost(&leaselock::LockKey::new("k").unwrap(), "gone");
        assert_eq!(code_for(&lost), LOST);
        let held = leaselock::Error::Held {
            key: leaselock::LockKey::new("k").unwrap(),
            holder: None,
        };
        assert_eq!(code_for(&held), CONFLICT);
        let io = std::io::Error::other("refused");
        assert_eq!(
            code_for(&leaselock::Error::transient("x", io)),
            STORAGE,
            "backend errors are storage errors"
        );
    }

    #[test]
    fn refused_credentials_have_their_own_code() {
        let denied = leaselock::Error::denied("x", "password authentication failed", None);
        assert_eq!(code_for(&denied), DENIED);
        let unreachable = leaselock::Error::not_accessible("x", "connection refused", None);
        assert_eq!(code_for(&unreachable), STORAGE);
    }
}
