//! The subcommands other than `run`: `status`, `list`, `release`, `init`, `check`, `key`, and
//! what they share with `run` (opening the storage, creating it when missing, closing every
//! backend opened before the runtime ends).
//!
//! Commands that only look (`status`, `list`, `check`, `release --dry-run`) open the storage
//! read-only and never create it; `release --force` writes to storage that must exist.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use leaselock::{Error, LockBackend, LockKey, LockState, Locker, WaitPolicy};
use serde::Serialize;
use tokio::time::Instant;

use crate::cli::{CheckArgs, Cli, Command, InitArgs, KeyArgs, ListArgs, ReleaseArgs, StatusArgs};
use crate::exit::{
    describe, Failure, CONFLICT, INTERNAL, OK, STATUS_EXPIRED, STATUS_FREE, STATUS_HELD, STORAGE,
};
use crate::logging::{out, say};
use crate::output::{
    human_duration, list_table, native_text, status_text, ListEntry, LockView, StateView,
};
use crate::target::{Access, NativeName, StorageUrl, Target};

/// Every backend this process opened, to be shut down before the runtime ends (see
/// [`shutdown_backends`]).
static OPENED: Mutex<Vec<Arc<dyn LockBackend>>> = Mutex::new(Vec::new());

/// Runs the parsed command line; returns the exit code (having printed any failure).
pub async fn dispatch(cli: Cli, storage: StorageUrl) -> u8 {
    let url = storage.url.clone();
    let outcome = match cli.command {
        Command::Run(args) => crate::run::run(&storage, args).await,
        Command::Status(args) => status(&url, args).await,
        Command::List(args) => list(&url, args).await,
        Command::Release(args) => release(&url, args).await,
        Command::Init(args) => init(&url, args).await,
        Command::Check(args) => check(&url, args).await,
        Command::Key(args) => native_key(&url, args),
    };
    shutdown_backends().await;
    match outcome {
        Ok(code) => code,
        Err(failure) => {
            say(&failure.message);
            failure.code
        }
    }
}

/// A validated key, or a usage failure.
pub fn key(key: &str) -> Result<LockKey, Failure> {
    LockKey::new(key).map_err(|e| Failure::lock("", &e))
}

/// Opens the backend behind `target`, creating an SQLite file if missing (for `run` and
/// `init`).
pub async fn connect(target: &Target) -> Result<Arc<dyn LockBackend>, Failure> {
    open(target, Access::Create).await
}

/// Opens the backend behind `target` for `access`, and keeps it for [`shutdown_backends`].
async fn open(target: &Target, access: Access) -> Result<Arc<dyn LockBackend>, Failure> {
    if access != Access::Create {
        if let Some(missing) = target.missing_file() {
            return Err(does_not_exist(
                target,
                &format!("the database file {} does not exist", missing.display()),
            ));
        }
    }
    let backend = target.open_with(access).await.map_err(|e| match e {
        Error::NotInitialized { what, .. } => does_not_exist(target, &what),
        e => Failure::lock(
            &format!("cannot open lock storage {}", target.display()),
            &e,
        ),
    })?;
    keep_for_shutdown(&backend);
    Ok(backend)
}

/// Keeps `backend` for [`shutdown_backends`].
fn keep_for_shutdown(backend: &Arc<dyn LockBackend>) {
    OPENED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::clone(backend));
}

/// Closes every backend this process opened ([`LockBackend::shutdown`]: MongoDB's client, the
/// MySQL pools), so no driver cleans up in a background task while the runtime shuts down.
pub async fn shutdown_backends() {
    let opened = std::mem::take(&mut *OPENED.lock().unwrap_or_else(|p| p.into_inner()));
    for backend in opened {
        backend.shutdown().await;
    }
}

/// Storage that is not there (exit 66): "lock storage URL does not exist: the database file …
/// does not exist; run `leaselock init`" for a missing file, "lock storage URL is not
/// initialized: WHAT; run `leaselock init`" for what the backend's check found missing (a
/// table, a collection, columns).
fn does_not_exist(target: &Target, what: &str) -> Failure {
    // The backends' own hint names the library call; the command's user wants the command.
    let what = what
        .trim_end_matches(": run init_storage (or `leaselock init`)")
        .trim_end_matches(" (run `leaselock init`)");
    let state = if target.missing_file().is_some() {
        "does not exist"
    } else {
        "is not initialized"
    };
    Failure::new(
        STORAGE,
        format!(
            "lock storage {} {state}: {what}; run `leaselock init`",
            target.display()
        ),
    )
}

