//! The session advisory lock backend.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use leaselock::{
    AcquireOutcome, AcquireRequest, Capabilities, Error, ExpiryClock, FencingToken, Lease,
    LockBackend, LockInfo, LockKey, LockKind, LockState, OwnerId, Result, Wakeup,
};
use tokio_postgres::types::Type;
use tokio_postgres::Row;

use super::{advisory_key, channel_name, key, lock, lock_match, owner, run, token, Conn, Shared};
use crate::config::{PgConfig, DEFAULT_COUNTER_TABLE};
use crate::error;

const NAME: &str = "postgres-advisory";
const COLUMNS: &str = "prefix, key, lock_id, token";
const HOLDER_COLUMNS: &str = "prefix, key, lock_id, token, owner, acquired_at, pid, wanted";
/// The holder table's name: the counter table's with this appended.
const HOLDER_SUFFIX: &str = "_holders";
/// How far ahead of the last token issued for a key the counter table reserves, durably. Every
/// this many acquisitions of a key, one waits for a log flush; a crash skips at most this many
/// tokens.
const TOKEN_BLOCK: i64 = 1000;
/// How many times an acquisition runs when its mark finds the holder gone (see `try_acquire`).
const ACQUIRE_ATTEMPTS: u32 = 3;

/// Session advisory locks (`pg_try_advisory_lock`), each held on its own dedicated connection,
/// with fencing tokens from a holder table backed by a durable counter table.
///
/// - **Try-lock only.** Acquiring never calls the blocking `pg_advisory_lock`; waiting is the
///   orchestrator's polling or wake-up. So work that runs `CREATE INDEX CONCURRENTLY` under the
///   lock cannot deadlock with instances waiting for it.
/// - **One session per held lock.** Each acquisition runs on a connection that holds nothing else
///   (a fresh one, or an idle one kept for reuse, see [`PgConfig::max_idle_sessions`]). When that
///   connection drops or is terminated on the server (`pg_terminate_backend`), the lock is free
///   at once and [`LockBackend::watch_lost`] resolves, so the guard's lost signal fires
///   immediately.
/// - **A documented key.** The 64-bit lock id is [`advisory_key`]`(prefix, key)`.
/// - **Pooler-safe.** The server process id (`pg_backend_pid()`) of the lock's session is recorded
///   at acquire and checked by every acquire, refresh, verify and release statement. Behind a
///   transaction-pooling proxy such as PgBouncer it changes, and the backend refuses with an
///   error that says so, instead of silently holding nothing. When a session opens, the control
///   connection's process id is compared with the session's too ([`PgConfig::probe_pooler`]),
///   which usually refuses before anything is locked.
/// - **Fencing tokens, without a log flush per lock.** The statement that takes the lock, only
///   when it was taken, records the holder and the key's next token in the *holder table*
///   (`prefix, key, lock_id, token, owner, acquired_at, pid, wanted`; the counter table's name with
///   `_holders` appended), an `UNLOGGED` table: writing it waits for no disk, like the lock
///   itself. The *counter table* (`prefix, key, lock_id, token`; default name
///   [`DEFAULT_COUNTER_TABLE`]) holds, durably, a token no holder of the key has reached: the same
///   statement raises it 1,000 ahead whenever a token would pass it, and only that acquisition
///   waits for the log flush. A crash empties the holder table, as it ends every session and so
///   every lock; the next acquisition then continues above the durable reservation. So tokens
///   only grow, across crashes too, and a crash skips at most 1,000 of them. The holder table
///   also names the holder for [`LockBackend::status`] and [`LockBackend::list`], which combine
///   it with `pg_locks`.
/// - **Wake-ups.** Release sends `pg_notify` in the same statement as `pg_advisory_unlock`, when
///   a waiter is listening: an acquisition refused while its caller waits (a live
///   [`LockBackend::watch_release`] in the same backend) marks the holder row `wanted`, and the
///   next acquisition clears it. A release nobody waits for sends nothing, because PostgreSQL
///   serializes the commits of all notifying transactions in a database. `init_storage` adds
///   the `wanted` column to a holder table made by an earlier version.
///
/// A lease can be released, refreshed and verified only through the backend instance that
/// acquired it (the lock lives on that instance's session); from elsewhere use
/// [`LockBackend::force_release`], which terminates the holder's session
/// (`pg_terminate_backend`, waiting up to 5 s for it to end; PostgreSQL 14 or newer, and the
/// role must be allowed to signal the holder: the same role, or `pg_signal_backend`). Dropping
/// the backend closes its sessions, which frees their locks.
///
/// ```no_run
/// use leaselock::Locker;
/// use leaselock_postgres::{PgAdvisoryBackend, PgConfig};
/// # #[tokio::main] async fn main() -> leaselock::Result<()> {
/// let config = PgConfig::from_url("postgres://app@localhost/app")?.prefix("billing")?;
/// let locker = Locker::builder(PgAdvisoryBackend::new(config)?).build()?;
/// locker.init_storage().await?;
/// locker
///     .run("migrations", |lock| async move {
///         // CREATE INDEX CONCURRENTLY is fine here: nobody waits inside PostgreSQL.
///         println!("fencing token {}", lock.token());
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgAdvisoryBackend {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Shared,
    /// The holder table, schema-qualified and quoted.
    holders: String,
    prefix: String,
    probe_pooler: bool,
    max_idle: usize,
    held: Mutex<HashMap<LeaseId, Arc<Session>>>,
    idle: Mutex<Vec<Arc<Session>>>,
}

