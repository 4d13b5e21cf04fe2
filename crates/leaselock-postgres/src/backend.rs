//! The two backends and what they share: connecting, the control connection, LISTEN/NOTIFY,
//! storage initialization.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use leaselock::{Error, LockKey, Result, Wakeup};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Row, Statement};

use crate::config::PgConfig;
use crate::error;

pub(crate) mod advisory;
pub(crate) mod table;

/// The stable 64-bit advisory lock id of `key` under `prefix`: the first 8 bytes of
/// SHA-256(`prefix` ‖ `0x00` ‖ `key`), read as a big-endian `i64`.
///
/// This is the number [`PgAdvisoryBackend`](crate::PgAdvisoryBackend) passes to
/// `pg_try_advisory_lock(bigint)`. In `pg_locks` it shows as `classid` = the high 32 bits and
/// `objid` = the low 32 bits (both unsigned), with `objsubid = 1`. The function never changes
/// between versions: other tools can compute it (`leaselock key KEY --url postgres://…` prints it).
///
/// ```
/// use leaselock_postgres::advisory_key;
/// assert_eq!(advisory_key("leaselock", "migrations"), -7_738_434_545_972_184_409);
/// // The same computation in SQL, for operators:
/// //   SELECT ('x' || substr(encode(sha256(convert_to('leaselock', 'UTF8') || '\x00'::bytea
/// //           || convert_to('migrations', 'UTF8')), 'hex'), 1, 16))::bit(64)::bigint;
/// assert_ne!(advisory_key("other_app", "migrations"), advisory_key("leaselock", "migrations"));
/// ```
pub fn advisory_key(prefix: &str, key: &str) -> i64 {
    let mut hasher = Sha256::new();
    hasher.update(prefix.as_bytes());
    hasher.update([0u8]);
    hasher.update(key.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// The `pg_locks` columns `(classid, objid)` under which PostgreSQL shows the advisory lock
/// `pg_try_advisory_lock(id)`: the high and low 32 bits, unsigned.
///
/// ```
/// use leaselock_postgres::advisory_lock_parts;
/// assert_eq!(advisory_lock_parts(-1), (u32::MAX, u32::MAX));
/// assert_eq!(advisory_lock_parts((7 << 32) | 9), (7, 9));
/// ```
pub fn advisory_lock_parts(id: i64) -> (u32, u32) {
    let bits = id as u64;
    ((bits >> 32) as u32, bits as u32)
}

/// SQL matching a `pg_locks` row (alias `l`) against the advisory id in the int8 expression `id`
/// in the current database.
pub(crate) fn lock_match(id: &str) -> String {
    format!(
        "l.locktype = 'advisory' AND l.objsubid = 1 \
         AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database()) \
         AND l.classid = ((({id}) >> 32) & 4294967295)::oid \
         AND l.objid = (({id}) & 4294967295)::oid"
    )
}

/// The NOTIFY channel of one storage: short (channel names are identifiers, at most 63 bytes),
/// stable, and different per table, schema and prefix.
pub(crate) fn channel_name(kind: &str, qualified: &str, prefix: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [kind, qualified, prefix] {
        hasher.update(part.as_bytes());
        hasher.update([0u8]);
    }
    let digest = hasher.finalize();
    let hex: String = digest[..10].iter().map(|b| format!("{b:02x}")).collect();
    format!("leaselock_{hex}")
}

/// The most statements one connection keeps prepared (a backend uses about a dozen).
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// The call that turns `synchronous_commit` off for the statement's own transaction
/// (`set_config(…, true)`), so its commit does not wait for the log flush, for a `RETURNING`
/// list: evaluated once per changed row, so only a statement that changed something (and so has
/// a commit to wait for) runs it. For releases only: acquisitions and refreshes must stay durable
/// (see the crate's "Durability").
pub(crate) const NO_FLUSH_WAIT_CALL: &str = "set_config('synchronous_commit', 'off', true)";

/// One connection, whether its driver task has ended, and its prepared statements.
pub(crate) struct Conn {
    pub(crate) client: Client,
    closed: watch::Receiver<bool>,
    /// `None` when statements are not cached (`statement_cache=false`).
    statements: Option<Mutex<HashMap<String, Statement>>>,
}

impl Conn {
    /// Runs one statement: prepared once and reused when this connection caches statements,
    /// else as an unnamed statement (no prepare round trip either way).
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
        match self.statement(sql, params).await {
            Some(statement) => {
                let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
                self.client.query(&statement?, &values).await
            }
            None => self.client.query_typed(sql, params).await,
        }
    }

    /// The prepared form of `sql` on this connection, preparing it on first use; `None` when
    /// this connection does not cache statements.
    async fn statement(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Option<std::result::Result<Statement, tokio_postgres::Error>> {
        let cache = self.statements.as_ref()?;
        if let Some(statement) = lock(cache).get(sql) {
            return Some(Ok(statement.clone()));
        }
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        let statement = match self.client.prepare_typed(sql, &types).await {
            Ok(statement) => statement,
            Err(e) => return Some(Err(e)),
        };
        let mut cache = lock(cache);
        if cache.len() < STATEMENT_CACHE_CAPACITY {
            cache.insert(sql.to_owned(), statement.clone());
        }
        Some(Ok(statement))
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow() || self.client.is_closed()
    }

    /// Resolves once the connection is gone (dropped, terminated by the server, broken).
    pub(crate) fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closed = self.closed.clone();
        async move {
            let _ = closed.wait_for(|closed| *closed).await;
        }
    }
}

/// Opens connections with the configured TLS and timeouts.
pub(crate) struct Connector {
    config: tokio_postgres::Config,
    target: String,
    connect_timeout: Duration,
    statement_cache: bool,
    #[cfg(feature = "tls")]
    tls: tokio_postgres_rustls::MakeRustlsConnect,
}

impl Connector {
    pub(crate) fn new(config: &PgConfig) -> Result<Self> {
        Ok(Self {
            config: config.connection.clone(),
            target: config.target(),
            connect_timeout: config.connect_timeout,
            statement_cache: config.statement_cache,
            #[cfg(feature = "tls")]
            tls: tls_connector(config)?,
        })
    }

    /// Opens a connection; notifications on `listen` (channel, sink) are forwarded to the sink.
    pub(crate) async fn connect(
        &self,
        backend: &'static str,
        listen: Option<(String, broadcast::Sender<Arc<str>>)>,
    ) -> Result<Conn> {
        #[cfg(not(feature = "tls"))]
        let connecting = self.config.connect(tokio_postgres::NoTls);
        #[cfg(feature = "tls")]
        let connecting = self.config.connect(self.tls.clone());
        let (client, connection) = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| error::connect_timeout(backend, &self.target))?
            .map_err(|e| error::connect(backend, &self.target, e))?;
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(drive(connection, listen, closed_tx));
        Ok(Conn {
            client,
            closed,
            statements: self.statement_cache.then(Mutex::default),
        })
    }
}

