//! The lease table: one row per key, expiry decided by the server's clock.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use leaselock::{
    AcquireOutcome, AcquireRequest, Capabilities, Error, ExpiryClock, FencingToken, Lease,
    LockBackend, LockInfo, LockKey, LockKind, LockState, Result, Wakeup,
};
use mysql_async::prelude::*;

use super::{micros, system_time, us_of, Shared, NOW_US};
use crate::config::{MysqlConfig, Strategy};

const NAME: &str = "mysql-table";

/// How many leases one batched refresh statement names: always this many placeholders (the last
/// lease repeated to fill them), so one prepared statement serves every batch.
const REFRESH_CHUNK: usize = 50;

/// The expiry of a lock without expiry: the largest `DATETIME(6)`.
const NEVER: &str = "CAST('9999-12-31 23:59:59.999999' AS DATETIME(6))";
/// [`NEVER`] in microseconds since the Unix epoch, as read back.
const NEVER_US: i64 = 253_402_300_799_999_999;

/// Leases in a table, expiring by the database server's clock (`UTC_TIMESTAMP(6)`, so the
/// session's time zone never matters).
///
/// One row per key that is never deleted: `lock_key VARBINARY(255)` (exact bytes: keys that differ
/// only in case, accents or trailing spaces stay distinct), the fencing counter `token`, and the
/// holder (`owner`, `acquired_at`, `expires_at` as UTC `DATETIME(6)`), which release, force release
/// and cleanup set to `NULL`. An acquisition is one `INSERT ... ON DUPLICATE KEY UPDATE` that takes
/// the row only if it is free or expired; the new token comes back in the same round trip through
/// `LAST_INSERT_ID(expr)`. Locks are not reentrant: a key held by anyone, the same owner included,
/// is [`AcquireOutcome::Held`].
///
/// The times of a returned [`Lease`] are this process's estimate (the clock at sending plus the
/// lease duration); [`LockBackend::status`] reports the server's.
///
/// A lock without expiry stores the largest `DATETIME(6)`, `9999-12-31 23:59:59.999999`, as its
/// expiry (`NULL` means free here), which no comparison with the clock ever passes; it is reported
/// without expiry.
///
/// No notifications: waiters poll, and a holder learns of a loss at its next refresh (or its local
/// deadline). Works through proxies and poolers that do not keep sessions.
///
/// A [`leaselock::Locker`] (by default: see its refresh batch window) refreshes the leases that fall due together 50 to a statement
/// (`UPDATE … WHERE (lock_key, owner, token) IN (…)`; [`LockBackend::refresh_many`]); when a
/// statement finds one of them lost, its leases are refreshed one by one to tell which.
///
/// ```no_run
/// # async fn f() -> leaselock::Result<()> {
/// use leaselock::{LockBackend, Locker};
/// use leaselock_mysql::{MysqlConfig, MysqlTableBackend};
/// let config = MysqlConfig::from_url("mysql://app:secret@127.0.0.1:3306/app")?.table("app_locks");
/// let backend = MysqlTableBackend::new(config)?;
/// backend.init_storage().await?;
/// let locker = Locker::builder(backend).build()?;
/// let guard = locker.acquire("nightly-report").await?.expect("acquired");
/// println!("fencing token {}", guard.token());
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MysqlTableBackend {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Shared,
    sql: Sql,
}

struct Sql {
    create: String,
    check: String,
    acquire: String,
    refresh: String,
    /// [`REFRESH_CHUNK`] leases of one duration at once (see [`LockBackend::refresh_many`]).
    refresh_chunk: String,
    verify: String,
    release: String,
    status: String,
    list: String,
    list_with_expired: String,
    force: String,
    release_expired: String,
}

