//! The SQLite lease-table backend.

use std::cell::Cell;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use leaselock::{
    async_trait, AcquireOutcome, AcquireRequest, Capabilities, Error, ExpiryClock, FencingToken,
    Lease, LockBackend, LockInfo, LockKey, LockKind, LockState, OwnerId, Result, Wakeup,
};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::config::SqliteConfig;
use crate::error::{convert, is_busy, join, not_initialized, NAME};

/// The database clock in milliseconds since the Unix epoch. SQLite evaluates `'now'` once per
/// statement, so every use in one statement sees the same instant.
const NOW_MS: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

/// How many times one acquisition tries when the key it found held is free again by the time its
/// holder is read (a release between the two statements).
const ACQUIRE_ATTEMPTS: usize = 3;

/// How many leases one batched refresh updates in its transaction: a few milliseconds of holding
/// the database's write lock at most.
const MAX_REFRESH_BATCH: usize = 500;

/// Leases in an SQLite table: the embedded default.
///
/// Several processes on one host exclude each other through one database file: the file is in
/// WAL mode, every write takes the database's write lock before it writes anything (acquire and
/// release are single autocommit statements, which SQLite runs as immediate transactions; the
/// others run in `BEGIN IMMEDIATE`), and a busy timeout makes a writer wait for another instead
/// of failing. Expiry is decided by SQLite's clock (the host's), fencing tokens are kept per
/// key forever (rows are never deleted). A call that may wait (another process has the database
/// locked) runs on tokio's blocking pool, never on the async runtime. A [`leaselock::Locker`]
/// (by default: see its refresh batch window) refreshes the leases that fall due together in
/// one transaction ([`LockBackend::refresh_many`], up to 500 a batch).
///
/// ```no_run
/// use leaselock::Locker;
/// use leaselock_sqlite::{SqliteBackend, SqliteConfig};
/// # #[tokio::main] async fn main() -> leaselock::Result<()> {
/// let backend = SqliteBackend::connect(SqliteConfig::new("leaselock.db")).await?;
/// let locker = Locker::builder(backend).build()?;
/// locker.init_storage().await?;
/// locker.run("nightly-job", |lock| async move { println!("token {}", lock.token()) }).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteBackend {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    conn: Mutex<Connection>,
    sql: Statements,
    busy_timeout: Duration,
}

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.inner.path)
            .field("table", &self.inner.sql.table)
            .finish()
    }
}

/// Every statement, built once from the validated, quoted table name.
struct Statements {
    table: String,
    create: String,
    exists: String,
    acquire: String,
    holder: String,
    refresh: String,
    verify: String,
    release: String,
    status: String,
    list: String,
    list_with_expired: String,
    force: String,
    expired: String,
}

