//! The subcommands other than `run`: `status`, `list`, `release`, `init`, `check`, `key`, and
//! what they share with `run` (opening the storage, creating it when missing).

use std::sync::Arc;
use std::time::Duration;

use leaselock::{Error, LockBackend, LockKey, LockState, Locker, WaitPolicy};
use serde::Serialize;
use tokio::time::Instant;

use crate::cli::{Cli, Command, KeyArgs, ListArgs, ReleaseArgs, StatusArgs};
use crate::exit::{Failure, CONFLICT, INTERNAL, OK, STORAGE};
use crate::logging::{out, say};
use crate::output::{human_duration, list_table, native_text, status_text, LockView, StateView};
use crate::target::{NativeName, Target};

/// Runs the parsed command line; returns the exit code (having printed any failure).
pub async fn dispatch(cli: Cli) -> u8 {
    let url = cli.url;
    let outcome = match cli.command {
        Command::Run(args) => crate::run::run(&url, args).await,
        Command::Status(args) => status(&url, args).await,
        Command::List(args) => list(&url, args).await,
        Command::Release(args) => release(&url, args).await,
        Command::Init => init(&url).await,
        Command::Check => check(&url).await,
        Command::Key(args) => native_key(&url, args),
    };
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

/// Opens the backend behind `target`.
pub async fn connect(target: &Target) -> Result<Arc<dyn LockBackend>, Failure> {
    target.open().await.map_err(|e| {
        Failure::lock(
            &format!("cannot open lock storage {}", target.display()),
            &e,
        )
    })
}

/// Creates the storage if it is missing (the check first, so a user without the right to create
/// tables can still use storage an administrator created). `init_storage` is idempotent and safe
/// from many processes at once.
pub async fn ensure_storage(locker: &Locker, target: &Target) -> Result<(), Failure> {
    match locker.check_storage().await {
        Ok(()) => Ok(()),
        Err(Error::NotInitialized { what, .. }) => {
            tracing::info!(url = %target.display(), %what, "lock storage missing; creating it");
            locker.init_storage().await.map_err(|e| {
                Failure::lock(
                    &format!("cannot create lock storage in {}", target.display()),
                    &e,
                )
            })
        }
        Err(e) => Err(Failure::lock(
            &format!("lock storage {} is not usable", target.display()),
            &e,
        )),
    }
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
                .open()
                .await
                .map_err(|e| (format!("cannot open lock storage {}", target.display()), e))?;
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

/// A locker with default settings over `target`'s backend, its storage created if missing.
async fn ready_locker(target: &Target) -> Result<Locker, Failure> {
    let locker = Locker::builder(connect(target).await?)
        .build()
        .map_err(|e| Failure::lock("", &e))?;
    ensure_storage(&locker, target).await?;
    Ok(locker)
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
    let locker = ready_locker(&target).await?;
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
    Ok(OK)
}

#[derive(Serialize)]
struct ListJson<'a> {
    url: &'a str,
    backend: &'a str,
    locks: Vec<LockView>,
}

async fn list(url: &str, args: ListArgs) -> Result<u8, Failure> {
    let target = Target::parse(url)?;
    let locker = ready_locker(&target).await?;
    let locks = locker
        .list()
        .await
        .map_err(|e| Failure::lock("cannot list locks", &e))?;
    let views: Vec<LockView> = locks.iter().map(LockView::new).collect();
    if args.json {
        json(&ListJson {
            url: target.display(),
            backend: locker.capabilities().backend,
            locks: views,
        })?;
    } else {
        out(&list_table(&views));
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
    let locker = ready_locker(&target).await?;
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

async fn init(url: &str) -> Result<u8, Failure> {
    let target = Target::parse(url)?;
    let backend = connect(&target).await?;
    let name = backend.capabilities().backend;
    backend.init_storage().await.map_err(|e| {
        Failure::lock(
            &format!("cannot create lock storage in {}", target.display()),
            &e,
        )
    })?;
    out(&format!(
        "lock storage ready: {} ({name})",
        target.display()
    ));
    Ok(OK)
}

async fn check(url: &str) -> Result<u8, Failure> {
    let target = Target::parse(url)?;
    if let Some(missing) = target.missing_file() {
        return Err(Failure::new(
            STORAGE,
            format!(
                "check failed for {}: the database file {} does not exist (run `leaselock init`)",
                target.display(),
                missing.display()
            ),
        ));
    }
    let backend = connect(&target).await?;
    let name = backend.capabilities().backend;
    backend
        .check_storage()
        .await
        .map_err(|e| Failure::lock(&format!("check failed for {}", target.display()), &e))?;
    out(&format!(
        "ok: lock storage {} is reachable and initialized ({name})",
        target.display()
    ));
    Ok(OK)
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
