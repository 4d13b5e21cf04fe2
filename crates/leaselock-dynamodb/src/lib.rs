#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod backend;
mod config;
mod error;

use std::sync::Arc;

pub use backend::DynamoDbBackend;
pub use config::{
    ClockOffset, DynamoDbConfig, DEFAULT_CLEANUP_AFTER, DEFAULT_REQUEST_TIMEOUT, DEFAULT_TABLE,
    DEFAULT_TABLE_READY_TIMEOUT, MIN_CLEANUP_AFTER,
};

/// Opens the backend described by `url` (see [`DynamoDbConfig::from_url`]):
/// `dynamodb://TABLE?endpoint=…&region=…`, for tools that pick a backend by URL scheme. Sends no
/// request and does not create the table.
///
/// A bad URL fails with `Error::InvalidInput { field: "url", .. }`.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> leaselock::Result<()> {
/// let backend = leaselock_dynamodb::from_url(
///     "dynamodb://leaselock_locks?endpoint=http://127.0.0.1:8000&region=us-east-1",
/// )
/// .await?;
/// backend.init_storage().await?;
/// # Ok(()) }
/// ```
pub async fn from_url(url: &str) -> leaselock::Result<Arc<dyn leaselock::LockBackend>> {
    Ok(Arc::new(
        DynamoDbBackend::connect(DynamoDbConfig::from_url(url)?).await?,
    ))
}
