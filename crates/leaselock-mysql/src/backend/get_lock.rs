//! Session locks with `GET_LOCK`, one dedicated connection per held lock, fencing tokens from a
//! holder table in memory under a durable reservation in a counter table.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use leaselock::{
    AcquireOutcome, AcquireRequest, Capabilities, Error, ExpiryClock, FencingToken, Lease,
    LockBackend, LockInfo, LockKey, LockKind, LockState, Namespace, OwnerId, Result, Wakeup,
};
use mysql_async::prelude::*;
use mysql_async::Conn;
use tokio::sync::{oneshot, watch};

use super::{system_time, us_of, Shared};
use crate::config::{MysqlConfig, Strategy};
use crate::error::{is_connection_gone, server_code};
use crate::lock_name::lock_name;

const NAME: &str = "mysql-get-lock";

/// How long a lost lock's record is kept for late `watch_lost`/`release` calls.
const KEEP_LOST: Duration = Duration::from_secs(300);
/// How long `force_release` waits for a killed connection to let go of its lock.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often a status read retries when it catches an acquisition half-way (the lock taken, its
/// record not yet committed).
const PROBE_RETRIES: usize = 3;

const ER_NO_SUCH_THREAD: u16 = 1094;
/// "The table is full": the in-memory holder table reached its size limit.
const ER_RECORD_FILE_FULL: u16 = 1114;
/// The holder table's name: the counter table's with this appended.
const HOLDER_SUFFIX: &str = "_holders";
/// How far ahead of the last token issued for a key the counter table reserves, durably. Every
/// this many acquisitions of a key, one writes the counter table (and waits for the log flush);
/// a server restart skips at most this many tokens.
const TOKEN_BLOCK: u64 = 1000;
/// The size limit the holder table is created with (the server's `max_heap_table_size` applies
/// again after a restart); when full, released keys' rows are dropped, see
/// [`Sql::evict`].
const HOLDER_TABLE_BYTES: u64 = 256 << 20;
const ER_UNSUPPORTED_PS: u16 = 1295;

/// Session locks with `GET_LOCK(name, 0)`, the way sqlx and Flyway lock MySQL migrations.
///
/// Each held lock lives on its own dedicated connection, taken from this instance's pool: the lock
/// is exactly as alive as that connection. If the connection ends (killed with `KILL CONNECTION`,
/// dropped by the network, the server restarted), the server frees the lock at once, and a small
/// per-lock task that pings the connection every
/// [`liveness_interval`](MysqlConfig::liveness_interval) (250 ms by default) fires the guard's lost
/// signal ([`LockBackend::watch_lost`]). Refresh and verify check, on that connection, that
/// `CONNECTION_ID()` is still the one recorded at acquisition and that `IS_USED_LOCK(name)` names
/// it. Nothing expires by time. A returned [`Lease`]'s `acquired_at` is this process's clock at
/// sending; [`LockBackend::status`] reports the server's.
///
/// Lock names follow [`lock_name`](crate::lock_name()) (`prefix:key`, hashed when needed to stay
/// within 64 characters). `GET_LOCK` names are global to the server: give applications sharing a
/// server different prefixes.
///
/// A *holder table* (the counter table's name with `_holders` appended, `ENGINE=MEMORY`) keeps
/// per key the last fencing token and the holder (owner, connection id, acquisition time), so
/// status, list and "held by" can name the holder. An acquisition is one statement:
/// `INSERT ... SELECT ... WHERE GET_LOCK(name, 0) = 1 ON DUPLICATE KEY UPDATE token =
/// LAST_INSERT_ID(token + 1), ...`, so the lock and the next token come in one round trip; like
/// the lock itself, it writes only server memory, so neither it nor the release waits for the
/// disk. The *counter table* (default [`DEFAULT_GET_LOCK_TABLE`](crate::DEFAULT_GET_LOCK_TABLE),
/// InnoDB) holds, durably, a token no holder of the key has reached: when a token would pass it,
/// the acquisition raises it 1,000 ahead in a second statement before it returns (one in 1,000
/// acquisitions of a key). A server restart empties the holder table, as it ends every lock;
/// tokens then continue above the reservation, so they only grow, and a restart skips at most
/// 1,000. (With binary logging on, as MySQL 8 has by default, the server logs the memory
/// table's writes too, and `sync_binlog = 1` makes them wait for the disk after all. A server
/// that refuses the MEMORY engine, as MySQL group replication's `disabled_storage_engines`
/// may, fails [`LockBackend::init_storage`]: create the holder table yourself with the same
/// columns and `ENGINE=InnoDB`, which `init_storage` keeps and which works the same, with a log
/// flush per lock.) The
/// holder record counts only while `IS_USED_LOCK(name)` equals its connection id: the lock itself
/// is the truth. Locks are not reentrant: a second acquisition by the same owner, even through the
/// same instance, runs on another connection and is refused.
///
/// Waiters are woken on release: [`LockBackend::watch_release`] waits server-side in
/// `GET_LOCK(name, 1)` on a spare connection (which holds no metadata lock on any table) and lets
/// go at once when it gets the lock.
///
/// [`LockBackend::force_release`] (and releasing another process's lease) ends the holder's
/// connection with `KILL CONNECTION`: a user may kill its own connections; killing other users'
/// needs `CONNECTION_ADMIN` (MySQL) or `CONNECTION ADMIN`/`SUPER` (MariaDB).
///
/// Not for connection poolers or proxies that move sessions between server connections.
///
/// ```no_run
/// # async fn f() -> leaselock::Result<()> {
/// use leaselock::{LockBackend, Locker};
/// use leaselock_mysql::{MysqlConfig, MysqlGetLockBackend};
/// let config = MysqlConfig::from_url("mysql://app:secret@127.0.0.1:3306/app")?.prefix("myapp");
/// let backend = MysqlGetLockBackend::new(config)?;
/// backend.init_storage().await?;
/// let locker = Locker::builder(backend).build()?;
/// locker
///     .run("migrations", |lock| async move {
///         // ... migrate, checking lock.lost() or lock.ensure_held() between steps
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MysqlGetLockBackend {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Shared,
    /// The holder table.
    holders: Namespace,
    sql: Sql,
    /// Locks this instance holds (or held until they were lost), by key and token.
    held: Mutex<HashMap<(LockKey, u64), Arc<Held>>>,
    /// Locks whose liveness watch has not started (see [`watch_new_locks`]).
    unwatched: Mutex<Unwatched>,
}

