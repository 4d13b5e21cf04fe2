//! PostgreSQL-specific behaviour beyond the shared suite: a server-side kill fires the lost
//! signal, concurrent storage init, pooler detection against a real PgBouncer, wake-ups through
//! LISTEN/NOTIFY, foreign holders, error classification, secrets kept out of messages.
//!
//! Needs `LEASELOCK_POSTGRES_URL`, and for the pooler test `LEASELOCK_PGBOUNCER_URL` (a PgBouncer
//! in `pool_mode = transaction` in front of the same server); `cargo xtask test` sets both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use leaselock::{
    AcquireOutcome, AcquireRequest, Error, Lease, LockBackend, LockKey, LockState, Locker, OwnerId,
    WaitPolicy,
};
use leaselock_postgres::{advisory_key, PgAdvisoryBackend, PgConfig, PgTableBackend};
use tokio_postgres::{Client, NoTls};

fn pg_url() -> Option<String> {
    leaselock_conformance::server_url("LEASELOCK_POSTGRES_URL")
}

fn fresh(name: &str) -> String {
    format!(
        "ll_{name}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn key(name: &str) -> LockKey {
    LockKey::new(format!("pg-test/{name}/{}", uuid::Uuid::new_v4())).unwrap()
}

fn owner(name: &str) -> OwnerId {
    OwnerId::new(format!("{name}-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

fn request(key: &LockKey, owner: &OwnerId) -> AcquireRequest {
    AcquireRequest::new(key.clone(), owner.clone(), Duration::from_secs(60)).unwrap()
}

async fn raw(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

async fn acquire(backend: &dyn LockBackend, req: &AcquireRequest) -> Lease {
    match backend.try_acquire(req).await.expect("try_acquire") {
        AcquireOutcome::Acquired(lease) => lease,
        AcquireOutcome::Held(h) => panic!("`{}` should be free, held by {h:?}", req.key()),
    }
}

/// The server processes holding the advisory lock of `lock_id`, seen from a separate connection.
async fn holders(client: &Client, lock_id: i64) -> Vec<i32> {
    client
        .query(
            "SELECT l.pid FROM pg_locks l \
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                AND l.classid = (($1::int8 >> 32) & 4294967295)::oid \
                AND l.objid = ($1::int8 & 4294967295)::oid",
            &[&lock_id],
        )
        .await
        .expect("read pg_locks")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn advisory(url: &str, ns: &str) -> PgAdvisoryBackend {
    let config = PgConfig::from_url(url)
        .unwrap()
        .table(ns)
        .unwrap()
        .prefix(ns)
        .unwrap();
    let backend = PgAdvisoryBackend::new(config).unwrap();
    backend.init_storage().await.expect("init");
    backend
}

/// A lease table named after `ns` (not `ns` itself, which [`advisory`] uses for its counters).
async fn table(url: &str, ns: &str) -> PgTableBackend {
    let name = format!("{ns}_leases");
    let backend =
        PgTableBackend::new(PgConfig::from_url(url).unwrap().table(&name).unwrap()).unwrap();
    backend.init_storage().await.expect("init");
    backend
}

/// The documented key derivation, the SQL recipe in its docs, and what `pg_locks` shows agree.
#[tokio::test]
async fn advisory_key_is_what_the_server_sees() {
    let Some(url) = pg_url() else { return };
    let ns = fresh("key");
    let backend = advisory(&url, &ns).await;
    let k = key("documented");
    let sql_id: i64 = raw(&url)
        .await
        .query_one(
            "SELECT ('x' || substr(encode(sha256(convert_to($1, 'UTF8') || '\\x00'::bytea \
                     || convert_to($2, 'UTF8')), 'hex'), 1, 16))::bit(64)::bigint",
            &[&ns, &k.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sql_id, advisory_key(&ns, k.as_str()));
    assert_eq!(backend.lock_id(&k), sql_id);
    let lease = acquire(&backend, &request(&k, &owner("a"))).await;
    let observer = raw(&url).await;
    assert_eq!(
        holders(&observer, sql_id).await,
        vec![backend.session_pid(&lease).unwrap()]
    );
    assert!(backend.release(&lease).await.unwrap());
    assert!(holders(&observer, sql_id).await.is_empty());
}

/// `pg_terminate_backend` on the holder's session: the guard's lost signal fires promptly (the
/// driver sees the connection end; no refresh is involved), and the lock is free.
#[tokio::test]
async fn server_side_kill_fires_lost_signal_at_once() {
    let Some(url) = pg_url() else { return };
    let ns = fresh("kill");
    let backend = Arc::new(advisory(&url, &ns).await);
    let locker = Locker::builder(Arc::clone(&backend))
        .refresh(false)
        .build()
        .unwrap();
    let k = key("kill");
    let guard = locker.acquire(k.as_str()).await.unwrap().unwrap();
    let lease = guard.lease().expect("held");
    let pid = backend.session_pid(&lease).expect("a session pid");
    let observer = raw(&url).await;
    assert_eq!(holders(&observer, backend.lock_id(&k)).await, vec![pid]);

    let killed_at = Instant::now();
    let terminated: bool = observer
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost().wait())
        .await
        .expect("the lost signal fires after the session is killed");
    let elapsed = killed_at.elapsed();
    eprintln!("lost signal {elapsed:?} after pg_terminate_backend: {reason}");
    assert!(reason.contains("session"), "{reason}");
    assert!(guard.is_lost());

    match backend.refresh(&lease).await {
        Err(Error::Lost { .. }) => {}
        other => panic!("refresh after the kill must be Lost: {other:?}"),
    }
    assert!(!backend.verify(&lease).await.unwrap());
    assert_eq!(backend.status(&k).await.unwrap(), LockState::Free);
    let next = acquire(&*backend, &request(&k, &owner("b"))).await;
    assert!(next.token > lease.token);
    assert!(backend.release(&next).await.unwrap());
}

/// 16 separate instances of each backend create the same fresh storage (in a fresh schema) at
/// once: none fails, and the result works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_init_from_16_tasks() {
    let Some(url) = pg_url() else { return };
    let schema = fresh("schema");
    let name = fresh("init");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let config = PgConfig::from_url(&url)
            .unwrap()
            .schema(&schema)
            .unwrap()
            .table(&name)
            .unwrap();
        let backend: Arc<dyn LockBackend> = if i % 2 == 0 {
            Arc::new(PgTableBackend::new(config).unwrap())
        } else {
            // A different table in the same fresh schema: the schema itself is raced too.
            let config = config.table(&format!("{name}_adv")).unwrap();
            Arc::new(PgAdvisoryBackend::new(config).unwrap())
        };
        tasks.push(tokio::spawn(async move {
            backend.init_storage().await.map(|()| backend)
        }));
    }
    let mut backends = Vec::new();
    for task in tasks {
        backends.push(task.await.unwrap().expect("concurrent init must not fail"));
    }
    for backend in &backends {
        backend.check_storage().await.expect("check after init");
    }
    let k = key("after-init");
    let lease = acquire(&*backends[0], &request(&k, &owner("a"))).await;
    assert!(matches!(
        backends[2]
            .try_acquire(&request(&k, &owner("b")))
            .await
            .unwrap(),
        AcquireOutcome::Held(Some(_))
    ));
    assert!(backends[0].release(&lease).await.unwrap());
    let schema_tables: i64 = raw(&url)
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    // The lease table, and the advisory backend's counter and holder tables.
    assert_eq!(schema_tables, 3);
    drop(backends);
    raw(&url)
        .await
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

/// `?schema=NAME` with the advisory strategy (the default, default table names): the counter and
/// holder tables are made in that schema, the lock's records go there and not to `public`, and
/// the lock works. The way to keep leaselock's tables away from an application's migration tool.
#[tokio::test]
async fn advisory_storage_in_its_own_schema() {
    let Some(url) = pg_url() else { return };
    let schema = fresh("own_schema");
    let prefix = fresh("prefix");
    let sep = if url.contains('?') { '&' } else { '?' };
    let storage_url = format!("{url}{sep}schema={schema}&prefix={prefix}");
    let from_url = || leaselock_postgres::from_url(&storage_url);
    let backend = from_url().await.unwrap();
    assert_eq!(backend.capabilities().backend, "postgres-advisory");
    backend.init_storage().await.unwrap();
    backend.check_storage().await.unwrap();
    let k = key("own-schema");
    let lease = acquire(&*backend, &request(&k, &owner("a"))).await;
    let other = from_url().await.unwrap();
    assert!(matches!(
        other.try_acquire(&request(&k, &owner("b"))).await.unwrap(),
        AcquireOutcome::Held(Some(_))
    ));
    assert_eq!(backend.list().await.unwrap().len(), 1);

    let admin = raw(&url).await;
    let mut tables: Vec<String> = admin
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    tables.sort();
    assert_eq!(tables, ["leaselock_advisory", "leaselock_advisory_holders"]);
    // The records of this prefix are in the schema's tables, none in public's (which other
    // tests may have made).
    let in_schema: i64 = admin
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{schema}\".leaselock_advisory_holders WHERE prefix = $1"
            ),
            &[&prefix],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_schema, 1);
    let public_exists: bool = admin
        .query_one(
            "SELECT to_regclass('public.leaselock_advisory_holders') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let in_public: i64 = if public_exists {
        admin
            .query_one(
                "SELECT count(*) FROM public.leaselock_advisory_holders WHERE prefix = $1",
                &[&prefix],
            )
            .await
            .unwrap()
            .get(0)
    } else {
        0
    };
    assert_eq!(in_public, 0);

    assert!(backend.release(&lease).await.unwrap());
    let next = acquire(&*other, &request(&k, &owner("b"))).await;
    assert!(next.token > lease.token);
    assert!(other.release(&next).await.unwrap());
    drop((backend, other));
    admin
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

/// Through PgBouncer in transaction mode, advisory locks are refused with an error naming the
/// cause, before anything is locked; with the up-front probe off, the pid checks on verify and
/// refresh catch it. The table backend works through the pooler.
#[tokio::test]
async fn pooler_is_detected_through_a_real_pgbouncer() {
    let Some(url) = pg_url() else { return };
    let Some(bouncer) = leaselock_conformance::server_url("LEASELOCK_PGBOUNCER_URL") else {
        return;
    };
    let ns = fresh("pooler");
    let observer = raw(&url).await;

    // 1. Default configuration: refused at acquire, nothing locked.
    let config = PgConfig::from_url(&bouncer)
        .unwrap()
        .table(&ns)
        .unwrap()
        .prefix(&ns)
        .unwrap();
    let backend = PgAdvisoryBackend::new(config.clone()).unwrap();
    backend
        .init_storage()
        .await
        .expect("init works through the pooler");
    let k = key("pooled");
    let err = backend
        .try_acquire(&request(&k, &owner("a")))
        .await
        .expect_err("advisory locks through a transaction pooler must be refused");
    let message = err.to_string();
    assert!(message.contains("PgBouncer"), "{message}");
    assert!(message.contains("transaction"), "{message}");
    assert!(!err.is_retryable(), "{err:?}");
    assert!(
        holders(&observer, backend.lock_id(&k)).await.is_empty(),
        "refused before anything was locked"
    );

    // 2. Without the probe the lock may be taken, but as soon as the session's statements land on
    //    another server process, verify and refresh refuse and say why.
    let unprobed = PgAdvisoryBackend::new(config.probe_pooler(false)).unwrap();
    let k2 = key("pooled-unprobed");
    let lease = acquire(&unprobed, &request(&k2, &owner("a"))).await;
    let locked_on = holders(&observer, unprobed.lock_id(&k2)).await;
    assert_eq!(locked_on.len(), 1, "the lock sits on one server process");
    // Another pooler client pins that (idle, most recently used) server process in a transaction.
    let pinning = raw(&bouncer).await;
    pinning.batch_execute("BEGIN").await.unwrap();
    let pinned: i32 = pinning
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        pinned, locked_on[0],
        "PgBouncer reuses the most recent server"
    );
    let lease2 = lease.clone();
    match unprobed.refresh(&lease2).await {
        Err(Error::Lost { reason, .. }) => assert!(reason.contains("PgBouncer"), "{reason}"),
        other => panic!("refresh must report the lease lost because of the pooler: {other:?}"),
    }
    pinning.batch_execute("COMMIT").await.unwrap();
    // The lease is forgotten; clean up the lock the pooler's server connection still holds.
    assert!(!unprobed.verify(&lease).await.unwrap());
    observer
        .execute("SELECT pg_terminate_backend($1, 5000)", &[&locked_on[0]])
        .await
        .unwrap();

    // 3. Verify refuses the same way.
    let k3 = key("pooled-verify");
    let lease = acquire(&unprobed, &request(&k3, &owner("a"))).await;
    let locked_on = holders(&observer, unprobed.lock_id(&k3)).await;
    let pinning = raw(&bouncer).await;
    pinning.batch_execute("BEGIN").await.unwrap();
    pinning.query_one("SELECT 1", &[]).await.unwrap();
    let err = unprobed
        .verify(&lease)
        .await
        .expect_err("verify must refuse behind the pooler");
    assert!(err.to_string().contains("PgBouncer"), "{err}");
    pinning.batch_execute("COMMIT").await.unwrap();
    for pid in locked_on {
        observer
            .execute("SELECT pg_terminate_backend($1, 5000)", &[&pid])
            .await
            .unwrap();
    }

    // 4. The lease table needs no session state: it works through the pooler, with prepared
    //    statements off (they do not follow a client from one server connection to the next).
    let leases = PgTableBackend::new(
        PgConfig::from_url(&format!(
            "{bouncer}{}statement_cache=false",
            if bouncer.contains('?') { '&' } else { '?' }
        ))
        .unwrap()
        .table(&format!("{ns}_leases"))
        .unwrap(),
    )
    .unwrap();
    leases.init_storage().await.unwrap();
    let k4 = key("pooled-table");
    let lease = acquire(&leases, &request(&k4, &owner("a"))).await;
    assert!(matches!(
        leases
            .try_acquire(&request(&k4, &owner("b")))
            .await
            .unwrap(),
        AcquireOutcome::Held(Some(_))
    ));
    assert!(leases.refresh(&lease).await.is_ok());
    assert!(leases.verify(&lease).await.unwrap());
    assert!(leases.release(&lease).await.unwrap());
}

/// A released lock reaches a waiter through NOTIFY long before its next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn release_wakes_waiter_through_notify() {
    let Some(url) = pg_url() else { return };
    let ns = fresh("notify");
    let backends: Vec<(Arc<dyn LockBackend>, Arc<dyn LockBackend>)> = vec![
        (
            Arc::new(advisory(&url, &ns).await),
            Arc::new(advisory(&url, &ns).await),
        ),
        (
            Arc::new(table(&url, &ns).await),
            Arc::new(table(&url, &ns).await),
        ),
    ];
    for (holder, waiter) in backends {
        assert!(waiter.capabilities().release_notifications);
        let k = key("notify");
        let held = acquire(&*holder, &request(&k, &owner("holder"))).await;
        // Polls only every 30 s: only a notification can make it fast.
        let locker = Locker::builder(waiter)
            .wait(WaitPolicy::until(
                Duration::from_secs(120),
                Duration::from_secs(30),
            ))
            .build()
            .unwrap();
        let k2 = k.clone();
        let task = tokio::spawn(async move { locker.acquire(k2.as_str()).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !task.is_finished(),
            "the waiter waits while the lock is held"
        );
        let released_at = Instant::now();
        assert!(holder.release(&held).await.unwrap());
        let guard = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("woken by NOTIFY, not by the 30 s poll")
            .unwrap()
            .unwrap()
            .expect("acquired");
        eprintln!(
            "{}: waiter acquired {:?} after release",
            holder.capabilities().backend,
            released_at.elapsed()
        );
        assert!(guard.token() > held.token);
        assert!(guard.release().await.unwrap());
    }
}

/// Whether `wakeup` has fired, polled once.
fn fired(wakeup: &mut leaselock::Wakeup) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    wakeup.as_mut().poll(&mut cx).is_ready()
}

/// A release sends `pg_notify` (whose commit is serialized across the database) only when a
/// waiter marked the key: a key nobody waits for is released without a notification.
#[tokio::test]
async fn a_release_notifies_only_when_somebody_waits() {
    let Some(url) = pg_url() else { return };
    let ns = fresh("quiet");
    let trios: Vec<[Arc<dyn LockBackend>; 3]> = vec![
        [
            Arc::new(advisory(&url, &ns).await),
            Arc::new(advisory(&url, &ns).await),
            Arc::new(advisory(&url, &ns).await),
        ],
        [
            Arc::new(table(&url, &ns).await),
            Arc::new(table(&url, &ns).await),
            Arc::new(table(&url, &ns).await),
        ],
    ];
    for [holder, observer, waiter] in trios {
        let name = holder.capabilities().backend;
        let (quiet, waited) = (key("quiet"), key("waited"));
        // The observer listens for both keys and never tries to take them: it marks nothing.
        let mut quiet_wakeup = observer.watch_release(&quiet).await.unwrap().unwrap();
        let mut waited_wakeup = observer.watch_release(&waited).await.unwrap().unwrap();

        let held = acquire(&*holder, &request(&quiet, &owner("holder"))).await;
        assert!(holder.release(&held).await.unwrap());

        let held = acquire(&*holder, &request(&waited, &owner("holder"))).await;
        let _watch = waiter.watch_release(&waited).await.unwrap();
        let refused = waiter
            .try_acquire(&request(&waited, &owner("waiter")))
            .await
            .unwrap();
        assert!(matches!(refused, AcquireOutcome::Held(Some(_))), "{name}");
        assert!(holder.release(&held).await.unwrap());
        tokio::time::timeout(Duration::from_secs(10), &mut waited_wakeup)
            .await
            .unwrap_or_else(|_| panic!("{name}: a release somebody waits for notifies"));
        // Notifications reach the observer's one listening connection in commit order: the
        // first release's would have arrived before the second's.
        assert!(
            !fired(&mut quiet_wakeup),
            "{name}: a release nobody waits for sends no notification"
        );
    }
}

/// Returns once a server process matching `condition` (SQL on `pg_stat_activity`) waits for a
/// lock: an order of events, never a length of time.
async fn until_waiting_for_a_lock(admin: &Client, condition: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND {condition}"
    );
    for _ in 0..3000 {
        let n: i64 = admin.query_one(&sql, &[]).await.unwrap().get(0);
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nothing came to wait for a lock: {condition}");
}

/// A lease table waiter whose statement began before the key's first row was committed cannot
/// mark that row (its snapshot does not show it): it runs once more, and marks it then. Here an
/// uncommitted insert from outside makes the waiter's attempt wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_waiter_marks_a_row_inserted_after_its_snapshot() {
    let Some(url) = pg_url() else { return };
    let ns = fresh("firstrow");
    let waiter = Arc::new(table(&url, &ns).await);
    let k = key("firstrow");
    let leases = format!("\"{ns}_leases\"");
    let admin = raw(&url).await;
    let mut inserter = raw(&url).await;
    let insert = inserter.transaction().await.unwrap();
    insert
        .execute(
            &format!(
                "INSERT INTO {leases} (key, owner, token, acquired_at, expires_at) \
                 VALUES ($1, 'outside', 1, now(), now() + interval '1 hour')"
            ),
            &[&k.as_str()],
        )
        .await
        .unwrap();
    let _watch = waiter.watch_release(&k).await.unwrap();
    let attempt = {
        let (waiter, k) = (Arc::clone(&waiter), k.clone());
        tokio::spawn(async move { waiter.try_acquire(&request(&k, &owner("waiter"))).await })
    };
    until_waiting_for_a_lock(&admin, "query LIKE '%marked AS%'").await;
    insert.commit().await.unwrap();
    match attempt.await.unwrap().unwrap() {
        AcquireOutcome::Held(Some(holder)) => assert_eq!(holder.owner.as_str(), "outside"),
        other => panic!("expected Held by `outside`, got {other:?}"),
    }
    let wanted: bool = admin
        .query_one(
            &format!("SELECT wanted FROM {leases} WHERE key = $1"),
            &[&k.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        wanted,
        "the waiter marked the row, so its release will notify"
    );
}

/// The advisory release clears the holder row before it unlocks, and a waiter's mark comes
/// after its refused attempt: when the release clears the row between the two, the release saw
/// no mark and notifies nobody, so the waiter must find that out and try again at once. Here a
/// row lock held from outside holds the release just before it clears, the waiter's attempt is
/// refused and its mark queues behind the release, and then both go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_waiter_that_marks_a_vacated_row_tries_again() {
    let Some(url) = pg_url() else { return };
    let ns = fresh("vacated");
    let holder = Arc::new(advisory(&url, &ns).await);
    let waiter = Arc::new(advisory(&url, &ns).await);
    let k = key("vacated");
    let held = acquire(&*holder, &request(&k, &owner("holder"))).await;
    let admin = raw(&url).await;
    let holders = format!("\"{ns}_holders\"");
    let holder_pid: i32 = admin
        .query_one(
            &format!("SELECT pid FROM {holders} WHERE prefix = $1 AND key = $2"),
            &[&ns, &k.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    let mut blocker = raw(&url).await;
    let row_lock = blocker.transaction().await.unwrap();
    row_lock
        .execute(
            &format!("SELECT 1 FROM {holders} WHERE prefix = $1 AND key = $2 FOR UPDATE"),
            &[&ns, &k.as_str()],
        )
        .await
        .unwrap();
    let release = {
        let (holder, held) = (Arc::clone(&holder), held.clone());
        tokio::spawn(async move { holder.release(&held).await })
    };
    until_waiting_for_a_lock(&admin, &format!("pid = {holder_pid}")).await;
    let _watch = waiter.watch_release(&k).await.unwrap();
    let attempt = {
        let (waiter, k) = (Arc::clone(&waiter), k.clone());
        tokio::spawn(async move { waiter.try_acquire(&request(&k, &owner("waiter"))).await })
    };
    until_waiting_for_a_lock(&admin, "query LIKE '%marked AS MATERIALIZED%'").await;
    row_lock.commit().await.unwrap();

    assert!(release.await.unwrap().unwrap(), "the holder released");
    match attempt.await.unwrap().unwrap() {
        AcquireOutcome::Acquired(lease) => {
            assert!(lease.token > held.token);
            assert!(waiter.release(&lease).await.unwrap());
        }
        AcquireOutcome::Held(holder) => {
            panic!(
                "the mark found the row vacated, so the waiter tries again; got Held({holder:?})"
            )
        }
    }
}

/// A lease table or holder table made before the `wanted` column gets it from `init_storage`,
/// keeping its rows; before that, the storage check says what to do. A table of the same name
/// that is not leaselock's is left alone.
#[tokio::test]
async fn init_storage_adds_the_wanted_column_to_an_earlier_versions_tables() {
    let Some(url) = pg_url() else { return };
    let ns = fresh("wanted");
    let client = raw(&url).await;
    let k = key("upgrade");
    client
        .batch_execute(&format!(
            "CREATE TABLE \"{ns}_leases\" (key text PRIMARY KEY, owner text, \
               token bigint NOT NULL CHECK (token > 0), acquired_at timestamptz, \
               expires_at timestamptz); \
             CREATE TABLE \"{ns}\" (prefix text NOT NULL, key text NOT NULL, \
               lock_id bigint NOT NULL, token bigint NOT NULL CHECK (token > 0), \
               PRIMARY KEY (prefix, key)); \
             CREATE UNLOGGED TABLE \"{ns}_holders\" (prefix text NOT NULL, key text NOT NULL, \
               lock_id bigint NOT NULL, token bigint NOT NULL CHECK (token > 0), owner text, \
               acquired_at timestamptz, pid integer, PRIMARY KEY (prefix, key)); \
             CREATE TABLE \"{ns}_other_leases\" (key text PRIMARY KEY, note text);"
        ))
        .await
        .unwrap();
    client
        .execute(
            &format!("INSERT INTO \"{ns}_leases\" VALUES ($1, NULL, 41, NULL, NULL)"),
            &[&k.as_str()],
        )
        .await
        .unwrap();
    let config = |table: String| PgConfig::from_url(&url).unwrap().table(&table).unwrap();
    let leases = PgTableBackend::new(config(format!("{ns}_leases"))).unwrap();
    let sessions = PgAdvisoryBackend::new(config(ns.clone()).prefix(&ns).unwrap()).unwrap();
    let backends: [&dyn LockBackend; 2] = [&leases, &sessions];
    for backend in backends {
        match backend.check_storage().await {
            Err(Error::NotInitialized { what, .. }) => {
                assert!(
                    what.contains("wanted") && what.contains("init_storage"),
                    "{what}"
                )
            }
            other => panic!("expected NotInitialized, got {other:?}"),
        }
        backend.init_storage().await.unwrap();
        backend.check_storage().await.unwrap();
    }
    let lease = acquire(&leases, &request(&k, &owner("a"))).await;
    assert_eq!(lease.token.get(), 42, "the row's token is kept");
    assert!(leases.release(&lease).await.unwrap());
    let lease = acquire(&sessions, &request(&k, &owner("a"))).await;
    assert!(sessions.release(&lease).await.unwrap());

    let other = PgTableBackend::new(config(format!("{ns}_other_leases"))).unwrap();
    assert!(other.init_storage().await.is_err());
    let columns: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.columns \
              WHERE table_name = $1 AND column_name = 'wanted'",
            &[&format!("{ns}_other_leases")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(columns, 0, "a table that is not leaselock's gets no column");
}

/// A session holding the same advisory lock outside leaselock (another tool, a blocking
/// `pg_advisory_lock`) makes acquisition return `Held` at once, never wait, with the holder
/// unknown (a refusal reads only the holder table, which has no row for it); status finds it
/// in `pg_locks` and force release ends it.
#[tokio::test]
async fn foreign_holder_is_reported_not_waited_for() {
    let Some(url) = pg_url() else { return };
    let ns = fresh("foreign");
    let backend = advisory(&url, &ns).await;
    let k = key("foreign");
    let foreign = raw(&url).await;
    let foreign_pid: i32 = foreign
        .query_one(
            "SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock($1)) AS taken",
            &[&backend.lock_id(&k)],
        )
        .await
        .unwrap()
        .get(0);
    let started = Instant::now();
    match backend
        .try_acquire(&request(&k, &owner("a")))
        .await
        .unwrap()
    {
        AcquireOutcome::Held(holder) => assert!(holder.is_none(), "{holder:?}"),
        other => panic!("expected Held, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "try-lock never waits"
    );
    match backend.status(&k).await.unwrap() {
        LockState::Held(info) => {
            assert!(
                info.owner.as_str().contains(&foreign_pid.to_string()),
                "{info:?}"
            )
        }
        other => panic!("expected Held, got {other:?}"),
    }
    let removed = backend.force_release(&k).await.unwrap().expect("removed");
    assert!(removed.owner.as_str().contains("unknown"), "{removed:?}");
    assert!(foreign.is_closed() || foreign.simple_query("SELECT 1").await.is_err());
    let lease = acquire(&backend, &request(&k, &owner("a"))).await;
    assert!(backend.release(&lease).await.unwrap());
}

/// A missing table is `NotInitialized`; an unreachable server and a database that does not exist
/// (yet) are `NotAccessible` (retryable); a role without privileges is `Denied` (permanent); none
/// of the messages shows the password.
#[tokio::test]
async fn check_storage_tells_missing_from_inaccessible() {
    let Some(url) = pg_url() else { return };
    let ns = fresh("check");
    for backend in [
        leaselock_postgres::from_url(&format!("{url}?strategy=table&table={ns}"))
            .await
            .unwrap(),
        leaselock_postgres::from_url(&format!("{url}?table={ns}_adv&prefix={ns}"))
            .await
            .unwrap(),
    ] {
        match backend.check_storage().await {
            Err(Error::NotInitialized { what, .. }) => assert!(what.contains(&ns), "{what}"),
            other => panic!("expected NotInitialized, got {other:?}"),
        }
        backend.init_storage().await.unwrap();
        backend.check_storage().await.unwrap();
    }

    let unreachable = leaselock_postgres::from_url(
        "postgres://someone:TopSecret123@127.0.0.1:1/db?connect_timeout=2",
    )
    .await
    .unwrap();
    let err = unreachable.check_storage().await.unwrap_err();
    assert!(matches!(err, Error::NotAccessible { .. }), "{err:?}");
    assert!(err.is_retryable());
    let shown = format!("{err} {err:?} {unreachable:?}");
    assert!(!shown.contains("TopSecret123"), "{shown}");
    assert!(shown.contains("127.0.0.1:1"), "{shown}");

    // A database that does not exist yet may be created meanwhile: retryable.
    let mut missing_db: tokio_postgres::Config = url.parse().expect("a valid URL");
    missing_db.dbname(format!("{ns}_nodb"));
    let err = PgTableBackend::new(PgConfig::new(missing_db))
        .unwrap()
        .check_storage()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotAccessible { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("3D000"), "{err}");

    // A role that may log in but not use the table.
    let admin = raw(&url).await;
    admin
        .batch_execute(
            "DO $$ BEGIN \
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'leaselock_noperm') THEN \
                 CREATE ROLE leaselock_noperm LOGIN; \
               END IF; \
             END $$",
        )
        .await
        .or_else(|e| {
            // Two test runs racing to create the role.
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                Ok(())
            } else {
                Err(e)
            }
        })
        .unwrap();
    let mut restricted: tokio_postgres::Config = url.parse().expect("a valid URL");
    restricted.user("leaselock_noperm");
    let backend = PgTableBackend::new(PgConfig::new(restricted).table(&ns).unwrap()).unwrap();
    match backend.check_storage().await {
        Err(err @ Error::Denied { .. }) => {
            assert!(!err.is_retryable());
            assert!(err.to_string().contains("permission"), "{err}")
        }
        other => panic!("expected Denied, got {other:?}"),
    }
    admin
        .batch_execute(&format!("GRANT SELECT ON \"{ns}\" TO leaselock_noperm"))
        .await
        .unwrap();
    match backend.check_storage().await {
        Err(Error::Denied { what, .. }) => {
            assert!(what.contains("INSERT, UPDATE"), "{what}")
        }
        other => panic!("expected Denied naming the privileges, got {other:?}"),
    }
    admin
        .batch_execute(&format!("DROP TABLE \"{ns}\""))
        .await
        .unwrap();
}

/// Identifiers keep their case and may need quoting; nothing is spliced unquoted.
#[tokio::test]
async fn schema_and_mixed_case_table() {
    let Some(url) = pg_url() else { return };
    let schema = fresh("Schema");
    let name = format!("Locks_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let backend = PgTableBackend::new(
        PgConfig::from_url(&url)
            .unwrap()
            .schema(&schema)
            .unwrap()
            .table(&name)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(backend.table(), format!("\"{schema}\".\"{name}\""));
    backend.init_storage().await.unwrap();
    let k = key("mixed");
    let lease = acquire(&backend, &request(&k, &owner("a"))).await;
    assert_eq!(backend.list().await.unwrap().len(), 1);
    assert!(backend.release(&lease).await.unwrap());
    let exists: bool = raw(&url)
        .await
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2)",
            &[&schema, &name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(exists);
    drop(backend);
    raw(&url)
        .await
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

/// With the `tls` feature, `sslmode=require` really negotiates TLS and verifies the server's
/// certificate against `sslrootcert`. Uses the Debian server's self-signed "snakeoil"
/// certificate (issued for `localhost`); skipped loudly where it is absent.
#[cfg(feature = "tls")]
#[tokio::test]
async fn tls_connection_verifies_the_server() {
    let Some(url) = pg_url() else { return };
    let snakeoil = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    if !std::path::Path::new(snakeoil).exists() {
        eprintln!("#####  SKIPPED: no {snakeoil} to trust for a TLS test  #####");
        return;
    }
    let config: tokio_postgres::Config = url.parse().unwrap();
    let db = config.get_dbname().unwrap_or("postgres").to_owned();
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let tls_url = format!(
        "postgres://{user}@localhost:{port}/{db}?sslmode=require&sslrootcert={snakeoil}&strategy=table&table={}",
        fresh("tls")
    );
    let backend = leaselock_postgres::from_url(&tls_url).await.unwrap();
    backend.init_storage().await.expect("init over TLS");
    let k = key("tls");
    let lease = acquire(&*backend, &request(&k, &owner("a"))).await;
    assert!(backend.release(&lease).await.unwrap());

    // The certificate names `localhost`: reaching the same server as 127.0.0.1 must fail the
    // handshake, so TLS is verified, not just used.
    let mismatched = format!(
        "postgres://{user}@127.0.0.1:{port}/{db}?sslmode=require&sslrootcert={snakeoil}&strategy=table&table=x"
    );
    let err = leaselock_postgres::from_url(&mismatched)
        .await
        .unwrap()
        .check_storage()
        .await
        .unwrap_err();
    let shown = format!("{err:?}");
    eprintln!("TLS refusal: {err}");
    assert!(
        shown.contains("NotValidForName") || shown.contains("certificate"),
        "{shown}"
    );
    // A certificate the client rejects does not heal by waiting.
    assert!(!err.is_retryable(), "{err:?}");
}

/// The durable token reservation of `k` in the advisory backend's counter table, read by hand.
async fn reservation(client: &Client, backend: &PgAdvisoryBackend, k: &LockKey) -> Option<i64> {
    client
        .query_opt(
            &format!(
                "SELECT token FROM {} WHERE prefix = $1 AND key = $2",
                backend.counter_table()
            ),
            &[&backend.prefix(), &k.as_str()],
        )
        .await
        .expect("read the counter table")
        .map(|r| r.get(0))
}

/// Tokens come from the unlogged holder table, under a durable reservation in the counter table
/// that only a token passing it raises (1,000 ahead, once per 1,000 acquisitions of a key). A
/// crash empties the holder table (what `TRUNCATE` does here): the next token is above every one
/// handed out before, because none passed the reservation.
#[tokio::test]
async fn advisory_tokens_grow_across_a_crash_that_empties_the_holder_table() {
    let Some(url) = pg_url() else { return };
    let ns = fresh("crash");
    let backend = advisory(&url, &ns).await;
    let client = raw(&url).await;
    let persistence: String = client
        .query_one(
            "SELECT relpersistence::text FROM pg_class WHERE oid = $1::text::regclass",
            &[&backend.holder_table()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(persistence, "u", "the holder table must be unlogged");
    let k = key("crash");
    let a = owner("a");
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let lease = acquire(&backend, &request(&k, &a)).await;
        tokens.push(lease.token.get());
        assert!(backend.release(&lease).await.unwrap());
    }
    assert_eq!(tokens, [1, 2, 3]);
    // Only the first acquisition reserved: 1 + 999.
    assert_eq!(reservation(&client, &backend, &k).await, Some(1000));

    // A reservation a token reaches is raised by that acquisition, 999 past it.
    client
        .execute(
            &format!(
                "UPDATE {} SET token = 4 WHERE prefix = $1 AND key = $2",
                backend.counter_table()
            ),
            &[&backend.prefix(), &k.as_str()],
        )
        .await
        .unwrap();
    let lease = acquire(&backend, &request(&k, &a)).await;
    assert_eq!(lease.token.get(), 4);
    assert_eq!(reservation(&client, &backend, &k).await, Some(4));
    assert!(backend.release(&lease).await.unwrap());
    let lease = acquire(&backend, &request(&k, &a)).await;
    assert_eq!(lease.token.get(), 5);
    assert_eq!(reservation(&client, &backend, &k).await, Some(5 + 999));
    assert!(backend.release(&lease).await.unwrap());

    // The crash: the holder table is empty again, the reservation durable.
    client
        .batch_execute(&format!("TRUNCATE {}", backend.holder_table()))
        .await
        .unwrap();
    let lease = acquire(&backend, &request(&k, &a)).await;
    assert_eq!(
        lease.token.get(),
        1005,
        "above the reservation, so above every earlier token"
    );
    assert_eq!(reservation(&client, &backend, &k).await, Some(1005 + 999));
    assert_eq!(
        backend.status(&k).await.unwrap(),
        LockState::Held({
            let mut info = leaselock::LockInfo::new(k.clone(), a.clone(), lease.token);
            info.acquired_at = Some(lease.acquired_at);
            info
        })
    );
    assert!(backend.release(&lease).await.unwrap());
}

/// A counter table made by an earlier version (holder columns in the counter table, its token the
/// last one handed out) keeps working: its tokens are a reservation, so the next token is above.
#[tokio::test]
async fn advisory_keeps_an_earlier_versions_counter_table() {
    let Some(url) = pg_url() else { return };
    let ns = fresh("upgrade");
    let client = raw(&url).await;
    let k = key("upgrade");
    client
        .batch_execute(&format!(
            "CREATE TABLE \"{ns}\" (prefix text NOT NULL, key text NOT NULL, \
               lock_id bigint NOT NULL, token bigint NOT NULL CHECK (token > 0), owner text, \
               acquired_at timestamptz, pid integer, PRIMARY KEY (prefix, key))"
        ))
        .await
        .unwrap();
    client
        .execute(
            &format!("INSERT INTO \"{ns}\" VALUES ($1, $2, 7, 41, NULL, NULL, NULL)"),
            &[&ns, &k.as_str()],
        )
        .await
        .unwrap();
    let backend = advisory(&url, &ns).await;
    let lease = acquire(&backend, &request(&k, &owner("a"))).await;
    assert_eq!(lease.token.get(), 42);
    assert!(backend.release(&lease).await.unwrap());
}

/// The holder table's name is the counter table's with `_holders`: a counter table name that
/// leaves no room for it is refused when the backend is built, naming the field.
#[test]
fn advisory_refuses_a_counter_table_name_too_long_for_its_holder_table() {
    let config = PgConfig::from_url("postgres://app@localhost/app")
        .unwrap()
        .table(&"c".repeat(56))
        .unwrap();
    let e = PgAdvisoryBackend::new(config).unwrap_err();
    assert!(
        matches!(e, Error::InvalidInput { field: "table", .. }),
        "{e}"
    );
    let config = PgConfig::from_url("postgres://app@localhost/app")
        .unwrap()
        .table(&"c".repeat(55))
        .unwrap();
    assert!(PgAdvisoryBackend::new(config).is_ok());
}
