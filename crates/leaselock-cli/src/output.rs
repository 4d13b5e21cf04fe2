//! How locks are shown: a human table by default, JSON for scripts.

use std::time::{Duration, SystemTime};

use leaselock::{LockInfo, LockState};
use serde::Serialize;

use crate::target::NativeName;

/// One lock as shown by `status`, `list` and `release`.
#[derive(Debug, Serialize)]
pub struct LockView {
    /// The key.
    pub key: String,
    /// The holder's owner id (for an expired lock: the last holder).
    pub owner: String,
    /// The holder's host, when the owner id has leaselock's default `host-pid-uuid` form.
    pub host: Option<String>,
    /// The holder's process id, when the owner id has the default form.
    pub pid: Option<u32>,
    /// The fencing token of the holder's acquisition.
    pub token: u64,
    /// When it was acquired (RFC 3339, UTC), if the backend records it.
    pub acquired_at: Option<String>,
    /// When the lease expires or expired (RFC 3339, UTC); `null` for session locks.
    pub expires_at: Option<String>,
    /// Milliseconds left before expiry, by the clock that decides expiry; `null` for session
    /// locks.
    pub remaining_ms: Option<u64>,
    /// The same, for humans (`41s`).
    pub remaining: Option<String>,
}

impl LockView {
    /// The view of `info`.
    pub fn new(info: &LockInfo) -> Self {
        let (host, pid) = split_owner(info.owner.as_str());
        Self {
            key: info.key.to_string(),
            owner: info.owner.to_string(),
            host,
            pid,
            token: info.token.get(),
            acquired_at: info.acquired_at.map(rfc3339),
            expires_at: info.expires_at.map(rfc3339),
            remaining_ms: info
                .remaining
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            remaining: info.remaining.map(human_duration),
        }
    }

    /// A one-line description of the holder: `OWNER (host H, pid P, fencing token T, 41s left)`.
    pub fn holder_line(&self) -> String {
        let mut parts = Vec::new();
        if let Some(host) = &self.host {
            parts.push(format!("host {host}"));
        }
        if let Some(pid) = self.pid {
            parts.push(format!("pid {pid}"));
        }
        parts.push(format!("fencing token {}", self.token));
        match (&self.remaining, self.remaining_ms) {
            (_, Some(0)) => parts.push("expired".to_owned()),
            (Some(left), _) => parts.push(format!("{left} left")),
            (None, _) => parts.push("session lock".to_owned()),
        }
        format!("`{}` ({})", self.owner, parts.join(", "))
    }
}

/// The state of one key, for `status --json` and `release --json`.
#[derive(Debug, Serialize)]
pub struct StateView {
    /// `free`, `held` or `expired`.
    pub state: &'static str,
    /// The holder (for `expired`: the last holder); `null` when free.
    pub lock: Option<LockView>,
}

impl StateView {
    /// The view of `state`.
    pub fn new(state: &LockState) -> Self {
        match state {
            LockState::Free => Self {
                state: "free",
                lock: None,
            },
            LockState::Held(info) => Self {
                state: "held",
                lock: Some(LockView::new(info)),
            },
            LockState::Expired(info) => Self {
                state: "expired",
                lock: Some(LockView::new(info)),
            },
        }
    }
}

/// Host and pid from an owner id of the default form `host-pid-uuid` (32 hex digits); `None`s
/// for owner ids chosen by the user.
pub fn split_owner(owner: &str) -> (Option<String>, Option<u32>) {
    let mut parts = owner.rsplitn(3, '-');
    let (Some(uuid), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else {
        return (None, None);
    };
    if uuid.len() != 32 || !uuid.bytes().all(|b| b.is_ascii_hexdigit()) || host.is_empty() {
        return (None, None);
    }
    match pid.parse::<u32>() {
        Ok(pid) => (Some(host.to_owned()), Some(pid)),
        Err(_) => (None, None),
    }
}

/// A timestamp in RFC 3339 (UTC, milliseconds).
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// A duration for humans: milliseconds below one second (`250ms`), tenths below ten seconds
/// (`2.5s`), whole seconds above (`1m 5s`).
pub fn human_duration(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{}ms", duration.as_millis())
    } else if duration < Duration::from_secs(10) {
        format!("{:.1}s", (duration.as_millis() / 100) as f64 / 10.0)
    } else {
        humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string()
    }
}