/// Opens storage that must already exist, for `access` (never [`Access::Create`]): checks it
/// and says so when it is missing or unusable. Creates nothing.
async fn open_existing(target: &Target, access: Access) -> Result<Locker, Failure> {
    let backend = open(target, access).await?;
    match backend.check_storage().await {
        Ok(()) => {}
        Err(Error::NotInitialized { what, .. }) => return Err(does_not_exist(target, &what)),
        Err(e) => {
            return Err(Failure::lock(
                &format!("lock storage {} is not usable", target.display()),
                &e,
            ))
        }
    }
    Locker::builder(backend)
        .build()
        .map_err(|e| Failure::lock("", &e))
}

/// How long [`open_ready`] keeps trying storage that cannot be reached yet.
#[derive(Clone, Copy, Debug)]
pub enum StorageWait {
    /// Not at all: the first failure is final.
    No,
    /// Until this much time has passed since the call.
    For(Duration),
    /// As long as it takes.
    Forever,
}

/// Opens `target` and makes its storage ready as [`ensure_storage`] does, retrying what can
/// heal within `wait`: a refused, reset or timed-out connection, a host name that does not
/// resolve, a database that does not exist yet, a server starting up or out of connections
/// (every [`Error::is_retryable`] error). Tries again every `interval`, and says so on stderr
/// once per change of reason (unless `quiet`). Refused credentials or permissions, bad input and
/// other permanent errors end it at once, with their own exit code; so does the deadline, with
/// the last error.
pub async fn open_ready(
    target: &Target,
    wait: StorageWait,
    interval: Duration,
    quiet: bool,
) -> Result<Arc<dyn LockBackend>, Failure> {
    let started = Instant::now();
    let mut backend: Option<Arc<dyn LockBackend>> = None;
    let mut last_reason: Option<String> = None;
    loop {
        let (context, error) = match attempt_ready(target, &mut backend).await {
            Ok(ready) => {
                if last_reason.is_some() && !quiet {
                    say(&format!(
                        "lock storage {} is reachable after {}",
                        target.display(),
                        human_duration(started.elapsed())
                    ));
                }
                return Ok(ready);
            }
            Err(failed) => failed,
        };
        let left = match wait {
            StorageWait::No => None,
            StorageWait::For(limit) => limit
                .checked_sub(started.elapsed())
                .filter(|left| *left > interval),
            StorageWait::Forever => Some(Duration::MAX),
        };
        let Some(left) = left.filter(|_| error.is_retryable()) else {
            let mut failure = Failure::lock(&context, &error);
            if last_reason.is_some() && error.is_retryable() {
                failure.message.push_str(&format!(
                    " (gave up after {})",
                    human_duration(started.elapsed())
                ));
            }
            return Err(failure);
        };
        let reason = unreachable_reason(&error);
        if !quiet && last_reason.as_ref() != Some(&reason) {
            let limit = match wait {
                StorageWait::For(_) => format!("for up to {}", human_duration(left)),
                _ => "as long as it takes".to_owned(),
            };
            say(&format!(
                "cannot reach lock storage {} ({reason}); retrying {limit}",
                target.display()
            ));
        }
        tracing::debug!(url = %target.display(), %error, "lock storage not reachable yet");
        last_reason = Some(reason);
        tokio::time::sleep(interval).await;
    }
}

/// One attempt of [`open_ready`]: opens the backend unless `backend` holds it already, checks
/// the storage and creates it when missing. On failure, the context for the message and the
/// error.
async fn attempt_ready(
    target: &Target,
    backend: &mut Option<Arc<dyn LockBackend>>,
) -> Result<Arc<dyn LockBackend>, (String, Error)> {
    let opened = match backend {
        Some(opened) => Arc::clone(opened),
        None => {
            let opened = target
                .open_with(Access::Create)
                .await
                .map_err(|e| (format!("cannot open lock storage {}", target.display()), e))?;
            keep_for_shutdown(&opened);
            *backend = Some(Arc::clone(&opened));
            opened
        }
    };
    match opened.check_storage().await {
        Ok(()) => Ok(opened),
        Err(Error::NotInitialized { what, .. }) => {
            tracing::info!(url = %target.display(), %what, "lock storage missing; creating it");
            match opened.init_storage().await {
                Ok(()) => Ok(opened),
                Err(e) => Err((
                    format!("cannot create lock storage in {}", target.display()),
                    e,
                )),
            }
        }
        Err(e) => Err((
            format!("lock storage {} is not usable", target.display()),
            e,
        )),
    }
}

