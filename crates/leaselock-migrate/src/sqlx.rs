//! sqlx migrations ([`Migrator`]) under a leaselock lock, on PostgreSQL and MySQL/MariaDB.
//!
//! [`GuardedMigrator`] turns sqlx's own lock off (its PostgreSQL advisory lock waits forever and
//! is skipped on early errors; its SQLite lock does nothing) and holds a leaselock lock instead,
//! with run-if-needed: when every migration is already applied, it returns without taking the
//! lock.
//!
//! ```no_run
//! use std::time::Duration;
//! use leaselock::{Locker, WaitPolicy};
//! use leaselock_migrate::{sqlx::GuardedMigrator, RunIfNeeded};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://app@db/app").await?;
//! let locker = Locker::builder(leaselock_postgres::from_url("postgres://app@db/app").await?)
//!     .wait(WaitPolicy::until(Duration::from_secs(300), Duration::from_secs(1)))
//!     .build()?;
//! let migrator = sqlx::migrate::Migrator::new(std::path::Path::new("./migrations")).await?;
//!
//! match GuardedMigrator::new(migrator).run(&locker, &pool).await? {
//!     RunIfNeeded::Ran(applied) => println!("applied {:?} with token {}", applied.versions, applied.token),
//!     RunIfNeeded::NotNeeded => println!("up to date; the lock was not taken"),
//!     other => println!("{other:?}"),
//! }
//! # Ok(()) }
//! ```
//!
//! While the migrations run, the lock's fencing token is a setting of the connection they run
//! on, for migrations that guard their own writes with it: on PostgreSQL
//! `current_setting('leaselock.fencing_token')` ([`crate::PG_TOKEN_SETTING`]), on MySQL/MariaDB
//! `@leaselock_fencing_token` ([`crate::MYSQL_TOKEN_VARIABLE`]). Rust code gets the whole
//! [`LockContext`] by composing [`GuardedMigrator::needs_run`] and [`GuardedMigrator::apply`]
//! with [`Locker::run_if_needed`] itself (see [`GuardedMigrator::apply`]).

use std::collections::HashMap;
use std::future::Future;

use ::sqlx::migrate::{AppliedMigration, Migrate, MigrateError, Migrator};
use ::sqlx::{MySql, MySqlConnection, PgConnection, Pool, Postgres};
use leaselock::{LockContext, LockKey, Locker, RunIfNeeded};

use crate::{Applied, Result};
use private::State;

/// The lock key [`GuardedMigrator`] uses unless told otherwise.
pub const DEFAULT_KEY: &str = "leaselock-migrate/sqlx";

/// A database whose sqlx migrations [`GuardedMigrator`] can guard: [`Postgres`] and [`MySql`]
/// (MySQL and MariaDB). Sealed.
pub trait Database: ::sqlx::Database + private::Ops {}

impl Database for Postgres {}
impl Database for MySql {}

mod private {
    use super::*;

    /// The migration table as read without the lock.
    #[derive(Debug)]
    pub struct State {
        pub(super) dirty: Option<i64>,
        pub(super) applied: Vec<AppliedMigration>,
    }

    /// The few statements that differ between databases. In a private module: callers cannot
    /// name it, so they cannot implement it or call its methods.
    pub trait Ops: ::sqlx::Database {
        /// The dirty version and the applied migrations; `None` when sqlx's table does not exist
        /// yet (reading creates nothing, so it is safe without the lock).
        fn state(
            conn: &mut Self::Connection,
        ) -> impl Future<Output = Result<Option<State>, MigrateError>> + Send;

        /// Sets (or with `None` clears) the fencing-token setting of the session.
        fn set_token(
            conn: &mut Self::Connection,
            token: Option<u64>,
        ) -> impl Future<Output = Result<(), ::sqlx::Error>> + Send;

        /// Runs the migrator on this connection.
        fn migrate(
            migrator: &Migrator,
            conn: &mut Self::Connection,
        ) -> impl Future<Output = Result<(), MigrateError>> + Send;
    }

    impl Ops for Postgres {
        async fn state(conn: &mut PgConnection) -> Result<Option<State>, MigrateError> {
            // The same unqualified name sqlx uses, resolved through the search path.
            let exists: bool =
                ::sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                    .fetch_one(&mut *conn)
                    .await?;
            read_state(conn, exists).await
        }