impl Statements {
    fn new(table: &leaselock::Namespace) -> Self {
        let t = table.quoted();
        let cleared = "owner = NULL, acquired_at_ms = NULL, expires_at_ms = NULL, ttl_ms = NULL";
        Self {
            table: table.as_str().to_owned(),
            create: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    lock_key TEXT PRIMARY KEY NOT NULL,
                    owner TEXT,
                    token INTEGER NOT NULL,
                    acquired_at_ms INTEGER,
                    expires_at_ms INTEGER,
                    ttl_ms INTEGER
                )"
            ),
            exists: "SELECT type FROM sqlite_schema WHERE name = ?1 COLLATE NOCASE \
                     AND type IN ('table', 'view') ORDER BY type = 'table' DESC LIMIT 1"
                .to_owned(),
            // One statement: insert a new key, or take over a free or expired one; the token
            // counts on from the row's last value, so it never goes back. A lock without expiry
            // has a NULL ttl, so a NULL expiry (`NOW + NULL`), which is never `<=` anything.
            acquire: format!(
                "INSERT INTO {t} (lock_key, owner, token, acquired_at_ms, expires_at_ms, ttl_ms)
                 VALUES (?1, ?2, 1, {NOW_MS}, {NOW_MS} + ?3, ?3)
                 ON CONFLICT (lock_key) DO UPDATE SET
                    owner = excluded.owner,
                    token = {t}.token + 1,
                    acquired_at_ms = excluded.acquired_at_ms,
                    expires_at_ms = excluded.expires_at_ms,
                    ttl_ms = excluded.ttl_ms
                 WHERE {t}.owner IS NULL OR {t}.expires_at_ms <= excluded.acquired_at_ms
                 RETURNING token, acquired_at_ms, expires_at_ms"
            ),
            holder: format!(
                "SELECT owner, token, acquired_at_ms, expires_at_ms, {NOW_MS}
                 FROM {t} WHERE lock_key = ?1 AND owner IS NOT NULL"
            ),
            refresh: format!(
                "UPDATE {t} SET expires_at_ms = {NOW_MS} + ?4, ttl_ms = ?4
                 WHERE lock_key = ?1 AND owner = ?2 AND token = ?3 AND expires_at_ms > {NOW_MS}
                 RETURNING acquired_at_ms, expires_at_ms"
            ),
            verify: format!(
                "SELECT count(*) FROM {t}
                 WHERE lock_key = ?1 AND owner = ?2 AND token = ?3
                   AND (expires_at_ms IS NULL OR expires_at_ms > {NOW_MS})"
            ),
            release: format!(
                "UPDATE {t} SET {cleared}
                 WHERE lock_key = ?1 AND owner = ?2 AND token = ?3
                   AND (expires_at_ms IS NULL OR expires_at_ms > {NOW_MS})"
            ),
            status: format!(
                "SELECT owner, token, acquired_at_ms, expires_at_ms, {NOW_MS}
                 FROM {t} WHERE lock_key = ?1"
            ),
            list_with_expired: format!(
                "SELECT lock_key, owner, token, acquired_at_ms, expires_at_ms, {NOW_MS}
                 FROM {t} WHERE owner IS NOT NULL
                 ORDER BY lock_key"
            ),
            list: format!(
                "SELECT lock_key, owner, token, acquired_at_ms, expires_at_ms, {NOW_MS}
                 FROM {t} WHERE owner IS NOT NULL
                   AND (expires_at_ms IS NULL OR expires_at_ms > {NOW_MS})
                 ORDER BY lock_key"
            ),
            force: format!("UPDATE {t} SET {cleared} WHERE lock_key = ?1 AND owner IS NOT NULL"),
            expired: format!(
                "UPDATE {t} SET {cleared} WHERE owner IS NOT NULL AND expires_at_ms <= {NOW_MS}"
            ),
        }
    }
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn token(raw: i64) -> FencingToken {
    FencingToken::new(raw as u64)
}

/// A row of (owner, token, acquired_at_ms, expires_at_ms, now_ms) into lock information, and
/// whether it has expired. A lock without expiry has no `expires_at_ms`.
fn info(key: &LockKey, row: Row) -> Result<(LockInfo, bool)> {
    let (owner, tok, acquired, expires, now) = row;
    let mut info = LockInfo::new(key.clone(), stored_owner(owner)?, token(tok));
    info.acquired_at = Some(time(acquired));
    info.expires_at = expires.map(time);
    info.remaining = expires.map(|e| Duration::from_millis((e - now).max(0) as u64));
    Ok((info, expires.is_some_and(|e| e <= now)))
}

fn stored_owner(owner: String) -> Result<OwnerId> {
    OwnerId::new(owner)
        .map_err(|e| Error::permanent(NAME, format!("corrupt owner in lock table: {e}")))
}