type LeaseId = (LockKey, OwnerId, FencingToken);

fn lease_id(lease: &Lease) -> LeaseId {
    (lease.key.clone(), lease.owner.clone(), lease.token)
}

/// A dedicated connection and the server process it reached when opened.
struct Session {
    conn: Conn,
    pid: i32,
}

impl fmt::Debug for PgAdvisoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgAdvisoryBackend")
            .field("target", &self.inner.shared.connector_target())
            .field("counter_table", &self.inner.shared.qualified)
            .field("holder_table", &self.inner.holders)
            .field("prefix", &self.inner.prefix)
            .field("held", &lock(&self.inner.held).len())
            .finish_non_exhaustive()
    }
}

fn conv(e: tokio_postgres::Error) -> Error {
    Error::permanent(NAME, format!("unexpected column type: {e}"))
}

impl PgAdvisoryBackend {
    /// A backend over `config`: its prefix and counter table (default [`DEFAULT_COUNTER_TABLE`]),
    /// and the holder table named after it. Connects lazily; call [`LockBackend::init_storage`]
    /// once to create both tables. Errors (field `table`) when the counter table's name leaves no
    /// room for the `_holders` of the holder table's (55 bytes at most).
    pub fn new(config: PgConfig) -> Result<Self> {
        let qualified = config.qualified(DEFAULT_COUNTER_TABLE);
        let holders = config.qualified_companion(DEFAULT_COUNTER_TABLE, HOLDER_SUFFIX)?;
        let prefix = config.prefix_name().to_owned();
        let channel = channel_name("advisory", &qualified, &prefix);
        Ok(Self {
            inner: Arc::new(Inner {
                shared: Shared::new(NAME, &config, qualified, channel)?,
                holders,
                prefix,
                probe_pooler: config.probe_pooler,
                max_idle: config.max_idle_sessions,
                held: Mutex::new(HashMap::new()),
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The 64-bit advisory lock id of `key` under this backend's prefix ([`advisory_key`]).
    pub fn lock_id(&self, key: &LockKey) -> i64 {
        advisory_key(&self.inner.prefix, key.as_str())
    }

    /// The advisory key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The schema-qualified, quoted counter table name.
    pub fn counter_table(&self) -> &str {
        &self.inner.shared.qualified
    }

    /// The schema-qualified, quoted holder table name: the counter table's with `_holders`
    /// appended.
    ///
    /// ```
    /// use leaselock_postgres::{PgAdvisoryBackend, PgConfig};
    /// let config = PgConfig::from_url("postgres://app@localhost/app?table=locks&schema=ops")?;
    /// let backend = PgAdvisoryBackend::new(config)?;
    /// assert_eq!(backend.counter_table(), "\"ops\".\"locks\"");
    /// assert_eq!(backend.holder_table(), "\"ops\".\"locks_holders\"");
    /// # Ok::<(), leaselock::Error>(())
    /// ```
    pub fn holder_table(&self) -> &str {
        &self.inner.holders
    }

    /// The server process id (`pg_backend_pid()`) of the session holding `lease`, if this
    /// instance holds it.
    pub fn session_pid(&self, lease: &Lease) -> Option<i32> {
        lock(&self.inner.held)
            .get(&lease_id(lease))
            .filter(|s| !s.conn.is_closed())
            .map(|s| s.pid)
    }

    /// The counter table.
    fn t(&self) -> &str {
        &self.inner.shared.qualified
    }

    /// The holder table.
    fn h(&self) -> &str {
        &self.inner.holders
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// An idle session holding nothing, or a new one.
    async fn take_session(&self) -> Result<Arc<Session>> {
        loop {
            let Some(session) = lock(&self.inner.idle).pop() else {
                break;
            };
            if !session.conn.is_closed() {
                return Ok(session);
            }
        }
        let conn = self.shared().connector.connect(NAME, None).await?;
        let rows = run(
            NAME,
            self.shared().operation_timeout,
            &conn,
            "opening a lock session",
            "SELECT pg_backend_pid()",
            &[],
        )
        .await?;
        let pid: i32 = rows
            .first()
            .ok_or_else(|| Error::permanent(NAME, "pg_backend_pid() returned no row"))?
            .try_get(0)
            .map_err(conv)?;
        if self.inner.probe_pooler {
            // Behind a transaction pooler the control connection's next statement usually lands
            // on the server process the session's statement just used. Checked once per session:
            // the pid checks in every later statement catch a session that moves.
            let row = self
                .shared()
                .query_one("probing for a pooler", "SELECT pg_backend_pid()", &[])
                .await?;
            let control_pid: i32 = row.try_get(0).map_err(conv)?;
            if control_pid == pid {
                return Err(error::pooler(
                    NAME,
                    &format!(
                        "the control connection and a lock session both reached server process \
                         {control_pid}"
                    ),
                ));
            }
        }
        Ok(Arc::new(Session { conn, pid }))
    }

    /// Keeps a session that holds nothing for reuse, or closes it.
    fn put_idle(&self, session: Arc<Session>) {
        if session.conn.is_closed() {
            return;
        }
        let mut idle = lock(&self.inner.idle);
        if idle.len() < self.inner.max_idle {
            idle.push(session);
        }
    }

    fn forget(&self, lease: &Lease) -> Option<Arc<Session>> {
        lock(&self.inner.held).remove(&lease_id(lease))
    }

    fn reap_closed(&self) {
        lock(&self.inner.held).retain(|_, s| !s.conn.is_closed());
    }

    /// Asks the lease's session whether it still holds the lock. Errors only when the check could
    /// not run.
    async fn check_session(&self, lease: &Lease) -> Result<Check> {
        let Some(session) = lock(&self.inner.held).get(&lease_id(lease)).cloned() else {
            return Ok(Check::Gone(
                "this backend instance does not hold the lease (released, lost, or acquired \
                 by another instance)"
                    .to_owned(),
            ));
        };
        if session.conn.is_closed() {
            self.forget(lease);
            return Ok(Check::Gone(SESSION_ENDED.to_owned()));
        }
        let id = self.lock_id(&lease.key);
        let sql = format!(
            "SELECT pg_backend_pid() AS pid, EXISTS (SELECT 1 FROM pg_locks l \
               WHERE {m} AND l.pid = pg_backend_pid() AND l.granted) AS holds",
            m = lock_match("$1")
        );
        let checked = tokio::time::timeout(
            self.shared().operation_timeout,
            session.conn.client.query_typed(&sql, &[(&id, Type::INT8)]),
        )
        .await;
        let rows = match checked {
            Err(_) => {
                self.forget(lease);
                return Ok(Check::Gone(format!(
                    "the lock's session did not answer within {:?}; it was closed, which frees \
                     the lock on the server",
                    self.shared().operation_timeout
                )));
            }
            Ok(Err(e)) if e.is_closed() || session.conn.is_closed() => {
                self.forget(lease);
                return Ok(Check::Gone(SESSION_ENDED.to_owned()));
            }
            Ok(Err(e)) => return Err(error::driver(NAME, "checking the lock session", e)),
            Ok(Ok(rows)) => rows,
        };
        let row = rows
            .first()
            .ok_or_else(|| Error::permanent(NAME, "the session check returned no row"))?;
        let pid: i32 = row.try_get("pid").map_err(conv)?;
        if pid != session.pid {
            // Closing the session is the best chance to free the lock on the process that took
            // it (the pooler may keep that server connection open, though).
            self.forget(lease);
            return Ok(Check::Pooler(format!(
                "the lock on `{}` was taken by server process {} but its session now reaches \
                 process {pid}: {}",
                lease.key,
                session.pid,
                error::POOLER_HINT
            )));
        }
        if row.try_get::<_, bool>("holds").map_err(conv)? {
            Ok(Check::Held)
        } else {
            self.forget(lease);
            Ok(Check::Gone(
                "the session no longer holds the advisory lock".to_owned(),
            ))
        }
    }
}

/// What a lock session check found.
enum Check {
    Held,
    /// Not held, and why.
    Gone(String),
    /// The session reaches another server process than the one that took the lock.
    Pooler(String),
}

const SESSION_ENDED: &str =
    "the lock's session ended (connection closed, or terminated on the server)";

/// Who holds an advisory lock, from a holder row (owner, token, acquired_at, pid at `at`) and
/// the process actually holding the lock.
fn holder_info(
    k: &LockKey,
    row: &Row,
    at: usize,
    holder_pid: Option<i32>,
) -> Result<Option<LockInfo>> {
    let Some(holder_pid) = holder_pid else {
        return Ok(None);
    };
    let raw_owner: Option<String> = row.try_get(at).map_err(conv)?;
    let raw_token: Option<i64> = row.try_get(at + 1).map_err(conv)?;
    let acquired_at: Option<SystemTime> = row.try_get(at + 2).map_err(conv)?;
    let row_pid: Option<i32> = row.try_get(at + 3).map_err(conv)?;
    let mut info = match (raw_owner, raw_token) {
        (Some(o), Some(t)) if row_pid == Some(holder_pid) => {
            let mut info = LockInfo::new(k.clone(), owner(NAME, o)?, token(NAME, t)?);
            info.acquired_at = acquired_at;
            info
        }
        // Held by a session that did not record itself (yet), or outside leaselock.
        (_, t) => LockInfo::new(
            k.clone(),
            OwnerId::new(format!("unknown (PostgreSQL server process {holder_pid})"))?,
            FencingToken::new(t.and_then(|t| u64::try_from(t).ok()).unwrap_or(0)),
        ),
    };
    info.expires_at = None;
    info.remaining = None;
    Ok(Some(info))
}

impl PgAdvisoryBackend {
    /// The acquisition statement; with `mark`, a refused attempt marks the holder row `wanted`.
    ///
    /// One statement: take the lock (only if the session still reaches the process it reached
    /// before); only if it was taken, record the holder with the key's next token (the last one
    /// plus 1, or above the durable reservation when the holder table has no row for the key:
    /// a new key, or a crash emptied it), clear `wanted`, and raise the reservation when the
    /// token passes it; else read the holder (and mark it). The reservation is read only when the
    /// lock was taken: with 64 workers on one key, reading it in every refused attempt too cost
    /// a sixth of the throughput. The token is computed in
    /// `DO UPDATE`, which reads the row's latest version, never the statement's snapshot: a
    /// holder that came and went between the snapshot and the lock is counted. The reservation
    /// may be read stale (it only grows), which can only raise it once more than needed. Only a
    /// raise writes a logged table, so only then does the commit wait for the log flush.
    /// (`raised` runs although nothing reads it: PostgreSQL runs every data-modifying WITH to
    /// completion.) The mark updates the row's latest version: `vacated` says it found the
    /// holder gone.
    fn acquire_sql(&self, mark: bool) -> String {
        let (marked, vacated) = if mark {
            (
                format!(
                    "marked AS MATERIALIZED ( \
                       UPDATE {h} SET wanted = true \
                        WHERE prefix = $2 AND key = $3 AND NOT EXISTS (SELECT 1 FROM bump) \
                       RETURNING owner \
                     ), ",
                    h = self.h()
                ),
                "EXISTS (SELECT 1 FROM marked WHERE owner IS NULL)",
            )
        } else {
            (String::new(), "false")
        };
        format!(
            "WITH me AS MATERIALIZED (SELECT pg_backend_pid() AS pid), \
             attempt AS MATERIALIZED ( \
               SELECT pg_try_advisory_lock($1) AS locked FROM me WHERE me.pid = $5 \
             ), \
             reserved AS MATERIALIZED ( \
               SELECT coalesce((SELECT c.token FROM {t} c WHERE c.prefix = $2 AND c.key = $3), 0) \
                 AS token FROM attempt WHERE attempt.locked \
             ), \
             bump AS MATERIALIZED ( \
               INSERT INTO {h} AS h (prefix, key, lock_id, token, owner, acquired_at, pid) \
               SELECT $2, $3, $1, r.token + 1, $4, now(), me.pid \
                 FROM me, attempt, reserved r WHERE attempt.locked \
               ON CONFLICT (prefix, key) DO UPDATE \
                 SET token = h.token + 1, lock_id = EXCLUDED.lock_id, owner = EXCLUDED.owner, \
                     acquired_at = EXCLUDED.acquired_at, pid = EXCLUDED.pid, wanted = false \
               RETURNING h.token, h.acquired_at \
             ), {marked}\
             raised AS ( \
               INSERT INTO {t} AS c (prefix, key, lock_id, token) \
               SELECT $2, $3, $1, b.token + {block} FROM bump b, reserved r WHERE b.token > r.token \
               ON CONFLICT (prefix, key) DO UPDATE \
                 SET token = greatest(c.token, EXCLUDED.token), lock_id = EXCLUDED.lock_id \
               RETURNING 1 \
             ) \
             SELECT me.pid, coalesce((SELECT locked FROM attempt), false) AS locked, \
                    b.token AS new_token, b.acquired_at AS new_acquired_at, \
                    o.owner, o.token, o.acquired_at, o.pid AS holder_pid, \
                    {vacated} AS vacated \
               FROM me \
               LEFT JOIN bump b ON true \
               LEFT JOIN {h} o ON b.token IS NULL AND o.prefix = $2 AND o.key = $3",
            t = self.t(),
            h = self.h(),
            block = TOKEN_BLOCK - 1,
        )
    }
}

#[async_trait]
impl LockBackend for PgAdvisoryBackend {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(NAME, LockKind::Session, ExpiryClock::None);
        caps.release_notifications = true;
        caps.lost_notifications = true;
        caps
    }

    async fn init_storage(&self) -> Result<()> {
        // A counter table made by an earlier version has the holder columns too; they are no
        // longer written, and its tokens are a valid reservation (no holder passed them).
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {t} ( \
                prefix text NOT NULL, \
                key text NOT NULL, \
                lock_id bigint NOT NULL, \
                token bigint NOT NULL CHECK (token > 0), \
                PRIMARY KEY (prefix, key) \
             ); \
             CREATE UNLOGGED TABLE IF NOT EXISTS {h} ( \
                prefix text NOT NULL, \
                key text NOT NULL, \
                lock_id bigint NOT NULL, \
                token bigint NOT NULL CHECK (token > 0), \
                owner text, \
                acquired_at timestamptz, \
                pid integer, \
                wanted boolean NOT NULL DEFAULT false, \
                PRIMARY KEY (prefix, key) \
             ); {upgrade}",
            t = self.t(),
            h = self.h(),
            upgrade = super::add_column(self.h(), HOLDER_COLUMNS, "wanted", super::WANTED)
        );
        self.shared().init(&ddl, self.shared().schema()).await?;
        self.check_storage().await
    }

    async fn check_storage(&self) -> Result<()> {
        self.shared().check(COLUMNS).await?;
        self.shared().check_table(self.h(), HOLDER_COLUMNS).await
    }

    async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome> {
        self.reap_closed();
        let k = request.key();
        let id = self.lock_id(k);
        let session = self.take_session().await?;
        // Somebody in this process waits for the key (a live release watch): a refused attempt
        // marks the holder row `wanted`, so that the release notifies. See `release` for why
        // no mark is missed.
        let mark = self.shared().watching(k);
        let sql = self.acquire_sql(mark);
        let mut attempt = 1;
        loop {
            let outcome = run(
                NAME,
                self.shared().operation_timeout,
                &session.conn,
                "try_acquire",
                &sql,
                &[
                    (&id, Type::INT8),
                    (&self.inner.prefix, Type::TEXT),
                    (&k.as_str(), Type::TEXT),
                    (&request.owner().as_str(), Type::TEXT),
                    (&session.pid, Type::INT4),
                ],
            )
            .await;
            // On any error the session's state is unknown (a session lock survives a failed
            // statement): drop it, which frees whatever it holds.
            let rows = outcome?;
            let row = rows
                .first()
                .ok_or_else(|| Error::permanent(NAME, "try_acquire returned no row"))?;
            let pid: i32 = row.try_get("pid").map_err(conv)?;
            if pid != session.pid {
                return Err(error::pooler(
                    NAME,
                    &format!(
                        "a lock session reached server process {} and then process {pid}",
                        session.pid
                    ),
                ));
            }
            if row.try_get::<_, bool>("locked").map_err(conv)? {
                let raw_token: i64 = row.try_get("new_token").map_err(conv)?;
                let acquired_at: SystemTime = row.try_get("new_acquired_at").map_err(conv)?;
                let lease = Lease::new(
                    k.clone(),
                    request.owner().clone(),
                    token(NAME, raw_token)?,
                    acquired_at,
                );
                lock(&self.inner.held).insert(lease_id(&lease), session);
                // On a crowded server the lock's session is all a holder keeps.
                self.shared().shed();
                return Ok(AcquireOutcome::Acquired(lease));
            }
            // The holder released between our attempt and our mark, so its release saw no
            // mark and sent no notification: try again at once rather than wait for a poll.
            if row.try_get::<_, bool>("vacated").map_err(conv)? && attempt < ACQUIRE_ATTEMPTS {
                attempt += 1;
                continue;
            }
            // A refusal names the holder its holder row records, and reads no `pg_locks`: that
            // view takes every lock-manager partition, and with 64 workers on one key reading
            // it in each refused attempt took two thirds of the throughput. A holder outside
            // leaselock, or one whose row this statement's snapshot does not show yet, is
            // reported unknown; `status` and `list` check the row against `pg_locks`.
            let row_pid: Option<i32> = row.try_get("holder_pid").map_err(conv)?;
            let info = holder_info(k, row, 4, row_pid)?;
            if self.shared().frugal() {
                // Waiting on a crowded server: keep no connection until the next attempt.
                drop(session);
                self.shared().shed();
            } else {
                self.put_idle(session);
            }
            return Ok(AcquireOutcome::Held(info));
        }
    }

    async fn refresh(&self, lease: &Lease) -> Result<Lease> {
        match self.check_session(lease).await? {
            Check::Held => Ok(lease.clone()),
            // The lock cannot be trusted any more: the holder must stop, so this is a loss.
            Check::Gone(reason) | Check::Pooler(reason) => Err(Error::lost(&lease.key, reason)),
        }
    }

    async fn verify(&self, lease: &Lease) -> Result<bool> {
        match self.check_session(lease).await? {
            Check::Held => Ok(true),
            Check::Gone(_) => Ok(false),
            Check::Pooler(reason) => Err(Error::permanent(NAME, reason)),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let Some(session) = self.forget(lease) else {
            return Ok(false);
        };
        if session.conn.is_closed() {
            return Ok(false);
        }
        let id = self.lock_id(&lease.key);
        let raw_token = lease.token.get() as i64;
        // The release writes only the unlogged holder table, so its commit waits for no log
        // flush. It clears the holder row before it unlocks, and notifies only when a waiter
        // marked the row `wanted`. A waiter marks the row after its attempt found the lock
        // taken; the row lock orders the mark and the clearing. A mark first: the clearing
        // waits for it and sees it. The clearing first: the mark finds the holder gone and the
        // waiter tries again (`vacated`). A new holder can only take the row after this
        // statement commits, so it never clears a mark this release has not seen.
        let sql = format!(
            "WITH me AS MATERIALIZED (SELECT pg_backend_pid() AS pid), \
             cleared AS MATERIALIZED ( \
               UPDATE {h} SET owner = NULL, acquired_at = NULL, pid = NULL \
                WHERE prefix = $2 AND key = $3 AND owner = $4 AND token = $5 \
                  AND EXISTS (SELECT 1 FROM me WHERE me.pid = $6) \
               RETURNING wanted \
             ), \
             unlocked AS MATERIALIZED ( \
               SELECT pg_advisory_unlock($1) AS ok FROM me \
                WHERE me.pid = $6 AND (SELECT count(*) FROM cleared) >= 0 \
             ), \
             notified AS MATERIALIZED ( \
               SELECT pg_notify($7, $3) FROM unlocked, cleared WHERE unlocked.ok AND cleared.wanted \
             ) \
             SELECT me.pid, coalesce((SELECT ok FROM unlocked), false) AS unlocked, \
                    (SELECT count(*) FROM cleared) AS cleared, \
                    (SELECT count(*) FROM notified) AS notified \
               FROM me",
            h = self.h(),
        );
        let outcome = run(
            NAME,
            self.shared().operation_timeout,
            &session.conn,
            "release",
            &sql,
            &[
                (&id, Type::INT8),
                (&self.inner.prefix, Type::TEXT),
                (&lease.key.as_str(), Type::TEXT),
                (&lease.owner.as_str(), Type::TEXT),
                (&raw_token, Type::INT8),
                (&session.pid, Type::INT4),
                (&self.shared().channel, Type::TEXT),
            ],
        )
        .await;
        let rows = match outcome {
            Ok(rows) => rows,
            // The session is gone, and its lock with it.
            Err(_) if session.conn.is_closed() => return Ok(false),
            // Dropping the session closes it, which frees the lock on the server.
            Err(e) => return Err(e),
        };
        let row = rows
            .first()
            .ok_or_else(|| Error::permanent(NAME, "release returned no row"))?;
        let pid: i32 = row.try_get("pid").map_err(conv)?;
        if pid != session.pid {
            return Err(error::pooler(
                NAME,
                &format!(
                    "the lock on `{}` was taken by server process {} but its session now \
                     reaches process {pid}",
                    lease.key, session.pid
                ),
            ));
        }
        let unlocked: bool = row.try_get("unlocked").map_err(conv)?;
        if unlocked {
            self.put_idle(session);
        }
        Ok(unlocked)
    }

    async fn status(&self, k: &LockKey) -> Result<LockState> {
        let id = self.lock_id(k);
        let sql = format!(
            "SELECT (SELECT l.pid FROM pg_locks l WHERE {m} AND l.granted LIMIT 1) AS holder_pid, \
                    c.owner, c.token, c.acquired_at, c.pid \
               FROM (SELECT 1) AS one \
               LEFT JOIN {h} c ON c.prefix = $2 AND c.key = $3",
            h = self.h(),
            m = lock_match("$1")
        );
        let row = self
            .shared()
            .query_one(
                "status",
                &sql,
                &[
                    (&id, Type::INT8),
                    (&self.inner.prefix, Type::TEXT),
                    (&k.as_str(), Type::TEXT),
                ],
            )
            .await?;
        let holder_pid: Option<i32> = row.try_get("holder_pid").map_err(conv)?;
        Ok(match holder_info(k, &row, 1, holder_pid)? {
            Some(info) => LockState::Held(info),
            None => LockState::Free,
        })
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let sql = format!(
            "SELECT c.key, c.owner, c.token, c.acquired_at, c.pid, l.pid AS holder_pid \
               FROM {h} c \
               JOIN pg_locks l ON {m} AND l.granted AND l.pid = c.pid \
              WHERE c.prefix = $1 AND c.owner IS NOT NULL \
              ORDER BY c.key COLLATE \"C\"",
            h = self.h(),
            m = lock_match("c.lock_id")
        );
        let rows = self
            .shared()
            .query("list", &sql, &[(&self.inner.prefix, Type::TEXT)])
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let k = key(NAME, row.try_get(0).map_err(conv)?)?;
            let holder_pid: Option<i32> = row.try_get("holder_pid").map_err(conv)?;
            if let Some(info) = holder_info(&k, row, 1, holder_pid)? {
                out.push(info);
            }
        }
        Ok(out)
    }

    async fn force_release(&self, k: &LockKey) -> Result<Option<LockInfo>> {
        let id = self.lock_id(k);
        // Only the holder's session can unlock a session lock: end that session, waiting until
        // it is gone (and with it the lock), then clear the holder and wake waiters.
        let sql = format!(
            "WITH holder AS MATERIALIZED ( \
               SELECT l.pid FROM pg_locks l \
                WHERE {m} AND l.granted AND l.pid <> pg_backend_pid() \
             ), \
             killed AS MATERIALIZED ( \
               SELECT pid, pg_terminate_backend(pid, 5000) AS ok FROM holder \
             ), \
             old AS MATERIALIZED ( \
               SELECT owner, token, acquired_at, pid FROM {h} WHERE prefix = $2 AND key = $3 \
             ), \
             cleared AS ( \
               UPDATE {h} SET owner = NULL, acquired_at = NULL, pid = NULL \
                WHERE prefix = $2 AND key = $3 AND owner IS NOT NULL \
                  AND NOT EXISTS (SELECT 1 FROM killed WHERE NOT ok) \
               RETURNING 1 \
             ), \
             notified AS MATERIALIZED (SELECT pg_notify($4, $3) FROM killed WHERE ok) \
             SELECT (SELECT pid FROM killed WHERE ok LIMIT 1) AS killed_pid, \
                    (SELECT pid FROM killed WHERE NOT ok LIMIT 1) AS survivor_pid, \
                    o.owner, o.token, o.acquired_at, o.pid, \
                    (SELECT count(*) FROM cleared) AS cleared, \
                    (SELECT count(*) FROM notified) AS notified \
               FROM (SELECT 1) AS one LEFT JOIN old o ON true",
            h = self.h(),
            m = lock_match("$1")
        );
        let row = self
            .shared()
            .query_one(
                "force_release",
                &sql,
                &[
                    (&id, Type::INT8),
                    (&self.inner.prefix, Type::TEXT),
                    (&k.as_str(), Type::TEXT),
                    (&self.shared().channel, Type::TEXT),
                ],
            )
            .await?;
        if let Some(pid) = row
            .try_get::<_, Option<i32>>("survivor_pid")
            .map_err(conv)?
        {
            return Err(Error::transient(
                NAME,
                format!(
                    "force_release of `{k}`: server process {pid} holding the lock did not end \
                     within 5 s of pg_terminate_backend"
                ),
            ));
        }
        let killed_pid: Option<i32> = row.try_get("killed_pid").map_err(conv)?;
        if let Some(pid) = killed_pid {
            tracing::info!(key = %k, pid, "force_release terminated the session holding the lock");
        }
        // Our own sessions for that key are gone now; forget them.
        self.reap_closed();
        holder_info(k, &row, 2, killed_pid)
    }

    async fn release_expired(&self) -> Result<u64> {
        // Session locks do not expire; this clears holders recorded in the holder table whose
        // session ended without releasing (a killed connection, a crashed client).
        let sql = format!(
            "WITH cleared AS ( \
               UPDATE {h} c SET owner = NULL, acquired_at = NULL, pid = NULL \
                WHERE c.prefix = $1 AND c.owner IS NOT NULL \
                  AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE {m} AND l.granted AND l.pid = c.pid) \
               RETURNING c.key \
             ), notified AS MATERIALIZED (SELECT pg_notify($2, cleared.key) FROM cleared) \
             SELECT (SELECT count(*) FROM cleared) AS cleared, \
                    (SELECT count(*) FROM notified) AS notified",
            h = self.h(),
            m = lock_match("c.lock_id")
        );
        let row = self
            .shared()
            .query_one(
                "release_expired",
                &sql,
                &[
                    (&self.inner.prefix, Type::TEXT),
                    (&self.shared().channel, Type::TEXT),
                ],
            )
            .await?;
        let cleared: i64 = row.try_get("cleared").map_err(conv)?;
        Ok(cleared.max(0) as u64)
    }

    async fn watch_release(&self, k: &LockKey) -> Result<Option<Wakeup>> {
        self.shared().watch_release(k).await
    }

    fn watch_lost(&self, lease: &Lease) -> Option<Wakeup> {
        let session = lock(&self.inner.held).get(&lease_id(lease)).cloned();
        match session {
            Some(session) => Some(Box::pin(session.conn.closed())),
            // Not held through this instance: already gone as far as it can tell.
            None => Some(Box::pin(std::future::ready(()))),
        }
    }
}
