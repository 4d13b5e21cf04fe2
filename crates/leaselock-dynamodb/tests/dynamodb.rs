//! DynamoDB-specific checks beyond the shared suite, against the server at
//! `LEASELOCK_DYNAMODB_URL`: a 32-way race with exactly one winner per round, clock-free
//! takeover of a dead holder's lease (with client clocks shifted by ±30 s), the optional
//! clock-skew fast path, the fencing counter surviving deletion of its item, and the error kinds
//! of `check_storage`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::{AttributeValue, TimeToLiveStatus};
use leaselock::{
    AcquireOutcome, AcquireRequest, Error, Lease, LockBackend, LockKey, LockState, OwnerId,
};
use leaselock_dynamodb::{ClockOffset, DynamoDbBackend, DynamoDbConfig};
use tokio::sync::Barrier;

const OFFSET: Duration = Duration::from_secs(30);

fn url() -> Option<String> {
    leaselock_conformance::server_url("LEASELOCK_DYNAMODB_URL")
}

async fn backend(
    url: &str,
    tweak: impl FnOnce(DynamoDbConfig) -> DynamoDbConfig,
) -> DynamoDbBackend {
    let config = tweak(DynamoDbConfig::from_url(url).expect("a valid URL"));
    let backend = DynamoDbBackend::connect(config).await.expect("connect");
    backend.init_storage().await.expect("init");
    backend
}

fn key(case: &str) -> LockKey {
    LockKey::new(format!("dynamodb/{case}/{}", uuid::Uuid::new_v4().simple())).unwrap()
}

