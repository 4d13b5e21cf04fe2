//! The one error type of leaselock.

use crate::types::{LockInfo, LockKey};

/// A boxed error from a driver or a hook.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with leaselock's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, for every backend.
///
/// Ask [`Error::is_retryable`] whether trying again later can help; retry code never needs to know
/// database error codes.
///
/// ```
/// use leaselock::{Error, LockKey};
/// let err = LockKey::new("").unwrap_err();
/// assert!(matches!(err, Error::InvalidInput { field: "key", .. }));
/// assert!(!err.is_retryable());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument or a configuration value is invalid. Nothing was changed.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The field or argument at fault (`key`, `lease_duration`, `table`, ...).
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },

    /// The lock is held by another owner (or by another acquisition of the same owner: locks are
    /// not reentrant).
    #[error("lock `{key}` is held{}", holder_suffix(.holder))]
    Held {
        /// The key asked for.
        key: LockKey,
        /// The holder, when the backend could tell.
        holder: Option<Box<LockInfo>>,
    },

    /// The lease was lost: it expired, was force-released, taken over, or its session ended.
    #[error("lease on `{key}` was lost: {reason}")]
    Lost {
        /// The key whose lease was lost.
        key: LockKey,
        /// What happened.
        reason: String,
    },

    /// The storage (table, collection) does not exist yet: call `init_storage` first.
    #[error("{backend}: storage is not initialized: {what}")]
    NotInitialized {
        /// The backend's name.
        backend: &'static str,
        /// What is missing.
        what: String,
    },

    /// The storage cannot be reached now: connection refused, reset or timed out, a host name
    /// that does not resolve, a database that does not exist yet, a server starting up, shutting
    /// down or at its connection limit. Always retryable: these heal, and a wait policy keeps
    /// trying them until its deadline. Refused credentials or permissions are
    /// [`Error::Denied`] instead.
    #[error("{backend}: storage is not accessible: {what}")]
    NotAccessible {
        /// The backend's name.
        backend: &'static str,
        /// What is missing or failing, in words for an operator.
        what: String,
        /// The driver's error, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// The storage refused the credentials or the operation: authentication failed, permission
    /// or privilege missing, a read-only file. Never retryable: waiting cannot fix it, an operator
    /// must change the credentials, grants or file modes. The message names the user or object
    /// the server named, never a password.
    #[error("{backend}: access denied: {what}")]
    Denied {
        /// The backend's name.
        backend: &'static str,
        /// What was refused, in words for an operator.
        what: String,
        /// The driver's error, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// The backend failed in another way.
    #[error("{backend}: {source}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// Whether trying again later may succeed (connection reset, deadlock, busy database).
        retryable: bool,
        /// The driver's error.
        #[source]
        source: BoxError,
    },
}

fn holder_suffix(holder: &Option<Box<LockInfo>>) -> String {
    match holder {
        Some(info) => format!(" by {info}"),
        None => String::new(),
    }
}

