//! The `--url` / `LEASELOCK_URL`: which backend, where, and how to show it without credentials.
//!
//! A URL is checked completely (scheme, syntax, the backend's own parameters) before anything is
//! opened or connected, so bad input touches nothing.

use std::sync::Arc;

use leaselock::LockBackend;
use url::Url;

use crate::exit::{describe, Failure};

/// The default URL: an SQLite file in the current directory, so the command works with no setup.
pub const DEFAULT_URL: &str = "sqlite://leaselock.db";

/// What replaces a password (or another secret) wherever a URL is shown.
pub const MASK: &str = "***";

/// Query parameters whose values are secrets (matched as substrings of the lower-cased name).
const SECRET_PARAMS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "credential",
    "access_key",
];

/// The schemes this build accepts, for messages.
const AVAILABLE: &str = "sqlite, postgres, mysql";

/// The backends this build can open, by URL scheme.
///
/// Backend crates slot in here: add the scheme to [`Scheme::from_name`], a pre-connection check
/// to [`Target::parse`] and the crate's `from_url` to [`Target::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// `sqlite://FILE` (relative to the current directory) or `sqlite:///ABSOLUTE/FILE`, with
    /// optional `?table=NAME&busy_timeout=5s`.
    Sqlite,
    /// `postgres://` or `postgresql://`, with `?strategy=advisory|table` (default `advisory`),
    /// `table=`, `schema=`, `prefix=`; other parameters go to the driver.
    Postgres,
    /// `mysql://` or `mariadb://`, with `?strategy=get_lock|table` (default `get_lock`),
    /// `table=`, `prefix=`; other parameters go to the driver.
    Mysql,
}

impl Scheme {
    /// The backend for a URL scheme (lower-cased), or a one-line usage error.
    fn from_name(scheme: &str) -> Result<Self, Failure> {
        // ---- Backend selection: the one place where a new scheme is wired in. ----
        match scheme {
            "sqlite" => Ok(Scheme::Sqlite),
            "postgres" | "postgresql" => Ok(Scheme::Postgres),
            "mysql" | "mariadb" => Ok(Scheme::Mysql),
            // Not wired into this build yet (their crates are in progress):
            "mongodb" | "mongodb+srv" | "dynamodb" => Err(Failure::usage(format!(
                "the `{scheme}` backend is not available in this build of leaselock yet \
                     (available: {AVAILABLE})"
            ))),
            other => Err(Failure::usage(format!(
                "unknown URL scheme `{other}` (available: {AVAILABLE}; for example {DEFAULT_URL})"
            ))),
        }
    }
}

/// A checked lock-storage URL.
#[derive(Clone)]
pub struct Target {
    url: String,
    display: String,
    scheme: Scheme,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.display)
            .field("scheme", &self.scheme)
            .finish()
    }
}

impl Target {
    /// Checks `url` without opening anything: its scheme is known to this build and the
    /// backend's own parser accepts it. Every secret in it is registered for scrubbing.
    pub fn parse(url: &str) -> Result<Self, Failure> {
        register_secrets(url);
        let display = redact(url);
        let scheme_name = match url.split_once(':') {
            Some((scheme, _)) if is_scheme(scheme) => scheme.to_ascii_lowercase(),
            _ => {
                return Err(Failure::usage(format!(
                    "malformed URL `{display}`: expected SCHEME://..., for example {DEFAULT_URL}"
                )))
            }
        };
        let scheme = Scheme::from_name(&scheme_name)?;
        let invalid = |error: leaselock::Error| {
            Failure::usage(format!("invalid URL `{display}`: {}", describe(&error)))
        };
        match scheme {
            Scheme::Sqlite => {
                leaselock_sqlite::SqliteConfig::from_url(url).map_err(invalid)?;
            }
            Scheme::Postgres => {
                leaselock_postgres::PgConfig::from_url(url).map_err(invalid)?;
            }
            Scheme::Mysql => {
                leaselock_mysql::MysqlConfig::from_url(url).map_err(invalid)?;
            }
        }
        Ok(Self {
            url: url.to_owned(),
            display,
            scheme,
        })
    }

    /// The URL with its password (and any secret parameter) replaced by `***`.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// For a file-based backend whose file does not exist yet: that file (so `check` can say so
    /// without creating it).
    pub fn missing_file(&self) -> Option<std::path::PathBuf> {
        match self.scheme {
            Scheme::Sqlite => {
                let config = leaselock_sqlite::SqliteConfig::from_url(&self.url).ok()?;
                let path = config.path();
                (!path.exists()).then(|| path.to_path_buf())
            }
            Scheme::Postgres | Scheme::Mysql => None,
        }
    }

    /// Opens (or connects to) the backend. For SQLite this creates the database file if
    /// missing, but never the table.
    pub async fn open(&self) -> leaselock::Result<Arc<dyn LockBackend>> {
        match self.scheme {
            Scheme::Sqlite => leaselock_sqlite::from_url(&self.url).await,
            Scheme::Postgres => leaselock_postgres::from_url(&self.url).await,
            Scheme::Mysql => leaselock_mysql::from_url(&self.url).await,
        }
    }
}

