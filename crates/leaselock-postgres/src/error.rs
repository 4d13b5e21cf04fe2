//! Converts driver errors into [`leaselock::Error`], tagged with the backend's name and
//! classified as retryable or permanent. Private: users only ever see `leaselock::Error`.

use leaselock::Error;
use tokio_postgres::error::SqlState;

/// The message for every pooler refusal, so users find the cause from any of the paths.
pub(crate) const POOLER_HINT: &str = "the connection goes through a transaction-pooling proxy \
     (such as PgBouncer with pool_mode=transaction, or another pooler that hands each \
     transaction to a different server session); session advisory locks need a direct \
     connection or session pooling. Connect the advisory backend directly to PostgreSQL, or use \
     `strategy=table` (PgTableBackend), which works through transaction pooling";

/// A driver error during a lock operation.
pub(crate) fn driver(backend: &'static str, what: &str, error: tokio_postgres::Error) -> Error {
    let Some(code) = error.code().cloned() else {
        // No SQLSTATE: I/O, a closed connection, a protocol or conversion problem.
        let retryable = error.is_closed() || is_io(&error);
        return wrap(backend, what, error, retryable);
    };
    if code == SqlState::UNDEFINED_TABLE || code == SqlState::INVALID_SCHEMA_NAME {
        return Error::NotInitialized {
            backend,
            what: format!("{what}: {}", db_message(&error)),
        };
    }
    if code == SqlState::UNDEFINED_COLUMN {
        // A table made by an earlier version lacks a column this one uses.
        return Error::NotInitialized {
            backend,
            what: format!(
                "{what}: {}; init_storage adds the columns this version needs to a table \
                 made by an earlier version",
                db_message(&error)
            ),
        };
    }
    if is_denied_code(&code) {
        return Error::denied(
            backend,
            format!("{what}: {}", db_message(&error)),
            Some(Box::new(error)),
        );
    }
    if code == SqlState::INVALID_CATALOG_NAME {
        // The database does not exist (yet): it may be created meanwhile.
        return Error::not_accessible(
            backend,
            format!("{what}: {}", db_message(&error)),
            Some(Box::new(error)),
        );
    }
    let retryable = is_retryable_code(&code);
    wrap(backend, what, error, retryable)
}

/// A failure to open a connection. What can heal is [`Error::NotAccessible`] (retryable): a
/// refused, reset or timed-out connection, a host name that does not resolve, a database that
/// does not exist yet, a server starting up, shutting down or out of connections. Refused
/// credentials or privileges are [`Error::Denied`]; another server error or a TLS certificate
/// the client rejects is a permanent [`Error::Backend`].
pub(crate) fn connect(backend: &'static str, target: &str, error: tokio_postgres::Error) -> Error {
    let what = |detail: String| format!("cannot connect to {target}: {detail}");
    match connect_kind(&error) {
        ConnectKind::Unreachable => {
            let what = what(match error.code() {
                Some(_) => db_message(&error),
                None => short(&error),
            });
            Error::not_accessible(backend, what, Some(Box::new(error)))
        }
        ConnectKind::Denied => {
            let what = what(match error.code() {
                Some(_) => db_message(&error),
                None => short(&error),
            });
            Error::denied(backend, what, Some(Box::new(error)))
        }
        ConnectKind::Permanent => wrap(backend, &what("failed".into()), error, false),
    }
}

/// How a failed connection attempt is classified (see [`connect`]).
#[derive(Debug, PartialEq, Eq)]
enum ConnectKind {
    Unreachable,
    Denied,
    Permanent,
}

fn connect_kind(error: &tokio_postgres::Error) -> ConnectKind {
    if let Some(code) = error.code() {
        return if is_denied_code(code) {
            ConnectKind::Denied
        } else if *code == SqlState::INVALID_CATALOG_NAME || is_retryable_code(code) {
            ConnectKind::Unreachable
        } else {
            ConnectKind::Permanent
        };
    }
    // No SQLSTATE. The driver's kinds are private; its messages for them are stable. An
    // authentication step the client cannot complete ("authentication error", or "invalid
    // configuration: password missing" when the server asks for a password the URL lacks) is
    // refused credentials.
    let text = short(error);
    if text.starts_with("authentication error") || text.contains("password missing") {
        return ConnectKind::Denied;
    }
    if let Some(io) = io_source(error) {
        // rustls reports a certificate it rejects as invalid data: that does not heal.
        return match io.kind() {
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
                ConnectKind::Permanent
            }
            _ => ConnectKind::Unreachable,
        };
    }
    if error.is_closed() || text.starts_with("timeout") || text.starts_with("error connecting") {
        return ConnectKind::Unreachable;
    }
    ConnectKind::Permanent
}