        async fn set_token(
            conn: &mut PgConnection,
            token: Option<u64>,
        ) -> Result<(), ::sqlx::Error> {
            let value = token.map(|t| t.to_string()).unwrap_or_default();
            ::sqlx::query("SELECT set_config($1, $2, false)")
                .bind(crate::PG_TOKEN_SETTING)
                .bind(value)
                .execute(conn)
                .await
                .map(drop)
        }

        async fn migrate(migrator: &Migrator, conn: &mut PgConnection) -> Result<(), MigrateError> {
            run_direct(migrator, conn).await
        }
    }

    impl Ops for MySql {
        async fn state(conn: &mut MySqlConnection) -> Result<Option<State>, MigrateError> {
            let found: i64 = ::sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = DATABASE() AND table_name = '_sqlx_migrations'",
            )
            .fetch_one(&mut *conn)
            .await?;
            read_state(conn, found > 0).await
        }

        async fn set_token(
            conn: &mut MySqlConnection,
            token: Option<u64>,
        ) -> Result<(), ::sqlx::Error> {
            ::sqlx::query("SET @leaselock_fencing_token = ?")
                .bind(token)
                .execute(conn)
                .await
                .map(drop)
        }

        async fn migrate(
            migrator: &Migrator,
            conn: &mut MySqlConnection,
        ) -> Result<(), MigrateError> {
            run_direct(migrator, conn).await
        }
    }

    /// `Migrator::run` on one connection. Through `run` itself (generic over `Acquire`), the
    /// compiler cannot prove the future `Send` ("implementation of `Acquire` is not general
    /// enough", a known sqlx limitation); `run_direct` is the public (if undocumented) method
    /// sqlx provides for exactly this, and `run` does nothing more than acquire and call it.
    async fn run_direct<C: Migrate + Send>(
        migrator: &Migrator,
        conn: &mut C,
    ) -> Result<(), MigrateError> {
        migrator.run_direct(conn).await
    }

    async fn read_state<C: Migrate + Send>(
        conn: &mut C,
        exists: bool,
    ) -> Result<Option<State>, MigrateError> {
        if !exists {
            return Ok(None);
        }
        let dirty = conn.dirty_version().await?;
        let applied = conn.list_applied_migrations().await?;
        Ok(Some(State { dirty, applied }))
    }
}

/// A sqlx [`Migrator`] that runs under a leaselock lock, only when something is pending.
///
/// Its own locking is turned off ([`Migrator::set_locking`]); the lock on [`DEFAULT_KEY`] (or
/// [`GuardedMigrator::key`]) replaces it. Give the [`Locker`] a waiting policy
/// ([`leaselock::WaitPolicy::until`]) so that instances starting together wait for the one
/// migrating instead of failing with [`leaselock::Error::Held`].
#[derive(Debug)]
pub struct GuardedMigrator {
    migrator: Migrator,
    key: LockKey,
}

impl GuardedMigrator {
    /// Guards `migrator` (from `sqlx::migrate!()` or [`Migrator::new`]), turning its own locking
    /// off.
    pub fn new(mut migrator: Migrator) -> Self {
        migrator.set_locking(false);
        Self {
            migrator,
            key: LockKey::new(DEFAULT_KEY).expect("the default key is valid"),
        }
    }

    /// The lock key. Default: [`DEFAULT_KEY`]. Set one that names the database when several
    /// databases share one lock store, so their migrations do not wait for each other.
    ///
    /// ```
    /// # fn f(migrator: sqlx::migrate::Migrator) -> leaselock_migrate::Result<()> {
    /// let guarded = leaselock_migrate::sqlx::GuardedMigrator::new(migrator).key("migrations/billing")?;
    /// # Ok(()) }
    /// ```
    pub fn key(mut self, key: impl AsRef<str>) -> Result<Self> {
        self.key = LockKey::new(key.as_ref())?;
        Ok(self)
    }

    /// The lock key in use.
    pub fn lock_key(&self) -> &LockKey {
        &self.key
    }