impl SqliteBackend {
    /// Opens (creating if needed) the database file and configures it for several processes:
    /// WAL journal, the busy timeout. Does not create the table: call
    /// [`LockBackend::init_storage`].
    ///
    /// With [`SqliteConfig::read_only`] the file is opened read-only and left exactly as it is
    /// (no journal mode switch); with it or without [`SqliteConfig::create_if_missing`], a
    /// missing file is [`Error::NotInitialized`] and nothing is created. A path that is not an
    /// SQLite database (a directory, another kind of file) is [`Error::NotAccessible`].
    pub async fn connect(config: SqliteConfig) -> Result<Self> {
        let (table, busy_timeout) = config.validated()?;
        let path = config.path().to_path_buf();
        let sql = Statements::new(&table);
        let open_path = path.clone();
        let read_only = config.is_read_only();
        let create = config.creates_if_missing();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            if !create && std::fs::symlink_metadata(&open_path).is_err() {
                return Err(Error::NotInitialized {
                    backend: NAME,
                    what: format!(
                        "the database file {} does not exist: run init_storage (or `leaselock \
                         init`)",
                        open_path.display()
                    ),
                });
            }
            if open_path.is_dir() {
                // Waiting does not turn a directory into a database: permanent.
                return Err(Error::permanent(
                    NAME,
                    format!(
                        "{} is a directory, not an SQLite database file",
                        open_path.display()
                    ),
                ));
            }
            let mut flags = OpenFlags::SQLITE_OPEN_NO_MUTEX;
            flags |= if read_only {
                OpenFlags::SQLITE_OPEN_READ_ONLY
            } else {
                OpenFlags::SQLITE_OPEN_READ_WRITE
            };
            if create {
                flags |= OpenFlags::SQLITE_OPEN_CREATE;
            }
            let conn = Connection::open_with_flags(&open_path, flags)
                .map_err(|e| crate::error::open_failed(&open_path, e))?;
            conn.busy_timeout(busy_timeout).map_err(convert)?;
            // Reading the schema is the first access of the file: a file that is not a
            // database fails here, with SQLite's "file is not a database".
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(|e| not_a_database(&open_path, e))?;
            if !read_only {
                let mode = wal_mode(&conn, busy_timeout)?;
                if !mode.eq_ignore_ascii_case("wal") {
                    tracing::warn!(path = %open_path.display(), mode, "SQLite could not switch to WAL; locking still works, with more contention");
                }
                conn.execute_batch("PRAGMA synchronous = NORMAL")
                    .map_err(convert)?;
            }
            Ok(conn)
        })
        .await
        .map_err(join)??;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                conn: Mutex::new(conn),
                sql,
                busy_timeout,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &std::path::Path {
        &self.inner.path
    }

    /// Runs `f` (a few statements on one key) with the connection: here, on the caller's thread,
    /// when that cannot wait, else on the blocking pool.
    ///
    /// A statement on a database no other process has locked takes a few microseconds, less
    /// than handing it to another thread and back (which was about two thirds of an uncontended
    /// acquire + release, see BENCHMARKS.md). So when the connection is free, `f` runs here with
    /// a busy handler that gives up at once instead of the busy timeout's wait: an async thread
    /// must not wait for another process. Every write takes the write lock before writing
    /// anything (a single writing statement in autocommit mode, or `BEGIN IMMEDIATE`), and the
    /// reads change nothing, so an `f` that met a busy database wrote nothing: its outcome is
    /// dropped and it runs again on the blocking pool, which waits as configured. (A commit here
    /// does not wait for the disk either: in WAL mode with `synchronous = NORMAL` only the
    /// occasional automatic checkpoint syncs, and it covers the few pages of a lock table.)
    async fn with<T, F>(&self, mut f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Connection, &Statements) -> Result<T> + Send + 'static,
    {
        if let Some(mut conn) = self.free_connection() {
            BUSY.with(|busy| busy.set(false));
            let outcome = conn
                .busy_handler(Some(give_up_when_busy))
                .map_err(convert)
                .and_then(|()| f(&mut conn, &self.inner.sql));
            // Busy without the handler being called is possible too: SQLite refuses a wait that
            // could deadlock.
            let met_busy =
                BUSY.with(|busy| busy.replace(false)) || outcome.as_ref().is_err_and(is_busy);
            conn.busy_timeout(self.inner.busy_timeout)
                .map_err(convert)?;
            if !met_busy {
                return outcome;
            }
            tracing::trace!("SQLite database busy; waiting on the blocking pool");
        }
        self.with_pool(f).await
    }

    /// The connection, when no other call is using it.
    fn free_connection(&self) -> Option<MutexGuard<'_, Connection>> {
        match self.inner.conn.try_lock() {
            Ok(conn) => Some(conn),
            // Nothing here can be left half-written by a panic: recover.
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Runs `f` with the connection on the blocking pool: for work that may take long (creating
    /// the table, a batch of refreshes, a scan of every lock) or must wait for another process.
    async fn with_pool<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Statements) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn, &inner.sql)
        })
        .await
        .map_err(join)?
    }
}

