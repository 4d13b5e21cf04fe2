#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

#[cfg(feature = "refinery")]
pub mod refinery;
#[cfg(feature = "sqlx")]
pub mod sqlx;

use leaselock::FencingToken;
pub use leaselock::RunIfNeeded;

/// The name of the session setting that holds the fencing token while migrations run on
/// PostgreSQL: read it in a migration with `current_setting('leaselock.fencing_token')`.
pub const PG_TOKEN_SETTING: &str = "leaselock.fencing_token";

/// The user variable that holds the fencing token while migrations run on MySQL/MariaDB: read
/// it in a migration as `@leaselock_fencing_token`.
pub const MYSQL_TOKEN_VARIABLE: &str = "@leaselock_fencing_token";

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong while guarding or running migrations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Taking, keeping or releasing the lock failed; [`leaselock::Error::Lost`] when the lease
    /// was lost while the migrations ran (they may have run partly without the lock).
    #[error("migration lock: {0}")]
    Lock(#[from] leaselock::Error),

    /// sqlx could not read the migration state or apply a migration.
    #[cfg(feature = "sqlx")]
    #[error("sqlx migrations: {0}")]
    Sqlx(#[from] ::sqlx::migrate::MigrateError),

    /// refinery could not read the migration state or apply a migration.
    #[cfg(feature = "refinery")]
    #[error("refinery migrations: {0}")]
    Refinery(#[from] ::refinery::Error),

    /// A statement of this crate's own (reading refinery's history table, setting the fencing
    /// token) failed on PostgreSQL.
    #[cfg(feature = "refinery")]
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

#[cfg(feature = "sqlx")]
impl From<::sqlx::Error> for Error {
    fn from(error: ::sqlx::Error) -> Self {
        Error::Sqlx(error.into())
    }
}

/// What one guarded run applied, returned inside [`RunIfNeeded::Ran`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Applied {
    /// The versions applied by this run, in the order they ran.
    pub versions: Vec<i64>,
    /// The fencing token of the lock they ran under (zero when the locker is disabled).
    pub token: FencingToken,
}