fn is_scheme(scheme: &str) -> bool {
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|s| name.contains(s))
}

/// `url` with its password and secret query parameters replaced by `***`. A URL that does not
/// parse loses everything between `://` and its last `@`.
pub fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(parsed) => {
            let mut redacted = parsed.clone();
            let mut changed = false;
            if parsed.password().is_some() {
                changed |= redacted.set_password(Some(MASK)).is_ok();
            }
            if parsed.query_pairs().any(|(name, _)| is_secret_param(&name)) {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(name, value)| {
                        let value = if is_secret_param(&name) {
                            MASK.to_owned()
                        } else {
                            value.into_owned()
                        };
                        (name.into_owned(), value)
                    })
                    .collect();
                redacted.query_pairs_mut().clear().extend_pairs(pairs);
                changed = true;
            }
            if changed {
                redacted.to_string()
            } else {
                url.to_owned()
            }
        }
        Err(_) => match url.split_once("://") {
            Some((scheme, rest)) => match rest.rfind('@') {
                Some(at) => format!("{scheme}://{MASK}{}", &rest[at..]),
                None => url.to_owned(),
            },
            None => url.to_owned(),
        },
    }
}

/// Registers every secret in `url` (its password, secret query values; as written and decoded)
/// for scrubbing from all output.
pub fn register_secrets(url: &str) {
    match Url::parse(url) {
        Ok(parsed) => {
            if let Some(password) = parsed.password() {
                crate::logging::add_secret(password);
                if let Ok(decoded) = percent_decode(password) {
                    crate::logging::add_secret(&decoded);
                }
            }
            for (name, value) in parsed.query_pairs() {
                if is_secret_param(&name) {
                    crate::logging::add_secret(&value);
                }
            }
        }
        Err(_) => {
            if let Some((_, rest)) = url.split_once("://") {
                if let Some(at) = rest.rfind('@') {
                    let userinfo = &rest[..at];
                    if let Some((_, password)) = userinfo.split_once(':') {
                        crate::logging::add_secret(password);
                    }
                }
            }
        }
    }
}

fn percent_decode(text: &str) -> Result<String, ()> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_and_secret_params() {
        assert_eq!(
            redact("postgres://app:hunter22@db:5432/x?strategy=table"),
            "postgres://app:***@db:5432/x?strategy=table"
        );
        assert_eq!(
            redact("dynamodb://locks?region=eu&secret_key=abc123"),
            "dynamodb://locks?region=eu&secret_key=***"
        );
        assert_eq!(redact(DEFAULT_URL), DEFAULT_URL);
        assert_eq!(
            redact("sqlite:///tmp/x.db?table=t"),
            "sqlite:///tmp/x.db?table=t"
        );
        // Unparseable (a `/` in the password): everything up to the last `@` goes.
        assert_eq!(
            redact("postgres://u:pa/ss@host:bad/db"),
            "postgres://***@host:bad/db"
        );
        assert_eq!(redact("mysql://root@h/db"), "mysql://root@h/db");
    }

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("p%40ss%2Fw").unwrap(), "p@ss/w");
        assert_eq!(percent_decode("plain").unwrap(), "plain");
        assert!(percent_decode("bad%zz").is_err());
    }

    #[test]
    fn parses_schemes() {
        assert_eq!(Target::parse(DEFAULT_URL).unwrap().scheme, Scheme::Sqlite);
        assert_eq!(
            Target::parse("sqlite:///tmp/x.db?table=jobs")
                .unwrap()
                .scheme,
            Scheme::Sqlite
        );
        let pg = Target::parse("postgresql://app:pw@db/app?strategy=table").unwrap();
        assert_eq!(pg.scheme, Scheme::Postgres);
        assert_eq!(pg.display(), "postgresql://app:***@db/app?strategy=table");
        let my = Target::parse("mariadb://root:pw@db/app?strategy=get_lock").unwrap();
        assert_eq!(my.scheme, Scheme::Mysql);
        assert_eq!(my.display(), "mariadb://root:***@db/app?strategy=get_lock");
        for bad in [
            "",
            "leaselock.db",
            "://x",
            "1sqlite://x",
            "ftp://x",
            "mongodb://h/db",
            "sqlite://",
            "sqlite://x.db?table=bad-name",
            "sqlite://x.db?nope=1",
            "postgres://app:pw@db/app?strategy=nope",
            "postgres://db/app?strategy=table&prefix=p",
            "mysql://root:pw@db/app?strategy=advisory",
        ] {
            let failure = Target::parse(bad).unwrap_err();
            assert_eq!(failure.code, crate::exit::USAGE, "{bad}: {failure}");
            assert!(!failure.message.contains('\n'));
        }
    }
}