impl Sql {
    fn new(table: &str) -> Self {
        let now = "UTC_TIMESTAMP(6)";
        let free = format!("(expires_at IS NULL OR expires_at <= {now})");
        let holder_columns = format!(
            "owner, token, {}, {}, {NOW_US}",
            us_of("acquired_at"),
            us_of("expires_at")
        );
        Self {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {table} (\
                 lock_key VARBINARY(255) NOT NULL, \
                 token BIGINT UNSIGNED NOT NULL, \
                 owner VARBINARY(255) NULL, \
                 acquired_at DATETIME(6) NULL, \
                 expires_at DATETIME(6) NULL, \
                 PRIMARY KEY (lock_key)\
                 ) ENGINE=InnoDB"
            ),
            // Checks in one statement that the table and every column exist, that we may read
            // and update them, and that the server is not read-only; changes nothing.
            check: format!(
                "UPDATE {table} SET lock_key = lock_key, token = token, owner = owner, \
                 acquired_at = acquired_at, expires_at = expires_at WHERE 1 = 0"
            ),
            // The assignments run left to right and later ones see earlier results, so every
            // condition reads `expires_at`, assigned last. A new row gets token 1 (affected rows
            // 1, no insert id); a taken-over row gets LAST_INSERT_ID(token + 1) (affected rows 2);
            // a held row is left as it is (affected rows 0).
            acquire: format!(
                "INSERT INTO {table} (lock_key, token, owner, acquired_at, expires_at) \
                 VALUES (?, 1, ?, {now}, COALESCE({now} + INTERVAL ? MICROSECOND, {NEVER})) \
                 ON DUPLICATE KEY UPDATE \
                 token = IF({free}, LAST_INSERT_ID(token + 1), token), \
                 owner = IF({free}, ?, owner), \
                 acquired_at = IF({free}, {now}, acquired_at), \
                 expires_at = IF({free}, COALESCE({now} + INTERVAL ? MICROSECOND, {NEVER}), expires_at)"
            ),
            refresh: format!(
                "UPDATE {table} SET expires_at = {now} + INTERVAL ? MICROSECOND \
                 WHERE lock_key = ? AND owner = ? AND token = ? AND expires_at > {now}"
            ),
            refresh_chunk: {
                let keys = vec!["?"; REFRESH_CHUNK].join(", ");
                let leases = vec!["(?, ?, ?)"; REFRESH_CHUNK].join(", ");
                // The plain key list lets the server find the rows by the primary key.
                format!(
                    "UPDATE {table} SET expires_at = {now} + INTERVAL ? MICROSECOND \
                     WHERE lock_key IN ({keys}) AND (lock_key, owner, token) IN ({leases}) \
                     AND expires_at > {now}"
                )
            },
            verify: format!(
                "SELECT COUNT(*) FROM {table} \
                 WHERE lock_key = ? AND owner = ? AND token = ? AND expires_at > {now}"
            ),
            release: format!(
                "UPDATE {table} SET owner = NULL, acquired_at = NULL, expires_at = NULL \
                 WHERE lock_key = ? AND owner = ? AND token = ? AND expires_at > {now}"
            ),
            status: format!("SELECT {holder_columns} FROM {table} WHERE lock_key = ?"),
            list: format!(
                "SELECT lock_key, {holder_columns} FROM {table} \
                 WHERE owner IS NOT NULL AND expires_at > {now} ORDER BY lock_key"
            ),
            list_with_expired: format!(
                "SELECT lock_key, {holder_columns} FROM {table} \
                 WHERE owner IS NOT NULL ORDER BY lock_key"
            ),
            force: format!(
                "UPDATE {table} SET owner = NULL, acquired_at = NULL, expires_at = NULL \
                 WHERE lock_key = ? AND owner = ? AND token = ?"
            ),
            release_expired: format!(
                "UPDATE {table} SET owner = NULL, acquired_at = NULL, expires_at = NULL \
                 WHERE owner IS NOT NULL AND expires_at <= {now}"
            ),
        }
    }
}

/// A row's holder columns: owner, token, acquired_at, expires_at (µs), the server's now (µs).
type HolderRow = (Option<Vec<u8>>, u64, Option<i64>, Option<i64>, i64);