/// The human form of `status`.
pub fn status_text(key: &str, state: &LockState) -> String {
    let view = StateView::new(state);
    let Some(lock) = view.lock else {
        return format!("key:         {key}\nstate:       free");
    };
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    format!(
        "key:         {key}\nstate:       {}\nowner:       {}\nhost:        {}\npid:         {}\ntoken:       {}\nacquired at: {}\nexpires at:  {}\nremaining:   {}",
        view.state,
        lock.owner,
        or_dash(&lock.host),
        lock.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        lock.token,
        or_dash(&lock.acquired_at),
        lock.expires_at
            .clone()
            .unwrap_or_else(|| "never (session lock: held while its connection lives)".to_owned()),
        match (view.state, &lock.remaining) {
            ("expired", _) => "none (expired)".to_owned(),
            (_, Some(remaining)) => remaining.clone(),
            (_, None) => "-".to_owned(),
        },
    )
}

/// One lock as `list` shows it: the lock, its state, and for an expired lease how long ago it
/// expired.
#[derive(Debug, Serialize)]
pub struct ListEntry {
    /// The lock.
    #[serde(flatten)]
    pub lock: LockView,
    /// `held`, or `expired` (only with `--all`).
    pub state: &'static str,
    /// For an expired lease: milliseconds since it expired, by this host's clock; `null`
    /// otherwise.
    pub expired_ago_ms: Option<u64>,
    /// The same, for humans (`5m 3s`).
    pub expired_ago: Option<String>,
}

impl ListEntry {
    /// The entry of a listed state (held or expired; `None` for a free key), its age reckoned
    /// at `now`.
    pub fn new(state: &LockState, now: SystemTime) -> Option<Self> {
        Some(match state {
            LockState::Free => return None,
            LockState::Held(info) => Self {
                lock: LockView::new(info),
                state: "held",
                expired_ago_ms: None,
                expired_ago: None,
            },
            LockState::Expired(info) => {
                let ago = info
                    .expires_at
                    .map(|at| now.duration_since(at).unwrap_or(Duration::ZERO));
                Self {
                    lock: LockView::new(info),
                    state: "expired",
                    expired_ago_ms: ago.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    expired_ago: ago.map(human_duration),
                }
            }
        })
    }
}

