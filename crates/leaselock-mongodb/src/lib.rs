#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod backend;
mod config;
mod error;

use std::sync::Arc;

pub use backend::{MongoBackend, EXPIRY_INDEX};
pub use config::{
    MongoConfig, ReadConsistency, DEFAULT_COLLECTION, DEFAULT_DATABASE,
    DEFAULT_SERVER_SELECTION_TIMEOUT, DEFAULT_WRITE_TIMEOUT,
};

/// Opens the backend described by `url` (see [`MongoConfig::from_url`]), for tools that pick a
/// backend by URL scheme: `mongodb://[USER:PASSWORD@]HOST[:PORT][,HOST…]/[DATABASE][?collection=NAME&…]`.
/// Does not contact the server and does not create the collection.
///
/// A bad URL fails with [`leaselock::Error::InvalidInput`] naming the field `url` (or `database`,
/// `collection`), without the password.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> leaselock::Result<()> {
/// let backend = leaselock_mongodb::from_url("mongodb://127.0.0.1:27017/app?collection=locks").await?;
/// backend.init_storage().await?;
/// # Ok(()) }
/// ```
pub async fn from_url(url: &str) -> leaselock::Result<Arc<dyn leaselock::LockBackend>> {
    Ok(Arc::new(
        MongoBackend::connect(MongoConfig::from_url(url)?).await?,
    ))
}