/// Why storage cannot be reached, briefly: the kind of a network error (`connection refused`,
/// `timed out`, ...) or its message (`failed to lookup address information: ...`), else the
/// backend's own description.
fn unreachable_reason(error: &Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                kind @ (ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut
                | HostUnreachable | NetworkUnreachable | NotConnected | BrokenPipe
                | AddrNotAvailable | UnexpectedEof) => kind.to_string(),
                // DNS failures and the like: the system's own words.
                _ => crate::exit::one_line(&io.to_string()),
            };
        }
        source = cause.source();
    }
    match error {
        Error::NotAccessible { what, .. } => crate::exit::one_line(what),
        other => crate::exit::describe(other),
    }
}

/// `wait` with `spent` taken off its deadline, for an acquisition that starts after `spent` went
/// into reaching the storage. A policy without a deadline is returned unchanged.
pub fn wait_left(wait: &WaitPolicy, spent: Duration, interval: Duration) -> WaitPolicy {
    match wait.timeout() {
        Some(timeout) => match timeout.checked_sub(spent).filter(|left| !left.is_zero()) {
            Some(left) => WaitPolicy::until(left, interval).with_jitter(interval / 2),
            None => WaitPolicy::fail_fast(),
        },
        None => wait.clone(),
    }
}

fn json<T: Serialize>(value: &T) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::new(INTERNAL, format!("cannot encode JSON: {e}")))?;
    out(&text);
    Ok(())
}

#[derive(Serialize)]
struct StatusJson<'a> {
    url: &'a str,
    backend: &'a str,
    key: &'a str,
    #[serde(flatten)]
    state: StateView,
}

async fn status(url: &str, args: StatusArgs) -> Result<u8, Failure> {
    let key = key(&args.key)?;
    let target = Target::parse(url)?;
    let locker = open_existing(&target, Access::ReadOnly).await?;
    let state = locker
        .status(key.as_str())
        .await
        .map_err(|e| Failure::lock(&format!("cannot read the state of `{key}`"), &e))?;
    if args.json {
        json(&StatusJson {
            url: target.display(),
            backend: locker.capabilities().backend,
            key: key.as_str(),
            state: StateView::new(&state),
        })?;
    } else {
        out(&status_text(key.as_str(), &state));
    }
    Ok(status_code(&state))
}

/// The exit code of `status` for `state` (see [`crate::exit::STATUS_TABLE`]).
fn status_code(state: &LockState) -> u8 {
    match state {
        LockState::Held(_) => STATUS_HELD,
        LockState::Expired(_) => STATUS_EXPIRED,
        LockState::Free => STATUS_FREE,
    }
}

#[derive(Serialize)]
struct ListJson<'a> {
    url: &'a str,
    backend: &'a str,
    /// Whether expired leases are included (`--all`).
    all: bool,
    locks: Vec<ListEntry>,
}

async fn list(url: &str, args: ListArgs) -> Result<u8, Failure> {
    let target = Target::parse(url)?;
    let locker = open_existing(&target, Access::ReadOnly).await?;
    let failed = |e: Error| Failure::lock("cannot list locks", &e);
    let states = if args.all {
        locker.list_with_expired().await.map_err(failed)?
    } else {
        let held = locker.list().await.map_err(failed)?;
        held.into_iter().map(LockState::Held).collect()
    };
    let now = SystemTime::now();
    let entries: Vec<ListEntry> = states
        .iter()
        .filter_map(|state| ListEntry::new(state, now))
        .collect();
    if args.json {
        json(&ListJson {
            url: target.display(),
            backend: locker.capabilities().backend,
            all: args.all,
            locks: entries,
        })?;
    } else {
        out(&list_table(&entries, args.all));
    }
    Ok(OK)
}

#[derive(Serialize)]
struct ReleaseJson<'a> {
    url: &'a str,
    backend: &'a str,
    key: &'a str,
    dry_run: bool,
    if_stale: bool,
    /// `none` (it was free), `would_release` (dry run), `released`, `refused` (live lease and
    /// --if-stale), `raced` (acquired again between the check and the break; left alone).
    action: &'static str,
    before: StateView,
    /// The holder that was removed, when one was.
    removed: Option<LockView>,
}