/// Switches the database to WAL (a no-op when it is already), returning the journal mode it is
/// in. Processes that open a new database file at once can each find the switch busy without
/// their busy handler being called (SQLite refuses a wait that could deadlock two connections
/// both upgrading their lock): tried again until the busy timeout.
fn wal_mode(conn: &Connection, busy_timeout: Duration) -> Result<String> {
    let started = std::time::Instant::now();
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && started.elapsed() < busy_timeout =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            outcome => return outcome.map_err(convert),
        }
    }
}

thread_local! {
    /// Set by [`give_up_when_busy`] on the thread whose statement met a locked database.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// The busy handler of a call run on the caller's thread: note it, and give up at once.
fn give_up_when_busy(_attempts: i32) -> bool {
    BUSY.with(|busy| busy.set(true));
    false
}

/// A statement of the backend does not fit the table it found.
fn wrong_columns(table: &str, error: rusqlite::Error) -> Error {
    match convert(error) {
        Error::Backend { source, .. } => Error::NotAccessible {
            backend: NAME,
            what: format!(
                "table `{table}` is not a leaselock lock table (its columns do not fit: {source})"
            ),
            source: None,
        },
        other => other,
    }
}

/// The first read of a file failed: say which file is not a usable database.
fn not_a_database(path: &std::path::Path, error: rusqlite::Error) -> Error {
    let extended = match &error {
        rusqlite::Error::SqliteFailure(failure, _) => failure.extended_code,
        _ => 0,
    };
    if matches!(
        extended,
        rusqlite::ffi::SQLITE_READONLY_DIRECTORY | rusqlite::ffi::SQLITE_READONLY_CANTINIT
    ) {
        // A permission this user lacks: waiting does not grant it.
        let what = format!(
            "{}: cannot be read by this user: the database is in WAL mode, and SQLite needs its \
             -shm file beside it, which this user may not create in that directory (give this \
             user write access to the directory)",
            path.display()
        );
        return Error::denied(NAME, what, Some(Box::new(error)));
    }
    let not_a_database = matches!(
        &error,
        rusqlite::Error::SqliteFailure(failure, _) if failure.code == rusqlite::ErrorCode::NotADatabase
    );
    match convert(error) {
        Error::NotAccessible { what, source, .. } => Error::NotAccessible {
            backend: NAME,
            what: format!("{}: {what}", path.display()),
            source,
        },
        Error::Denied { what, source, .. } => {
            Error::denied(NAME, format!("{}: {what}", path.display()), source)
        }
        // Permanent: a file that is not a database stays one.
        _ if not_a_database => {
            Error::permanent(NAME, format!("{}: file is not a database", path.display()))
        }
        other => other,
    }
}

/// The rows of a list statement (key, then the holder columns), each with whether it expired.
fn list_rows(conn: &mut Connection, statement: &str) -> Result<Vec<(LockInfo, bool)>> {
    let mut stmt = conn.prepare_cached(statement).map_err(convert)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?),
            ))
        })
        .map_err(convert)?;
    let mut out = Vec::new();
    for row in rows {
        let (key, row) = row.map_err(convert)?;
        let key = LockKey::new(key)
            .map_err(|e| Error::permanent(NAME, format!("corrupt key in lock table: {e}")))?;
        out.push(info(&key, row)?);
    }
    Ok(out)
}

fn immediate(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(convert)
}