#[cfg(feature = "tls")]
fn tls_connector(config: &PgConfig) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    for cert in &config.tls_roots {
        roots.add(cert.clone()).map_err(|e| {
            Error::invalid(
                "tls_root_certificates",
                format!("unusable certificate: {e}"),
            )
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid("tls", e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
}

/// Drives a connection until it ends, forwarding notifications, then reports the end.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    listen: Option<(String, broadcast::Sender<Arc<str>>)>,
    closed: watch::Sender<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let outcome = std::future::poll_fn(|cx| loop {
        match connection.poll_message(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(Ok(())),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
            Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => {
                if let Some((channel, sink)) = &listen {
                    if n.channel() == channel {
                        let _ = sink.send(Arc::from(n.payload()));
                    }
                }
            }
            Poll::Ready(Some(Ok(AsyncMessage::Notice(notice)))) => {
                tracing::trace!(notice = %notice.message(), "postgres notice");
            }
            Poll::Ready(Some(Ok(_))) => {}
        }
    })
    .await;
    if let Err(e) = outcome {
        tracing::debug!(error = %e, "postgres connection ended");
    }
    closed.send_replace(true);
}

/// What both backends share: the statement connections (opened as concurrent operations need
/// them, reopened when they break), the LISTEN, timeouts.
pub(crate) struct Shared {
    pub(crate) backend: &'static str,
    pub(crate) connector: Connector,
    pub(crate) operation_timeout: Duration,
    pub(crate) qualified: String,
    pub(crate) channel: String,
    schema: Option<String>,
    target: String,
    /// The statement connections: at most [`PgConfig::connections`], a new one opened only when
    /// every open one has a statement in flight, so a caller that runs one statement at a time
    /// (the CLI) keeps one connection, and a busy server process spreads its load.
    control: Vec<Slot>,
    /// Where every statement connection forwards the notifications of [`Shared::channel`].
    events: broadcast::Sender<Arc<str>>,
    /// The statement connection that runs `LISTEN`, once a release is watched: no connection
    /// of its own.
    listener: tokio::sync::Mutex<Option<Arc<Conn>>>,
    /// How many live release watches this backend has per key. An acquisition that finds its
    /// key held marks the key wanted only when somebody here waits for it, so that a release
    /// sends `pg_notify` only when a waiter can hear it.
    watched: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    /// Set when the last release watch found the server crowded (see [`Shared::watch_release`]):
    /// waiting, this backend keeps no connection between attempts.
    frugal: AtomicBool,
    /// When the server's connections were last counted.
    crowd_checked: Mutex<Option<std::time::Instant>>,
}

/// How often a waiter counts the server's connections, at most.
const CROWD_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The server's client connections and their limit, for [`Shared::watch_release`].
const CROWD_SQL: &str = "SELECT (SELECT count(*) FROM pg_stat_activity \
                                 WHERE backend_type = 'client backend') AS used, \
                                current_setting('max_connections')::int8 AS max";

/// One statement connection (opened on first use) and how many operations use it now.
struct Slot {
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    busy: AtomicUsize,
}

/// A statement connection in use; it counts as busy until this is dropped.
pub(crate) struct InUse<'a> {
    conn: Arc<Conn>,
    _busy: Busy<'a>,
}

/// One count of a slot's users, given back when dropped (also when the operation is cancelled).
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::ops::Deref for InUse<'_> {
    type Target = Arc<Conn>;
    fn deref(&self) -> &Arc<Conn> {
        &self.conn
    }
}

