#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod backend;
mod config;
mod error;

use std::sync::Arc;

pub use backend::SqliteBackend;
pub use config::{SqliteConfig, DEFAULT_BUSY_TIMEOUT, DEFAULT_TABLE};

/// Opens the backend described by `url` (see [`SqliteConfig::from_url`]), for tools that pick a
/// backend by URL scheme. Does not create the table.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> leaselock::Result<()> {
/// let backend = leaselock_sqlite::from_url("sqlite://leaselock.db").await?;
/// backend.init_storage().await?;
/// # Ok(()) }
/// ```
pub async fn from_url(url: &str) -> leaselock::Result<Arc<dyn leaselock::LockBackend>> {
    Ok(Arc::new(
        SqliteBackend::connect(SqliteConfig::from_url(url)?).await?,
    ))
}

/// The workspace README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct WorkspaceReadme;