/// Locks acquired since the liveness ticker last looked.
#[derive(Default)]
struct Unwatched {
    locks: Vec<Weak<Held>>,
    /// A ticker task runs.
    ticking: bool,
}

/// A lock this instance holds, with its dedicated connection.
struct Held {
    key: LockKey,
    owner: OwnerId,
    token: FencingToken,
    name: String,
    /// `CONNECTION_ID()` of `conn`, as the handshake told it (32 bits).
    conn_id: u32,
    /// The dedicated connection; `None` once released or lost.
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// `Some(reason)` once the lock is lost.
    lost: watch::Sender<Option<String>>,
    lost_at: Mutex<Option<Instant>>,
}

impl Held {
    fn lost_reason(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// Records the loss (the first reason wins) and ends the connection, if given.
    fn mark_lost(&self, reason: &str, conn: Option<Conn>) {
        let first = self.lost.send_if_modified(|state| {
            if state.is_none() {
                *state = Some(reason.to_owned());
                true
            } else {
                false
            }
        });
        if first {
            *lock(&self.lost_at) = Some(Instant::now());
            tracing::warn!(key = %self.key, token = %self.token, reason, "GET_LOCK lock lost");
        }
        if let Some(conn) = conn {
            discard(conn);
        }
    }
}

/// Ends a connection in the background: one in an unknown state never goes back to the pool.
fn discard(conn: Conn) {
    tokio::spawn(async move {
        let _ = conn.disconnect().await;
    });
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Set in the LAST_INSERT_ID of an acquisition whose previous holder's record was never cleared,
/// or that found no record although the key was used before (the server restarted, or the record
/// was evicted): in both cases a previous holder may not know yet that its lock ended. Tokens
/// stay far below it.
const UNCLEAN_BIT: u64 = 1 << 62;
/// Set in the LAST_INSERT_ID of an acquisition whose token passed the key's durable reservation.
const RAISE_BIT: u64 = 1 << 61;
/// The token bits of such a LAST_INSERT_ID.
const TOKEN_MASK: u64 = RAISE_BIT - 1;

struct Sql {
    create: String,
    create_holders: String,
    check: String,
    check_holders: String,
    acquire: String,
    raise: String,
    evict: String,
    probe: String,
    check_held: String,
    check_remote: String,
    release: String,
    tidy: String,
    list: String,
    stale: String,
    tidy_stale: String,
}

impl Sql {
    /// The statements over the counter table `counter` and the holder table `table`, both
    /// quoted.
    fn new(counter: &str, table: &str) -> Self {
        let now = "UTC_TIMESTAMP(6)";
        let acquired = us_of("t.acquired_at");
        Self {
            // A counter table made by an earlier version has the holder columns too (nullable):
            // they are no longer written, and its tokens are a valid reservation (no holder
            // passed them).
            create: format!(
                "CREATE TABLE IF NOT EXISTS {counter} (\
                 lock_key VARBINARY(255) NOT NULL, \
                 lock_name VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL, \
                 token BIGINT UNSIGNED NOT NULL, \
                 PRIMARY KEY (lock_key)\
                 ) ENGINE=InnoDB"
            ),
            create_holders: format!(
                "CREATE TABLE IF NOT EXISTS {table} (\
                 lock_key VARBINARY(255) NOT NULL, \
                 lock_name VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL, \
                 token BIGINT UNSIGNED NOT NULL, \
                 owner VARBINARY(255) NULL, \
                 connection_id BIGINT UNSIGNED NULL, \
                 acquired_at DATETIME(6) NULL, \
                 PRIMARY KEY (lock_key)\
                 ) ENGINE=MEMORY"
            ),
            check: format!(
                "UPDATE {counter} SET lock_key = lock_key, lock_name = lock_name, token = token \
                 WHERE 1 = 0"
            ),
            check_holders: format!(
                "UPDATE {table} SET lock_key = lock_key, lock_name = lock_name, token = token, \
                 owner = owner, connection_id = connection_id, acquired_at = acquired_at \
                 WHERE 1 = 0"
            ),
            // GET_LOCK runs once (on the one row of the reservation's aggregate); only when it
            // returns 1 is the row inserted (affected rows 1) or updated (affected rows 2). Both
            // report the new token through LAST_INSERT_ID, with RAISE_BIT set when it passes
            // the key's reservation, and UNCLEAN_BIT set when the previous holder's record was
            // never cleared (its session ended without a release) or is missing although the key
            // has a reservation (the server restarted). The reservation is read once, in `r`,
            // which the update clause sees too. A new row's token starts above the reservation;
            // an existing row's token is its own + 1 (the table is in memory, so that is always
            // the latest). The assignments run left to right: `owner` is read
            // before it is overwritten, then the token moves.
            acquire: format!(
                "INSERT INTO {table} \
                 (lock_key, lock_name, token, owner, connection_id, acquired_at) \
                 SELECT ?, ?, LAST_INSERT_ID((r.reserved + 1) | {RAISE_BIT} | \
                   IF(r.found, {UNCLEAN_BIT}, 0)) & {TOKEN_MASK}, ?, CONNECTION_ID(), {now} \
                 FROM (SELECT COALESCE(MAX(c.token), 0) AS reserved, COUNT(*) > 0 AS found \
                   FROM {counter} AS c WHERE c.lock_key = ?) AS r \
                 WHERE GET_LOCK(?, 0) = 1 \
                 ON DUPLICATE KEY UPDATE \
                 lock_name = IF(LAST_INSERT_ID((token + 1) | \
                 IF(owner IS NULL, 0, {UNCLEAN_BIT}) | \
                 IF(token + 1 > r.reserved, {RAISE_BIT}, 0)) = 0, lock_name, ?), \
                 token = token + 1, owner = ?, connection_id = CONNECTION_ID(), \
                 acquired_at = {now}"
            ),
            // Only ever raised: GREATEST keeps a higher reservation a stale read missed.
            raise: format!(
                "INSERT INTO {counter} (lock_key, lock_name, token) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE token = GREATEST(token, VALUES(token)), \
                 lock_name = VALUES(lock_name)"
            ),
            // The rows of released keys, when the holder table is full: their tokens are below
            // the reservation, so the keys continue above it.
            evict: format!("DELETE FROM {table} WHERE owner IS NULL"),
            probe: format!(
                "SELECT IS_USED_LOCK(?), t.owner, t.token, {acquired}, t.connection_id \
                 FROM (SELECT 1 AS one) AS one LEFT JOIN {table} AS t ON t.lock_key = ?"
            ),
            check_held: format!(
                "SELECT CONNECTION_ID(), IS_USED_LOCK(?), \
                 (SELECT COUNT(*) FROM {table} WHERE lock_key = ? AND token = ? AND owner = ? \
                 AND connection_id = CONNECTION_ID())"
            ),
            check_remote: format!(
                "SELECT t.connection_id, IS_USED_LOCK(?) FROM {table} AS t \
                 WHERE t.lock_key = ? AND t.token = ? AND t.owner = ?"
            ),
            // Clears the holder's record and releases the lock in one statement (the row is
            // found by primary key and locked before RELEASE_LOCK runs); one affected row means
            // both happened.
            release: format!(
                "UPDATE {table} SET owner = NULL, connection_id = NULL, acquired_at = NULL \
                 WHERE lock_key = ? AND token = ? AND connection_id = ? AND RELEASE_LOCK(?) = 1"
            ),
            tidy: format!(
                "UPDATE {table} SET owner = NULL, connection_id = NULL, acquired_at = NULL \
                 WHERE lock_key = ? AND token = ? AND connection_id = ?"
            ),
            list: format!(
                "SELECT t.lock_key, t.owner, t.token, {acquired} FROM {table} AS t \
                 WHERE t.owner IS NOT NULL AND IS_USED_LOCK(t.lock_name) = t.connection_id \
                 ORDER BY t.lock_key"
            ),
            stale: format!(
                "SELECT lock_key, token, connection_id FROM {table} \
                 WHERE owner IS NOT NULL AND NOT (IS_USED_LOCK(lock_name) <=> connection_id)"
            ),
            tidy_stale: format!(
                "UPDATE {table} SET owner = NULL, connection_id = NULL, acquired_at = NULL \
                 WHERE lock_key = ? AND token = ? AND connection_id = ? \
                 AND NOT (IS_USED_LOCK(lock_name) <=> connection_id)"
            ),
        }
    }
}

/// What a probe of a key found: `IS_USED_LOCK(name)` and the key's record.
struct Probe {
    used_by: Option<u64>,
    owner: Option<Vec<u8>>,
    token: Option<u64>,
    acquired_us: Option<i64>,
    connection_id: Option<u64>,
}

type ProbeRow = (
    Option<u64>,
    Option<Vec<u8>>,
    Option<u64>,
    Option<i64>,
    Option<u64>,
);

impl Probe {
    /// Whether the record describes the connection that holds the lock.
    fn consistent(&self) -> bool {
        match self.used_by {
            None => true,
            Some(id) => self.connection_id == Some(id) && self.owner.is_some(),
        }
    }
}

impl MysqlGetLockBackend {
    /// A backend over `config`'s server, counter table and prefix (its strategy is ignored), and
    /// the holder table named after the counter table. Validates the configuration (a counter
    /// table name leaves room for the `_holders` of the holder table's: 55 bytes at most);
    /// connects lazily, on first use. Call within a Tokio runtime.
    pub fn new(config: MysqlConfig) -> Result<Self> {
        let checked = config.check_for(Strategy::GetLock)?;
        let holders = checked.table.with_suffix("table", HOLDER_SUFFIX)?;
        let sql = Sql::new(&checked.table.backquoted(), &holders.backquoted());
        Ok(Self {
            inner: Arc::new(Inner {
                shared: Shared::new(NAME, checked),
                holders,
                sql,
                held: Mutex::default(),
                unwatched: Mutex::default(),
            }),
        })
    }

    /// The `GET_LOCK` name this backend uses for `key` (see [`crate::lock_name()`]).
    ///
    /// ```
    /// use leaselock::LockKey;
    /// use leaselock_mysql::{MysqlConfig, MysqlGetLockBackend};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
    /// let config = MysqlConfig::from_url("mysql://127.0.0.1/app")?.prefix("myapp");
    /// let backend = MysqlGetLockBackend::new(config)?;
    /// assert_eq!(backend.lock_name(&LockKey::new("migrations")?), "myapp:migrations");
    /// # Ok(()) }
    /// ```
    pub fn lock_name(&self, key: &LockKey) -> String {
        lock_name(self.shared().checked.prefix.as_str(), key.as_str())
    }

    /// The holder table's name: the counter table's with `_holders` appended.
    ///
    /// ```
    /// use leaselock_mysql::{MysqlConfig, MysqlGetLockBackend};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
    /// let config = MysqlConfig::from_url("mysql://127.0.0.1/app?table=locks")?;
    /// let backend = MysqlGetLockBackend::new(config)?;
    /// assert_eq!(backend.holder_table(), "locks_holders");
    /// # Ok(()) }
    /// ```
    pub fn holder_table(&self) -> &str {
        self.inner.holders.as_str()
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    fn held(&self) -> MutexGuard<'_, HashMap<(LockKey, u64), Arc<Held>>> {
        lock(&self.inner.held)
    }

    /// This instance's record of `lease`, if it acquired it.
    fn local(&self, lease: &Lease) -> Option<Arc<Held>> {
        self.held()
            .get(&(lease.key.clone(), lease.token.get()))
            .filter(|held| held.owner == lease.owner)
            .cloned()
    }

    /// Forgets locks lost long ago (their guards have long been told).
    fn prune(&self) {
        self.held()
            .retain(|_, held| lock(&held.lost_at).is_none_or(|at| at.elapsed() < KEEP_LOST));
    }

    /// Reads `IS_USED_LOCK(name)` and the key's record; retries a few times when it catches an
    /// acquisition half-way.
    async fn probe(&self, conn: &mut Conn, key: &LockKey) -> Result<Probe> {
        let name = self.lock_name(key);
        let mut attempt = 0;
        loop {
            let row: Option<ProbeRow> = self
                .shared()
                .first(conn, &self.inner.sql.probe, (&name, key.as_str()))
                .await?;
            let (used_by, owner, token, acquired_us, connection_id) =
                row.unwrap_or((None, None, None, None, None));
            let probe = Probe {
                used_by,
                owner,
                token,
                acquired_us,
                connection_id,
            };
            attempt += 1;
            if probe.consistent() || attempt > PROBE_RETRIES {
                return Ok(probe);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The holder a probe found, or `None` if the lock is free. A lock held by a connection the
    /// record does not describe (taken outside leaselock, or caught mid-acquisition) is reported
    /// with owner `unknown (connection N)` and the key's last token.
    fn holder(&self, key: &LockKey, probe: Probe) -> Result<Option<LockInfo>> {
        let Some(id) = probe.used_by else {
            return Ok(None);
        };
        let token = FencingToken::new(probe.token.unwrap_or(0));
        match probe.owner {
            Some(owner) if probe.connection_id == Some(id) => {
                let mut info = LockInfo::new(key.clone(), self.shared().owner_from(owner)?, token);
                info.acquired_at = probe.acquired_us.map(system_time);
                Ok(Some(info))
            }
            _ => {
                let owner = OwnerId::new(format!("unknown (connection {id})"))?;
                Ok(Some(LockInfo::new(key.clone(), owner, token)))
            }
        }
    }

    /// Checks on its own connection that a lock this instance holds is still held. `Ok(Err)`
    /// names why not.
    async fn check_local(&self, held: &Held) -> Result<std::result::Result<(), String>> {
        if let Some(reason) = held.lost_reason() {
            return Ok(Err(reason));
        }
        let mut slot = held.conn.lock().await;
        let Some(conn) = slot.as_mut() else {
            let reason = held.lost_reason();
            return Ok(Err(reason.unwrap_or_else(|| "the lock was released".into())));
        };
        let params = (
            held.name.as_str(),
            held.key.as_str(),
            held.token.get(),
            held.owner.as_str(),
        );
        let timeout = ping_timeout(self.shared().checked.liveness_interval);
        let row: std::result::Result<Option<(u64, Option<u64>, i64)>, _> =
            match tokio::time::timeout(timeout, conn.exec_first(&self.inner.sql.check_held, params))
                .await
            {
                Ok(row) => row,
                Err(_) => {
                    // A connection that does not answer (a partition, a hung server) cannot
                    // vouch for its session: the same verdict as a ping that times out.
                    let reason =
                        format!("the connection holding the lock did not answer in {timeout:?}");
                    held.mark_lost(&reason, slot.take());
                    return Ok(Err(reason));
                }
            };
        let reason = match row {
            Ok(Some((id, used_by, records))) => {
                // The handshake's id has 32 bits.
                let ours = |id: u64| id as u32 == held.conn_id;
                if ours(id) && used_by.is_some_and(ours) && records == 1 {
                    return Ok(Ok(()));
                }
                if !ours(id) {
                    format!("the lock's connection changed (now {id})")
                } else if !used_by.is_some_and(ours) {
                    "the lock's connection no longer holds the lock".to_owned()
                } else {
                    "the lock's record was cleared (force-released?)".to_owned()
                }
            }
            Ok(None) => "the lock's connection answered nothing".to_owned(),
            Err(e) if is_connection_gone(&e) => {
                format!("the connection holding the lock ended: {e}")
            }
            Err(e) => return Err(self.shared().err(e)),
        };
        held.mark_lost(&reason, slot.take());
        Ok(Err(reason))
    }

    /// Whether `lease`, acquired by another instance or process, still holds its key; returns
    /// the holding connection's id if so.
    async fn check_remote(&self, conn: &mut Conn, lease: &Lease) -> Result<Option<u64>> {
        let name = self.lock_name(&lease.key);
        let params = (
            name.as_str(),
            lease.key.as_str(),
            lease.token.get(),
            lease.owner.as_str(),
        );
        let row: Option<(Option<u64>, Option<u64>)> = self
            .shared()
            .first(conn, &self.inner.sql.check_remote, params)
            .await?;
        Ok(match row {
            Some((Some(recorded), Some(used_by))) if recorded == used_by => Some(used_by),
            _ => None,
        })
    }

    /// Ends connection `id` and waits until it no longer holds `key`'s lock.
    async fn kill(&self, conn: &mut Conn, key: &LockKey, id: u64) -> Result<()> {
        let shared = self.shared();
        let killed = match conn.exec_drop("KILL CONNECTION ?", (id,)).await {
            Err(e) if server_code(&e) == Some(ER_UNSUPPORTED_PS) => {
                // Servers that cannot prepare KILL: the id is a number the server gave us.
                conn.query_drop(format!("KILL CONNECTION {id}")).await
            }
            other => other,
        };
        match killed {
            Ok(()) => {}
            Err(e) if server_code(&e) == Some(ER_NO_SUCH_THREAD) => {}
            Err(e) => return Err(shared.err(e)),
        }
        let name = self.lock_name(key);
        let started = Instant::now();
        loop {
            let used_by: Option<Option<u64>> = shared
                .first(conn, "SELECT IS_USED_LOCK(?)", (name.as_str(),))
                .await?;
            if used_by.flatten() != Some(id) {
                return Ok(());
            }
            if started.elapsed() > KILL_WAIT {
                return Err(Error::transient(
                    NAME,
                    format!(
                        "connection {id} was killed but still held `{key}` after {KILL_WAIT:?}"
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Marks this instance's record of `key` (if any) lost, after its connection was killed.
    fn lost_locally(&self, key: &LockKey, token: FencingToken, reason: &str) {
        let held = self.held().get(&(key.clone(), token.get())).cloned();
        if let Some(held) = held {
            // The connection is dead; the liveness task will take it out of the slot.
            held.mark_lost(reason, None);
        }
    }
}

/// A release statement failed: the lock is gone with its connection (`Ok(false)`), or the
/// connection is in an unknown state and is discarded, which frees the lock on the server.
fn release_failed(shared: &Shared, held: &Held, conn: Conn, e: mysql_async::Error) -> Result<bool> {
    if is_connection_gone(&e) {
        held.mark_lost(&format!("the connection holding the lock ended: {e}"), None);
        return Ok(false);
    }
    held.mark_lost("releasing failed", Some(conn));
    Err(shared.err(e))
}

/// How long a held lock's connection may take to answer a ping or a check before its session
/// counts as lost: four liveness intervals, at least 2 s.
fn ping_timeout(every: Duration) -> Duration {
    (every * 4).max(Duration::from_secs(2))
}

/// How long an acquisition that took the lock over from an ended session (no release) waits
/// before it returns: two liveness intervals, time for that session's holder, if it still runs,
/// to ping, fail and fire its lost signal.
pub(crate) fn takeover_grace(every: Duration) -> Duration {
    every * 2
}

/// Starts the liveness watches of the locks acquired since its last tick, every liveness
/// interval, while there are any; a lock released before the tick after its acquisition never
/// needs one. (A task and a timer per acquisition cost more than the lock: the spawn wakes
/// another worker thread, and a timer earlier than every other wakes the runtime's timer thread.)
/// A watch started at a tick pings at once, so no lock goes longer than an interval, plus the
/// time to ping, without a ping, as when every lock had its own watch from the start.
async fn watch_new_locks(inner: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        let locks = {
            let mut unwatched = lock(&inner.unwatched);
            if unwatched.locks.is_empty() {
                unwatched.ticking = false;
                return;
            }
            std::mem::take(&mut unwatched.locks)
        };
        for held in locks {
            if held.strong_count() > 0 {
                tokio::spawn(watch_liveness(held, every));
            }
        }
    }
}

/// Pings a held lock's connection at once, then every interval, until it is released, lost, or
/// forgotten.
async fn watch_liveness(held: Weak<Held>, every: Duration) {
    let timeout = ping_timeout(every);
    loop {
        let Some(strong) = held.upgrade() else { return };
        if !ping_held(&strong, timeout).await {
            return;
        }
        drop(strong);
        tokio::time::sleep(every).await;
    }
}

/// One liveness ping of `held`'s connection: `false` once there is nothing left to watch
/// (released, lost before, or found dead now, which marks it lost).
async fn ping_held(held: &Held, timeout: Duration) -> bool {
    let mut slot = held.conn.lock().await;
    let Some(conn) = slot.as_mut() else {
        return false;
    };
    if held.lost_reason().is_some() {
        if let Some(conn) = slot.take() {
            discard(conn);
        }
        return false;
    }
    let reason = match tokio::time::timeout(timeout, conn.ping()).await {
        Ok(Ok(())) => return true,
        Ok(Err(e)) => {
            format!("the connection holding the lock ended (killed on the server, or dropped): {e}")
        }
        Err(_) => format!("the connection holding the lock did not answer a ping in {timeout:?}"),
    };
    held.mark_lost(&reason, slot.take());
    false
}

impl fmt::Debug for MysqlGetLockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlGetLockBackend")
            .field("server", &self.shared().ctx.server)
            .field("table", &self.shared().checked.table)
            .field("holder_table", &self.inner.holders)
            .field("prefix", &self.shared().checked.prefix)
            .field("held", &self.held().len())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl LockBackend for MysqlGetLockBackend {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(NAME, LockKind::Session, ExpiryClock::None);
        caps.release_notifications = true;
        caps.lost_notifications = true;
        caps
    }

    async fn init_storage(&self) -> Result<()> {
        let mut conn = self.shared().conn().await?;
        let sql = &self.inner.sql;
        // A MEMORY table's size limit is the session's max_heap_table_size when it is created.
        let created = async {
            conn.query_drop(&sql.create).await?;
            conn.query_drop(format!(
                "SET SESSION max_heap_table_size = {HOLDER_TABLE_BYTES}"
            ))
            .await?;
            let holders = conn.query_drop(&sql.create_holders).await;
            conn.query_drop("SET SESSION max_heap_table_size = DEFAULT")
                .await?;
            holders
        }
        .await;
        created.map_err(|e| self.shared().err(e))?;
        tracing::debug!(table = %self.shared().checked.table, holders = %self.inner.holders, "GET_LOCK counter and holder tables ready");
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
            .map_err(|e| shared.check_error(e))?;
        conn.query_drop(&self.inner.sql.check_holders)
            .await
            .map_err(|e| shared.check_error(e))
    }

    async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome> {
        self.prune();
        let shared = self.shared();
        let key = request.key();
        let owner = request.owner().as_str();
        let name = self.lock_name(key);
        let sent = SystemTime::now();
        // The connection the last release gave back (see `Shared::hot_conn`), or the pool's.
        let (mut conn, mut kept) = shared.kept_or_pool().await?;
        // From here until it is known to hold nothing, this connection is reset if it goes back
        // to the pool (which frees user locks): also when this future is dropped mid-statement
        // (a caller's timeout or select!), after GET_LOCK may have succeeded on the server.
        conn.reset_connection(true);
        let params = (
            key.as_str(),
            name.as_str(),
            owner,
            key.as_str(),
            name.as_str(),
            name.as_str(),
            owner,
        );
        let mut evicted = false;
        while let Err(e) = conn.exec_drop(&self.inner.sql.acquire, params).await {
            // The statement may have taken the lock before failing: end the connection rather
            // than return it to the pool holding a lock.
            let _ = conn.disconnect().await;
            if std::mem::take(&mut kept) && super::ended(&e) {
                // The kept connection had ended on the server (nothing ran on it): as the pool's
                // own check would, take another.
                tracing::debug!(error = %e, "kept MySQL connection had ended; using the pool's");
                conn = shared.conn().await?;
                conn.reset_connection(true);
                continue;
            }
            if evicted || server_code(&e) != Some(ER_RECORD_FILE_FULL) {
                return Err(shared.err(e));
            }
            let mut other = shared.conn().await?;
            let dropped = shared.run(&mut other, &self.inner.sql.evict, ()).await?;
            tracing::info!(dropped, holders = %self.inner.holders, "GET_LOCK holder table full; dropped the rows of released keys");
            evicted = true;
            conn = other;
            conn.reset_connection(true);
        }
        let (token, unclean, raise) = match (conn.affected_rows(), conn.last_insert_id()) {
            (1 | 2, Some(id)) => (id & TOKEN_MASK, id & UNCLEAN_BIT != 0, id & RAISE_BIT != 0),
            (0, _) => {
                // GET_LOCK returned 0: the connection holds nothing and can go back as it is.
                conn.reset_connection(false);
                let probe = self.probe(&mut conn, key).await?;
                // It answered and holds nothing: keep it for the next attempt, as a clean
                // release does (the pool would take it in through its recycler task).
                shared.give_back(conn);
                let holder = match probe.consistent() {
                    true => self.holder(key, probe)?,
                    false => None,
                };
                return Ok(AcquireOutcome::Held(holder));
            }
            (rows, id) => {
                let _ = conn.disconnect().await;
                return Err(shared.corrupt(format!(
                    "unexpected acquisition outcome ({rows} rows affected, insert id {id:?})"
                )));
            }
        };
        if raise {
            // The token passed the durable reservation: raise it before anyone sees the token.
            // Failing, the connection ends (which frees the lock) and the token was never used.
            let reservation = token + TOKEN_BLOCK - 1;
            let raised = conn
                .exec_drop(
                    &self.inner.sql.raise,
                    (key.as_str(), name.as_str(), reservation),
                )
                .await;
            if let Err(e) = raised {
                let _ = conn.disconnect().await;
                return Err(shared.err(e));
            }
        }
        // Whatever happens to this connection now, it must not go back to the pool holding the
        // lock: it stays marked for a reset (which frees user locks) until a clean release.
        let (lost, _) = watch::channel(None);
        let held = Arc::new(Held {
            key: key.clone(),
            owner: request.owner().clone(),
            token: FencingToken::new(token),
            name,
            conn_id: conn.id(),
            conn: tokio::sync::Mutex::new(Some(conn)),
            lost,
            lost_at: Mutex::new(None),
        });
        self.held().insert((key.clone(), token), Arc::clone(&held));
        {
            let mut unwatched = lock(&self.inner.unwatched);
            unwatched.locks.push(Arc::downgrade(&held));
            if !unwatched.ticking {
                unwatched.ticking = true;
                tokio::spawn(watch_new_locks(
                    Arc::downgrade(&self.inner),
                    shared.checked.liveness_interval,
                ));
            }
        }
        if unclean {
            // The previous holder's session ended without a release: its process was killed,
            // its connection was killed, or the server restarted. In the last two cases that
            // holder may still be running and learns of the loss only at its next liveness
            // ping: hold the lock until it has had time to, so that no two owners overlap.
            let grace = takeover_grace(shared.checked.liveness_interval);
            tracing::debug!(%key, token, ?grace, "GET_LOCK taken over from an ended session; waiting for its holder to learn of the loss");
            tokio::time::sleep(grace).await;
            if let Err(reason) = self.check_local(&held).await? {
                self.held().remove(&(key.clone(), token));
                return Err(Error::lost(key, reason));
            }
        }
        tracing::trace!(%key, token, conn = held.conn_id, "GET_LOCK acquired");
        Ok(AcquireOutcome::Acquired(Lease::new(
            key.clone(),
            request.owner().clone(),
            FencingToken::new(token),
            sent,
        )))
    }

    async fn refresh(&self, lease: &Lease) -> Result<Lease> {
        // Nothing to extend: check that the session is alive and unchanged.
        if let Some(held) = self.local(lease) {
            return match self.check_local(&held).await? {
                Ok(()) => Ok(lease.clone()),
                Err(reason) => Err(Error::lost(&lease.key, reason)),
            };
        }
        let mut conn = self.shared().conn().await?;
        match self.check_remote(&mut conn, lease).await? {
            Some(_) => Ok(lease.clone()),
            None => Err(Error::lost(
                &lease.key,
                "the lock is no longer held by this lease's connection",
            )),
        }
    }

    async fn verify(&self, lease: &Lease) -> Result<bool> {
        if let Some(held) = self.local(lease) {
            return Ok(self.check_local(&held).await?.is_ok());
        }
        let mut conn = self.shared().conn().await?;
        Ok(self.check_remote(&mut conn, lease).await?.is_some())
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let shared = self.shared();
        let held = {
            let mut map = self.held();
            let slot = (lease.key.clone(), lease.token.get());
            match map.get(&slot) {
                Some(held) if held.owner == lease.owner => map.remove(&slot),
                _ => None,
            }
        };
        let Some(held) = held else {
            // Held by another instance or process (or not at all): only ending its connection
            // can release it, and only if this lease is the one holding it.
            let mut conn = shared.conn().await?;
            let Some(id) = self.check_remote(&mut conn, lease).await? else {
                return Ok(false);
            };
            self.kill(&mut conn, &lease.key, id).await?;
            shared
                .run(
                    &mut conn,
                    &self.inner.sql.tidy,
                    (lease.key.as_str(), lease.token.get(), id),
                )
                .await?;
            tracing::info!(key = %lease.key, token = %lease.token, conn = id, "released another process's GET_LOCK lock by ending its connection");
            return Ok(true);
        };
        let Some(mut conn) = held.conn.lock().await.take() else {
            return Ok(false);
        };
        if held.lost_reason().is_some() {
            discard(conn);
            return Ok(false);
        }
        // One statement clears the record and releases: the record's row stays locked until
        // the statement commits, so a waiter that gets the lock at RELEASE_LOCK finds it cleared
        // (a clean hand-over, no takeover grace).
        let params = (
            held.key.as_str(),
            held.token.get(),
            u64::from(held.conn_id),
            held.name.as_str(),
        );
        match conn.exec_drop(&self.inner.sql.release, params).await {
            Ok(()) if conn.affected_rows() == 1 => {
                // The session holds nothing now: kept for the next acquisition, or back to the
                // pool, as it is, statements and all.
                conn.reset_connection(false);
                shared.give_back(conn);
                tracing::trace!(key = %held.key, token = %held.token, "GET_LOCK released");
                return Ok(true);
            }
            Ok(()) => {}
            Err(e) => return release_failed(shared, &held, conn, e),
        }
        // The record was not this lease's (cleared by a force release, say): release the lock
        // alone.
        let released: std::result::Result<Option<Option<i64>>, _> = conn
            .exec_first("SELECT RELEASE_LOCK(?)", (held.name.as_str(),))
            .await;
        match released {
            Ok(Some(Some(1))) => {}
            Ok(_) => {
                held.mark_lost("the lock's connection no longer held the lock", Some(conn));
                return Ok(false);
            }
            Err(e) => return release_failed(shared, &held, conn, e),
        }
        tracing::trace!(key = %held.key, token = %held.token, "GET_LOCK released");
        Ok(true)
    }

    async fn status(&self, key: &LockKey) -> Result<LockState> {
        let mut conn = self.shared().conn().await?;
        let probe = self.probe(&mut conn, key).await?;
        Ok(match self.holder(key, probe)? {
            Some(info) => LockState::Held(info),
            None => LockState::Free,
        })
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let shared = self.shared();
        let mut conn = shared.conn().await?;
        type ListRow = (Vec<u8>, Vec<u8>, u64, Option<i64>);
        let rows: Vec<ListRow> = shared.all(&mut conn, &self.inner.sql.list, ()).await?;
        rows.into_iter()
            .map(|(key, owner, token, acquired)| {
                let mut info = LockInfo::new(
                    shared.key_from(key)?,
                    shared.owner_from(owner)?,
                    FencingToken::new(token),
                );
                info.acquired_at = acquired.map(system_time);
                Ok(info)
            })
            .collect()
    }

    async fn force_release(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let shared = self.shared();
        let mut conn = shared.conn().await?;
        let probe = self.probe(&mut conn, key).await?;
        let Some(id) = probe.used_by else {
            return Ok(None);
        };
        let Some(info) = self.holder(key, probe)? else {
            return Ok(None);
        };
        self.kill(&mut conn, key, id).await?;
        shared
            .run(
                &mut conn,
                &self.inner.sql.tidy,
                (key.as_str(), info.token.get(), id),
            )
            .await?;
        self.lost_locally(key, info.token, "the lock was force-released");
        tracing::info!(%key, owner = %info.owner, token = %info.token, conn = id, "GET_LOCK lock force-released (connection killed)");
        Ok(Some(info))
    }

    async fn release_expired(&self) -> Result<u64> {
        // Session locks never expire. What can go stale is a holder record whose session ended
        // without releasing (killed, crashed): clear those, keeping the counters.
        let shared = self.shared();
        let mut conn = shared.conn().await?;
        let stale: Vec<(Vec<u8>, u64, Option<u64>)> =
            shared.all(&mut conn, &self.inner.sql.stale, ()).await?;
        let mut cleared = 0;
        for (key, token, connection_id) in stale {
            // Each row alone, by primary key and token, re-checking the lock: no range locks.
            let params = (key, token, connection_id.unwrap_or(0));
            cleared += shared
                .run(&mut conn, &self.inner.sql.tidy_stale, params)
                .await?;
        }
        Ok(cleared)
    }

    async fn watch_release(&self, key: &LockKey) -> Result<Option<Wakeup>> {
        let pool = self.shared().pool.clone();
        let name = self.lock_name(key);
        let wait = self.shared().checked.release_wait.as_secs();
        // Starts waiting only when first polled (after a failed attempt), so a first attempt that
        // succeeds costs nothing.
        Ok(Some(Box::pin(async move {
            let (tx, rx) = oneshot::channel::<()>();
            tokio::spawn(wait_for_release(pool, name, wait, tx));
            if rx.await.is_err() {
                // The watcher could not wait (no connection): leave it to the caller's polling.
                std::future::pending::<()>().await;
            }
        })))
    }

    fn watch_lost(&self, lease: &Lease) -> Option<Wakeup> {
        let held = self.local(lease)?;
        let mut rx = held.lost.subscribe();
        Some(Box::pin(async move {
            loop {
                if rx.borrow_and_update().is_some() {
                    return;
                }
                if rx.changed().await.is_err() {
                    // Forgotten: released through this instance, so gone as well.
                    return;
                }
            }
        }))
    }

    /// Disconnects this instance's pool, waiting at most 1 s for connections still out of it
    /// (a held lock's, a waiter's) to come back.
    async fn shutdown(&self) {
        self.shared().shutdown().await
    }
}

/// Waits server-side, `wait` seconds at a time, until `name` is free, takes it and lets go in the
/// same statement, and tells `tx`. Gives up quietly when nobody listens any more or on an error.
async fn wait_for_release(
    pool: mysql_async::Pool,
    name: String,
    wait: u64,
    tx: oneshot::Sender<()>,
) {
    let Ok(mut conn) = pool.get_conn().await else {
        return;
    };
    loop {
        let got: std::result::Result<Option<Option<i64>>, _> = conn
            .exec_first(
                "SELECT IF(GET_LOCK(?, ?) = 1, RELEASE_LOCK(?), 0)",
                (name.as_str(), wait, name.as_str()),
            )
            .await;
        match got {
            Ok(Some(Some(1))) => {
                let _ = tx.send(());
                return;
            }
            Ok(_) if !tx.is_closed() => continue,
            Ok(_) => return,
            Err(_) => {
                let _ = conn.disconnect().await;
                return;
            }
        }
    }
}
