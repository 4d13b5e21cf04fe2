//! Configuration of the MongoDB backend.

use std::fmt;
use std::time::Duration;

use leaselock::{Error, Namespace, Result};

/// The default database, used when neither the configuration nor the URL's path names one.
pub const DEFAULT_DATABASE: &str = "leaselock";
/// The default collection.
pub const DEFAULT_COLLECTION: &str = "leaselock_locks";
/// How long a write waits for a majority of the replica set to acknowledge it, by default.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an operation waits to find a suitable server (the primary), by default, when the URL
/// does not set `serverSelectionTimeoutMS`.
pub const DEFAULT_SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// How reads (`verify`, `status`, `list`) are kept from returning stale ownership. Every read goes
/// to the primary; this picks its read concern.
///
/// ```
/// use leaselock_mongodb::ReadConsistency;
/// assert_eq!(ReadConsistency::default(), ReadConsistency::Majority);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadConsistency {
    /// `readConcern: majority` on the primary: a read sees every write acknowledged by a majority
    /// (all of ours are) and nothing that could be rolled back. The default.
    #[default]
    Majority,
    /// `readConcern: linearizable`: additionally confirms with a majority that the primary is
    /// still the primary, so even a deposed primary in a network partition cannot answer. Slower:
    /// each read waits for a replication round.
    Linearizable,
}

/// Where and how the MongoDB backend keeps its locks.
///
/// `Debug` shows the URL with its password (and secret-looking options) replaced by `***`.
///
/// ```
/// use std::time::Duration;
/// use leaselock_mongodb::MongoConfig;
/// let config = MongoConfig::new("mongodb://app:s3cret@db1:27017,db2:27017/?replicaSet=rs0")
///     .database("ops")
///     .collection("app_locks")
///     .write_timeout(Duration::from_secs(5));
/// assert_eq!(config.database_name(), "ops");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct MongoConfig {
    url: String,
    database: Option<String>,
    collection: String,
    read_consistency: ReadConsistency,
    write_timeout: Duration,
    server_selection_timeout: Option<Duration>,
}

impl MongoConfig {
    /// Locks on the deployment at `url`, a MongoDB connection string (`mongodb://…` or
    /// `mongodb+srv://…`, with every option the driver knows). The URL is checked when the
    /// backend is created.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            database: None,
            collection: DEFAULT_COLLECTION.to_owned(),
            read_consistency: ReadConsistency::default(),
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            server_selection_timeout: None,
        }
    }

    /// The database holding the collection. Default: the database in the URL's path, else
    /// `leaselock` ([`DEFAULT_DATABASE`]). Validated like an identifier: an ASCII letter or `_`,
    /// then letters, digits or `_`, at most 63 bytes.
    pub fn database(mut self, database: impl Into<String>) -> Self {
        self.database = Some(database.into());
        self
    }

    /// The collection name. Default: `leaselock_locks` ([`DEFAULT_COLLECTION`]). Validated like
    /// [`MongoConfig::database`].
    pub fn collection(mut self, collection: impl Into<String>) -> Self {
        self.collection = collection.into();
        self
    }

    /// The read concern of `verify`, `status` and `list`. Default:
    /// [`ReadConsistency::Majority`].
    pub fn read_consistency(mut self, read_consistency: ReadConsistency) -> Self {
        self.read_consistency = read_consistency;
        self
    }

    /// How long a write waits for a majority of the replica set to acknowledge it (`wtimeout`)
    /// before failing with a retryable error. Default: 10 s ([`DEFAULT_WRITE_TIMEOUT`]). Between
    /// 1 ms and one hour.
    pub fn write_timeout(mut self, write_timeout: Duration) -> Self {
        self.write_timeout = write_timeout;
        self
    }

    /// How long an operation waits to find the primary before failing with
    /// [`leaselock::Error::NotAccessible`]. Default: the URL's `serverSelectionTimeoutMS`, else
    /// 10 s ([`DEFAULT_SERVER_SELECTION_TIMEOUT`]). Between 1 ms and one hour.
    pub fn server_selection_timeout(mut self, timeout: Duration) -> Self {
        self.server_selection_timeout = Some(timeout);
        self
    }

    /// The database that will be used: the configured one, else the URL's, else `leaselock`.
    pub fn database_name(&self) -> &str {
        match &self.database {
            Some(database) => database,
            None => url_database(&self.url).unwrap_or(DEFAULT_DATABASE),
        }
    }

    /// The configured collection name.
    pub fn collection_name(&self) -> &str {
        &self.collection
    }

    /// Parses `mongodb://[USER:PASSWORD@]HOST[:PORT][,HOST…]/[DATABASE][?OPTIONS]` (or
    /// `mongodb+srv://…`). The database comes from the path (default `leaselock`); the option
    /// `collection=NAME` is this crate's and is removed before the driver sees the URL; every
    /// other option goes to the driver. Errors name the field `url` and never repeat the password.
    ///
    /// ```
    /// use leaselock_mongodb::MongoConfig;
    /// let config = MongoConfig::from_url(
    ///     "mongodb://app:pw@127.0.0.1:27017/ops?collection=jobs&appName=deployer",
    /// )?;
    /// assert_eq!(config.database_name(), "ops");
    /// assert_eq!(config.collection_name(), "jobs");
    /// assert_eq!(MongoConfig::from_url("mongodb://127.0.0.1")?.database_name(), "leaselock");
    /// assert!(MongoConfig::from_url("postgres://db/x").is_err());
    /// # Ok::<(), leaselock::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        let (without_query, query) = match url.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (url, None),
        };
        let mut collection = None;
        let mut kept = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("collection", value)) => collection = Some(value.to_owned()),
                _ => kept.push(pair),
            }
        }
        let mut driver_url = without_query.to_owned();
        if !kept.is_empty() {
            driver_url.push('?');
            driver_url.push_str(&kept.join("&"));
        }
        let mut config = Self::new(driver_url);
        if let Some(collection) = collection {
            config = config.collection(collection);
        }
        config.validated()?;
        Ok(config)
    }

    /// The URL for the driver, the namespace, and checked timeouts.
    pub(crate) fn validated(&self) -> Result<Validated> {
        split_url(&self.url)?;
        let database = Namespace::for_field("database", self.database_name())?;
        let collection = Namespace::for_field("collection", self.collection.clone())?;
        check_timeout("write_timeout", self.write_timeout)?;
        if let Some(timeout) = self.server_selection_timeout {
            check_timeout("server_selection_timeout", timeout)?;
        }
        Ok(Validated {
            url: self.url.clone(),
            database,
            collection,
            read_consistency: self.read_consistency,
            write_timeout: self.write_timeout,
            server_selection_timeout: self.server_selection_timeout,
        })
    }
}