/// A typed statement parameter.
pub(crate) type Param<'a> = (&'a (dyn ToSql + Sync), Type);

impl Shared {
    pub(crate) fn new(
        backend: &'static str,
        config: &PgConfig,
        qualified: String,
        channel: String,
    ) -> Result<Self> {
        Ok(Self {
            backend,
            connector: Connector::new(config)?,
            operation_timeout: config.operation_timeout,
            qualified,
            channel,
            schema: config.schema_name().map(str::to_owned),
            target: config.target(),
            control: (0..config.connections)
                .map(|_| Slot {
                    conn: tokio::sync::Mutex::new(None),
                    busy: AtomicUsize::new(0),
                })
                .collect(),
            events: broadcast::channel(1024).0,
            listener: tokio::sync::Mutex::new(None),
            watched: Arc::default(),
            frugal: AtomicBool::new(false),
            crowd_checked: Mutex::new(None),
        })
    }

    /// The configured schema, if any.
    pub(crate) fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// Where this connects (no password).
    pub(crate) fn connector_target(&self) -> &str {
        &self.target
    }

    /// A statement connection: an open one nobody uses, else a new one while fewer than
    /// [`PgConfig::connections`] are open, else the least used (statements pipeline). Reopened
    /// when it broke.
    pub(crate) async fn control(&self) -> Result<InUse<'_>> {
        let slot = &self.control[self.pick()];
        let busy = Busy(&slot.busy);
        let mut control = slot.conn.lock().await;
        if let Some(conn) = control.as_ref() {
            if !conn.is_closed() {
                return Ok(InUse {
                    conn: Arc::clone(conn),
                    _busy: busy,
                });
            }
        }
        let conn = Arc::new(
            self.connector
                .connect(
                    self.backend,
                    Some((self.channel.clone(), self.events.clone())),
                )
                .await?,
        );
        *control = Some(Arc::clone(&conn));
        Ok(InUse { conn, _busy: busy })
    }

    /// The slot the next operation uses, counted busy.
    fn pick(&self) -> usize {
        let mut unopened = None;
        let mut least = (usize::MAX, 0);
        let mut chosen = None;
        for (i, slot) in self.control.iter().enumerate() {
            let busy = slot.busy.load(Ordering::Relaxed);
            // A slot whose lock is taken is being opened (or checked): it counts as used.
            if let Ok(conn) = slot.conn.try_lock() {
                if conn.as_ref().is_none_or(|c| c.is_closed()) {
                    unopened.get_or_insert(i);
                    continue;
                }
                if busy == 0 {
                    chosen = Some(i);
                    break;
                }
            }
            if busy < least.0 {
                least = (busy, i);
            }
        }
        let i = chosen.or(unopened).unwrap_or(least.1);
        self.control[i].busy.fetch_add(1, Ordering::Relaxed);
        i
    }

    /// Forgets `conn` (it stopped answering): the next operation in its slot opens a new one.
    async fn forget(&self, conn: &Arc<Conn>) {
        for slot in &self.control {
            let mut control = slot.conn.lock().await;
            if control.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
                *control = None;
            }
        }
        let mut listener = self.listener.lock().await;
        if listener.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            // Its watchers are told through `closed` once the last user drops it.
            *listener = None;
        }
    }

    /// One statement on a statement connection, in one round trip.
    pub(crate) async fn query(
        &self,
        what: &str,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>> {
        let conn = self.control().await?;
        let outcome = tokio::time::timeout(self.operation_timeout, conn.query(sql, params)).await;
        match outcome {
            Ok(result) => result.map_err(|e| error::driver(self.backend, what, e)),
            Err(_) => {
                // A connection that stopped answering is not trusted again: the next operation
                // in its turn opens a new one.
                self.forget(&conn).await;
                Err(error::timeout(self.backend, what))
            }
        }
    }

    /// Like [`Shared::query`], expecting exactly one row.
    pub(crate) async fn query_one(
        &self,
        what: &str,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Row> {
        let mut rows = self.query(what, sql, params).await?;
        match rows.len() {
            1 => Ok(rows.remove(0)),
            n => Err(Error::permanent(
                self.backend,
                format!("{what}: expected one row, got {n}"),
            )),
        }
    }

    /// Creates the storage with `ddl` in one round trip, serialized among concurrent
    /// initializers by transaction-level advisory locks (one for the schema, one for the table).
    /// A concurrent `CREATE` racing past the locks anyway (another tool, an older version) makes
    /// the whole transaction fail with a duplicate-object error: it is tried again, and then
    /// finds the objects in place.
    pub(crate) async fn init(&self, ddl: &str, schema: Option<&str>) -> Result<()> {
        let table_lock = advisory_key("leaselock-init", &self.qualified);
        let create_schema = match schema {
            // CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema
            // exists, so only try when it is missing. The name is a validated identifier.
            Some(schema) => format!(
                "SELECT pg_advisory_xact_lock({schema_lock}); \
                 DO $leaselock$ BEGIN \
                   IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = '{schema}') THEN \
                     CREATE SCHEMA IF NOT EXISTS \"{schema}\"; \
                   END IF; \
                 END $leaselock$;",
                schema_lock = advisory_key("leaselock-init-schema", schema)
            ),
            None => String::new(),
        };
        // One simple query: one implicit transaction, so the xact locks cover all of it.
        let sql = format!("{create_schema} SELECT pg_advisory_xact_lock({table_lock}); {ddl}");
        let conn = self.control().await?;
        let mut attempt = 1;
        loop {
            let outcome =
                tokio::time::timeout(self.operation_timeout, conn.client.batch_execute(&sql))
                    .await
                    .map_err(|_| error::timeout(self.backend, "init_storage"))?;
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 5 && is_duplicate_object(&e) => {
                    tracing::debug!(error = %e, attempt, "concurrent storage creation; trying again");
                    attempt += 1;
                }
                Err(e) => return Err(error::driver(self.backend, "init_storage", e)),
            }
        }
    }

    /// The pre-flight check: the table exists with the expected columns, and this role may read
    /// and write it.
    pub(crate) async fn check(&self, columns: &str) -> Result<()> {
        self.check_table(&self.qualified, columns).await
    }

    /// [`Shared::check`] for `table` (schema-qualified and quoted), which may be a companion of
    /// the backend's own table.
    pub(crate) async fn check_table(&self, table: &str, columns: &str) -> Result<()> {
        let sql = format!(
            "SELECT (SELECT count(*) FROM (SELECT {columns} FROM {t} LIMIT 0) probe) AS n, \
                    has_table_privilege($1, 'SELECT') AS can_select, \
                    has_table_privilege($1, 'INSERT') AS can_insert, \
                    has_table_privilege($1, 'UPDATE') AS can_update",
            t = table
        );
        let row = self
            .query_one(
                &format!("checking table {table}"),
                &sql,
                &[(&table, Type::TEXT)],
            )
            .await?;
        let missing: Vec<&str> = [
            ("SELECT", "can_select"),
            ("INSERT", "can_insert"),
            ("UPDATE", "can_update"),
        ]
        .into_iter()
        .filter(|(_, col)| !row.get::<_, bool>(*col))
        .map(|(privilege, _)| privilege)
        .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::denied(
                self.backend,
                format!(
                    "this role lacks {} privilege on table {}",
                    missing.join(", "),
                    table
                ),
                None,
            ))
        }
    }

    /// Subscribes to release notifications for `key`; LISTEN is in place when this returns. The
    /// LISTEN runs on a statement connection (notifications arrive between its statements), so
    /// watching costs no connection of its own.
    ///
    ///
    /// It first counts the server's client connections (at most once every
    /// [`CROWD_CHECK_EVERY`]): when a third of `max_connections` or more are in use, it does not
    /// listen (the caller polls), stops a LISTEN in place, and the backend turns frugal: after
    /// each attempt it closes the connections it does not need ([`Shared::shed`]), so that a
    /// crowd of waiting processes leaves the server room. A later count below that ends it.
    pub(crate) async fn watch_release(&self, key: &LockKey) -> Result<Option<Wakeup>> {
        let due = {
            let mut checked = lock(&self.crowd_checked);
            let due = checked.is_none_or(|at| at.elapsed() >= CROWD_CHECK_EVERY);
            if due {
                *checked = Some(std::time::Instant::now());
            }
            due
        };
        if due {
            let row = self
                .query_one("counting the server's connections", CROWD_SQL, &[])
                .await?;
            let used: i64 = row.try_get("used").map_err(|e| self.unexpected(e))?;
            let max: i64 = row.try_get("max").map_err(|e| self.unexpected(e))?;
            let crowded = used * 3 >= max;
            if crowded != self.frugal() {
                tracing::debug!(used, max, crowded, "server connections counted");
            }
            self.frugal.store(crowded, Ordering::Relaxed);
        }
        if self.frugal() {
            // Its connection closes once no statement uses it; its watchers then wake.
            self.listener.lock().await.take();
            self.shed();
            return Ok(None);
        }
        let mut listener = self.listener.lock().await;
        let reuse = listener.as_ref().filter(|c| !c.is_closed());
        let (events, closed) = match reuse {
            Some(conn) => (self.events.subscribe(), conn.closed()),
            None => {
                let conn = self.control().await?;
                // Subscribed before LISTEN, so that nothing between them is missed.
                let events = self.events.subscribe();
                let listen = format!("LISTEN \"{}\"", self.channel);
                let outcome = tokio::time::timeout(
                    self.operation_timeout,
                    conn.client.batch_execute(&listen),
                )
                .await;
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(error::driver(self.backend, "LISTEN", e)),
                    Err(_) => {
                        let stuck = Arc::clone(&conn);
                        drop(conn);
                        drop(listener);
                        self.forget(&stuck).await;
                        return Err(error::timeout(self.backend, "LISTEN"));
                    }
                }
                let closed = conn.closed();
                *listener = Some(Arc::clone(&conn));
                (events, closed)
            }
        };
        drop(listener);
        let watch = Watch::new(&self.watched, key);
        Ok(Some(Box::pin(async move {
            wait_for_key(events, closed, &watch.key).await;
            drop(watch);
        })))
    }

    /// Whether the last release watch found the server crowded: then a waiter keeps no
    /// connection between its attempts.
    pub(crate) fn frugal(&self) -> bool {
        self.frugal.load(Ordering::Relaxed)
    }

    /// When [`Shared::frugal`], closes the statement connections no operation uses now.
    pub(crate) fn shed(&self) {
        if !self.frugal() {
            return;
        }
        for slot in &self.control {
            if slot.busy.load(Ordering::Relaxed) == 0 {
                if let Ok(mut conn) = slot.conn.try_lock() {
                    *conn = None;
                }
            }
        }
    }

    fn unexpected(&self, e: tokio_postgres::Error) -> Error {
        Error::permanent(self.backend, format!("unexpected column type: {e}"))
    }

    /// Whether a release watch of this backend (a waiter of this process) is live for `key`.
    pub(crate) fn watching(&self, key: &LockKey) -> bool {
        lock(&self.watched).contains_key(key.as_str())
    }
}