type Row = (String, i64, i64, Option<i64>, i64);

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Row>> {
    let owner: Option<String> = r.get(0)?;
    Ok(match owner {
        Some(owner) => Some((owner, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        None => None,
    })
}

/// Extends `lease` inside `tx`: `Ok(Err(Lost))` when it no longer holds its key, `Err` when the
/// statement itself failed (which fails the whole transaction).
fn refresh_in(
    tx: &rusqlite::Transaction<'_>,
    sql: &Statements,
    lease: &Lease,
) -> Result<Result<Lease>> {
    let Some(ttl) = lease.ttl else {
        return Ok(Err(Error::invalid(
            "lease",
            "a lease without a duration cannot be refreshed",
        )));
    };
    let row = tx
        .prepare_cached(&sql.refresh)
        .and_then(|mut s| {
            s.query_row(
                params![
                    lease.key.as_str(),
                    lease.owner.as_str(),
                    lease.token.get() as i64,
                    millis(ttl)
                ],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()
        })
        .map_err(convert)?;
    Ok(match row {
        Some((acquired, expires)) => {
            let mut fresh = lease.clone().with_expiry(time(expires), ttl);
            fresh.acquired_at = time(acquired);
            Ok(fresh)
        }
        None => Err(Error::lost(
            &lease.key,
            "the lease expired, was released or was taken over",
        )),
    })
}

#[async_trait]
impl LockBackend for SqliteBackend {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(NAME, LockKind::Lease, ExpiryClock::Database);
        caps.max_refresh_batch = MAX_REFRESH_BATCH;
        caps
    }

    async fn init_storage(&self) -> Result<()> {
        self.with_pool(|conn, sql| {
            let tx = immediate(conn)?;
            tx.execute_batch(&sql.create).map_err(convert)?;
            tx.commit().map_err(convert)
        })
        .await?;
        tracing::debug!(table = %self.inner.sql.table, "SQLite lock table ready");
        Ok(())
    }

    async fn check_storage(&self) -> Result<()> {
        self.with(|conn, sql| {
            let kind: Option<String> = conn
                .query_row(&sql.exists, [&sql.table], |r| r.get(0))
                .optional()
                .map_err(convert)?;
            match kind.as_deref() {
                Some("table") => {}
                Some(other) => {
                    return Err(Error::NotAccessible {
                        backend: NAME,
                        what: format!(
                            "`{}` is a {other}, not a lock table: drop it or choose another \
                             table name",
                            sql.table
                        ),
                        source: None,
                    })
                }
                None => return Err(not_initialized(&format!("no table `{}`", sql.table))),
            }
            // Preparing every statement checks the columns too.
            for statement in [&sql.acquire, &sql.refresh, &sql.status, &sql.list] {
                conn.prepare_cached(statement)
                    .map_err(|e| wrong_columns(&sql.table, e))?;
            }
            Ok(())
        })
        .await
    }

    /// One autocommit statement, like the floor's: SQLite takes the write lock when a writing
    /// statement starts (waiting in the busy handler), so the statement is its own immediate
    /// transaction. Only a refused attempt reads the holder, in a second statement; a holder
    /// gone by then (released or expired in between) means the key is free again: try again.
    async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome> {
        let request = request.clone();
        self.with(move |conn, sql| {
            let key = request.key().as_str();
            let ttl = request.ttl().map(millis);
            let mut holder = None;
            for _ in 0..ACQUIRE_ATTEMPTS {
                let won = conn
                    .prepare_cached(&sql.acquire)
                    .and_then(|mut s| {
                        s.query_row(params![key, request.owner().as_str(), ttl], |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, Option<i64>>(2)?,
                            ))
                        })
                        .optional()
                    })
                    .map_err(convert)?;
                if let Some((tok, acquired, expires)) = won {
                    let lease = Lease::new(
                        request.key().clone(),
                        request.owner().clone(),
                        token(tok),
                        time(acquired),
                    );
                    return Ok(AcquireOutcome::Acquired(match (expires, request.ttl()) {
                        (Some(expires), Some(ttl)) => lease.with_expiry(time(expires), ttl),
                        _ => lease,
                    }));
                }
                let row = conn
                    .prepare_cached(&sql.holder)
                    .and_then(|mut s| s.query_row([key], read_row).optional())
                    .map_err(convert)?
                    .flatten();
                match row.map(|row| info(request.key(), row)).transpose()? {
                    Some((info, false)) => return Ok(AcquireOutcome::Held(Some(info))),
                    // Released or expired since the attempt: the key is free again.
                    Some((info, true)) => holder = Some(info),
                    None => holder = None,
                }
            }
            Ok(AcquireOutcome::Held(holder))
        })
        .await
    }

    async fn refresh(&self, lease: &Lease) -> Result<Lease> {
        let lease = lease.clone();
        self.with(move |conn, sql| {
            let tx = immediate(conn)?;
            let fresh = refresh_in(&tx, sql, &lease)?;
            tx.commit().map_err(convert)?;
            fresh
        })
        .await
    }

    /// Every lease in one immediate transaction: one thread hand-off and one commit for the
    /// batch.
    async fn refresh_many(&self, leases: &[Lease]) -> Vec<Result<Lease>> {
        let count = leases.len();
        let leases = leases.to_vec();
        let outcome = self
            .with_pool(move |conn, sql| {
                let tx = immediate(conn)?;
                let results = leases
                    .iter()
                    .map(|lease| refresh_in(&tx, sql, lease))
                    .collect::<Result<Vec<_>>>()?;
                tx.commit().map_err(convert)?;
                Ok(results)
            })
            .await;
        outcome.unwrap_or_else(|error| error.for_batch(count).into_iter().map(Err).collect())
    }

    async fn verify(&self, lease: &Lease) -> Result<bool> {
        let lease = lease.clone();
        self.with(move |conn, sql| {
            let n: i64 = conn
                .prepare_cached(&sql.verify)
                .and_then(|mut s| {
                    s.query_row(
                        params![
                            lease.key.as_str(),
                            lease.owner.as_str(),
                            lease.token.get() as i64
                        ],
                        |r| r.get(0),
                    )
                })
                .map_err(convert)?;
            Ok(n == 1)
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let lease = lease.clone();
        // One autocommit statement, its own immediate transaction (see `try_acquire`).
        self.with(move |conn, sql| {
            let n = conn
                .prepare_cached(&sql.release)
                .and_then(|mut s| {
                    s.execute(params![
                        lease.key.as_str(),
                        lease.owner.as_str(),
                        lease.token.get() as i64
                    ])
                })
                .map_err(convert)?;
            Ok(n == 1)
        })
        .await
    }

    async fn status(&self, key: &LockKey) -> Result<LockState> {
        let key = key.clone();
        self.with(move |conn, sql| {
            let row = conn
                .prepare_cached(&sql.status)
                .and_then(|mut s| s.query_row([key.as_str()], read_row).optional())
                .map_err(convert)?
                .flatten();
            Ok(match row {
                None => LockState::Free,
                Some(row) => match info(&key, row)? {
                    (info, true) => LockState::Expired(info),
                    (info, false) => LockState::Held(info),
                },
            })
        })
        .await
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let rows = self
            .with_pool(|conn, sql| list_rows(conn, &sql.list))
            .await?;
        Ok(rows.into_iter().map(|(info, _)| info).collect())
    }

    async fn list_with_expired(&self) -> Result<Vec<LockState>> {
        let rows = self
            .with_pool(|conn, sql| list_rows(conn, &sql.list_with_expired))
            .await?;
        Ok(rows
            .into_iter()
            .map(|(info, expired)| {
                if expired {
                    LockState::Expired(info)
                } else {
                    LockState::Held(info)
                }
            })
            .collect())
    }

    async fn force_release(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let key = key.clone();
        self.with(move |conn, sql| {
            let tx = immediate(conn)?;
            let row = tx
                .prepare_cached(&sql.holder)
                .and_then(|mut s| s.query_row([key.as_str()], read_row).optional())
                .map_err(convert)?
                .flatten();
            let removed = row.map(|row| info(&key, row)).transpose()?.map(|(i, _)| i);
            if removed.is_some() {
                tx.prepare_cached(&sql.force)
                    .and_then(|mut s| s.execute([key.as_str()]))
                    .map_err(convert)?;
            }
            tx.commit().map_err(convert)?;
            Ok(removed)
        })
        .await
    }

    async fn release_expired(&self) -> Result<u64> {
        self.with_pool(|conn, sql| {
            let tx = immediate(conn)?;
            let n = tx.execute(&sql.expired, []).map_err(convert)?;
            tx.commit().map_err(convert)?;
            Ok(n as u64)
        })
        .await
    }

    async fn watch_release(&self, _key: &LockKey) -> Result<Option<Wakeup>> {
        // SQLite has no notifications across processes: waiters poll.
        Ok(None)
    }

    fn watch_lost(&self, _lease: &Lease) -> Option<Wakeup> {
        None
    }
}