    /// The guarded migrator (with its locking off).
    pub fn migrator(&self) -> &Migrator {
        &self.migrator
    }

    /// The versions of the migrations in the source that the database has not applied yet, in
    /// order. Reads without the lock and creates nothing: a database without sqlx's table has
    /// every migration pending.
    pub async fn pending<DB: Database>(&self, pool: &Pool<DB>) -> Result<Vec<i64>> {
        let mut conn = pool.acquire().await?;
        let state = DB::state(&mut conn).await?;
        Ok(self.split(state.as_ref()).0)
    }

    /// Whether running the migrator may do anything: something is pending, or the table is in
    /// a state sqlx reports as an error (a dirty or modified migration, one missing from the
    /// source). Reads without the lock; this is the check of [`Locker::run_if_needed`].
    pub async fn needs_run<DB: Database>(&self, pool: &Pool<DB>) -> Result<bool> {
        let mut conn = pool.acquire().await?;
        let state = DB::state(&mut conn).await?;
        let (pending, troubled) = self.split(state.as_ref());
        Ok(!pending.is_empty() || troubled)
    }

    /// Pending versions, and whether the table is in a state the migrator would report (the
    /// lock is then taken, so that sqlx itself reports it).
    fn split(&self, state: Option<&State>) -> (Vec<i64>, bool) {
        let ups = self
            .migrator
            .iter()
            .filter(|m| !m.migration_type.is_down_migration());
        let Some(state) = state else {
            return (ups.map(|m| m.version).collect(), false);
        };
        let applied: HashMap<i64, &AppliedMigration> =
            state.applied.iter().map(|m| (m.version, m)).collect();
        let mut troubled = state.dirty.is_some();
        let mut pending = Vec::new();
        for migration in ups {
            match applied.get(&migration.version) {
                None => pending.push(migration.version),
                Some(done) => troubled |= done.checksum != migration.checksum,
            }
        }
        if !self.migrator.ignore_missing {
            troubled |= state
                .applied
                .iter()
                .any(|done| !self.migrator.version_exists(done.version));
        }
        (pending, troubled)
    }

    /// Applies the pending migrations on one connection from `pool`, under the lock that `lock`
    /// describes: sets the fencing-token setting ([`crate::PG_TOKEN_SETTING`],
    /// [`crate::MYSQL_TOKEN_VARIABLE`]), checks that the lock is still held, runs the migrator,
    /// and clears the setting again (a connection whose setting cannot be cleared is closed
    /// instead of going back to the pool). Returns what it applied.
    ///
    /// [`GuardedMigrator::run`] calls it; call it yourself to do more under the same lock:
    ///
    /// ```no_run
    /// # async fn f(locker: leaselock::Locker, pool: sqlx::PgPool, migrator: sqlx::migrate::Migrator) -> leaselock_migrate::Result<()> {
    /// let guarded = &leaselock_migrate::sqlx::GuardedMigrator::new(migrator);
    /// let pool = &pool;
    /// let outcome = locker
    ///     .run_if_needed(
    ///         guarded.lock_key().as_str(),
    ///         || guarded.needs_run(pool),
    ///         |lock| async move {
    ///             println!("migrating with fencing token {}", lock.token());
    ///             guarded.apply(pool, &lock).await
    ///         },
    ///     )
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn apply<DB: Database>(
        &self,
        pool: &Pool<DB>,
        lock: &LockContext,
    ) -> Result<Applied> {
        let mut conn = pool.acquire().await?;
        let state = DB::state(&mut conn).await?;
        let (versions, _) = self.split(state.as_ref());
        DB::set_token(&mut conn, Some(lock.token().get())).await?;
        lock.ensure_held().await?;
        tracing::info!(key = %self.key, token = %lock.token(), pending = ?versions, "running sqlx migrations");
        let outcome = DB::migrate(&self.migrator, &mut conn).await;
        if let Err(error) = DB::set_token(&mut conn, None).await {
            tracing::warn!(%error, "could not clear the fencing-token setting; closing the connection");
            let _ = conn.close().await;
        }
        outcome?;
        Ok(Applied {
            versions,
            token: lock.token(),
        })
    }

