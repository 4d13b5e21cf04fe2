//! Turning the driver's errors into leaselock's.

use leaselock::Error;
use mongodb::error::{
    ErrorKind, WriteFailure, RETRYABLE_ERROR, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR,
};

pub(crate) const NAME: &str = "mongodb";

/// `DuplicateKey`: an upsert lost the race to insert the same `_id`.
pub(crate) const DUPLICATE_KEY: i32 = 11000;
/// `NamespaceExists`: the collection was created meanwhile.
pub(crate) const NAMESPACE_EXISTS: i32 = 48;
/// `NamespaceNotFound`: no such collection.
pub(crate) const NAMESPACE_NOT_FOUND: i32 = 26;

/// Server error codes that say "try again": node state changes, interruptions, timeouts, write
/// conflicts, a write concern not satisfied in time.
const TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    24,    // LockTimeout
    46,    // LockBusy
    50,    // MaxTimeMSExpired
    64,    // WriteConcernFailed (wtimeout)
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    112,   // WriteConflict
    117,   // ConflictingOperationInProgress
    134,   // ReadConcernMajorityNotAvailableYet
    189,   // PrimarySteppedDown
    202,   // NetworkInterfaceExceededTimeLimit
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

/// Codes that mean the credentials do not allow the operation.
const DENIED_CODES: &[i32] = &[
    13, // Unauthorized
    18, // AuthenticationFailed
];

/// The server's error code, if the error carries one.
pub(crate) fn code(error: &mongodb::error::Error) -> Option<i32> {
    match &*error.kind {
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => Some(e.code),
        _ => None,
    }
}

/// Classifies a driver error: an unreachable server makes storage not accessible (retryable),
/// refused credentials or permissions are [`Error::Denied`] (permanent), a missing collection means storage is not initialized, node state changes and
/// timeouts are retryable, the rest is permanent. The driver's messages name hosts, never
/// passwords.
pub(crate) fn convert(error: mongodb::error::Error) -> Error {
    let code = code(&error);
    if code == Some(NAMESPACE_NOT_FOUND) {
        return not_initialized("the lock collection does not exist");
    }
    if code.is_some_and(|c| DENIED_CODES.contains(&c)) {
        return Error::denied(
            NAME,
            "the server refused the credentials or the operation (permission denied)",
            Some(Box::new(error)),
        );
    }
    match &*error.kind {
        ErrorKind::ServerSelection { .. } => {
            return Error::NotAccessible {
                backend: NAME,
                what: "no reachable MongoDB primary (server selection timed out)".to_owned(),
                source: Some(Box::new(error)),
            }
        }
        ErrorKind::Authentication { .. } => {
            return Error::denied(NAME, "authentication failed", Some(Box::new(error)))
        }
        ErrorKind::DnsResolve { .. } => {
            return Error::NotAccessible {
                backend: NAME,
                what: "the MongoDB host name does not resolve".to_owned(),
                source: Some(Box::new(error)),
            }
        }
        ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. } => {
            return Error::transient(NAME, error)
        }
        _ => {}
    }
    let labelled = [
        RETRYABLE_WRITE_ERROR,
        RETRYABLE_ERROR,
        TRANSIENT_TRANSACTION_ERROR,
    ]
    .iter()
    .any(|label| error.contains_label(label));
    if labelled || code.is_some_and(|c| TRANSIENT_CODES.contains(&c)) {
        Error::transient(NAME, error)
    } else {
        Error::permanent(NAME, error)
    }
}

pub(crate) fn not_initialized(what: &str) -> Error {
    Error::NotInitialized {
        backend: NAME,
        what: format!("{what}: run init_storage (or `leaselock init`)"),
    }
}

/// A document in the lock collection that this crate did not write.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::permanent(
        NAME,
        format!("unexpected document in the lock collection: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(code: i32) -> mongodb::error::Error {
        let error: mongodb::error::CommandError = mongodb::bson::from_document(
            mongodb::bson::doc! { "code": code, "codeName": "X", "errmsg": "m" },
        )
        .expect("a command error");
        mongodb::error::Error::from(ErrorKind::Command(error))
    }

    #[test]
    fn refused_credentials_are_permanent_unreachable_servers_are_not() {
        for code in DENIED_CODES {
            let err = convert(command(*code));
            assert!(matches!(err, Error::Denied { .. }), "{code}: {err:?}");
            assert!(!err.is_retryable());
        }
        let err = convert(command(91)); // ShutdownInProgress
        assert!(err.is_retryable());
    }
}