/// A live release watch, counted in [`Shared::watching`] until it is dropped.
struct Watch {
    watched: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    key: Arc<str>,
}

impl Watch {
    fn new(watched: &Arc<Mutex<HashMap<Arc<str>, usize>>>, key: &LockKey) -> Self {
        let key: Arc<str> = Arc::from(key.as_str());
        *lock(watched).entry(Arc::clone(&key)).or_default() += 1;
        Self {
            watched: Arc::clone(watched),
            key,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watched = lock(&self.watched);
        if let Some(count) = watched.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                watched.remove(&self.key);
            }
        }
    }
}

/// Locks `mutex`. Nothing guarded here can be left half-written by a panic: recover.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `wanted` column of both backends' holder rows: set when an acquisition by somebody who
/// will wait finds the key held, cleared by the next acquisition. A release notifies only when
/// it is set: the commit of a transaction that notifies is serialized across the database, which
/// under contention costs more than the rest of the release.
pub(crate) const WANTED: &str = "boolean NOT NULL DEFAULT false";

/// DDL (a `DO` block, for [`Shared::init`]) that adds `column` (`definition`) to `table` when
/// the table has every other one of `columns` (the comma-separated list the storage check
/// expects: the table is ours, made by an earlier version) but not `column`. Any other table of
/// that name is left alone, for the storage check to refuse. The names are validated
/// identifiers and constants.
pub(crate) fn add_column(table: &str, columns: &str, column: &str, definition: &str) -> String {
    let earlier: Vec<String> = columns
        .split(',')
        .map(str::trim)
        .filter(|c| *c != column)
        .map(|c| format!("'{c}'"))
        .collect();
    format!(
        "DO $leaselock$ BEGIN \
           IF (SELECT count(*) FROM pg_attribute \
                WHERE attrelid = '{table}'::regclass AND NOT attisdropped \
                  AND attname IN ({earlier_list})) = {n} \
              AND NOT EXISTS (SELECT 1 FROM pg_attribute \
                WHERE attrelid = '{table}'::regclass AND NOT attisdropped \
                  AND attname = '{column}') THEN \
             ALTER TABLE {table} ADD COLUMN {column} {definition}; \
           END IF; \
         END $leaselock$;",
        earlier_list = earlier.join(", "),
        n = earlier.len()
    )
}