async fn release(url: &str, args: ReleaseArgs) -> Result<u8, Failure> {
    if !args.force {
        return Err(Failure::usage(
            "`release` breaks a lock whoever holds it: add --force (with --if-stale to break it \
             only once its lease has expired, --dry-run to only show it)",
        ));
    }
    let key = key(&args.key)?;
    let target = Target::parse(url)?;
    // A dry run only reads; breaking writes, to storage that must exist (there is nothing to
    // break in storage that does not).
    let access = if args.dry_run {
        Access::ReadOnly
    } else {
        Access::Existing
    };
    let locker = open_existing(&target, access).await?;
    let read_failed = |e: Error| Failure::lock(&format!("cannot read the state of `{key}`"), &e);
    let break_failed = |e: Error| Failure::lock(&format!("cannot break `{key}`"), &e);
    let before = locker.status(key.as_str()).await.map_err(read_failed)?;
    let mut removed = None;
    let (action, code, message) = match &before {
        LockState::Free => ("none", OK, format!("`{key}` is free; nothing to release")),
        LockState::Held(info) if args.if_stale => (
            "refused",
            CONFLICT,
            if info.expires_at.is_some() {
                format!(
                    "refusing to break `{key}`: its lease is live (held by {}; it expires unless \
                     refreshed); --if-stale breaks only a lease that expired because its holder \
                     stopped refreshing it",
                    LockView::new(info).holder_line()
                )
            } else {
                format!(
                    "refusing to break `{key}`: it is a session lock held by {} over a live \
                     connection, never stale (it ends with that connection)",
                    LockView::new(info).holder_line()
                )
            },
        ),
        LockState::Held(info) | LockState::Expired(info) if args.dry_run => (
            "would_release",
            OK,
            format!(
                "would break `{key}`, {} by {}",
                if before.is_held() {
                    "held"
                } else {
                    "last held (expired)"
                },
                LockView::new(info).holder_line()
            ),
        ),
        LockState::Expired(info) if args.if_stale => {
            // The backend's release of expired leases is atomic: a lease refreshed or acquired
            // again after our read is never broken. It also clears other keys' expired leases,
            // which changes nothing for anyone (an expired lease is free to take).
            let cleared = locker.release_expired().await.map_err(break_failed)?;
            tracing::info!(cleared, "released expired leases");
            match locker.status(key.as_str()).await.map_err(read_failed)? {
                LockState::Free => {
                    removed = Some(LockView::new(info));
                    (
                        "released",
                        OK,
                        format!(
                            "broke stale lock `{key}` of {}",
                            LockView::new(info).holder_line()
                        ),
                    )
                }
                LockState::Held(now) => (
                    "raced",
                    CONFLICT,
                    format!(
                        "`{key}` was acquired again meanwhile by {}; left alone",
                        LockView::new(&now).holder_line()
                    ),
                ),
                LockState::Expired(_) => {
                    return Err(Failure::new(
                        STORAGE,
                        format!("the backend did not release the expired lease on `{key}`"),
                    ))
                }
            }
        }
        LockState::Held(_) | LockState::Expired(_) => {
            match locker
                .force_release(key.as_str())
                .await
                .map_err(break_failed)?
            {
                Some(previous) => {
                    let view = LockView::new(&previous);
                    let message = format!("broke `{key}` held by {}", view.holder_line());
                    removed = Some(view);
                    ("released", OK, message)
                }
                None => (
                    "none",
                    OK,
                    format!("`{key}` was released meanwhile; nothing to break"),
                ),
            }
        }
    };
    if args.json {
        json(&ReleaseJson {
            url: target.display(),
            backend: locker.capabilities().backend,
            key: key.as_str(),
            dry_run: args.dry_run,
            if_stale: args.if_stale,
            action,
            before: StateView::new(&before),
            removed,
        })?;
    } else if code == OK {
        out(&message);
    } else {
        say(&message);
    }
    Ok(code)
}

/// What `init --json` and `check --json` print.
#[derive(Serialize)]
struct StorageJson<'a> {
    url: &'a str,
    /// The backend's name; `null` when it could not be opened.
    backend: Option<&'a str>,
    /// Whether the storage is there and usable.
    ok: bool,
    /// What is wrong (the message also printed on stderr); `null` when `ok`.
    error: Option<&'a str>,
}

/// Prints the outcome of `init` or `check`: `text` or JSON on success; on failure the JSON (the
/// caller prints the message on stderr).
fn storage_outcome(
    json_out: bool,
    target: &Target,
    backend: Option<&str>,
    outcome: Result<(), Failure>,
    text: impl FnOnce(&str) -> String,
) -> Result<u8, Failure> {
    if json_out {
        json(&StorageJson {
            url: target.display(),
            backend,
            ok: outcome.is_ok(),
            error: outcome.as_ref().err().map(|f| f.message.as_str()),
        })?;
    }
    outcome?;
    if !json_out {
        out(&text(backend.unwrap_or_default()));
    }
    Ok(OK)
}

