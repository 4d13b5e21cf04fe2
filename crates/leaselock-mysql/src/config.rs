//! Where locks live and how the backends behave: [`MysqlConfig`] and [`Strategy`].

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use leaselock::{Error, LockBackend, Namespace, Result};
use mysql_async::{Opts, OptsBuilder};

use crate::backend::{MysqlGetLockBackend, MysqlTableBackend};

/// The default table of the [`Strategy::Table`] backend: `leaselock_locks`.
pub const DEFAULT_TABLE: &str = "leaselock_locks";
/// The default table of the [`Strategy::GetLock`] backend, which keeps durable fencing token
/// reservations there (and its holders in `leaselock_get_locks_holders`): `leaselock_get_locks`.
/// (Different from [`DEFAULT_TABLE`], so the two strategies never share a table by accident.)
pub const DEFAULT_GET_LOCK_TABLE: &str = "leaselock_get_locks";
/// The default prefix of `GET_LOCK` names: `leaselock` (see [`crate::lock_name`]).
pub const DEFAULT_PREFIX: &str = "leaselock";
/// How often a held `GET_LOCK` lock's connection is checked, by default: 250 ms.
pub const DEFAULT_LIVENESS_INTERVAL: Duration = Duration::from_millis(250);
/// How long one server-side wait for a release lasts, by default: 1 s.
pub const DEFAULT_RELEASE_WAIT: Duration = Duration::from_secs(1);

/// Which of the two backends to use.
///
/// ```
/// use leaselock_mysql::Strategy;
/// assert_eq!("table".parse::<Strategy>()?, Strategy::Table);
/// assert_eq!(Strategy::default(), Strategy::GetLock);
/// assert!("advisory".parse::<Strategy>().is_err());
/// # Ok::<(), leaselock::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Session locks with `GET_LOCK` ([`MysqlGetLockBackend`]): freed the moment the holder's
    /// connection ends, nothing to refresh. `strategy=get_lock` in a URL. The default.
    #[default]
    GetLock,
    /// A lease table with expiry by the server's clock ([`MysqlTableBackend`]): survives
    /// connection drops, works through proxies that do not keep sessions. `strategy=table`.
    Table,
}

impl Strategy {
    /// The name used in URLs: `get_lock` or `table`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::GetLock => "get_lock",
            Strategy::Table => "table",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "get_lock" => Ok(Strategy::GetLock),
            "table" => Ok(Strategy::Table),
            other => Err(Error::invalid(
                "strategy",
                format!("unknown strategy `{other}`: use `get_lock` or `table`"),
            )),
        }
    }
}

/// Connection options plus where and how locks live. Cheap to clone.
///
/// Build it from a URL with [`MysqlConfig::from_url`] or from [`mysql_async::Opts`] with
/// [`MysqlConfig::new`], adjust it, then [`MysqlConfig::build`] a backend (or pass it to
/// [`MysqlGetLockBackend::new`] / [`MysqlTableBackend::new`], which validate it).
///
/// Its `Debug` output never shows the password.
///
/// ```
/// use std::time::Duration;
/// use leaselock_mysql::{MysqlConfig, Strategy};
/// let config = MysqlConfig::from_url("mysql://app:secret@db.internal:3306/app?strategy=table")?
///     .table("job_locks")
///     .liveness_interval(Duration::from_millis(500));
/// let debug = format!("{config:?}");
/// assert!(debug.contains("job_locks") && debug.contains("Table"));
/// assert!(!debug.contains("secret"));
/// # Ok::<(), leaselock::Error>(())
/// ```
#[derive(Clone)]
pub struct MysqlConfig {
    opts: Opts,
    pub(crate) strategy: Strategy,
    pub(crate) table: Option<String>,
    pub(crate) prefix: String,
    pub(crate) liveness_interval: Duration,
    pub(crate) release_wait: Duration,
}

/// A checked configuration, as the backends use it.
#[derive(Clone)]
pub(crate) struct Checked {
    pub(crate) opts: Opts,
    pub(crate) table: Namespace,
    pub(crate) prefix: Namespace,
    pub(crate) liveness_interval: Duration,
    pub(crate) release_wait: Duration,
    pub(crate) server: String,
}