/// The human table of `list`; with `all`, a STATE column and the expired leases' age.
pub fn list_table(locks: &[ListEntry], all: bool) -> String {
    if locks.is_empty() {
        return if all {
            "no locks held or expired".to_owned()
        } else {
            "no locks held".to_owned()
        };
    }
    let mut header = vec!["KEY"];
    if all {
        header.push("STATE");
    }
    header.extend([
        "OWNER",
        "HOST",
        "PID",
        "TOKEN",
        "ACQUIRED AT",
        "EXPIRES AT",
        "REMAINING",
    ]);
    let dash = || "-".to_owned();
    let rows: Vec<Vec<String>> = locks
        .iter()
        .map(|entry| {
            let l = &entry.lock;
            let mut row = vec![l.key.clone()];
            if all {
                row.push(entry.state.to_owned());
            }
            let remaining = match &entry.expired_ago {
                Some(ago) => format!("expired {ago} ago"),
                None if entry.state == "expired" => "expired".to_owned(),
                None => l.remaining.clone().unwrap_or_else(dash),
            };
            row.extend([
                l.owner.clone(),
                l.host.clone().unwrap_or_else(dash),
                l.pid.map_or_else(dash, |p| p.to_string()),
                l.token.to_string(),
                l.acquired_at.clone().unwrap_or_else(dash),
                l.expires_at.clone().unwrap_or_else(dash),
                remaining,
            ]);
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, &width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let header: Vec<String> = header.into_iter().map(str::to_owned).collect();
    let mut out = vec![line(&header)];
    out.extend(rows.iter().map(|row| line(row)));
    out.join("\n")
}

/// The human form of `key`: one `label: value` line per fact that applies to the backend.
pub fn native_text(key: &str, native: &NativeName) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        ("key", key.to_owned()),
        ("backend", native.backend.to_owned()),
    ];
    if let Some(id) = native.advisory_key {
        lines.push(("advisory key", id.to_string()));
    }
    if let Some(pg) = &native.pg_locks {
        lines.push((
            "pg_locks",
            format!(
                "classid {}, objid {}, objsubid {}",
                pg.classid, pg.objid, pg.objsubid
            ),
        ));
    }
    if let Some(name) = &native.lock_name {
        lines.push(("lock name", name.clone()));
    }
    let optional = [
        ("prefix", &native.prefix),
        ("file", &native.file),
        ("database", &native.database),
        ("schema", &native.schema),
    ];
    lines.extend(
        optional
            .into_iter()
            .filter_map(|(label, value)| Some((label, value.clone()?))),
    );
    if let Some(table) = &native.table {
        match native.kind {
            "advisory_lock" | "get_lock" => {
                lines.push((
                    "counter table",
                    format!("{table} (durable fencing token reservations)"),
                ));
                let kept = match native.kind {
                    "advisory_lock" => "unlogged",
                    _ => "in memory",
                };
                lines.push((
                    "holder table",
                    format!("{table}_holders (holders and their tokens, {kept})"),
                ));
            }
            _ => lines.push(("table", table.clone())),
        }
    }
    if let Some(collection) = &native.collection {
        lines.push(("collection", collection.clone()));
    }
    lines.push((
        "key field",
        format!("{} (the key, as is)", native.key_field),
    ));
    lines.push(("inspect", native.inspect.clone()));
    let width = lines
        .iter()
        .map(|(label, _)| label.len())
        .max()
        .unwrap_or(0)
        + 1;
    lines
        .iter()
        .map(|(label, value)| format!("{:<width$} {value}", format!("{label}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use leaselock::{FencingToken, LockKey, OwnerId};

    #[test]
    fn owners() {
        let generated = OwnerId::generate();
        let (host, pid) = split_owner(generated.as_str());
        assert_eq!(pid, Some(std::process::id()));
        assert!(host.is_some());
        assert_eq!(
            split_owner("my-host-name-42-0123456789abcdef0123456789abcdef"),
            (Some("my-host-name".to_owned()), Some(42))
        );
        assert_eq!(split_owner("deploy-job"), (None, None));
        assert_eq!(split_owner("a-b-c"), (None, None));
    }

    #[test]
    fn views() {
        let mut info = LockInfo::new(
            LockKey::new("k").unwrap(),
            OwnerId::new("h-7-0123456789abcdef0123456789abcdef").unwrap(),
            FencingToken::new(3),
        );
        info.remaining = Some(Duration::from_millis(41_500));
        info.expires_at = Some(SystemTime::UNIX_EPOCH);
        let view = LockView::new(&info);
        assert_eq!(view.remaining.as_deref(), Some("41s"));
        assert_eq!(view.expires_at.as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(
            view.holder_line(),
            "`h-7-0123456789abcdef0123456789abcdef` (host h, pid 7, fencing token 3, 41s left)"
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(303);
        let held = ListEntry::new(&LockState::Held(info.clone()), now).unwrap();
        assert_eq!((held.state, held.expired_ago_ms), ("held", None));
        let table = list_table(&[held], false);
        assert!(table.starts_with("KEY"), "{table}");
        assert!(!table.contains("STATE"), "{table}");
        assert_eq!(table.lines().count(), 2);
        info.remaining = Some(Duration::ZERO);
        let expired = ListEntry::new(&LockState::Expired(info), now).unwrap();
        assert_eq!(expired.state, "expired");
        assert_eq!(expired.expired_ago_ms, Some(303_000));
        let table = list_table(&[expired], true);
        assert!(table.starts_with("KEY  STATE"), "{table}");
        assert!(
            table.lines().nth(1).unwrap().contains("expired 5m 3s ago"),
            "{table}"
        );
        assert!(ListEntry::new(&LockState::Free, now).is_none());
        assert_eq!(list_table(&[], true), "no locks held or expired");
        assert_eq!(view.token, 3);
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(human_duration(Duration::from_millis(2_590)), "2.5s");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m 5s");
    }
}