async fn init(url: &str, args: InitArgs) -> Result<u8, Failure> {
    let target = Target::parse(url)?;
    let backend = match connect(&target).await {
        Ok(backend) => backend,
        Err(failure) => {
            return storage_outcome(args.json, &target, None, Err(failure), |_| String::new())
        }
    };
    let name = backend.capabilities().backend;
    let outcome = init_and_verify(&*backend, &target).await;
    storage_outcome(args.json, &target, Some(name), outcome, |name| {
        format!("lock storage ready: {} ({name})", target.display())
    })
}

/// Creates the storage, then checks that what is there is usable: `CREATE … IF NOT EXISTS`
/// leaves alone a table of that name with other columns, or a view.
async fn init_and_verify(backend: &dyn LockBackend, target: &Target) -> Result<(), Failure> {
    backend.init_storage().await.map_err(|e| {
        Failure::lock(
            &format!("cannot create lock storage in {}", target.display()),
            &e,
        )
    })?;
    backend.check_storage().await.map_err(|e| {
        let what = match &e {
            Error::NotInitialized { what, .. } | Error::NotAccessible { what, .. } => what.clone(),
            e => describe(e),
        };
        Failure::new(
            STORAGE,
            format!(
                "lock storage {} is not usable after init: {what}",
                target.display()
            ),
        )
    })
}

async fn check(url: &str, args: CheckArgs) -> Result<u8, Failure> {
    let target = Target::parse(url)?;
    if let Some(missing) = target.missing_file() {
        let failure = Failure::new(
            STORAGE,
            format!(
                "check failed for {}: the database file {} does not exist (run `leaselock init`)",
                target.display(),
                missing.display()
            ),
        );
        return storage_outcome(args.json, &target, None, Err(failure), |_| String::new());
    }
    let backend = match open(&target, Access::ReadOnly).await {
        Ok(backend) => backend,
        Err(failure) => {
            return storage_outcome(args.json, &target, None, Err(failure), |_| String::new())
        }
    };
    let name = backend.capabilities().backend;
    let outcome = backend
        .check_storage()
        .await
        .map_err(|e| Failure::lock(&format!("check failed for {}", target.display()), &e));
    storage_outcome(args.json, &target, Some(name), outcome, |name| {
        format!(
            "ok: lock storage {} is reachable and initialized ({name})",
            target.display()
        )
    })
}

#[derive(Serialize)]
struct KeyJson<'a> {
    url: &'a str,
    key: &'a str,
    #[serde(flatten)]
    native: NativeName,
}

/// `leaselock key`: computed from the URL, connecting to nothing.
fn native_key(url: &str, args: KeyArgs) -> Result<u8, Failure> {
    let key = key(&args.key)?;
    let target = Target::parse(url)?;
    let native = target.native_name(&key)?;
    if args.json {
        json(&KeyJson {
            url: target.display(),
            key: key.as_str(),
            native,
        })?;
    } else {
        out(&native_text(key.as_str(), &native));
    }
    Ok(OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_short_and_name_the_network_failure() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = Error::not_accessible("x", "cannot connect to db:5432", Some(Box::new(refused)));
        assert_eq!(unreachable_reason(&err), "connection refused");
        let dns = std::io::Error::other("failed to lookup address information: Name unknown");
        let err = Error::not_accessible("x", "cannot connect to db:5432", Some(Box::new(dns)));
        assert_eq!(
            unreachable_reason(&err),
            "failed to lookup address information: Name unknown"
        );
        let err = Error::not_accessible("x", "database \"app\" does not exist (3D000)", None);
        assert_eq!(
            unreachable_reason(&err),
            "database \"app\" does not exist (3D000)"
        );
    }

    #[test]
    fn the_time_spent_reaching_storage_comes_off_the_wait() {
        let interval = Duration::from_millis(250);
        let wait = WaitPolicy::until(Duration::from_secs(20), interval);
        let left = wait_left(&wait, Duration::from_secs(3), interval);
        assert_eq!(left.timeout(), Some(Duration::from_secs(17)));
        let none_left = wait_left(&wait, Duration::from_secs(21), interval);
        assert_eq!(none_left, WaitPolicy::fail_fast());
        assert_eq!(
            wait_left(&WaitPolicy::fail_fast(), Duration::from_secs(1), interval),
            WaitPolicy::fail_fast()
        );
    }
}
