//! Turning rusqlite's errors into leaselock's.

use leaselock::Error;
use rusqlite::ErrorCode;

pub(crate) const NAME: &str = "sqlite";

/// Whether `error` is SQLite's "database is busy" or "locked": nothing was written, and waiting
/// may help.
pub(crate) fn is_busy(error: &Error) -> bool {
    match error {
        Error::Backend { source, .. } => source
            .downcast_ref::<rusqlite::Error>()
            .is_some_and(is_busy_driver_error),
        _ => false,
    }
}

/// [`is_busy`] for the driver's own error.
fn is_busy_driver_error(error: &rusqlite::Error) -> bool {
    error
        .sqlite_error_code()
        .is_some_and(|code| matches!(code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

/// Classifies a driver error: busy/locked is retryable, a missing table means storage is not
/// initialized, refused permissions and a read-only file are [`Error::Denied`]; a file that
/// cannot be opened or is not a database is permanent (a local file does not heal by waiting).
pub(crate) fn convert(error: rusqlite::Error) -> Error {
    if is_busy_driver_error(&error) {
        return Error::transient(NAME, error);
    }
    if let rusqlite::Error::SqliteFailure(failure, _) = &error {
        // The file (or its directory) is read-only for this user: no retry can fix that, so a
        // waiting acquisition must fail at once instead of waiting for a "busy" database.
        if matches!(
            failure.extended_code,
            rusqlite::ffi::SQLITE_READONLY | rusqlite::ffi::SQLITE_READONLY_DIRECTORY
        ) {
            let what =
                format!("{error} (the database file or its directory is read-only for this user)");
            return Error::denied(NAME, what, Some(Box::new(error)));
        }
    }
    if let rusqlite::Error::SqliteFailure(failure, message) = &error {
        let what = || message.clone().unwrap_or_else(|| error.to_string());
        match failure.code {
            ErrorCode::PermissionDenied
            | ErrorCode::ReadOnly
            | ErrorCode::AuthorizationForStatementDenied => {
                let what = what();
                return Error::denied(NAME, what, Some(Box::new(error)));
            }
            ErrorCode::CannotOpen | ErrorCode::NotADatabase => {
                return Error::permanent(NAME, error);
            }
            _ => {}
        }
        if message
            .as_deref()
            .is_some_and(|m| m.starts_with("no such table"))
        {
            return not_initialized(message.as_deref().unwrap_or_default());
        }
    }
    if let rusqlite::Error::SqlInputError { msg, .. } = &error {
        if msg.starts_with("no such table") {
            return not_initialized(msg);
        }
    }
    Error::permanent(NAME, error)
}

/// A failure to open the database file at `path`: [`convert`]'s classification, with the path
/// in the message. SQLite says "unable to open database file" for a missing directory and a
/// refused permission alike; a file that exists but that this process may not open for
/// writing is told apart as [`Error::Denied`].
pub(crate) fn open_failed(path: &std::path::Path, error: rusqlite::Error) -> Error {
    let what = format!("cannot open {}: {error}", path.display());
    let refused = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied);
    match convert(error) {
        Error::Denied { source, .. } => Error::denied(NAME, what, source),
        _ if refused => Error::denied(NAME, what, None),
        err if err.is_retryable() => err,
        _ => Error::permanent(NAME, what),
    }
}

pub(crate) fn not_initialized(what: &str) -> Error {
    Error::NotInitialized {
        backend: NAME,
        what: format!("{what}: run init_storage (or `leaselock init`)"),
    }
}

/// A blocking task that could not finish (the runtime is shutting down).
pub(crate) fn join(error: tokio::task::JoinError) -> Error {
    Error::transient(NAME, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: std::os::raw::c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn busy_and_locked_are_busy_nothing_else_is() {
        assert!(is_busy(&convert(failure(rusqlite::ffi::SQLITE_BUSY))));
        assert!(is_busy(&convert(failure(rusqlite::ffi::SQLITE_LOCKED))));
        assert!(!is_busy(&convert(failure(
            rusqlite::ffi::SQLITE_CONSTRAINT
        ))));
        assert!(!is_busy(&Error::transient(NAME, "busy, but not SQLite's")));
    }

    #[test]
    fn a_read_only_file_is_not_worth_retrying() {
        let err = convert(failure(rusqlite::ffi::SQLITE_READONLY));
        assert!(!err.is_retryable(), "{err:?}");
        assert!(err.to_string().contains("read-only for this user"), "{err}");
        assert!(!convert(failure(rusqlite::ffi::SQLITE_READONLY_DIRECTORY)).is_retryable());
    }

    #[test]
    fn refused_and_broken_files_are_permanent() {
        for code in [rusqlite::ffi::SQLITE_PERM, rusqlite::ffi::SQLITE_READONLY] {
            let err = convert(failure(code));
            assert!(matches!(err, Error::Denied { .. }), "{err:?}");
            assert!(!err.is_retryable());
        }
        for code in [rusqlite::ffi::SQLITE_NOTADB, rusqlite::ffi::SQLITE_CANTOPEN] {
            let err = convert(failure(code));
            assert!(matches!(err, Error::Backend { .. }), "{err:?}");
            assert!(!err.is_retryable());
        }
        let err = open_failed(
            std::path::Path::new("/nonexistent-dir/x.db"),
            failure(rusqlite::ffi::SQLITE_CANTOPEN),
        );
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("/nonexistent-dir/x.db"), "{err}");
    }
}