fn owner(name: &str) -> OwnerId {
    OwnerId::new(format!("{name}-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

fn request(key: &LockKey, owner: &OwnerId, ttl: Duration) -> AcquireRequest {
    AcquireRequest::new(key.clone(), owner.clone(), ttl).unwrap()
}

async fn acquire(backend: &DynamoDbBackend, req: &AcquireRequest) -> Lease {
    match backend.try_acquire(req).await.unwrap() {
        AcquireOutcome::Acquired(lease) => lease,
        AcquireOutcome::Held(holder) => {
            panic!("`{}` should be free, held by {holder:?}", req.key())
        }
    }
}

/// Polls `try_acquire` on one instance until it succeeds; returns the lease and how many
/// attempts saw the lock held (each naming `holder`).
async fn poll_until_acquired(
    backend: &DynamoDbBackend,
    req: &AcquireRequest,
    holder: &Lease,
    limit: Duration,
) -> (Lease, u32) {
    let started = Instant::now();
    let mut refused = 0;
    loop {
        match backend.try_acquire(req).await.unwrap() {
            AcquireOutcome::Acquired(lease) => return (lease, refused),
            AcquireOutcome::Held(Some(info)) => {
                assert_eq!(info.owner, holder.owner);
                assert_eq!(info.token, holder.token);
                refused += 1;
            }
            AcquireOutcome::Held(None) => panic!("a refused acquire must name the holder"),
        }
        assert!(started.elapsed() < limit, "not acquired within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// 32 tasks, each with its own client, race for one key in 8 rounds: exactly one wins each
/// round, every loser is told who won (from the same response), and tokens increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_of_32_has_one_winner_per_round() {
    let Some(url) = url() else { return };
    let mut instances = Vec::new();
    for _ in 0..32 {
        instances.push(Arc::new(backend(&url, |c| c).await));
    }
    let key = key("race");
    let mut last_token = 0;
    for round in 0..8 {
        let barrier = Arc::new(Barrier::new(instances.len()));
        let tasks: Vec<_> = instances
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let (b, barrier, key) = (Arc::clone(b), Arc::clone(&barrier), key.clone());
                tokio::spawn(async move {
                    let me = owner(&format!("racer{i}"));
                    barrier.wait().await;
                    b.try_acquire(&request(&key, &me, Duration::from_secs(60)))
                        .await
                        .expect("try_acquire")
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                AcquireOutcome::Acquired(lease) => winners.push((i, lease)),
                AcquireOutcome::Held(holder) => losers.push(holder),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let (i, lease) = winners.pop().unwrap();
        assert_eq!(losers.len(), 31);
        for holder in losers {
            let holder = holder.expect("a loser is told who holds the lock");
            assert_eq!(holder.owner, lease.owner, "round {round}");
            assert_eq!(holder.token, lease.token, "round {round}");
        }
        assert!(lease.token.get() > last_token, "round {round}");
        last_token = lease.token.get();
        assert!(instances[i].release(&lease).await.unwrap());
    }
}

/// A holder dies (never refreshes). A waiter whose wall clock is far off the holder's takes
/// over after one lease duration, measured on its own monotonic clock: not earlier (as a
/// wall-clock comparison would with the holder's clock behind), not 60 s later (as it would
/// with the holder's clock ahead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_holder_is_taken_over_after_one_lease_whatever_the_clocks() {
    let Some(url) = url() else { return };
    let ttl = Duration::from_millis(1500);
    for (holder_clock, waiter_clock) in [
        (ClockOffset::Ahead(OFFSET), ClockOffset::Behind(OFFSET)),
        (ClockOffset::Behind(OFFSET), ClockOffset::Ahead(OFFSET)),
    ] {
        let holder = backend(&url, |c| c.clock_offset(holder_clock)).await;
        let waiter = backend(&url, |c| c.clock_offset(waiter_clock)).await;
        let key = key("dead_holder");
        let started = Instant::now();
        let dead = acquire(&holder, &request(&key, &owner("dead"), ttl)).await;
        let (taken, refused) = poll_until_acquired(
            &waiter,
            &request(&key, &owner("waiter"), ttl),
            &dead,
            Duration::from_secs(20),
        )
        .await;
        let waited = started.elapsed();
        assert!(
            waited >= ttl,
            "{holder_clock:?}/{waiter_clock:?}: taken over after {waited:?}, before one lease"
        );
        assert!(
            waited < ttl + Duration::from_secs(5),
            "{holder_clock:?}/{waiter_clock:?}: taken over only after {waited:?}"
        );
        assert!(refused >= 1, "the waiter first saw the lock held");
        assert!(taken.token > dead.token);
        assert!(!holder.verify(&dead).await.unwrap());
        assert!(matches!(
            holder.refresh(&dead).await,
            Err(Error::Lost { .. })
        ));
        assert!(!holder.release(&dead).await.unwrap());
        assert!(waiter.verify(&taken).await.unwrap());
        assert!(waiter.release(&taken).await.unwrap());
    }
}

/// A holder that keeps refreshing is never taken over, however long a waiter watches: every
/// refresh writes a new record version, which restarts the waiter's watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshing_holder_is_never_taken_over() {
    let Some(url) = url() else { return };
    let ttl = Duration::from_millis(600);
    let holder = backend(&url, |c| c.clock_offset(ClockOffset::Behind(OFFSET))).await;
    let waiter = backend(&url, |c| c.clock_offset(ClockOffset::Ahead(OFFSET))).await;
    let key = key("refreshing");
    let mut lease = acquire(&holder, &request(&key, &owner("alive"), ttl)).await;
    let waiting = request(&key, &owner("waiter"), ttl);
    let started = Instant::now();
    let mut last_refresh = Instant::now();
    while started.elapsed() < ttl * 6 {
        if last_refresh.elapsed() >= ttl / 3 {
            lease = holder.refresh(&lease).await.expect("refresh a held lease");
            last_refresh = Instant::now();
        }
        match waiter.try_acquire(&waiting).await.unwrap() {
            AcquireOutcome::Held(Some(info)) => assert_eq!(info.owner, lease.owner),
            other => panic!("a refreshed lease was taken: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // Once the holder stops refreshing, the waiter gets it a lease later.
    let stopped = Instant::now();
    let (taken, _) = poll_until_acquired(&waiter, &waiting, &lease, Duration::from_secs(20)).await;
    assert!(stopped.elapsed() >= ttl / 2, "{:?}", stopped.elapsed());
    assert!(taken.token > lease.token);
    assert!(waiter.release(&taken).await.unwrap());
}

/// With a declared clock-skew bound, a waiter whose wall clock is past the stored expiry plus
/// the bound takes over at once; one whose clock is behind falls back to watching for a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_skew_allows_fast_takeover() {
    let Some(url) = url() else { return };
    let ttl = Duration::from_secs(2);
    let skew = Duration::from_millis(200);
    let holder = backend(&url, |c| c).await;

    let ahead = backend(&url, |c| {
        c.max_clock_skew(skew)
            .clock_offset(ClockOffset::Ahead(OFFSET))
    })
    .await;
    let key1 = key("skew_fast");
    let dead = acquire(&holder, &request(&key1, &owner("dead"), ttl)).await;
    let fast = acquire(&ahead, &request(&key1, &owner("fast"), ttl)).await;
    assert!(fast.token > dead.token);
    assert!(ahead.release(&fast).await.unwrap());

    let behind = backend(&url, |c| {
        c.max_clock_skew(skew)
            .clock_offset(ClockOffset::Behind(OFFSET))
    })
    .await;
    let key2 = key("skew_slow");
    let started = Instant::now();
    let dead = acquire(&holder, &request(&key2, &owner("dead"), ttl)).await;
    let (slow, _) = poll_until_acquired(
        &behind,
        &request(&key2, &owner("slow"), ttl),
        &dead,
        Duration::from_secs(20),
    )
    .await;
    assert!(started.elapsed() >= ttl, "{:?}", started.elapsed());
    assert!(slow.token > dead.token);
    assert!(behind.release(&slow).await.unwrap());
}

/// `release_expired` releases what this instance has watched unchanged for a lease, and
/// nothing that is refreshed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_expired_after_watching_a_lease() {
    let Some(url) = url() else { return };
    let holder = backend(&url, |c| c).await;
    let cleaner = backend(&url, |c| c.clock_offset(ClockOffset::Behind(OFFSET))).await;
    let ttl = Duration::from_millis(500);
    let dead_key = key("cleanup_dead");
    let live_key = key("cleanup_live");
    let dead = acquire(&holder, &request(&dead_key, &owner("dead"), ttl)).await;
    let mut live = acquire(&holder, &request(&live_key, &owner("live"), ttl)).await;
    cleaner.release_expired().await.unwrap(); // first sightings
    let started = Instant::now();
    while started.elapsed() < ttl + Duration::from_millis(200) {
        live = holder.refresh(&live).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    live = holder.refresh(&live).await.unwrap();
    assert!(cleaner.release_expired().await.unwrap() >= 1);
    assert_eq!(cleaner.status(&dead_key).await.unwrap(), LockState::Free);
    assert!(
        holder.verify(&live).await.unwrap(),
        "a refreshed lease survives"
    );
    assert!(!holder.release(&dead).await.unwrap());
    assert!(holder.release(&live).await.unwrap());
}

/// Items are never deleted by leaselock, but DynamoDB's time to live may delete a long-unused
/// one: the next acquisition still gets a higher token. Also: every write stores the
/// time-to-live attribute, and `init_storage` turned the table's time to live on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_survives_deletion_of_the_item() {
    let Some(url) = url() else { return };
    let b = backend(&url, |c| c).await;
    let key = key("ttl_deleted");
    let mut last = 0;
    for _ in 0..3 {
        let lease = acquire(&b, &request(&key, &owner("a"), Duration::from_secs(60))).await;
        assert!(lease.token.get() > last);
        last = lease.token.get();
        assert!(b.release(&lease).await.unwrap());
    }
    let item = b
        .client()
        .get_item()
        .table_name(b.table())
        .key("key", AttributeValue::S(key.to_string()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item()
        .cloned()
        .expect("the item stays after release");
    assert!(!item.contains_key("owner"), "release removes the holder");
    let cleanup_at: u64 = item["expire_item_at"].as_n().unwrap().parse().unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let retention = leaselock_dynamodb::DEFAULT_CLEANUP_AFTER.as_secs();
    assert!(
        cleanup_at >= now + retention - 5 && cleanup_at <= now + retention + 5,
        "{cleanup_at} vs {now}"
    );

    // What the time to live would do, long after the last use.
    b.client()
        .delete_item()
        .table_name(b.table())
        .key("key", AttributeValue::S(key.to_string()))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = acquire(&b, &request(&key, &owner("b"), Duration::from_secs(60))).await;
    assert!(
        again.token.get() > last,
        "token went back after deletion: {} after {last}",
        again.token
    );
    assert!(b.release(&again).await.unwrap());

    let ttl = b
        .client()
        .describe_time_to_live()
        .table_name(b.table())
        .send()
        .await
        .unwrap();
    let description = ttl.time_to_live_description().expect("a description");
    assert_eq!(description.attribute_name(), Some("expire_item_at"));
    assert!(matches!(
        description.time_to_live_status(),
        Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
    ));
}

/// A missing table is `NotInitialized`; an endpoint nobody listens on is `NotAccessible`
/// (retryable); neither error shows the configured secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_storage_tells_missing_table_from_unreachable_server() {
    let Some(url) = url() else { return };
    let table = format!(
        "ll_dd_missing_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let missing = DynamoDbBackend::connect(DynamoDbConfig::from_url(&url).unwrap().table(&table))
        .await
        .unwrap();
    match missing.check_storage().await {
        Err(Error::NotInitialized { what, .. }) => assert!(what.contains(&table), "{what}"),
        other => panic!("expected NotInitialized, got {other:?}"),
    }
    let missing_key = key("missing");
    assert!(matches!(
        missing
            .try_acquire(&request(&missing_key, &owner("a"), Duration::from_secs(5)))
            .await,
        Err(Error::NotInitialized { .. })
    ));

    // A port on this machine that nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = DynamoDbConfig::new("t")
        .endpoint(format!("http://127.0.0.1:{port}"))
        .region("us-east-1")
        .credentials("AKIDEXAMPLE", "wJalrXUtnFEMI-very-secret")
        .request_timeout(Duration::from_secs(2));
    let unreachable = DynamoDbBackend::connect(config).await.unwrap();
    assert!(!format!("{unreachable:?}").contains("very-secret"));
    let error = unreachable.check_storage().await.unwrap_err();
    assert!(
        matches!(error, Error::NotAccessible { .. }),
        "expected NotAccessible, got {error:?}"
    );
    assert!(error.is_retryable());
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains("very-secret"), "{shown}");
}

/// `from_url` opens a working backend, and refuses a bad URL naming the field `url`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_url_opens_a_backend() {
    for bad in [
        "dynamodb://",
        "dynamodb://a-b",
        "mysql://x",
        "dynamodb://t?foo=1",
    ] {
        assert!(
            matches!(
                leaselock_dynamodb::from_url(bad).await,
                Err(Error::InvalidInput { field: "url", .. })
            ),
            "{bad}"
        );
    }
    let Some(url) = url() else { return };
    let backend = leaselock_dynamodb::from_url(&url).await.unwrap();
    assert_eq!(backend.capabilities().backend, "dynamodb");
    backend.init_storage().await.unwrap();
    backend.check_storage().await.unwrap();
}
