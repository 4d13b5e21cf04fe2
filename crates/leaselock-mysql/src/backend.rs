//! The two [`leaselock::LockBackend`] implementations and what they share.

mod get_lock;
mod table;

use std::ops::DerefMut;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use leaselock::{Error, LockKey, OwnerId, Result};
use mysql_async::prelude::{FromRow, Queryable};
use mysql_async::{Conn, Params, Pool, Row};

pub use get_lock::MysqlGetLockBackend;
pub use table::MysqlTableBackend;

use crate::config::Checked;
use crate::error::ErrorContext;

/// The server's clock as microseconds since the Unix epoch, in UTC whatever the session's time
/// zone (`UTC_TIMESTAMP(6)` is constant within one statement).
pub(crate) const NOW_US: &str =
    "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))";

/// A `DATETIME(6)` column holding UTC, as microseconds since the Unix epoch.
pub(crate) fn us_of(column: &str) -> String {
    format!("TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {column})")
}

/// Microseconds since the Unix epoch as a `SystemTime` (negative values clamp to the epoch).
pub(crate) fn system_time(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// A duration in whole microseconds, for `INTERVAL ? MICROSECOND`.
pub(crate) fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// How long a connection may wait in [`Shared::hot_conn`]'s slot: long enough for an
/// acquisition and the release of short work after it, short enough that no connection sits
/// there idle where a server or proxy timeout could close it unseen.
const HOT_IDLE: Duration = Duration::from_secs(1);

/// How long [`Shared::shutdown`] waits for the pool to disconnect: the pool waits for every
/// connection still out of it, and a release watcher's stays out for its server-side `GET_LOCK`
/// wait (`release_wait`, 1 s by default); a program that is about to exit must not wait longer.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// What every backend instance owns: its own pool, and how to describe errors.
pub(crate) struct Shared {
    pub(crate) pool: Pool,
    pub(crate) ctx: ErrorContext,
    pub(crate) checked: Checked,
    /// The connection the last lease operation used and gave back, and when.
    hot: std::sync::Mutex<Option<(Conn, std::time::Instant)>>,
}

/// A connection for one lease operation (see [`Shared::hot_conn`]). Dereferences to the
/// driver's [`Conn`].
pub(crate) struct HotConn<'a> {
    shared: &'a Shared,
    conn: Option<Conn>,
    keep: bool,
    /// Came from the slot and has not answered since: it may have ended on the server.
    unproven: bool,
}

/// `ER_CONNECTION_KILLED` (MariaDB) and `ER_CLIENT_INTERACTION_TIMEOUT` (MySQL 8): what a
/// connection ended on the server answers its next statement with.
const ENDED_ON_THE_SERVER: [u16; 2] = [1927, 4031];

impl HotConn<'_> {
    /// The operation's statements all succeeded: the connection may serve the next one.
    pub(crate) fn keep(&mut self) {
        self.keep = true;
    }

    /// Runs the operation's first statement. On the kept connection, a statement that finds
    /// it ended (killed, or the server restarted, since the last operation) runs once more on
    /// a connection from the pool, whose check would have caught that: a statement sent on a
    /// connection the server had already closed never ran.
    pub(crate) async fn exec_drop(&mut self, sql: &str, params: impl Into<Params>) -> Result<()> {
        self.first_statement(sql, params.into(), false)
            .await
            .map(drop)
    }

    /// [`HotConn::exec_drop`] for a statement that returns a row.
    pub(crate) async fn exec_first<T: FromRow>(
        &mut self,
        sql: &str,
        params: impl Into<Params>,
    ) -> Result<Option<T>> {
        let row = self.first_statement(sql, params.into(), true).await?;
        row.map(|row| self.shared.decode(row)).transpose()
    }

    /// Runs `sql` (reading its first row if `row`), once more on a pool connection when the
    /// kept one had ended.
    async fn first_statement(
        &mut self,
        sql: &str,
        params: Params,
        row: bool,
    ) -> Result<Option<Row>> {
        let outcome = match statement(self.deref_mut(), sql, params.clone(), row).await {
            Err(e) if self.unproven && ended(&e) => {
                tracing::debug!(error = %e, "kept MySQL connection had ended; using the pool's");
                self.conn = Some(self.shared.conn().await?);
                statement(self.deref_mut(), sql, params, row).await
            }
            outcome => outcome,
        };
        self.unproven = false;
        outcome.map_err(|e| self.shared.err(e))
    }
}

