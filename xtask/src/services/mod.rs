//! The database servers the test suite needs, one file each.
//!
//! A service's `up` makes sure its server runs (installing it if this machine lacks it and it
//! can be installed from a package registry), creates what the tests need (a database, a table),
//! and returns the URL to export as `env_var`. Scratch files go under `ctx.scratch`.

use std::path::PathBuf;

use crate::util::Result;

mod dynamodb;
mod mongodb;
mod mysql;
mod pgbouncer;
mod postgres;

/// Where services keep their files.
pub struct Ctx {
    /// The workspace root.
    #[allow(dead_code)]
    pub root: PathBuf,
    /// `<root>/.services`, for data directories, configs and logs.
    #[allow(dead_code)]
    pub scratch: PathBuf,
}

impl Ctx {
    pub fn new(root: PathBuf) -> Result<Self> {
        let scratch = root.join(".services");
        std::fs::create_dir_all(&scratch)
            .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
        Ok(Self { root, scratch })
    }
}

/// One server.
pub struct Service {
    /// A name for messages.
    pub name: &'static str,
    /// The variable the tests read the URL from.
    pub env_var: &'static str,
    /// Starts the server (installing it if needed) and returns its URL.
    pub up: fn(&Ctx) -> Result<String>,
    /// Stops a server this tool started, if it can.
    pub down: Option<fn(&Ctx) -> Result<()>>,
}

/// Every service, in start order.
pub fn all() -> Vec<Service> {
    vec![
        postgres::SERVICE,
        pgbouncer::SERVICE,
        mysql::SERVICE,
        mongodb::SERVICE,
        dynamodb::SERVICE,
    ]
}
