//! MySQL/MariaDB-specific behaviour beyond the shared suite: server-side kills, concurrent
//! initialization, long keys, storage checks, wake-ups, URLs.
//!
//! Needs `LEASELOCK_MYSQL_URL` (for example `mysql://root@127.0.0.1:3306/leaselock_test`); skips
//! loudly without it, and fails under `CI=true`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use leaselock::{
    AcquireOutcome, AcquireRequest, Error, Lease, LockBackend, LockKey, LockState, Locker, OwnerId,
    WaitPolicy,
};
use leaselock_mysql::mysql_async::prelude::*;
use leaselock_mysql::mysql_async::{Conn, Opts, OptsBuilder};
use leaselock_mysql::{MysqlConfig, MysqlGetLockBackend, MysqlTableBackend, Strategy};

/// Generous bound for anything that should take milliseconds: never tight timing.
const SOON: Duration = Duration::from_secs(5);

fn url() -> Option<String> {
    leaselock_conformance::server_url("LEASELOCK_MYSQL_URL")
}

fn fresh_namespace() -> String {
    leaselock_conformance::fresh_namespace()
}

fn key(name: &str) -> LockKey {
    leaselock_conformance::fresh_key(name)
}

fn owner(name: &str) -> OwnerId {
    OwnerId::new(format!("{name}-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

fn request(key: &LockKey, owner: &OwnerId) -> AcquireRequest {
    AcquireRequest::new(key.clone(), owner.clone(), Duration::from_secs(60)).unwrap()
}

async fn acquire(backend: &dyn LockBackend, key: &LockKey, who: &str) -> Lease {
    match backend
        .try_acquire(&request(key, &owner(who)))
        .await
        .unwrap()
    {
        AcquireOutcome::Acquired(lease) => lease,
        AcquireOutcome::Held(holder) => panic!("`{key}` should be free; held by {holder:?}"),
    }
}

async fn raw_conn(url: &str) -> Conn {
    Conn::new(Opts::from_url(url).unwrap()).await.unwrap()
}

/// A GET_LOCK backend in a fresh table and prefix, initialized.
async fn get_lock_backend(url: &str) -> (MysqlGetLockBackend, String) {
    let ns = fresh_namespace();
    let config = MysqlConfig::from_url(url).unwrap().table(&ns).prefix(&ns);
    let backend = MysqlGetLockBackend::new(config).unwrap();
    backend.init_storage().await.unwrap();
    (backend, ns)
}

/// Drops `table`, and the holder table named after it if there is one.
async fn drop_table(url: &str, table: &str) {
    let holders = leaselock::Namespace::new(format!("{table}_holders")).unwrap();
    let table = leaselock::Namespace::new(table).unwrap();
    let mut conn = raw_conn(url).await;
    conn.query_drop(format!(
        "DROP TABLE IF EXISTS {}, {}",
        table.backquoted(),
        holders.backquoted()
    ))
    .await
    .unwrap();
}

/// The connection id holding `name`, if any.
async fn holder_of(conn: &mut Conn, name: &str) -> Option<u64> {
    let row: Option<Option<u64>> = conn
        .exec_first("SELECT IS_USED_LOCK(?)", (name,))
        .await
        .unwrap();
    row.flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_kill_fires_the_lost_signal() {
    let Some(url) = url() else { return };
    let (backend, ns) = get_lock_backend(&url).await;
    let backend = Arc::new(backend);
    let k = key("kill");
    let name = backend.lock_name(&k);
    // No refresh daemon: only the backend's own liveness watch can tell the guard.
    let locker = Locker::builder(Arc::clone(&backend))
        .refresh(false)
        .build()
        .unwrap();
    let guard = locker.acquire(k.as_str()).await.unwrap().unwrap();
    let lease = guard.lease().unwrap();
    let direct = backend
        .watch_lost(&lease)
        .expect("GET_LOCK locks report losses");

    let mut admin = raw_conn(&url).await;
    let id = holder_of(&mut admin, &name)
        .await
        .expect("held on the server");
    admin
        .query_drop(format!("KILL CONNECTION {id}"))
        .await
        .unwrap();
    let killed_at = Instant::now();

    let reason = tokio::time::timeout(SOON, guard.lost().wait())
        .await
        .expect("the guard's lost signal fires after KILL CONNECTION");
    eprintln!(
        "lost signal {:?} after the kill: {reason}",
        killed_at.elapsed()
    );
    tokio::time::timeout(SOON, direct)
        .await
        .expect("watch_lost resolves too");
    assert!(!backend.verify(&lease).await.unwrap());
    assert!(matches!(
        backend.refresh(&lease).await,
        Err(Error::Lost { .. })
    ));
    assert_eq!(backend.status(&k).await.unwrap(), LockState::Free);
    // The killed holder's record is stale; cleanup clears it (this table has no other).
    assert_eq!(backend.release_expired().await.unwrap(), 1);
    assert_eq!(backend.release_expired().await.unwrap(), 0);
    // Free at once for someone else, with a higher token.
    let next = acquire(&*backend, &k, "next").await;
    assert!(next.token > lease.token);
    assert!(!guard.release().await.unwrap());
    assert!(backend.release(&next).await.unwrap());
    drop_table(&url, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_init_from_16_tasks() {
    let Some(url) = url() else { return };
    for strategy in [Strategy::GetLock, Strategy::Table] {
        let ns = fresh_namespace();
        let config = MysqlConfig::from_url(&url)
            .unwrap()
            .strategy(strategy)
            .table(&ns)
            .prefix(&ns);
        // 16 tasks on one instance and 16 on separate instances, all at once.
        let shared = config.clone().build().unwrap();
        let mut tasks = Vec::new();
        for i in 0..32 {
            let backend = if i % 2 == 0 {
                Arc::clone(&shared)
            } else {
                config.clone().build().unwrap()
            };
            tasks.push(tokio::spawn(async move { backend.init_storage().await }));
        }
        for task in tasks {
            task.await
                .unwrap()
                .unwrap_or_else(|e| panic!("{strategy}: concurrent init failed: {e}"));
        }
        shared.check_storage().await.unwrap();
        let k = key("after_init");
        let lease = acquire(&*shared, &k, "a").await;
        assert_eq!(lease.token.get(), 1);
        assert!(shared.release(&lease).await.unwrap());
        drop_table(&url, &ns).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_keys_and_keys_differing_after_64_characters_are_distinct() {
    let Some(url) = url() else { return };
    let (backend, ns) = get_lock_backend(&url).await;
    let common = format!("{}/{}", key("long").as_str(), "q".repeat(64));
    assert!(common.chars().count() > 64);
    let keys: Vec<LockKey> = [
        format!("{common}a"),
        format!("{common}b"),
        format!("{common}A"),
        "x".repeat(255),
        format!("{}{}", "x".repeat(254), "y"),
    ]
    .into_iter()
    .map(|k| LockKey::new(k).unwrap())
    .collect();
    let mut admin = raw_conn(&url).await;
    let mut leases = Vec::new();
    for k in &keys {
        let name = backend.lock_name(k);
        assert!(name.len() <= 64, "{name}");
        leases.push(acquire(&backend, k, "a").await);
        // The documented name is the server's name: it shows up held there, by someone.
        assert!(
            holder_of(&mut admin, &name).await.is_some(),
            "`{name}` must be held on the server"
        );
    }
    let names: std::collections::HashSet<String> =
        keys.iter().map(|k| backend.lock_name(k)).collect();
    assert_eq!(names.len(), keys.len(), "every key has its own lock name");
    for lease in &leases {
        match backend.status(&lease.key).await.unwrap() {
            LockState::Held(info) => {
                assert_eq!(info.key, lease.key);
                assert_eq!(info.token, lease.token);
            }
            other => panic!("expected Held, got {other:?}"),
        }
    }
    // Releasing one leaves the others held.
    assert!(backend.release(&leases[0]).await.unwrap());
    assert_eq!(backend.status(&keys[0]).await.unwrap(), LockState::Free);
    for lease in &leases[1..] {
        assert!(backend.verify(lease).await.unwrap());
        assert!(backend.release(lease).await.unwrap());
    }
    drop_table(&url, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_taken_outside_leaselock_is_reported_held() {
    let Some(url) = url() else { return };
    let (backend, ns) = get_lock_backend(&url).await;
    let k = key("outside");
    let mut other = raw_conn(&url).await;
    let got: Option<i64> = other
        .exec_first("SELECT GET_LOCK(?, 0)", (backend.lock_name(&k),))
        .await
        .unwrap();
    assert_eq!(got, Some(1));
    match backend
        .try_acquire(&request(&k, &owner("a")))
        .await
        .unwrap()
    {
        AcquireOutcome::Held(_) => {}
        AcquireOutcome::Acquired(lease) => panic!("acquired a lock held elsewhere: {lease:?}"),
    }
    match backend.status(&k).await.unwrap() {
        LockState::Held(info) => assert!(info.owner.as_str().starts_with("unknown")),
        other => panic!("expected Held by an unknown connection, got {other:?}"),
    }
    let _ = other.disconnect().await;
    drop_table(&url, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_wakes_a_waiter_long_before_its_retry_interval() {
    let Some(url) = url() else { return };
    let (backend, ns) = get_lock_backend(&url).await;
    let backend = Arc::new(backend);
    let k = key("wakeup");
    let holder = acquire(&*backend, &k, "holder").await;
    // Without a wake-up this waiter would sleep 60 s between attempts.
    let waiter = Locker::builder(Arc::clone(&backend))
        .wait(WaitPolicy::until(
            Duration::from_secs(120),
            Duration::from_secs(60),
        ))
        .build()
        .unwrap();
    let kk = k.clone();
    let task = tokio::spawn(async move { waiter.acquire(kk.as_str()).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !task.is_finished(),
        "the waiter waits while the lock is held"
    );
    let released_at = Instant::now();
    assert!(backend.release(&holder).await.unwrap());
    let guard = tokio::time::timeout(SOON, task)
        .await
        .expect("the release wakes the waiter")
        .unwrap()
        .unwrap()
        .expect("acquired");
    eprintln!("hand-off took {:?}", released_at.elapsed());
    assert!(guard.token() > holder.token);
    assert!(guard.release().await.unwrap());
    drop_table(&url, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_from_another_instance_ends_the_holders_connection() {
    let Some(url) = url() else { return };
    let (a, ns) = get_lock_backend(&url).await;
    let config = MysqlConfig::from_url(&url).unwrap().table(&ns).prefix(&ns);
    let b = MysqlGetLockBackend::new(config).unwrap();
    let k = key("remote_release");
    let lease = acquire(&a, &k, "a").await;
    let lost = a.watch_lost(&lease).unwrap();
    assert!(b.verify(&lease).await.unwrap(), "any instance can verify");
    let mut forged = lease.clone();
    forged.owner = owner("intruder");
    assert!(!b.release(&forged).await.unwrap());
    assert!(b.release(&lease).await.unwrap());
    tokio::time::timeout(SOON, lost)
        .await
        .expect("the holder learns of it");
    assert_eq!(a.status(&k).await.unwrap(), LockState::Free);
    assert!(!a.release(&lease).await.unwrap());
    drop_table(&url, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_backend_frees_its_locks() {
    let Some(url) = url() else { return };
    let (a, ns) = get_lock_backend(&url).await;
    let config = MysqlConfig::from_url(&url).unwrap().table(&ns).prefix(&ns);
    let b = MysqlGetLockBackend::new(config).unwrap();
    let k = key("dropped");
    let lease = acquire(&a, &k, "a").await;
    drop(a);
    let started = Instant::now();
    loop {
        if let AcquireOutcome::Acquired(next) =
            b.try_acquire(&request(&k, &owner("b"))).await.unwrap()
        {
            assert!(next.token > lease.token);
            assert!(b.release(&next).await.unwrap());
            break;
        }
        assert!(
            started.elapsed() < SOON,
            "the dropped instance's lock was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop_table(&url, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_expiry_follows_the_server_clock_in_any_session_time_zone() {
    let Some(url) = url() else { return };
    let ns = fresh_namespace();
    // A session time zone far from UTC: expiry must not move by its offset.
    let opts = OptsBuilder::from_opts(Opts::from_url(&url).unwrap())
        .init(vec!["SET time_zone = '+09:30'"]);
    let backend = MysqlTableBackend::new(MysqlConfig::new(opts).table(&ns)).unwrap();
    backend.init_storage().await.unwrap();
    let k = key("tz");
    let ttl = Duration::from_secs(30);
    let lease = match backend
        .try_acquire(&AcquireRequest::new(k.clone(), owner("a"), ttl).unwrap())
        .await
        .unwrap()
    {
        AcquireOutcome::Acquired(lease) => lease,
        other => panic!("{other:?}"),
    };
    match backend.status(&k).await.unwrap() {
        LockState::Held(info) => {
            let remaining = info.remaining.unwrap();
            assert!(remaining <= ttl && remaining > ttl - SOON, "{remaining:?}");
            // Server and tests share this machine's clock.
            let expires = info.expires_at.unwrap();
            let expected = SystemTime::now() + ttl;
            let skew = expires
                .duration_since(expected)
                .unwrap_or_else(|e| e.duration());
            assert!(skew < SOON, "expires_at is off by {skew:?}");
        }
        other => panic!("expected Held, got {other:?}"),
    }
    assert!(backend.release(&lease).await.unwrap());
    drop_table(&url, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_storage_tells_missing_from_inaccessible() {
    let Some(url) = url() else { return };
    for strategy in [Strategy::GetLock, Strategy::Table] {
        let ns = fresh_namespace();
        let config = MysqlConfig::from_url(&url).unwrap().strategy(strategy);
        let missing = config.clone().table(&ns).build().unwrap();
        match missing.check_storage().await {
            Err(Error::NotInitialized { what, .. }) => assert!(what.contains(&ns), "{what}"),
            other => panic!("{strategy}: expected NotInitialized, got {other:?}"),
        }

        // The other strategy's table has the wrong columns.
        let other = match strategy {
            Strategy::GetLock => Strategy::Table,
            Strategy::Table => Strategy::GetLock,
        };
        let theirs = config.clone().strategy(other).table(&ns).build().unwrap();
        theirs.init_storage().await.unwrap();
        assert!(matches!(
            missing.check_storage().await,
            Err(Error::NotInitialized { .. })
        ));
        drop_table(&url, &ns).await;

        // Nobody listens on port 1.
        let opts = OptsBuilder::from_opts(Opts::from_url(&url).unwrap())
            .ip_or_hostname("127.0.0.1")
            .tcp_port(1)
            .prefer_socket(false);
        let unreachable = MysqlConfig::new(opts).strategy(strategy).build().unwrap();
        match unreachable.check_storage().await {
            Err(err @ Error::NotAccessible { .. }) => assert!(err.is_retryable()),
            other => panic!("{strategy}: expected NotAccessible, got {other:?}"),
        }

        // A database that does not exist yet may be created meanwhile: retryable.
        let opts = OptsBuilder::from_opts(Opts::from_url(&url).unwrap())
            .db_name(Some(format!("{ns}_nodb")));
        let no_db = MysqlConfig::new(opts).strategy(strategy).build().unwrap();
        match no_db.check_storage().await {
            Err(err @ Error::NotAccessible { .. }) => {
                assert!(err.is_retryable());
                assert!(err.to_string().contains("Unknown database"), "{err}");
            }
            other => panic!("{strategy}: expected NotAccessible, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_problems_are_denied_and_never_show_the_password() {
    let Some(url) = url() else { return };
    let opts = Opts::from_url(&url).unwrap();
    let user = format!(
        "ll_noaccess_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let mut admin = raw_conn(&url).await;
    // The user exists but has no privilege on the test database. (Account statements take no
    // placeholders; both names are made here of letters, digits, `_` and `-`.)
    if let Err(e) = admin
        .query_drop(format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"
        ))
        .await
    {
        if leaselock_conformance::is_ci() {
            panic!("cannot create a test user: {e}");
        }
        eprintln!("\n#####  SKIPPED: the test server's user cannot create users: {e}  #####\n");
        return;
    }
    let db = opts.db_name().unwrap_or("leaselock_test");
    let url_with_password = format!(
        "mysql://{user}:{password}@{}:{}/{db}?prefer_socket=false",
        opts.ip_or_hostname(),
        opts.tcp_port()
    );
    for strategy in [Strategy::GetLock, Strategy::Table] {
        let backend = MysqlConfig::from_url(&url_with_password)
            .unwrap()
            .strategy(strategy)
            .build()
            .unwrap();
        assert!(!format!("{backend:?}").contains(&password));
        let err = backend.check_storage().await.unwrap_err();
        assert!(matches!(err, Error::Denied { .. }), "{err:?}");
        assert!(!err.is_retryable());
        let mut chain = format!("{err} {err:?}");
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            chain.push_str(&format!(" {s} {s:?}"));
            source = s.source();
        }
        assert!(!chain.contains(&password), "{chain}");
        let acquire = backend
            .try_acquire(&request(&key("denied"), &owner("a")))
            .await
            .unwrap_err();
        assert!(!format!("{acquire} {acquire:?}").contains(&password));
        assert!(!acquire.is_retryable(), "{acquire:?}");

        // A wrong password is refused at once, and the message names neither password.
        let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
        let backend = MysqlConfig::from_url(&url_with_password.replace(&password, &wrong))
            .unwrap()
            .strategy(strategy)
            .build()
            .unwrap();
        let err = backend.check_storage().await.unwrap_err();
        assert!(matches!(err, Error::Denied { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("using password: YES"), "{err}");
        let shown = format!("{err} {err:?}");
        assert!(
            !shown.contains(&wrong) && !shown.contains(&password),
            "{shown}"
        );
    }
    admin
        .query_drop(format!("DROP USER '{user}'@'%'"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_url_picks_the_strategy() {
    let Some(url) = url() else { return };
    let ns = fresh_namespace();
    let sep = if url.contains('?') { '&' } else { '?' };
    let table = leaselock_mysql::from_url(&format!("{url}{sep}strategy=table&table={ns}"))
        .await
        .unwrap();
    assert_eq!(table.capabilities().backend, "mysql-table");
    table.init_storage().await.unwrap();
    table.check_storage().await.unwrap();
    let mariadb = url.replacen("mysql://", "mariadb://", 1);
    let get_lock = leaselock_mysql::from_url(&format!("{mariadb}{sep}prefix={ns}&table={ns}_g"))
        .await
        .unwrap();
    assert_eq!(get_lock.capabilities().backend, "mysql-get-lock");
    get_lock.init_storage().await.unwrap();
    let k = key("url");
    let lease = acquire(&*get_lock, &k, "a").await;
    // The prefix from the URL is the one on the server.
    let mut admin = raw_conn(&url).await;
    let name = leaselock_mysql::lock_name(&ns, k.as_str());
    assert!(holder_of(&mut admin, &name).await.is_some());
    assert!(get_lock.release(&lease).await.unwrap());
    drop_table(&url, &ns).await;
    drop_table(&url, &format!("{ns}_g")).await;
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_required_when_asked() {
    let Some(url) = url() else { return };
    let ns = fresh_namespace();
    let sep = if url.contains('?') { '&' } else { '?' };
    let backend = leaselock_mysql::from_url(&format!(
        "{url}{sep}require_ssl=true&prefer_socket=false&table={ns}"
    ))
    .await
    .unwrap();
    let mut admin = raw_conn(&url).await;
    let have_ssl: Option<(String, String)> = admin
        .query_first("SHOW VARIABLES LIKE 'have_ssl'")
        .await
        .unwrap();
    let server_has_tls = have_ssl.is_some_and(|(_, v)| v == "YES");
    // Either the server speaks TLS (then everything works over it) or the connection is
    // refused: never a silent fallback to plain text.
    match backend.init_storage().await {
        Ok(()) => {
            assert!(
                server_has_tls,
                "connected without TLS although it was required"
            );
            let k = key("tls");
            let lease = acquire(&*backend, &k, "a").await;
            assert!(backend.release(&lease).await.unwrap());
            drop_table(&url, &ns).await;
        }
        Err(err) => assert!(!server_has_tls, "TLS failed against a TLS server: {err}"),
    }
}

/// The durable token reservation of `k` in the GET_LOCK backend's counter table `ns`.
async fn reservation(conn: &mut Conn, ns: &str, k: &LockKey) -> Option<u64> {
    conn.exec_first(
        format!("SELECT token FROM `{ns}` WHERE lock_key = ?"),
        (k.as_str(),),
    )
    .await
    .unwrap()
}

/// The storage engine of `table` in the current database.
async fn engine_of(conn: &mut Conn, table: &str) -> Option<String> {
    conn.exec_first(
        "SELECT engine FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND table_name = ?",
        (table,),
    )
    .await
    .unwrap()
}

/// Creates `table` by hand with the columns of a holder table (also those of an earlier
/// version's counter table) and `engine`.
async fn create_holder_layout(conn: &mut Conn, table: &str, engine: &str) {
    conn.query_drop(format!(
        "CREATE TABLE `{table}` (lock_key VARBINARY(255) NOT NULL, \
           lock_name VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL, \
           token BIGINT UNSIGNED NOT NULL, owner VARBINARY(255) NULL, \
           connection_id BIGINT UNSIGNED NULL, acquired_at DATETIME(6) NULL, \
           PRIMARY KEY (lock_key)) ENGINE={engine}"
    ))
    .await
    .unwrap();
}

/// The tokens of `n` acquisitions of `k`, each released at once.
async fn cycle_tokens(backend: &dyn LockBackend, k: &LockKey, n: usize) -> Vec<u64> {
    let mut tokens = Vec::new();
    for _ in 0..n {
        let lease = acquire(backend, k, "a").await;
        tokens.push(lease.token.get());
        assert!(backend.release(&lease).await.unwrap());
    }
    tokens
}

/// Tokens come from the in-memory holder table, under a durable reservation in the counter table
/// that only a token passing it raises (1,000 ahead, once per 1,000 acquisitions of a key). A
/// server restart empties the holder table (what `DELETE` does here): the next token is above
/// every one handed out before, because none passed the reservation.
#[tokio::test]
async fn get_lock_tokens_grow_across_a_restart_that_empties_the_holder_table() {
    let Some(url) = url() else { return };
    let (backend, ns) = get_lock_backend(&url).await;
    let mut conn = raw_conn(&url).await;
    let engine = engine_of(&mut conn, backend.holder_table()).await;
    assert_eq!(engine.as_deref(), Some("MEMORY"));
    let k = key("restart");
    assert_eq!(cycle_tokens(&backend, &k, 3).await, [1, 2, 3]);
    // Only the first acquisition reserved: 1 + 999.
    assert_eq!(reservation(&mut conn, &ns, &k).await, Some(1000));

    // A reservation a token reaches is raised by that acquisition, 999 past it.
    conn.exec_drop(
        format!("UPDATE `{ns}` SET token = 4 WHERE lock_key = ?"),
        (k.as_str(),),
    )
    .await
    .unwrap();
    let lease = acquire(&backend, &k, "a").await;
    assert_eq!(lease.token.get(), 4);
    assert_eq!(reservation(&mut conn, &ns, &k).await, Some(4));
    assert!(backend.release(&lease).await.unwrap());
    let lease = acquire(&backend, &k, "a").await;
    assert_eq!(lease.token.get(), 5);
    assert_eq!(reservation(&mut conn, &ns, &k).await, Some(5 + 999));
    assert!(backend.release(&lease).await.unwrap());

    // The restart: the holder table is empty again, the reservation durable. The key was used
    // before, so the acquisition waits out the takeover grace (a holder from before the restart
    // may still be running), then holds a token above every earlier one.
    conn.query_drop(format!("DELETE FROM `{}`", backend.holder_table()))
        .await
        .unwrap();
    let lease = acquire(&backend, &k, "a").await;
    assert_eq!(
        lease.token.get(),
        1005,
        "above the reservation, so above every earlier token"
    );
    assert_eq!(reservation(&mut conn, &ns, &k).await, Some(1005 + 999));
    match backend.status(&k).await.unwrap() {
        LockState::Held(info) => assert_eq!(info.token, lease.token),
        other => panic!("expected held, got {other:?}"),
    }
    assert!(backend.release(&lease).await.unwrap());
    drop_table(&url, &ns).await;
}

/// A counter table made by an earlier version (holder columns in the counter table, its token the
/// last one handed out) keeps working: its tokens are a reservation, so the next token is above.
#[tokio::test]
async fn get_lock_keeps_an_earlier_versions_counter_table() {
    let Some(url) = url() else { return };
    let ns = fresh_namespace();
    let k = key("upgrade");
    let mut conn = raw_conn(&url).await;
    create_holder_layout(&mut conn, &ns, "InnoDB").await;
    conn.exec_drop(
        format!("INSERT INTO `{ns}` (lock_key, lock_name, token) VALUES (?, 'old', 41)"),
        (k.as_str(),),
    )
    .await
    .unwrap();
    let config = MysqlConfig::from_url(&url).unwrap().table(&ns).prefix(&ns);
    let backend = MysqlGetLockBackend::new(config).unwrap();
    backend.init_storage().await.unwrap();
    backend.check_storage().await.unwrap();
    let lease = acquire(&backend, &k, "a").await;
    assert_eq!(lease.token.get(), 42);
    assert!(backend.release(&lease).await.unwrap());
    drop_table(&url, &ns).await;
}

/// A full holder table (its size limit is the server's `max_heap_table_size` after a restart)
/// drops the rows of released keys and goes on: nothing fails, tokens still grow.
#[tokio::test]
async fn get_lock_full_holder_table_drops_released_rows() {
    let Some(url) = url() else { return };
    let ns = fresh_namespace();
    let config = MysqlConfig::from_url(&url).unwrap().table(&ns).prefix(&ns);
    let backend = MysqlGetLockBackend::new(config).unwrap();
    // The holder table, made small by hand before init_storage (which keeps what exists).
    let mut conn = raw_conn(&url).await;
    conn.query_drop("SET SESSION max_heap_table_size = 16384")
        .await
        .unwrap();
    create_holder_layout(&mut conn, backend.holder_table(), "MEMORY").await;
    backend.init_storage().await.unwrap();
    let keys: Vec<LockKey> = (0..200).map(|i| key(&format!("full-{i}"))).collect();
    for k in &keys {
        let lease = acquire(&backend, k, "a").await;
        assert_eq!(lease.token.get(), 1);
        assert!(backend.release(&lease).await.unwrap());
    }
    let rows: Option<u64> = conn
        .query_first(format!("SELECT COUNT(*) FROM `{}`", backend.holder_table()))
        .await
        .unwrap();
    assert!(
        rows.unwrap() < 200,
        "the table should have filled and been emptied of released rows, holds {rows:?}"
    );
    // A key whose row was dropped continues above its reservation.
    let lease = acquire(&backend, &keys[0], "a").await;
    assert!(lease.token.get() > 1, "token {} after 1", lease.token);
    assert!(backend.release(&lease).await.unwrap());
    drop_table(&url, &ns).await;
}

/// The holder table's name is the counter table's with `_holders`: a counter table name that
/// leaves no room for it is refused when the backend is built, naming the field.
#[tokio::test]
async fn get_lock_refuses_a_counter_table_name_too_long_for_its_holder_table() {
    let config = MysqlConfig::from_url("mysql://127.0.0.1/app")
        .unwrap()
        .table("c".repeat(56));
    let e = MysqlGetLockBackend::new(config).unwrap_err();
    assert!(
        matches!(e, Error::InvalidInput { field: "table", .. }),
        "{e}"
    );
    let config = MysqlConfig::from_url("mysql://127.0.0.1/app")
        .unwrap()
        .table("c".repeat(55));
    assert!(MysqlGetLockBackend::new(config).is_ok());
}

/// A server that refuses the MEMORY engine (MySQL group replication lists it in
/// `disabled_storage_engines`) takes a holder table created by hand as InnoDB: init_storage keeps
/// it, and locking works the same, at the price of a log flush per lock.
#[tokio::test]
async fn get_lock_works_with_an_innodb_holder_table_made_by_hand() {
    let Some(url) = url() else { return };
    let ns = fresh_namespace();
    let config = MysqlConfig::from_url(&url).unwrap().table(&ns).prefix(&ns);
    let backend = MysqlGetLockBackend::new(config).unwrap();
    let mut conn = raw_conn(&url).await;
    create_holder_layout(&mut conn, backend.holder_table(), "InnoDB").await;
    backend.init_storage().await.unwrap();
    backend.check_storage().await.unwrap();
    let engine = engine_of(&mut conn, backend.holder_table()).await;
    assert_eq!(engine.as_deref(), Some("InnoDB"));
    let k = key("innodb-holders");
    assert_eq!(cycle_tokens(&backend, &k, 3).await, [1, 2, 3]);
    assert_eq!(reservation(&mut conn, &ns, &k).await, Some(1000));
    drop_table(&url, &ns).await;
}

/// The table backend keeps the connection of one lease operation for the next (under a
/// second). One ended on the server meanwhile (killed here; a restart does the same) is
/// replaced by a connection from the pool, as the pool's own check would: no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_connection_ended_between_operations_is_replaced_from_the_pool() {
    let Some(url) = url() else { return };
    let (mut admin, db, opts) = scratch_database(&url).await;
    let backend = MysqlTableBackend::new(MysqlConfig::new(opts).table("locks")).unwrap();
    backend.init_storage().await.unwrap();
    let k = key("hot");
    for round in 0..3 {
        let lease = acquire(&backend, &k, "a").await;
        kill_connections_of(&mut admin, &db).await;
        assert!(backend.verify(&lease).await.unwrap(), "round {round}");
        kill_connections_of(&mut admin, &db).await;
        let lease = backend.refresh(&lease).await.unwrap();
        kill_connections_of(&mut admin, &db).await;
        assert!(backend.release(&lease).await.unwrap(), "round {round}");
        kill_connections_of(&mut admin, &db).await;
    }
    drop_scratch_database(&mut admin, &db).await;
}

/// The GET_LOCK backend keeps the connection of a clean release for the next acquisition (under
/// a second); one ended on the server meanwhile is replaced from the pool: no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_get_lock_connection_ended_before_the_next_acquisition_is_replaced() {
    let Some(url) = url() else { return };
    let (mut admin, db, backend) = scratch_get_lock_backend(&url).await;
    let k = key("hot");
    let mut tokens = Vec::new();
    for round in 0..3 {
        let lease = acquire(&backend, &k, "a").await;
        tokens.push(lease.token.get());
        assert!(backend.release(&lease).await.unwrap(), "round {round}");
        kill_connections_of(&mut admin, &db).await;
    }
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    drop_scratch_database(&mut admin, &db).await;
}

/// A refused GET_LOCK acquisition keeps its connection for the next attempt too (it holds
/// nothing); one ended on the server meanwhile is replaced from the pool: no attempt fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_get_lock_connection_ended_before_the_next_attempt_is_replaced() {
    let Some(url) = url() else { return };
    let (mut admin, db, backend) = scratch_get_lock_backend(&url).await;
    let k = key("hot-refused");
    // Held from outside, on a connection to another database, which the kills below spare.
    let mut outside = raw_conn(&url).await;
    let name = leaselock_mysql::lock_name(&db, k.as_str());
    let got: Option<i64> = outside
        .exec_first("SELECT GET_LOCK(?, 0)", (name.as_str(),))
        .await
        .unwrap();
    assert_eq!(got, Some(1));
    let waiter = owner("waiter");
    for round in 0..3 {
        let outcome = backend.try_acquire(&request(&k, &waiter)).await.unwrap();
        assert!(
            matches!(outcome, AcquireOutcome::Held(_)),
            "round {round}: {outcome:?}"
        );
        kill_connections_of(&mut admin, &db).await;
    }
    let released: Option<i64> = outside
        .exec_first("SELECT RELEASE_LOCK(?)", (name.as_str(),))
        .await
        .unwrap();
    assert_eq!(released, Some(1));
    let lease = acquire(&backend, &k, "waiter").await;
    assert!(backend.release(&lease).await.unwrap());
    drop_scratch_database(&mut admin, &db).await;
}

/// A database of its own (so that its connections can be told from other tests'): an admin
/// connection, its name, and options that connect to it.
async fn scratch_database(url: &str) -> (Conn, String, OptsBuilder) {
    let db = format!("leaselock_hot_{}", uuid::Uuid::new_v4().simple());
    let mut admin = raw_conn(url).await;
    admin
        .query_drop(format!("CREATE DATABASE `{db}`"))
        .await
        .unwrap();
    let opts = OptsBuilder::from_opts(Opts::from_url(url).unwrap()).db_name(Some(db.clone()));
    (admin, db, opts)
}

/// A GET_LOCK backend, initialized, whose connections use a scratch database of their own (see
/// [`scratch_database`]), with its prefix named after it.
async fn scratch_get_lock_backend(url: &str) -> (Conn, String, MysqlGetLockBackend) {
    let (admin, db, opts) = scratch_database(url).await;
    let config = MysqlConfig::new(opts).table("locks").prefix(&db);
    let backend = MysqlGetLockBackend::new(config).unwrap();
    backend.init_storage().await.unwrap();
    (admin, db, backend)
}

/// Drops a database made by [`scratch_database`].
async fn drop_scratch_database(admin: &mut Conn, db: &str) {
    admin
        .query_drop(format!("DROP DATABASE `{db}`"))
        .await
        .unwrap();
}

/// Ends every connection using database `db`.
async fn kill_connections_of(admin: &mut Conn, db: &str) {
    let ids: Vec<u64> = admin
        .exec(
            "SELECT id FROM information_schema.processlist WHERE db = ?",
            (db,),
        )
        .await
        .unwrap();
    assert!(!ids.is_empty(), "the backend's connections");
    for id in ids {
        let _ = admin.query_drop(format!("KILL CONNECTION {id}")).await;
    }
}
