//! Configuration of the SQLite backend.

use std::path::{Path, PathBuf};
use std::time::Duration;

use leaselock::{Error, Namespace, Result};

/// The default table name.
pub const DEFAULT_TABLE: &str = "leaselock_locks";
/// The default busy timeout.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how the SQLite backend keeps its locks.
///
/// ```
/// use std::time::Duration;
/// use leaselock_sqlite::SqliteConfig;
/// let config = SqliteConfig::new("locks.db")
///     .table("app_locks")
///     .busy_timeout(Duration::from_secs(10));
/// assert_eq!(config.path().to_str(), Some("locks.db"));
/// ```
#[derive(Clone, Debug)]
pub struct SqliteConfig {
    path: PathBuf,
    table: String,
    busy_timeout: Duration,
    read_only: bool,
    create_if_missing: bool,
}

impl SqliteConfig {
    /// Locks in the database file at `path` (created if missing). Every process that should
    /// exclude the others must use the same file on the same host (SQLite's locking does not
    /// work over network file systems).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            table: DEFAULT_TABLE.to_owned(),
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            read_only: false,
            create_if_missing: true,
        }
    }

    /// The table name. Default: `leaselock_locks` ([`DEFAULT_TABLE`]). Validated when the backend
    /// is created: an ASCII letter or `_`, then letters, digits or `_`, at most 63 bytes.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// How long a statement waits for another process's write transaction before failing with a
    /// retryable error. Default: 5 s ([`DEFAULT_BUSY_TIMEOUT`]). At most one hour.
    pub fn busy_timeout(mut self, busy_timeout: Duration) -> Self {
        self.busy_timeout = busy_timeout;
        self
    }

    /// Open the database file read-only (SQLite's `SQLITE_OPEN_READ_ONLY`), for tools that only
    /// look: the file is never created, its journal mode is left as it is, and nothing is ever
    /// written: acquisitions, releases and refreshes fail at once with an error that is not
    /// retryable; `status`, `list` and the storage check work.
    /// Default: `false` (read-write).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Whether opening creates the database file when it does not exist. Default: `true`. With
    /// `false` (and always when [`SqliteConfig::read_only`]), a missing file fails with
    /// [`Error::NotInitialized`] and nothing is created.
    pub fn create_if_missing(mut self, create: bool) -> Self {
        self.create_if_missing = create;
        self
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file is opened read-only (see [`SqliteConfig::read_only`]).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether a missing file is created: [`SqliteConfig::create_if_missing`], never when
    /// read-only.
    pub fn creates_if_missing(&self) -> bool {
        self.create_if_missing && !self.read_only
    }

    pub(crate) fn validated(&self) -> Result<(Namespace, Duration)> {
        if self.path.as_os_str().is_empty() {
            return Err(Error::invalid("path", "must not be empty"));
        }
        let table = Namespace::for_field("table", self.table.clone())?;
        if self.busy_timeout > Duration::from_secs(3600) {
            return Err(Error::invalid(
                "busy_timeout",
                format!("{:?} is longer than one hour", self.busy_timeout),
            ));
        }
        Ok((table, self.busy_timeout))
    }

    /// Parses `sqlite://PATH[?table=NAME&busy_timeout=5s]`: `sqlite://leaselock.db` is relative
    /// to the current directory, `sqlite:///var/lib/app/locks.db` is absolute.
    ///
    /// ```
    /// use leaselock_sqlite::SqliteConfig;
    /// let config = SqliteConfig::from_url("sqlite:///tmp/locks.db?table=jobs")?;
    /// assert_eq!(config.path().to_str(), Some("/tmp/locks.db"));
    /// assert!(SqliteConfig::from_url("postgres://db/x").is_err());
    /// # Ok::<(), leaselock::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| Error::invalid("url", "an SQLite URL starts with `sqlite://`"))?;
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        if path.is_empty() {
            return Err(Error::invalid(
                "url",
                "no database file: use sqlite://FILE or sqlite:///ABSOLUTE/FILE",
            ));
        }
        let mut config = Self::new(path);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "table" => config = config.table(value),
                "busy_timeout" => {
                    let millis = value
                        .strip_suffix("ms")
                        .map(|v| v.parse::<u64>().map(Duration::from_millis))
                        .or_else(|| {
                            value
                                .strip_suffix('s')
                                .map(|v| v.parse::<u64>().map(Duration::from_secs))
                        })
                        .ok_or_else(|| {
                            Error::invalid("url", "busy_timeout needs a unit: `500ms` or `5s`")
                        })?
                        .map_err(|_| Error::invalid("url", "busy_timeout is not a number"))?;
                    config = config.busy_timeout(millis);
                }
                other => {
                    return Err(Error::invalid(
                        "url",
                        format!(
                            "unknown SQLite URL parameter `{other}` (known: table, busy_timeout)"
                        ),
                    ))
                }
            }
        }
        config.validated()?;
        Ok(config)
    }
}