impl MysqlConfig {
    /// A configuration over `opts` with every default: [`Strategy::GetLock`], the strategy's
    /// default table, prefix [`DEFAULT_PREFIX`], [`DEFAULT_LIVENESS_INTERVAL`],
    /// [`DEFAULT_RELEASE_WAIT`].
    ///
    /// `CLIENT_FOUND_ROWS` is switched off whatever `opts` say: the backends read affected-row
    /// counts.
    ///
    /// ```
    /// use leaselock_mysql::MysqlConfig;
    /// use leaselock_mysql::mysql_async::OptsBuilder;
    /// let opts = OptsBuilder::default().ip_or_hostname("127.0.0.1").db_name(Some("app"));
    /// let config = MysqlConfig::new(opts);
    /// assert_eq!(config.server(), "127.0.0.1:3306/app");
    /// ```
    pub fn new(opts: impl Into<Opts>) -> Self {
        let opts = OptsBuilder::from_opts(opts.into()).client_found_rows(false);
        Self {
            opts: opts.into(),
            strategy: Strategy::default(),
            table: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            liveness_interval: DEFAULT_LIVENESS_INTERVAL,
            release_wait: DEFAULT_RELEASE_WAIT,
        }
    }

    /// Parses a `mysql://` or `mariadb://` URL: `scheme://user:password@host:port/database?...`.
    ///
    /// leaselock's own query parameters, removed before the rest goes to `mysql_async` (which
    /// understands `pool_max`, `require_ssl`, `socket`, ... see [`mysql_async::Opts`]):
    /// `strategy=get_lock|table` (default `get_lock`), `table=` (a table name), `prefix=` (the
    /// `GET_LOCK` name prefix). A `pool_max` below 10 without `pool_min` lowers `pool_min` to
    /// match (`mysql_async` would refuse it).
    ///
    /// Errors are [`Error::InvalidInput`] with the field `url`; their text never contains the
    /// password.
    ///
    /// ```
    /// use leaselock_mysql::MysqlConfig;
    /// let config = MysqlConfig::from_url("mariadb://root@127.0.0.1/test?prefix=myapp&pool_max=5")?;
    /// assert_eq!(config.server(), "127.0.0.1:3306/test");
    ///
    /// let err = MysqlConfig::from_url("mysql://u:hunter2@h/db?strategy=nope").unwrap_err();
    /// assert!(matches!(err, leaselock::Error::InvalidInput { field: "url", .. }));
    /// assert!(!err.to_string().contains("hunter2"));
    /// # Ok::<(), leaselock::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        let mut parsed = url::Url::parse(url)
            .map_err(|e| Error::invalid("url", format!("not a valid URL: {e}")))?;
        let secrets = secrets_of(&parsed);
        let fail = |reason: String| Error::invalid("url", redact(&reason, &secrets));
        match parsed.scheme() {
            "mysql" => {}
            "mariadb" => parsed
                .set_scheme("mysql")
                .map_err(|()| fail("cannot use this mariadb:// URL".into()))?,
            other => {
                return Err(fail(format!(
                    "unsupported scheme `{other}`: use mysql:// or mariadb://"
                )))
            }
        }
        let mut strategy = None;
        let mut table = None;
        let mut prefix = None;
        let mut rest = Vec::new();
        for (name, value) in parsed.query_pairs() {
            let slot = match name.as_ref() {
                "strategy" => &mut strategy,
                "table" => &mut table,
                "prefix" => &mut prefix,
                _ => {
                    rest.push((name.into_owned(), value.into_owned()));
                    continue;
                }
            };
            if slot.replace(value.into_owned()).is_some() {
                return Err(fail(format!("parameter `{name}` is given twice")));
            }
        }
        // mysql_async keeps at least 10 connections by default and rejects `pool_max` below
        // that unless `pool_min` is lowered too: lower it for the user.
        let has = |name: &str| rest.iter().any(|(n, _)| n == name);
        if has("pool_max") && !has("pool_min") {
            let max = rest.iter().find(|(n, _)| n == "pool_max").map(|(_, v)| v);
            if let Some(max) = max.and_then(|v| v.parse::<usize>().ok()) {
                rest.push(("pool_min".into(), max.min(10).to_string()));
            }
        }
        parsed.set_query(None);
        if !rest.is_empty() {
            parsed.query_pairs_mut().extend_pairs(rest);
        }
        let opts = Opts::from_url(parsed.as_str()).map_err(|e| fail(e.to_string()))?;
        let mut config = Self::new(opts);
        if let Some(strategy) = strategy {
            config.strategy = strategy.parse().map_err(|e: Error| fail(reason_of(e)))?;
        }
        config.table = table;
        if let Some(prefix) = prefix {
            config.prefix = prefix;
        }
        config.check().map_err(|e| fail(reason_of(e)))?;
        Ok(config)
    }

    /// Chooses the backend [`MysqlConfig::build`] makes. Default: [`Strategy::GetLock`].
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// The table where locks (lease table) or fencing token reservations (`GET_LOCK`, whose
    /// holders are in this name with `_holders` appended) live.
    /// Default: [`DEFAULT_TABLE`] for the lease table, [`DEFAULT_GET_LOCK_TABLE`] for `GET_LOCK`.
    /// Validated with [`Namespace`] (field `table`) when a backend is built; always quoted with
    /// backticks.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    /// The prefix of `GET_LOCK` names (see [`crate::lock_name`]). Default: [`DEFAULT_PREFIX`].
    /// `GET_LOCK` names are global to the whole server, across databases: give applications
    /// that share a server different prefixes, and keep one prefix with one table. Validated
    /// with [`Namespace`] (field `prefix`) when a backend is built.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How often the connection of each held `GET_LOCK` lock is pinged, so that a connection
    /// killed on the server (or dropped by the network) fires the guard's lost signal within
    /// about this long. A connection that does not answer a ping or a check within four
    /// intervals (at least 2 s) counts as lost. An acquisition that takes a lock over from a
    /// session that ended without releasing it (a killed connection, a server restart, a killed
    /// process) waits two intervals before it returns, so that the old holder, if it still
    /// runs, is told first. Default: [`DEFAULT_LIVENESS_INTERVAL`]; between 10 ms and 60 s.
    pub fn liveness_interval(mut self, interval: Duration) -> Self {
        self.liveness_interval = interval;
        self
    }

    /// How long one server-side wait of a `GET_LOCK` waiter for a release lasts (`GET_LOCK(name,
    /// seconds)` on a spare connection, which holds no metadata lock); the waiter waits again
    /// while anybody still waits. Shorter frees an abandoned waiter's connection sooner. Whole
    /// seconds, default [`DEFAULT_RELEASE_WAIT`]; between 1 s and 1 hour.
    pub fn release_wait(mut self, wait: Duration) -> Self {
        self.release_wait = wait;
        self
    }

    /// Builds the backend the strategy names.
    ///
    /// ```no_run
    /// # async fn f() -> leaselock::Result<()> {
    /// use leaselock::Locker;
    /// use leaselock_mysql::MysqlConfig;
    /// let backend = MysqlConfig::from_url("mysql://root@127.0.0.1:3306/app")?.build()?;
    /// backend.init_storage().await?;
    /// let locker = Locker::builder(backend).build()?;
    /// locker.run("migrations", |_lock| async { /* migrate */ }).await?;
    /// # Ok(()) }
    /// ```
    pub fn build(self) -> Result<Arc<dyn LockBackend>> {
        Ok(match self.strategy {
            Strategy::GetLock => Arc::new(MysqlGetLockBackend::new(self)?),
            Strategy::Table => Arc::new(MysqlTableBackend::new(self)?),
        })
    }

    /// `host:port/database`, for messages; never the user or password.
    pub fn server(&self) -> String {
        format!(
            "{}:{}/{}",
            self.opts.ip_or_hostname(),
            self.opts.tcp_port(),
            self.opts.db_name().unwrap_or("")
        )
    }

    fn table_or_default(&self, strategy: Strategy) -> &str {
        match (&self.table, strategy) {
            (Some(table), _) => table,
            (None, Strategy::GetLock) => DEFAULT_GET_LOCK_TABLE,
            (None, Strategy::Table) => DEFAULT_TABLE,
        }
    }

    fn check(&self) -> Result<Checked> {
        self.check_for(self.strategy)
    }

    /// Validates every field for the backend of `strategy`.
    pub(crate) fn check_for(&self, strategy: Strategy) -> Result<Checked> {
        let table = Namespace::for_field("table", self.table_or_default(strategy))?;
        let prefix = Namespace::for_field("prefix", self.prefix.as_str())?;
        let interval = self.liveness_interval;
        if interval < Duration::from_millis(10) || interval > Duration::from_secs(60) {
            return Err(Error::invalid(
                "liveness_interval",
                format!("{interval:?} is outside 10ms..=60s"),
            ));
        }
        let wait = self.release_wait;
        if wait < Duration::from_secs(1)
            || wait > Duration::from_secs(3600)
            || wait.subsec_nanos() != 0
        {
            return Err(Error::invalid(
                "release_wait",
                format!("{wait:?} is not a whole number of seconds in 1s..=3600s"),
            ));
        }
        Ok(Checked {
            opts: self.opts.clone(),
            table,
            prefix,
            liveness_interval: interval,
            release_wait: wait,
            server: self.server(),
        })
    }
}

