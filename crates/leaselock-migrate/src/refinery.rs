//! refinery migrations ([`Runner`]) under a leaselock lock, on PostgreSQL through tokio-postgres.
//!
//! refinery has no lock of its own: two instances starting together both apply the same
//! migrations. [`GuardedRunner`] holds a leaselock lock around the runner, with run-if-needed:
//! when every migration is already applied, it returns without taking the lock.
//!
//! ```no_run
//! use std::time::Duration;
//! use leaselock::{Locker, WaitPolicy};
//! use leaselock_migrate::{refinery::GuardedRunner, RunIfNeeded};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let url = "postgres://app@db/app";
//! let (mut client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
//! tokio::spawn(connection);
//! let locker = Locker::builder(leaselock_postgres::from_url(url).await?)
//!     .wait(WaitPolicy::until(Duration::from_secs(300), Duration::from_secs(1)))
//!     .build()?;
//!
//! // Or `embed_migrations!("./migrations")` and its `migrations::runner()`.
//! let runner = refinery::Runner::new(&refinery::load_sql_migrations("./migrations")?);
//! let outcome = GuardedRunner::new(runner)
//!     .run(&locker, &mut client)
//!     .await?;
//! if let RunIfNeeded::Ran(applied) = outcome {
//!     println!("applied {:?} with fencing token {}", applied.versions, applied.token);
//! }
//! # Ok(()) }
//! ```
//!
//! While the migrations run, the lock's fencing token is the session setting
//! `leaselock.fencing_token` ([`crate::PG_TOKEN_SETTING`]): a migration reads it with
//! `current_setting('leaselock.fencing_token')`. Rust code gets the whole [`LockContext`] by
//! composing [`GuardedRunner::needs_run`] and [`GuardedRunner::apply`] with
//! [`Locker::run_if_needed`] itself.

use std::fmt;

use ::refinery::{Migration, Runner};
use leaselock::{LockContext, LockKey, Locker, RunIfNeeded};
use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::{Applied, Error, Result};

/// The lock key [`GuardedRunner`] uses unless told otherwise.
pub const DEFAULT_KEY: &str = "leaselock-migrate/refinery";

/// A refinery [`Runner`] that runs under a leaselock lock, only when something is pending.
///
/// Give the [`Locker`] a waiting policy ([`leaselock::WaitPolicy::until`]) so that instances
/// starting together wait for the one migrating instead of failing with
/// [`leaselock::Error::Held`].
///
/// "Pending" means a migration of the runner that the history table does not list with the
/// same name and checksum, or a listed one the runner lacks (refinery then reports the
/// divergence under the lock). The check cannot see a runner's [`refinery::Target`]: with a
/// target below the latest migration, the lock is taken every time (and the runner applies
/// nothing).
pub struct GuardedRunner {
    runner: Runner,
    key: LockKey,
}

impl fmt::Debug for GuardedRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let migrations: Vec<String> = self
            .runner
            .get_migrations()
            .iter()
            .map(ToString::to_string)
            .collect();
        f.debug_struct("GuardedRunner")
            .field("key", &self.key)
            .field("migrations", &migrations)
            .finish()
    }
}

impl GuardedRunner {
    /// Guards `runner` (from `embed_migrations!` or [`Runner::new`]).
    pub fn new(runner: Runner) -> Self {
        Self {
            runner,
            key: LockKey::new(DEFAULT_KEY).expect("the default key is valid"),
        }
    }

    /// The lock key. Default: [`DEFAULT_KEY`]. Set one that names the database when several
    /// databases share one lock store.
    pub fn key(mut self, key: impl AsRef<str>) -> Result<Self> {
        self.key = LockKey::new(key.as_ref())?;
        Ok(self)
    }

    /// The lock key in use.
    pub fn lock_key(&self) -> &LockKey {
        &self.key
    }

    /// The guarded runner.
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// The applied migrations; empty when refinery's history table does not exist yet (reading
    /// creates nothing, so it is safe without the lock).
    async fn applied(&self, client: &mut Client) -> Result<Vec<Migration>> {
        match self.runner.get_applied_migrations_async(client).await {
            Ok(applied) => Ok(applied),
            Err(error) if is_undefined_table(&error) => Ok(Vec::new()),
            Err(error) => Err(error.into()),
        }
    }

    /// Pending versions, and whether the history disagrees with the runner.
    fn split(&self, applied: &[Migration]) -> (Vec<i64>, bool) {
        let mut pending = Vec::new();
        let mut troubled = false;
        for migration in self.runner.get_migrations() {
            match applied.iter().find(|a| a.version() == migration.version()) {
                None => pending.push(i64::from(migration.version())),
                Some(done) => troubled |= done != migration,
            }
        }
        troubled |= applied.iter().any(|done| {
            !self
                .runner
                .get_migrations()
                .iter()
                .any(|m| m.version() == done.version())
        });
        pending.sort_unstable();
        (pending, troubled)
    }

    /// The versions of the runner's migrations that the database has not applied yet, in
    /// order. Reads without the lock.
    pub async fn pending(&self, client: &mut Client) -> Result<Vec<i64>> {
        let applied = self.applied(client).await?;
        Ok(self.split(&applied).0)
    }