impl Error {
    /// An [`Error::InvalidInput`] for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            field,
            reason: reason.into(),
        }
    }

    /// An [`Error::Backend`] that may succeed when tried again.
    pub fn transient(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            backend,
            retryable: true,
            source: source.into(),
        }
    }

    /// An [`Error::Backend`] that will fail again the same way.
    pub fn permanent(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            backend,
            retryable: false,
            source: source.into(),
        }
    }

    /// An [`Error::NotAccessible`]: the storage cannot be reached now, and may be later
    /// (retryable).
    pub fn not_accessible(
        backend: &'static str,
        what: impl Into<String>,
        source: Option<BoxError>,
    ) -> Self {
        Error::NotAccessible {
            backend,
            what: what.into(),
            source,
        }
    }

    /// An [`Error::Denied`]: the storage refused the credentials or the operation (permanent).
    ///
    /// ```
    /// use leaselock::Error;
    /// let err = Error::denied("example", "password authentication failed for user \"app\"", None);
    /// assert!(!err.is_retryable());
    /// assert_eq!(
    ///     err.to_string(),
    ///     "example: access denied: password authentication failed for user \"app\""
    /// );
    /// ```
    pub fn denied(
        backend: &'static str,
        what: impl Into<String>,
        source: Option<BoxError>,
    ) -> Self {
        Error::Denied {
            backend,
            what: what.into(),
            source,
        }
    }

    /// An [`Error::Lost`] for `key`.
    pub fn lost(key: &LockKey, reason: impl Into<String>) -> Self {
        Error::Lost {
            key: key.clone(),
            reason: reason.into(),
        }
    }

    /// This error once for each of `n` operations that failed together (a batch whose
    /// connection dropped, say), for [`crate::LockBackend::refresh_many`]: the first is this
    /// error itself, the others carry its kind, message and retryability (a driver's error
    /// becomes its message).
    ///
    /// ```
    /// use leaselock::Error;
    /// let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
    /// let errors = Error::transient("example", reset).for_batch(3);
    /// assert_eq!(errors.len(), 3);
    /// assert!(errors.iter().all(|e| e.is_retryable() && e.to_string() == "example: reset"));
    /// ```
    pub fn for_batch(self, n: usize) -> Vec<Error> {
        let mut errors: Vec<Error> = (1..n).map(|_| self.duplicate()).collect();
        if n > 0 {
            errors.insert(0, self);
        }
        errors
    }

    fn duplicate(&self) -> Error {
        let message = |source: &BoxError| -> BoxError { source.to_string().into() };
        match self {
            Error::InvalidInput { field, reason } => Error::invalid(field, reason.clone()),
            Error::Held { key, holder } => Error::Held {
                key: key.clone(),
                holder: holder.clone(),
            },
            Error::Lost { key, reason } => Error::lost(key, reason.clone()),
            Error::NotInitialized { backend, what } => Error::NotInitialized {
                backend,
                what: what.clone(),
            },
            Error::NotAccessible {
                backend,
                what,
                source,
            } => Error::NotAccessible {
                backend,
                what: what.clone(),
                source: source.as_ref().map(message),
            },
            Error::Denied {
                backend,
                what,
                source,
            } => Error::Denied {
                backend,
                what: what.clone(),
                source: source.as_ref().map(message),
            },
            Error::Backend {
                backend,
                retryable,
                source,
            } => Error::Backend {
                backend,
                retryable: *retryable,
                source: message(source),
            },
        }
    }

    /// Whether the operation may succeed if tried again later: transient backend failures and
    /// unreachable storage ([`Error::NotAccessible`]). Invalid input, refused credentials or
    /// permissions ([`Error::Denied`]), a lost lease and missing storage are permanent; a held
    /// lock is a normal outcome that waiting (not retrying) resolves.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Backend { retryable, .. } => *retryable,
            Error::NotAccessible { .. } => true,
            Error::InvalidInput { .. }
            | Error::Held { .. }
            | Error::Lost { .. }
            | Error::Denied { .. }
            | Error::NotInitialized { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{FencingToken, OwnerId};

    #[test]
    fn display_and_classification() {
        let key = LockKey::new("k").unwrap();
        let info = LockInfo::new(
            key.clone(),
            OwnerId::new("o").unwrap(),
            FencingToken::new(4),
        );
        let held = Error::Held {
            key: key.clone(),
            holder: Some(Box::new(info)),
        };
        assert_eq!(
            held.to_string(),
            "lock `k` is held by `o` (fencing token 4)"
        );
        assert!(!held.is_retryable());
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(Error::transient("x", io).is_retryable());
        assert!(!Error::permanent("x", "bad").is_retryable());
        assert!(!Error::lost(&key, "expired").is_retryable());
    }

    #[test]
    fn unreachable_is_retryable_denied_is_not() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let unreachable =
            Error::not_accessible("x", "cannot connect to db:5432", Some(Box::new(refused)));
        assert!(unreachable.is_retryable());
        assert_eq!(
            unreachable.to_string(),
            "x: storage is not accessible: cannot connect to db:5432"
        );
        let denied = Error::denied("x", "access denied for user 'app'", None);
        assert!(!denied.is_retryable());
        // A batch copy keeps the kind and the classification.
        let copies = denied.for_batch(2);
        assert!(copies
            .iter()
            .all(|e| matches!(e, Error::Denied { .. }) && !e.is_retryable()));
        let copies = unreachable.for_batch(2);
        assert!(copies.iter().all(Error::is_retryable));
    }
}