impl MysqlTableBackend {
    /// A backend over `config`'s server and table (its strategy is ignored). Validates the
    /// configuration; connects lazily, on first use. Call within a Tokio runtime.
    pub fn new(config: MysqlConfig) -> Result<Self> {
        let checked = config.check_for(Strategy::Table)?;
        let sql = Sql::new(&checked.table.backquoted());
        Ok(Self {
            inner: Arc::new(Inner {
                shared: Shared::new(NAME, checked),
                sql,
            }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The state described by a row's holder columns.
    fn state(&self, key: &LockKey, row: Option<HolderRow>) -> Result<LockState> {
        let Some((Some(owner), token, acquired, expires, now)) = row else {
            return Ok(LockState::Free);
        };
        let mut info = LockInfo::new(
            key.clone(),
            self.shared().owner_from(owner)?,
            FencingToken::new(token),
        );
        info.acquired_at = acquired.map(system_time);
        if expires == Some(NEVER_US) {
            return Ok(LockState::Held(info)); // a lock without expiry
        }
        info.expires_at = expires.map(system_time);
        let left = expires.map_or(0, |expires| expires.saturating_sub(now));
        info.remaining = Some(Duration::from_micros(u64::try_from(left).unwrap_or(0)));
        Ok(if left > 0 {
            LockState::Held(info)
        } else {
            LockState::Expired(info)
        })
    }
}

impl fmt::Debug for MysqlTableBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared().describe(f, "MysqlTableBackend")
    }
}

impl MysqlTableBackend {
    /// One batched refresh statement over `chunk` (at most [`REFRESH_CHUNK`] leases of duration
    /// `ttl`): whether it refreshed every one of them.
    async fn refresh_chunk(&self, ttl: Duration, chunk: &[&Lease]) -> Result<bool> {
        let shared = self.shared();
        let last = chunk.last().expect("a chunk is never empty");
        let padded = || {
            chunk
                .iter()
                .chain(std::iter::repeat(last))
                .take(REFRESH_CHUNK)
        };
        let mut params: Vec<mysql_async::Value> = Vec::with_capacity(1 + 4 * REFRESH_CHUNK);
        params.push(micros(ttl).into());
        params.extend(padded().map(|lease| lease.key.as_str().into()));
        for lease in padded() {
            params.push(lease.key.as_str().into());
            params.push(lease.owner.as_str().into());
            params.push(lease.token.get().into());
        }
        let distinct: std::collections::HashSet<(&str, &str, u64)> = chunk
            .iter()
            .map(|l| (l.key.as_str(), l.owner.as_str(), l.token.get()))
            .collect();
        let mut conn = shared.conn().await?;
        let changed = shared
            .run(&mut conn, &self.inner.sql.refresh_chunk, params)
            .await?;
        Ok(changed == distinct.len() as u64)
    }
}

#[async_trait]
impl LockBackend for MysqlTableBackend {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(NAME, LockKind::Lease, ExpiryClock::Database);
        caps.max_refresh_batch = 20 * REFRESH_CHUNK;
        caps
    }

    async fn init_storage(&self) -> Result<()> {
        let mut conn = self.shared().conn().await?;
        conn.query_drop(&self.inner.sql.create)
            .await
            .map_err(|e| self.shared().err(e))?;
        tracing::debug!(table = %self.shared().checked.table, "lease table ready");
        Ok(())
    }

    async fn check_storage(&self) -> Result<()> {
        let shared = self.shared();
        let mut conn = shared
            .pool
            .get_conn()
            .await
            .map_err(|e| shared.check_error(e))?;
        conn.query_drop(&self.inner.sql.check)
            .await
            .map_err(|e| shared.check_error(e))
    }

    async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome> {
        let shared = self.shared();
        let key = request.key().as_str();
        let owner = request.owner().as_str();
        // `NULL` for a lock without expiry, which then gets `NEVER`.
        let ttl = request.ttl().map(micros);
        let sent = SystemTime::now();
        let mut conn = shared.hot_conn().await?;
        conn.exec_drop(&self.inner.sql.acquire, (key, owner, ttl, owner, ttl))
            .await?;
        let token = match (conn.affected_rows(), conn.last_insert_id()) {
            (1, None) => 1,
            (2, Some(token)) => token,
            (0, _) => {
                let row: Option<HolderRow> = shared
                    .first(&mut conn, &self.inner.sql.status, (key,))
                    .await?;
                conn.keep();
                let holder = match self.state(request.key(), row)? {
                    LockState::Held(info) => Some(info),
                    // Released or expired since our attempt: the caller simply tries again.
                    LockState::Free | LockState::Expired(_) => None,
                };
                return Ok(AcquireOutcome::Held(holder));
            }
            (rows, id) => {
                return Err(shared.corrupt(format!(
                    "unexpected acquisition outcome ({rows} rows affected, insert id {id:?})"
                )))
            }
        };
        conn.keep();
        tracing::trace!(key, token, "lease acquired");
        let lease = Lease::new(
            request.key().clone(),
            request.owner().clone(),
            FencingToken::new(token),
            sent,
        );
        Ok(AcquireOutcome::Acquired(match request.ttl() {
            Some(ttl) => lease.with_expiry(sent + ttl, ttl),
            None => lease,
        }))
    }

    async fn refresh(&self, lease: &Lease) -> Result<Lease> {
        let shared = self.shared();
        let ttl = lease.ttl.ok_or_else(|| {
            Error::invalid("lease", "a lease without a duration cannot be refreshed")
        })?;
        let sent = SystemTime::now();
        let mut conn = shared.hot_conn().await?;
        let params = (
            micros(ttl),
            lease.key.as_str(),
            lease.owner.as_str(),
            lease.token.get(),
        );
        conn.exec_drop(&self.inner.sql.refresh, params).await?;
        if conn.affected_rows() == 1 {
            conn.keep();
            let mut fresh = lease.clone();
            fresh.expires_at = Some(sent + ttl);
            fresh.ttl = Some(ttl);
            return Ok(fresh);
        }
        // Lost: find out how, for the message (only on this rare path).
        let row: Option<HolderRow> = shared
            .first(&mut conn, &self.inner.sql.status, (lease.key.as_str(),))
            .await?;
        conn.keep();
        let reason = match self.state(&lease.key, row)? {
            LockState::Expired(info) if info.owner == lease.owner && info.token == lease.token => {
                "the lease expired before it was refreshed"
            }
            _ => "the lease was released, force-released or taken over",
        };
        Err(Error::lost(&lease.key, reason))
    }

    /// Leases of one duration, 50 to a statement. When a statement changes as many
    /// rows as it names leases, all of them were refreshed; otherwise (a lease was lost) each
    /// lease of that statement is refreshed on its own, which tells the lost ones apart.
    async fn refresh_many(&self, leases: &[Lease]) -> Vec<Result<Lease>> {
        leaselock::refresh_in_chunks(self, leases, REFRESH_CHUNK, |ttl, chunk| async move {
            self.refresh_chunk(ttl, &chunk).await
        })
        .await
    }

    async fn verify(&self, lease: &Lease) -> Result<bool> {
        let shared = self.shared();
        let mut conn = shared.hot_conn().await?;
        let params = (lease.key.as_str(), lease.owner.as_str(), lease.token.get());
        let count: Option<i64> = conn.exec_first(&self.inner.sql.verify, params).await?;
        conn.keep();
        Ok(count == Some(1))
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let shared = self.shared();
        let mut conn = shared.hot_conn().await?;
        let params = (lease.key.as_str(), lease.owner.as_str(), lease.token.get());
        conn.exec_drop(&self.inner.sql.release, params).await?;
        conn.keep();
        Ok(conn.affected_rows() == 1)
    }

    async fn status(&self, key: &LockKey) -> Result<LockState> {
        let shared = self.shared();
        let mut conn = shared.conn().await?;
        let row: Option<HolderRow> = shared
            .first(&mut conn, &self.inner.sql.status, (key.as_str(),))
            .await?;
        self.state(key, row)
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let shared = self.shared();
        let mut conn = shared.conn().await?;
        type ListRow = (Vec<u8>, Option<Vec<u8>>, u64, Option<i64>, Option<i64>, i64);
        let rows: Vec<ListRow> = shared.all(&mut conn, &self.inner.sql.list, ()).await?;
        let mut out = Vec::with_capacity(rows.len());
        for (key, owner, token, acquired, expires, now) in rows {
            let key = shared.key_from(key)?;
            let holder = (owner, token, acquired, expires, now);
            if let LockState::Held(info) = self.state(&key, Some(holder))? {
                out.push(info);
            }
        }
        Ok(out)
    }

    async fn list_with_expired(&self) -> Result<Vec<LockState>> {
        let shared = self.shared();
        let mut conn = shared.conn().await?;
        type ListRow = (Vec<u8>, Option<Vec<u8>>, u64, Option<i64>, Option<i64>, i64);
        let rows: Vec<ListRow> = shared
            .all(&mut conn, &self.inner.sql.list_with_expired, ())
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (key, owner, token, acquired, expires, now) in rows {
            let key = shared.key_from(key)?;
            match self.state(&key, Some((owner, token, acquired, expires, now)))? {
                LockState::Free => {}
                state => out.push(state),
            }
        }
        Ok(out)
    }

    async fn force_release(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let shared = self.shared();
        let mut conn = shared.conn().await?;
        // Read the holder, then clear exactly that holder; retry if it changed hands between.
        for _ in 0..8 {
            let row: Option<HolderRow> = shared
                .first(&mut conn, &self.inner.sql.status, (key.as_str(),))
                .await?;
            let info = match self.state(key, row)? {
                LockState::Free => return Ok(None),
                LockState::Held(info) | LockState::Expired(info) => info,
            };
            let params = (key.as_str(), info.owner.as_str(), info.token.get());
            if shared.run(&mut conn, &self.inner.sql.force, params).await? == 1 {
                tracing::info!(%key, owner = %info.owner, token = %info.token, "lease force-released");
                return Ok(Some(info));
            }
        }
        Err(Error::transient(
            NAME,
            format!("`{key}` kept changing hands while it was being force-released"),
        ))
    }

    async fn release_expired(&self) -> Result<u64> {
        let shared = self.shared();
        let mut conn = shared.conn().await?;
        shared
            .run(&mut conn, &self.inner.sql.release_expired, ())
            .await
    }

    async fn watch_release(&self, _key: &LockKey) -> Result<Option<Wakeup>> {
        // A lease row has no session to wait on: waiters poll at their retry interval.
        Ok(None)
    }

    fn watch_lost(&self, _lease: &Lease) -> Option<Wakeup> {
        None
    }
    /// Disconnects this instance's pool (within 1 s).
    async fn shutdown(&self) {
        self.shared().shutdown().await
    }
}