/// One statement on `conn`, and its first row if `row`.
async fn statement(
    conn: &mut Conn,
    sql: &str,
    params: Params,
    row: bool,
) -> mysql_async::Result<Option<Row>> {
    match row {
        true => conn.exec_first(sql, params).await,
        false => conn.exec_drop(sql, params).await.map(|()| None),
    }
}

/// Whether `e` says the connection is gone (rather than that the statement failed).
pub(crate) fn ended(e: &mysql_async::Error) -> bool {
    match e {
        mysql_async::Error::Server(e) => ENDED_ON_THE_SERVER.contains(&e.code),
        e => e.is_fatal(),
    }
}

impl std::ops::Deref for HotConn<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for HotConn<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("present until dropped")
    }
}

impl Drop for HotConn<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if self.keep {
            self.shared.give_back(conn);
        }
        // Failed, or cancelled mid-statement: back to the pool, whose recycler cleans up or
        // discards it.
    }
}

impl Shared {
    pub(crate) fn new(backend: &'static str, checked: Checked) -> Self {
        #[cfg(feature = "tls")]
        {
            // rustls needs a process-wide crypto provider when several are compiled in (another
            // crate may enable aws-lc-rs); use ring unless the application chose one.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let ctx = ErrorContext {
            backend,
            table: checked.table.as_str().to_owned(),
            server: checked.server.clone(),
        };
        Self {
            // `Pool::new` starts nothing: connections are made on first use. Pooled connections
            // carry no session state of ours (a connection holding a `GET_LOCK` lock is taken out
            // of the pool, and is reset if it ever goes back), so they are not reset on return:
            // that would cost a round trip and drop the prepared statements, which then cost
            // another. An application's own `reset_connection` choice has no say here.
            pool: Pool::new(
                mysql_async::OptsBuilder::from_opts(checked.opts.clone()).pool_opts(
                    checked
                        .opts
                        .pool_opts()
                        .clone()
                        .with_reset_connection(false),
                ),
            ),
            ctx,
            checked,
            hot: std::sync::Mutex::new(None),
        }
    }

