//! Turns driver errors into [`leaselock::Error`], tagged with the backend's name and classified as
//! retryable or permanent.

use leaselock::Error;
use mysql_async::{DriverError, Error as MyError};

/// What an error is about: which backend, which table, which server. Never holds credentials.
#[derive(Clone, Debug)]
pub(crate) struct ErrorContext {
    pub(crate) backend: &'static str,
    pub(crate) table: String,
    /// `host:port/database`, for messages.
    pub(crate) server: String,
}

// Server error codes (shared by MySQL and MariaDB).
const ER_DBACCESS_DENIED_ERROR: u16 = 1044;
const ER_ACCESS_DENIED_ERROR: u16 = 1045;
const ER_BAD_DB_ERROR: u16 = 1049;
const ER_SERVER_SHUTDOWN: u16 = 1053;
const ER_BAD_FIELD_ERROR: u16 = 1054;
const ER_TOO_MANY_CONNECTIONS: u16 = 1040;
const ER_CON_COUNT_ERROR: u16 = 1203;
const ER_NO_SUCH_TABLE: u16 = 1146;
const ER_TABLEACCESS_DENIED_ERROR: u16 = 1142;
const ER_COLUMNACCESS_DENIED_ERROR: u16 = 1143;
const ER_KILL_DENIED_ERROR: u16 = 1095;
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
const ER_LOCK_DEADLOCK: u16 = 1213;
const ER_SPECIFIC_ACCESS_DENIED_ERROR: u16 = 1227;
const ER_QUERY_INTERRUPTED: u16 = 1317;
const ER_CONNECTION_KILLED: u16 = 1927;
const ER_USER_LOCK_DEADLOCK: u16 = 3058;
const ER_READ_ONLY_MODE: u16 = 1836;
const ER_OPTION_PREVENTS_STATEMENT: u16 = 1290;
const ER_CLIENT_INTERACTION_TIMEOUT: u16 = 4031;
const ER_ACCESS_DENIED_NO_PASSWORD_ERROR: u16 = 1698;
const ER_PASSWORD_EXPIRED: u16 = 1820;
const ER_ACCOUNT_HAS_BEEN_LOCKED: u16 = 3118;

/// The server error code, if `err` is a server error.
pub(crate) fn server_code(err: &MyError) -> Option<u16> {
    match err {
        MyError::Server(e) => Some(e.code),
        _ => None,
    }
}

/// Whether `err` means the connection itself is gone (so a session lock on it is gone too).
pub(crate) fn is_connection_gone(err: &MyError) -> bool {
    match err {
        MyError::Io(_) => true,
        MyError::Driver(DriverError::ConnectionClosed | DriverError::PacketOutOfOrder) => true,
        MyError::Driver(DriverError::UnexpectedPacket { .. }) => true,
        MyError::Server(e) => matches!(
            e.code,
            ER_CONNECTION_KILLED | ER_SERVER_SHUTDOWN | ER_CLIENT_INTERACTION_TIMEOUT
        ),
        _ => false,
    }
}