impl fmt::Debug for MysqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlConfig")
            .field("server", &self.server())
            .field("user", &self.opts.user())
            .field(
                "password",
                &self.opts.pass().map(|_| "<redacted>").unwrap_or("<none>"),
            )
            .field("strategy", &self.strategy)
            .field("table", &self.table_or_default(self.strategy))
            .field("prefix", &self.prefix)
            .field("liveness_interval", &self.liveness_interval)
            .field("release_wait", &self.release_wait)
            .finish()
    }
}

/// The password of a URL, as written and percent-decoded, to keep out of messages.
fn secrets_of(url: &url::Url) -> Vec<String> {
    let Some(raw) = url.password() else {
        return Vec::new();
    };
    let mut secrets = vec![raw.to_owned(), percent_decode(raw)];
    secrets.retain(|s| !s.is_empty());
    secrets
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn redact(text: &str, secrets: &[String]) -> String {
    secrets.iter().fold(text.to_owned(), |text, secret| {
        text.replace(secret, "<redacted>")
    })
}

fn reason_of(err: Error) -> String {
    match err {
        Error::InvalidInput { field, reason } => format!("invalid {field}: {reason}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters() {
        let c = MysqlConfig::from_url(
            "mysql://u:p%40ss@localhost:3307/db?strategy=table&table=my_locks&prefix=app&pool_max=3",
        )
        .unwrap();
        assert_eq!(c.strategy, Strategy::Table);
        let checked = c.check().unwrap();
        assert_eq!(checked.table.as_str(), "my_locks");
        assert_eq!(checked.prefix.as_str(), "app");
        assert_eq!(c.opts.tcp_port(), 3307);
        assert_eq!(c.opts.pass(), Some("p@ss"));
        assert_eq!(c.opts.pool_opts().constraints().max(), 3);
        assert!(!c.opts.client_found_rows());

        let c = MysqlConfig::from_url("mariadb://localhost/db?client_found_rows=true").unwrap();
        assert_eq!(c.strategy, Strategy::GetLock);
        assert!(!c.opts.client_found_rows(), "forced off");
        assert_eq!(c.check().unwrap().table.as_str(), DEFAULT_GET_LOCK_TABLE);
        assert_eq!(
            c.check_for(Strategy::Table).unwrap().table.as_str(),
            DEFAULT_TABLE
        );
    }

    #[test]
    fn bad_urls_never_show_the_password() {
        for url in [
            "postgres://u:s3cr3t@h/db",
            "mysql://u:s3cr3t@h/db?strategy=zz",
            "mysql://u:s3cr3t@h/db?table=x;drop",
            "mysql://u:s3cr3t@h/db?prefix=",
            "mysql://u:s3cr3t@h/db?bogus=s3cr3t",
            "mysql://u:s3cr3t@h/db?pool_max=s3cr3t",
            "mysql://u:s3cr3t@h/db?table=a&table=b",
            "mysql://u:s3cr3t@h:99999/db",
            "not a url s3cr3t",
            "mysql://u:s3cr3t@/db",
            "mysql://u:s3%63r3t@h/db?strategy=zz",
        ] {
            let err = MysqlConfig::from_url(url).unwrap_err();
            assert!(
                matches!(err, Error::InvalidInput { field: "url", .. }),
                "{url}: {err:?}"
            );
            assert!(!err.to_string().contains("s3cr3t"), "{url}: {err}");
            assert!(!format!("{err:?}").contains("s3cr3t"), "{url}: {err:?}");
        }
    }

    #[test]
    fn debug_redacts() {
        let c = MysqlConfig::from_url("mysql://u:s3cr3t@h/db").unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cr3t"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn bounds() {
        let c = MysqlConfig::from_url("mysql://h/db").unwrap();
        let field = |c: MysqlConfig| match c.check() {
            Err(Error::InvalidInput { field, .. }) => field,
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("accepted"),
        };
        assert_eq!(
            field(c.clone().liveness_interval(Duration::ZERO)),
            "liveness_interval"
        );
        assert_eq!(
            field(c.clone().release_wait(Duration::from_millis(1500))),
            "release_wait"
        );
        assert!(c
            .clone()
            .release_wait(Duration::from_secs(2))
            .check()
            .is_ok());
        assert_eq!(field(c.clone().table("bad name")), "table");
        assert_eq!(field(c.prefix("a:b")), "prefix");
    }
}