impl fmt::Debug for MongoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoConfig")
            .field("url", &redact_url(&self.url))
            .field("database", &self.database_name())
            .field("collection", &self.collection)
            .field("read_consistency", &self.read_consistency)
            .field("write_timeout", &self.write_timeout)
            .field("server_selection_timeout", &self.server_selection_timeout)
            .finish()
    }
}

/// A configuration whose every part was checked.
pub(crate) struct Validated {
    pub(crate) url: String,
    pub(crate) database: Namespace,
    pub(crate) collection: Namespace,
    pub(crate) read_consistency: ReadConsistency,
    pub(crate) write_timeout: Duration,
    pub(crate) server_selection_timeout: Option<Duration>,
}

fn check_timeout(field: &'static str, timeout: Duration) -> Result<()> {
    if timeout < Duration::from_millis(1) || timeout > Duration::from_secs(3600) {
        return Err(Error::invalid(
            field,
            format!("{timeout:?} is not between 1 ms and one hour"),
        ));
    }
    Ok(())
}

/// The parts of a connection string: `(userinfo, hosts, path, query)`, split the way the driver
/// splits them (query at the first `?`, userinfo at the last `@` before it).
struct UrlParts<'a> {
    scheme: &'a str,
    userinfo: Option<&'a str>,
    hosts: &'a str,
    path: Option<&'a str>,
    query: Option<&'a str>,
}

fn split_url(url: &str) -> Result<UrlParts<'_>> {
    let (scheme, rest) = url
        .split_once("://")
        .filter(|(scheme, _)| matches!(*scheme, "mongodb" | "mongodb+srv"))
        .ok_or_else(|| {
            Error::invalid(
                "url",
                "a MongoDB URL starts with `mongodb://` or `mongodb+srv://`",
            )
        })?;
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let (userinfo, after_userinfo) = match before_query.rsplit_once('@') {
        Some((userinfo, after)) => (Some(userinfo), after),
        None => (None, before_query),
    };
    let (hosts, path) = match after_userinfo.split_once('/') {
        Some((hosts, path)) => (hosts, Some(path)),
        None => (after_userinfo, None),
    };
    if hosts.is_empty() {
        return Err(Error::invalid("url", "no host"));
    }
    Ok(UrlParts {
        scheme,
        userinfo,
        hosts,
        path,
        query,
    })
}

/// The database named by the URL's path, if any.
fn url_database(url: &str) -> Option<&str> {
    split_url(url)
        .ok()
        .and_then(|parts| parts.path)
        .filter(|path| !path.is_empty())
}

/// The password in the URL's userinfo, if any (as written, percent-encoded or not).
pub(crate) fn url_password(url: &str) -> Option<&str> {
    split_url(url)
        .ok()
        .and_then(|parts| parts.userinfo)
        .and_then(|userinfo| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|password| !password.is_empty())
}

/// Options whose values are secrets (compared case-insensitively), besides any option whose name
/// mentions a password, secret or token.
const SECRET_OPTIONS: &[&str] = &["authmechanismproperties"];