impl ErrorContext {
    /// Converts a driver error.
    pub(crate) fn convert(&self, err: MyError) -> Error {
        let backend = self.backend;
        match &err {
            MyError::Server(e) => match e.code {
                ER_NO_SUCH_TABLE => Error::NotInitialized {
                    backend,
                    what: format!(
                        "table `{}` does not exist in {}; call init_storage first",
                        self.table, self.server
                    ),
                },
                ER_BAD_FIELD_ERROR => Error::NotInitialized {
                    backend,
                    what: format!(
                        "table `{}` in {} exists but does not have the columns this backend \
                         needs (created by something else, or by the other leaselock-mysql \
                         strategy?): {}",
                        self.table, self.server, e.message
                    ),
                },
                ER_DBACCESS_DENIED_ERROR
                | ER_ACCESS_DENIED_ERROR
                | ER_ACCESS_DENIED_NO_PASSWORD_ERROR
                | ER_TABLEACCESS_DENIED_ERROR
                | ER_COLUMNACCESS_DENIED_ERROR
                | ER_SPECIFIC_ACCESS_DENIED_ERROR
                | ER_KILL_DENIED_ERROR
                | ER_PASSWORD_EXPIRED
                | ER_ACCOUNT_HAS_BEEN_LOCKED => Error::denied(
                    backend,
                    format!("{} refused access: {}", self.server, e.message),
                    Some(Box::new(err)),
                ),
                // A database that does not exist yet may be created meanwhile; a read-only
                // server may be a replica about to be promoted.
                ER_BAD_DB_ERROR | ER_READ_ONLY_MODE | ER_OPTION_PREVENTS_STATEMENT => {
                    Error::not_accessible(
                        backend,
                        format!("{} cannot be used: {}", self.server, e.message),
                        Some(Box::new(err)),
                    )
                }
                // The server is out of connections or going away: it heals.
                ER_TOO_MANY_CONNECTIONS | ER_CON_COUNT_ERROR | ER_SERVER_SHUTDOWN => {
                    Error::not_accessible(
                        backend,
                        format!("cannot connect to {}: {}", self.server, e.message),
                        Some(Box::new(err)),
                    )
                }
                ER_LOCK_WAIT_TIMEOUT
                | ER_LOCK_DEADLOCK
                | ER_QUERY_INTERRUPTED
                | ER_CONNECTION_KILLED
                | ER_USER_LOCK_DEADLOCK
                | ER_CLIENT_INTERACTION_TIMEOUT => Error::transient(backend, err),
                _ => Error::permanent(backend, err),
            },
            MyError::Io(_) => Error::NotAccessible {
                backend,
                what: format!("cannot talk to the server at {}", self.server),
                source: Some(Box::new(err)),
            },
            MyError::Driver(
                DriverError::ConnectionClosed
                | DriverError::PoolDisconnected
                | DriverError::PacketOutOfOrder
                | DriverError::UnexpectedPacket { .. },
            ) => Error::transient(backend, err),
            MyError::Driver(_) | MyError::Other(_) | MyError::Url(_) => {
                Error::permanent(backend, err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mysql_async::ServerError;

    fn ctx() -> ErrorContext {
        ErrorContext {
            backend: "mysql-table",
            table: "locks".into(),
            server: "db:3306/app".into(),
        }
    }

    fn server(code: u16) -> MyError {
        MyError::Server(ServerError {
            code,
            message: "m".into(),
            state: "HY000".into(),
        })
    }

    #[test]
    fn classification() {
        assert!(matches!(
            ctx().convert(server(ER_NO_SUCH_TABLE)),
            Error::NotInitialized { .. }
        ));
        // Refused credentials and privileges are permanent.
        for code in [
            ER_ACCESS_DENIED_ERROR,
            ER_DBACCESS_DENIED_ERROR,
            ER_TABLEACCESS_DENIED_ERROR,
            ER_SPECIFIC_ACCESS_DENIED_ERROR,
            ER_ACCESS_DENIED_NO_PASSWORD_ERROR,
        ] {
            let err = ctx().convert(server(code));
            assert!(matches!(err, Error::Denied { .. }), "{code}: {err:?}");
            assert!(!err.is_retryable(), "{code}");
        }
        // What heals: a database created later, a server out of connections or restarting.
        for code in [
            ER_BAD_DB_ERROR,
            ER_TOO_MANY_CONNECTIONS,
            ER_CON_COUNT_ERROR,
            ER_SERVER_SHUTDOWN,
        ] {
            let err = ctx().convert(server(code));
            assert!(
                matches!(err, Error::NotAccessible { .. }),
                "{code}: {err:?}"
            );
            assert!(err.is_retryable(), "{code}");
        }
        assert!(ctx().convert(server(ER_LOCK_DEADLOCK)).is_retryable());
        assert!(!ctx().convert(server(1064)).is_retryable());
        let io = MyError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into());
        assert!(is_connection_gone(&io));
        let err = ctx().convert(io);
        assert!(err.is_retryable());
        assert!(err.to_string().contains("db:3306/app"), "{err}");
        assert!(!is_connection_gone(&server(ER_LOCK_DEADLOCK)));
        assert!(is_connection_gone(&server(ER_CONNECTION_KILLED)));
    }
}