    /// Whether running the runner may do anything: something is pending, or the history
    /// disagrees with the runner (refinery then reports it). Reads without the lock; this is the
    /// check of [`Locker::run_if_needed`].
    pub async fn needs_run(&self, client: &mut Client) -> Result<bool> {
        let applied = self.applied(client).await?;
        let (pending, troubled) = self.split(&applied);
        Ok(!pending.is_empty() || troubled)
    }

    /// Applies the pending migrations under the lock that `lock` describes: sets the session
    /// setting `leaselock.fencing_token`, checks that the lock is still held, runs the runner,
    /// and clears the setting. Returns what refinery applied.
    ///
    /// [`GuardedRunner::run`] calls it; call it yourself to do more under the same lock:
    ///
    /// ```no_run
    /// # async fn f(locker: leaselock::Locker, client: tokio_postgres::Client, runner: refinery::Runner) -> leaselock_migrate::Result<()> {
    /// let guarded = &leaselock_migrate::refinery::GuardedRunner::new(runner);
    /// let client = &tokio::sync::Mutex::new(client);
    /// let outcome = locker
    ///     .run_if_needed(
    ///         guarded.lock_key().as_str(),
    ///         || async { guarded.needs_run(&mut *client.lock().await).await },
    ///         |lock| async move {
    ///             println!("migrating with fencing token {}", lock.token());
    ///             guarded.apply(&mut *client.lock().await, &lock).await
    ///         },
    ///     )
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn apply(&self, client: &mut Client, lock: &LockContext) -> Result<Applied> {
        set_token(client, Some(lock.token().get())).await?;
        let outcome = async {
            lock.ensure_held().await?;
            tracing::info!(key = %self.key, token = %lock.token(), "running refinery migrations");
            Ok::<_, Error>(self.runner.run_async(client).await?)
        }
        .await;
        if let Err(error) = set_token(client, None).await {
            tracing::warn!(%error, "could not clear the fencing-token setting");
        }
        let report = outcome?;
        Ok(Applied {
            versions: report
                .applied_migrations()
                .iter()
                .map(|m| i64::from(m.version()))
                .collect(),
            token: lock.token(),
        })
    }

    /// Applies pending migrations with run-if-needed: when nothing is pending, returns
    /// [`RunIfNeeded::NotNeeded`] without taking the lock; otherwise acquires it (waiting as the
    /// locker is configured), checks again, and runs the runner ([`RunIfNeeded::Ran`] with what
    /// it applied, or [`RunIfNeeded::NotNeededOnceLocked`] when another instance applied
    /// everything meanwhile). The lock is always released.
    pub async fn run(&self, locker: &Locker, client: &mut Client) -> Result<RunIfNeeded<Applied>> {
        let client = &Mutex::new(client);
        locker
            .run_if_needed(
                self.key.as_str(),
                || async { self.needs_run(*client.lock().await).await },
                |lock| async move { self.apply(*client.lock().await, &lock).await },
            )
            .await
    }
}

async fn set_token(client: &Client, token: Option<u64>) -> Result<(), tokio_postgres::Error> {
    let value = token.map(|t| t.to_string()).unwrap_or_default();
    client
        .execute(
            "SELECT set_config($1, $2, false)",
            &[&crate::PG_TOKEN_SETTING, &value],
        )
        .await
        .map(drop)
}

/// Whether refinery failed because its history table does not exist yet.
fn is_undefined_table(error: &::refinery::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if let Some(pg) = error.downcast_ref::<tokio_postgres::Error>() {
            return pg.code() == Some(&SqlState::UNDEFINED_TABLE);
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(name: &str, sql: &str) -> Migration {
        Migration::unapplied(name, sql).unwrap()
    }

    fn guarded() -> GuardedRunner {
        GuardedRunner::new(Runner::new(&[
            migration("V1__a", "CREATE TABLE a (x INT)"),
            migration("V2__b", "CREATE TABLE b (x INT)"),
        ]))
    }

    fn applied(m: Migration) -> Migration {
        let mut m = m;
        m.set_applied();
        m
    }

    #[test]
    fn pending_and_troubled_states() {
        let g = guarded();
        assert_eq!(g.split(&[]), (vec![1, 2], false));
        let first = applied(migration("V1__a", "CREATE TABLE a (x INT)"));
        assert_eq!(g.split(std::slice::from_ref(&first)), (vec![2], false));
        let second = applied(migration("V2__b", "CREATE TABLE b (x INT)"));
        assert_eq!(g.split(&[first.clone(), second]), (vec![], false));
        // A modified migration, or one the runner lacks: the runner must run to report it.
        let modified = applied(migration("V2__b", "CREATE TABLE b (y INT)"));
        assert_eq!(g.split(&[first.clone(), modified]), (vec![], true));
        let unknown = applied(migration("V9__z", "SELECT 1"));
        assert_eq!(g.split(&[first, unknown]), (vec![2], true));
        assert_eq!(g.lock_key().as_str(), DEFAULT_KEY);
        assert!(format!("{g:?}").contains("V1__a"));
    }

    /// Compiles only if the futures can move between threads (`tokio::spawn`).
    #[allow(dead_code)]
    fn futures_are_send(g: &GuardedRunner, locker: &Locker, client: &mut Client) {
        fn send<T: Send>(_: T) {}
        send(g.run(locker, client));
    }
}