    /// [`leaselock::LockBackend::shutdown`]: closes the kept connection and disconnects the
    /// pool, waiting at most [`SHUTDOWN_TIMEOUT`] for connections still taken from it (a held
    /// `GET_LOCK` lock's, a waiter's) to come back.
    pub(crate) async fn shutdown(&self) {
        let hot = self.hot.lock().unwrap_or_else(|p| p.into_inner()).take();
        let pool = self.pool.clone();
        let close = async move {
            if let Some((conn, _)) = hot {
                let _ = conn.disconnect().await;
            }
            pool.disconnect().await
        };
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, close).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %self.ctx.convert(e), "MySQL pool disconnect failed")
            }
            Err(_) => {
                tracing::debug!("MySQL pool disconnect did not finish within {SHUTDOWN_TIMEOUT:?}")
            }
        }
    }

    pub(crate) async fn conn(&self) -> Result<Conn> {
        self.pool.get_conn().await.map_err(|e| self.ctx.convert(e))
    }

    /// A connection for one lease operation: the one the last operation gave back, if that was
    /// under [`HOT_IDLE`] ago, else one from the pool. mysql_async hands every connection
    /// dropped back to its pool through the pool's recycler task, a wake-up of another task
    /// (often on another thread) per statement; an acquisition and its release back to back
    /// skip it. Run the first statement with [`HotConn::exec_drop`] or [`HotConn::exec_first`]
    /// (which move to a pool connection when the kept one has ended meanwhile), and call
    /// [`HotConn::keep`] once the statements succeeded; a connection not kept goes back to the
    /// pool.
    pub(crate) async fn hot_conn(&self) -> Result<HotConn<'_>> {
        let (conn, unproven) = self.kept_or_pool().await?;
        Ok(HotConn {
            shared: self,
            conn: Some(conn),
            keep: false,
            unproven,
        })
    }

    /// The connection the last operation gave back, if that was under [`HOT_IDLE`] ago (one
    /// given back longer ago goes to the pool), and `true`: it may have ended on the server
    /// since. Else one from the pool, and `false`.
    pub(crate) async fn kept_or_pool(&self) -> Result<(Conn, bool)> {
        let cached = self.hot.lock().unwrap_or_else(|p| p.into_inner()).take();
        match cached {
            Some((conn, since)) if since.elapsed() < HOT_IDLE => Ok((conn, true)),
            _ => Ok((self.conn().await?, false)),
        }
    }

    /// Keeps `conn`, which holds no session state of ours and answered its last statement, for
    /// the next operation (see [`Shared::hot_conn`]); to the pool when one is kept already.
    pub(crate) fn give_back(&self, conn: Conn) {
        let mut hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
        if hot.is_none() {
            *hot = Some((conn, std::time::Instant::now()));
        }
    }

    pub(crate) fn err(&self, e: mysql_async::Error) -> Error {
        self.ctx.convert(e)
    }

    /// Decodes a row without the driver's panicking conversion: a table whose columns have
    /// unexpected types is an error, never a panic.
    pub(crate) fn decode<T: FromRow>(&self, row: Row) -> Result<T> {
        mysql_async::from_row_opt(row)
            .map_err(|_| self.corrupt("a row has unexpected column types"))
    }

    /// The first row of a prepared statement, decoded.
    pub(crate) async fn first<T: FromRow>(
        &self,
        conn: &mut Conn,
        sql: &str,
        params: impl Into<Params> + Send,
    ) -> Result<Option<T>> {
        let row: Option<Row> = conn
            .exec_first(sql, params)
            .await
            .map_err(|e| self.err(e))?;
        row.map(|row| self.decode(row)).transpose()
    }

    /// Every row of a prepared statement, decoded.
    pub(crate) async fn all<T: FromRow>(
        &self,
        conn: &mut Conn,
        sql: &str,
        params: impl Into<Params> + Send,
    ) -> Result<Vec<T>> {
        let rows: Vec<Row> = conn.exec(sql, params).await.map_err(|e| self.err(e))?;
        rows.into_iter().map(|row| self.decode(row)).collect()
    }

    /// Runs a prepared statement that returns no rows; returns the affected rows.
    pub(crate) async fn run(
        &self,
        conn: &mut Conn,
        sql: &str,
        params: impl Into<Params> + Send,
    ) -> Result<u64> {
        conn.exec_drop(sql, params).await.map_err(|e| self.err(e))?;
        Ok(conn.affected_rows())
    }

    /// Maps a storage check failure: a missing table or column is `NotInitialized`, refused
    /// credentials or privileges `Denied`, and everything else `NotAccessible` when it may heal
    /// (connection, read-only server, ...), else a permanent backend error naming the table.
    pub(crate) fn check_error(&self, e: mysql_async::Error) -> Error {
        match self.ctx.convert(e) {
            err @ (Error::NotInitialized { .. }
            | Error::NotAccessible { .. }
            | Error::Denied { .. }) => err,
            other => {
                let what = format!(
                    "table `{}` in {} cannot be used: {other}",
                    self.ctx.table, self.ctx.server
                );
                if other.is_retryable() {
                    Error::not_accessible(self.ctx.backend, what, Some(Box::new(other)))
                } else {
                    Error::permanent(self.ctx.backend, what)
                }
            }
        }
    }

    pub(crate) fn corrupt(&self, what: impl Into<String>) -> Error {
        Error::permanent(
            self.ctx.backend,
            format!("table `{}`: {}", self.ctx.table, what.into()),
        )
    }

    /// A key read back from the table.
    pub(crate) fn key_from(&self, bytes: Vec<u8>) -> Result<LockKey> {
        String::from_utf8(bytes)
            .map_err(|_| self.corrupt("a lock key is not UTF-8"))
            .and_then(|key| LockKey::new(key).map_err(|e| self.corrupt(e.to_string())))
    }

    /// An owner read back from the table.
    pub(crate) fn owner_from(&self, bytes: Vec<u8>) -> Result<OwnerId> {
        String::from_utf8(bytes)
            .map_err(|_| self.corrupt("an owner is not UTF-8"))
            .and_then(|owner| OwnerId::new(owner).map_err(|e| self.corrupt(e.to_string())))
    }

    pub(crate) fn describe(&self, f: &mut std::fmt::Formatter<'_>, name: &str) -> std::fmt::Result {
        f.debug_struct(name)
            .field("server", &self.ctx.server)
            .field("table", &self.checked.table)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(system_time(-5), UNIX_EPOCH);
        assert_eq!(
            system_time(1_500_000),
            UNIX_EPOCH + Duration::from_millis(1500)
        );
        assert_eq!(micros(Duration::from_millis(3)), 3000);
        assert_eq!(micros(Duration::MAX), u64::MAX);
    }
}