/// The URL with its password and secret-looking option values replaced by `***`, for Debug
/// output and logs. Something that is not a MongoDB URL is hidden whole.
pub(crate) fn redact_url(url: &str) -> String {
    let Ok(parts) = split_url(url) else {
        return "<not a MongoDB URL>".to_owned();
    };
    let mut out = format!("{}://", parts.scheme);
    if let Some(userinfo) = parts.userinfo {
        match userinfo.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:***@")),
            None => out.push_str(&format!("{userinfo}@")),
        }
    }
    out.push_str(parts.hosts);
    if let Some(path) = parts.path {
        out.push('/');
        out.push_str(path);
    }
    if let Some(query) = parts.query {
        let redacted: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if is_secret_option(name) => format!("{name}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&redacted.join("&"));
    }
    out
}

fn is_secret_option(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_OPTIONS.contains(&name.as_str())
        || ["password", "secret", "token"]
            .iter()
            .any(|word| name.contains(word))
}

/// `message` with every occurrence of the URL's password (as written and percent-decoded)
/// replaced by `***`.
pub(crate) fn scrub(message: String, url: &str) -> String {
    let Some(password) = url_password(url) else {
        return message;
    };
    let mut message = message.replace(password, "***");
    let decoded = percent_decode(password);
    if !decoded.is_empty() {
        message = message.replace(&decoded, "***");
    }
    message
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_url_takes_database_and_collection() {
        let c = MongoConfig::from_url(
            "mongodb://u:p@h1:1,h2:2/ops?replicaSet=rs0&collection=jobs&w=majority",
        )
        .unwrap();
        assert_eq!(c.database_name(), "ops");
        assert_eq!(c.collection_name(), "jobs");
        assert_eq!(
            c.url,
            "mongodb://u:p@h1:1,h2:2/ops?replicaSet=rs0&w=majority"
        );
        let c = MongoConfig::from_url("mongodb://h/?collection=x").unwrap();
        assert_eq!(c.database_name(), DEFAULT_DATABASE);
        assert_eq!(c.url, "mongodb://h/");
        let c = MongoConfig::from_url("mongodb+srv://cluster.example").unwrap();
        assert_eq!(c.database_name(), DEFAULT_DATABASE);
        assert_eq!(c.collection_name(), DEFAULT_COLLECTION);
    }

    #[test]
    fn bad_urls_name_the_field_and_hide_the_password() {
        for bad in [
            "postgres://u:hunter2@h/db",
            "mongodb://u:hunter2@/db",
            "hunter2",
            "mongodb://u:hunter2@h/bad-db",
            "mongodb://u:hunter2@h/db?collection=bad-name",
            "mongodb://u:hunter2@h/db?collection=",
        ] {
            let err = MongoConfig::from_url(bad).unwrap_err();
            let text = format!("{err} {err:?}");
            assert!(!text.contains("hunter2"), "{text}");
            match err {
                Error::InvalidInput { field, .. } => {
                    assert!(
                        ["url", "database", "collection"].contains(&field),
                        "{field}"
                    )
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            MongoConfig::from_url("mysql://h").unwrap_err(),
            Error::InvalidInput { field: "url", .. }
        ));
    }

    #[test]
    fn debug_redacts() {
        let c = MongoConfig::new(
            "mongodb://user:p%40ss@h/db?authMechanismProperties=AWS_SESSION_TOKEN:tok&tlsCertificateKeyFilePassword=kp&appName=x",
        );
        let debug = format!("{c:?}");
        for secret in ["p%40ss", "tok", "kp"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(debug.contains("user:***@h/db"), "{debug}");
        assert!(debug.contains("appName=x"), "{debug}");
        assert_eq!(redact_url("nonsense"), "<not a MongoDB URL>");
    }

    #[test]
    fn scrub_replaces_both_spellings() {
        let url = "mongodb://u:p%40ss@h/db";
        assert_eq!(scrub("x p%40ss p@ss y".into(), url), "x *** *** y");
        assert_eq!(scrub("nothing".into(), "mongodb://h"), "nothing");
    }

    #[test]
    fn timeouts_and_names_are_checked() {
        let ok = MongoConfig::new("mongodb://h");
        assert!(ok.validated().is_ok());
        assert!(matches!(
            ok.clone().write_timeout(Duration::ZERO).validated(),
            Err(Error::InvalidInput {
                field: "write_timeout",
                ..
            })
        ));
        assert!(matches!(
            ok.clone()
                .server_selection_timeout(Duration::from_secs(7200))
                .validated(),
            Err(Error::InvalidInput {
                field: "server_selection_timeout",
                ..
            })
        ));
        assert!(matches!(
            ok.clone().collection("a.b").validated(),
            Err(Error::InvalidInput {
                field: "collection",
                ..
            })
        ));
        assert!(matches!(
            ok.database("x y").validated(),
            Err(Error::InvalidInput {
                field: "database",
                ..
            })
        ));
    }
}