/// The errors concurrent `CREATE … IF NOT EXISTS` can raise: a unique violation in the catalog,
/// or the object appearing between the check and the creation.
fn is_duplicate_object(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    error.code().is_some_and(|c| {
        *c == SqlState::UNIQUE_VIOLATION
            || *c == SqlState::DUPLICATE_TABLE
            || *c == SqlState::DUPLICATE_SCHEMA
            || *c == SqlState::DUPLICATE_OBJECT
    })
}

async fn wait_for_key(
    mut events: broadcast::Receiver<Arc<str>>,
    closed: impl Future<Output = ()>,
    key: &str,
) {
    let matching = async {
        loop {
            match events.recv().await {
                Ok(released) if &*released == key => return,
                Ok(_) => continue,
                // Missed some: one of them may have been ours. Closed: the listener is gone.
                Err(_) => return,
            }
        }
    };
    tokio::select! {
        _ = matching => {}
        _ = closed => {}
    }
}

/// One statement on `conn`, with the operation timeout.
pub(crate) async fn run(
    backend: &'static str,
    timeout: Duration,
    conn: &Conn,
    what: &str,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Vec<Row>> {
    tokio::time::timeout(timeout, conn.query(sql, params))
        .await
        .map_err(|_| error::timeout(backend, what))?
        .map_err(|e| error::driver(backend, what, e))
}

/// A database token (`bigint`, always positive) as a fencing token.
pub(crate) fn token(backend: &'static str, raw: i64) -> Result<leaselock::FencingToken> {
    u64::try_from(raw)
        .ok()
        .filter(|t| *t > 0)
        .map(leaselock::FencingToken::new)
        .ok_or_else(|| Error::permanent(backend, format!("invalid fencing token {raw} in storage")))
}

/// A stored owner id.
pub(crate) fn owner(backend: &'static str, raw: String) -> Result<leaselock::OwnerId> {
    leaselock::OwnerId::new(raw)
        .map_err(|e| Error::permanent(backend, format!("invalid owner in storage: {e}")))
}

/// A stored key.
pub(crate) fn key(backend: &'static str, raw: String) -> Result<LockKey> {
    LockKey::new(raw).map_err(|e| Error::permanent(backend, format!("invalid key in storage: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisory_keys_are_stable() {
        // Pinned: changing the derivation would let two versions hold "the same" lock at once.
        assert_eq!(
            advisory_key("leaselock", "migrations"),
            -7_738_434_545_972_184_409
        );
        assert_ne!(advisory_key("a", "bc"), advisory_key("ab", "c"));
        assert_ne!(advisory_key("p", "k1"), advisory_key("p", "k2"));
    }

    #[test]
    fn channels() {
        let a = channel_name("table", "\"locks\"", "");
        assert!(a.len() < 64 && a.starts_with("leaselock_"), "{a}");
        assert_ne!(a, channel_name("table", "\"other\"", ""));
        assert_eq!(a, channel_name("table", "\"locks\"", ""));
    }
}