    /// Applies pending migrations with run-if-needed: when nothing is pending, returns
    /// [`RunIfNeeded::NotNeeded`] without taking the lock; otherwise acquires it (waiting as the
    /// locker is configured), checks again, and runs the migrator ([`RunIfNeeded::Ran`] with
    /// what it applied, or [`RunIfNeeded::NotNeededOnceLocked`] when another instance applied
    /// everything meanwhile). The lock is always released.
    pub async fn run<DB: Database>(
        &self,
        locker: &Locker,
        pool: &Pool<DB>,
    ) -> Result<RunIfNeeded<Applied>> {
        locker
            .run_if_needed(
                self.key.as_str(),
                || self.needs_run(pool),
                |lock| async move { self.apply(pool, &lock).await },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use ::sqlx::migrate::{Migration, MigrationType};

    use super::*;

    fn migration(version: i64, kind: MigrationType, sql: &'static str) -> Migration {
        Migration::new(version, Cow::Borrowed("m"), kind, Cow::Borrowed(sql), false)
    }

    fn guarded() -> GuardedMigrator {
        let mut migrator = Migrator::DEFAULT;
        migrator.migrations = Cow::Owned(vec![
            migration(1, MigrationType::ReversibleUp, "CREATE TABLE a (x INT)"),
            migration(1, MigrationType::ReversibleDown, "DROP TABLE a"),
            migration(2, MigrationType::ReversibleUp, "CREATE TABLE b (x INT)"),
            migration(2, MigrationType::ReversibleDown, "DROP TABLE b"),
        ]);
        GuardedMigrator::new(migrator)
    }

    fn applied(g: &GuardedMigrator, version: i64) -> AppliedMigration {
        let m = g
            .migrator
            .iter()
            .find(|m| m.version == version && !m.migration_type.is_down_migration())
            .unwrap();
        AppliedMigration {
            version,
            checksum: m.checksum.clone(),
        }
    }

    #[test]
    fn locking_is_off_and_keys_are_validated() {
        let g = guarded();
        assert!(!g.migrator().locking);
        assert_eq!(g.lock_key().as_str(), DEFAULT_KEY);
        assert!(matches!(
            guarded().key(""),
            Err(crate::Error::Lock(leaselock::Error::InvalidInput {
                field: "key",
                ..
            }))
        ));
    }

    #[test]
    fn pending_and_troubled_states() {
        let g = guarded();
        // No table: every up migration is pending; down migrations never are.
        assert_eq!(g.split(None), (vec![1, 2], false));
        let state = |dirty, applied| State { dirty, applied };
        assert_eq!(
            g.split(Some(&state(None, vec![applied(&g, 1)]))),
            (vec![2], false)
        );
        let done = vec![applied(&g, 1), applied(&g, 2)];
        assert_eq!(g.split(Some(&state(None, done.clone()))), (vec![], false));
        // Dirty, modified or unknown migrations: nothing pending, but the migrator must run to
        // report them.
        assert_eq!(g.split(Some(&state(Some(2), done.clone()))), (vec![], true));
        let mut modified = done.clone();
        modified[1].checksum = Cow::Owned(vec![0; 4]);
        assert_eq!(g.split(Some(&state(None, modified))), (vec![], true));
        let mut unknown = done.clone();
        unknown.push(AppliedMigration {
            version: 3,
            checksum: Cow::Owned(vec![1]),
        });
        assert_eq!(g.split(Some(&state(None, unknown.clone()))), (vec![], true));
        let mut lenient = guarded();
        lenient.migrator.set_ignore_missing(true);
        assert_eq!(lenient.split(Some(&state(None, unknown))), (vec![], false));
    }

    /// Compiles only if the futures can move between threads (`tokio::spawn`).
    #[allow(dead_code)]
    fn futures_are_send(
        g: &GuardedMigrator,
        locker: &Locker,
        pg: &::sqlx::PgPool,
        my: &::sqlx::MySqlPool,
        lock: &LockContext,
    ) {
        fn send<T: Send>(_: T) {}
        send(g.run(locker, pg));
        send(g.run(locker, my));
        send(g.pending(pg));
        send(g.needs_run(my));
        send(g.apply(pg, lock));
    }
}