/// SQLSTATEs that say the credentials or privileges are refused: class 28 (invalid
/// authorization specification, invalid password) and 42501 (insufficient privilege).
fn is_denied_code(code: &SqlState) -> bool {
    code.code().starts_with("28") || *code == SqlState::INSUFFICIENT_PRIVILEGE
}

fn io_source(error: &tokio_postgres::Error) -> Option<&std::io::Error> {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        source = cause.source();
    }
    None
}

/// A connection attempt that took longer than the configured timeout.
pub(crate) fn connect_timeout(backend: &'static str, target: &str) -> Error {
    Error::not_accessible(backend, format!("connecting to {target} timed out"), None)
}

/// A statement that took longer than the configured timeout (retryable).
pub(crate) fn timeout(backend: &'static str, what: &str) -> Error {
    Error::transient(backend, format!("{what}: timed out"))
}

/// A session that turned out to be shared through a transaction pooler (permanent).
pub(crate) fn pooler(backend: &'static str, detail: &str) -> Error {
    Error::permanent(backend, format!("{detail}: {POOLER_HINT}"))
}

fn wrap(backend: &'static str, what: &str, error: tokio_postgres::Error, retryable: bool) -> Error {
    Error::Backend {
        backend,
        retryable,
        source: Box::new(Context {
            what: what.to_owned(),
            source: error,
        }),
    }
}

/// Whether a server error may go away when tried again.
fn is_retryable_code(code: &SqlState) -> bool {
    let class = &code.code()[..2];
    matches!(
        class,
        "08" // connection exception
        | "53" // insufficient resources
        | "57" // operator intervention: shutdown, cancel, cannot connect now
        | "58" // system error (I/O)
    ) || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::LOCK_NOT_AVAILABLE
}

fn is_io(error: &tokio_postgres::Error) -> bool {
    std::error::Error::source(error).is_some_and(|s| s.is::<std::io::Error>())
}

/// The server's own message (no statement text, no parameters).
fn db_message(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => short(error),
    }
}

/// The driver's message including its source, on one line.
fn short(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

/// A driver error with what we were doing.
#[derive(Debug)]
struct Context {
    what: String,
    source: tokio_postgres::Error,
}

impl std::fmt::Display for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.source.as_db_error() {
            Some(db) => write!(f, "{}: {} ({})", self.what, db.message(), db.code().code()),
            None => write!(f, "{}: {}", self.what, short(&self.source)),
        }
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert!(is_retryable_code(&SqlState::ADMIN_SHUTDOWN));
        assert!(is_retryable_code(&SqlState::CONNECTION_FAILURE));
        assert!(is_retryable_code(&SqlState::T_R_DEADLOCK_DETECTED));
        assert!(is_retryable_code(&SqlState::TOO_MANY_CONNECTIONS));
        assert!(!is_retryable_code(&SqlState::SYNTAX_ERROR));
        assert!(!is_retryable_code(&SqlState::UNIQUE_VIOLATION));
        assert!(is_denied_code(&SqlState::INVALID_PASSWORD));
        assert!(is_denied_code(
            &SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        ));
        assert!(is_denied_code(&SqlState::INSUFFICIENT_PRIVILEGE));
        assert!(!is_denied_code(&SqlState::INVALID_CATALOG_NAME));
        assert!(!is_denied_code(&SqlState::TOO_MANY_CONNECTIONS));
        assert!(is_retryable_code(&SqlState::CANNOT_CONNECT_NOW));
        let err = pooler("postgres-advisory", "pid changed");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("PgBouncer"), "{err}");
    }
}
