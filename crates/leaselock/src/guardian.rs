//! Lazy daemons: a guard's refresh daemon becomes a task only once it has something to do.
//!
//! Most locks are held for less than a refresh interval (a check before a migration, a short
//! job), and on a fast backend a task per guard cost more than the lock: the spawn wakes another
//! worker thread of the runtime, and so does the abort at release. So a guard starts out as a
//! [`Slot`] in its locker's guardian: the time its daemon first has work (its first refresh, or
//! its local deadline when it is not refreshed) and, for a backend that tells of a lost lease,
//! that backend's watch, polled in place with a waker that reports to the guardian. One guardian
//! task per locker sleeps until the earliest of those times. When a slot's time comes or its
//! watch fires, the guardian starts that guard's daemon as a task of its own, which from then on
//! runs as it always did. A release before then takes the slot out: no task was ever spawned, and
//! registering a slot wakes the guardian only when it is due before anything already waiting.
//!
//! The guardian also wakes at least every `tick` (half the locker's release timeout), so that
//! the runtime's timer always has a wake-up due before a release's timeout: tokio wakes its
//! parked timer thread whenever a timer is set earlier than every other, and in a process with
//! no other timers each release's timeout did (about 70 µs of a MySQL lease cycle on two cores,
//! where that thread competes with the database for a CPU).
//!
//! Locks: a slot's own mutex and the guardian's state are never held together.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::backend::Wakeup;
use crate::guard::DaemonStart;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The locker's side: registers slots. Dropping it (with the last clone of its locker) lets the
/// guardian task end once no slot waits any more.
#[derive(Debug)]
pub(crate) struct Guardian {
    shared: Arc<Shared>,
}

/// The longest the guardian task sleeps (see the module docs).
const MAX_TICK: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Notify,
    /// The locker is gone: the task ends when no slot waits.
    closed: AtomicBool,
    /// The longest the task sleeps.
    tick: Duration,
    next_id: AtomicU64,
    /// Daemons started as tasks (for tests and debugging).
    started: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// Every waiting slot by id.
    slots: HashMap<u64, Arc<Slot>>,
    /// The waiting slots that have a due time, by that time.
    timers: BTreeMap<(Instant, u64), ()>,
    /// Slots whose watch was woken since the task last looked.
    woken: Vec<Arc<Slot>>,
    /// When the task wakes by itself next; `None` while no task runs.
    armed: Option<Instant>,
    /// A guardian task runs (it clears this when its runtime drops it).
    task_alive: bool,
}

/// One guard's place in the guardian, until its daemon starts or the guard lets go.
pub(crate) struct Slot {
    id: u64,
    /// When the daemon has work to do by itself; `None`: only when the watch fires.
    due: Option<Instant>,
    shared: Weak<Shared>,
    inner: Mutex<SlotState>,
    /// The watch was woken after its last poll began.
    woken: AtomicBool,
    waker: Waker,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("id", &self.id)
            .field("due", &self.due)
            .finish_non_exhaustive()
    }
}

enum SlotState {
    /// Not started. `watch` is `None` while somebody polls it (or when there is none).
    Waiting {
        start: DaemonStart,
        watch: Option<Wakeup>,
    },
    /// The daemon runs as a task of its own.
    Running(AbortHandle),
    /// The guard let go (or the daemon's runtime is gone).
    Stopped,
}

/// Wakes the guardian for one slot's watch. Holds the slot weakly: a stopped slot is gone.
struct SlotWaker(Weak<Slot>);

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(slot) = self.0.upgrade() else { return };
        if slot.woken.swap(true, Ordering::SeqCst) {
            return; // queued already, and not polled since
        }
        let Some(shared) = slot.shared.upgrade() else {
            return;
        };
        lock(&shared.state).woken.push(slot);
        shared.wake.notify_one();
    }
}

impl Guardian {
    /// A guardian for a locker whose releases time out after `release_timeout` (zero: never).
    pub(crate) fn new(release_timeout: Duration) -> Self {
        let tick = match release_timeout.is_zero() {
            true => MAX_TICK,
            false => (release_timeout / 2).clamp(Duration::from_millis(50), MAX_TICK),
        };
        Self {
            shared: Arc::new(Shared {
                state: Mutex::default(),
                wake: Notify::new(),
                closed: AtomicBool::new(false),
                tick,
                next_id: AtomicU64::new(0),
                started: AtomicU64::new(0),
            }),
        }
    }

    /// Registers a guard whose daemon starts at `due` (if any) or when `watch` fires, whichever
    /// comes first. Must be called inside a tokio runtime.
    pub(crate) fn register(
        &self,
        start: DaemonStart,
        due: Option<Instant>,
        watch: Option<Wakeup>,
    ) -> Arc<Slot> {
        let shared = &self.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let has_watch = watch.is_some();
        let slot = Arc::new_cyclic(|weak: &Weak<Slot>| Slot {
            id,
            due,
            shared: Arc::downgrade(shared),
            inner: Mutex::new(SlotState::Waiting { start, watch }),
            woken: AtomicBool::new(false),
            waker: Waker::from(Arc::new(SlotWaker(weak.clone()))),
        });
        if has_watch {
            // Polled here, on the caller's thread, so that the watch registers its waker without
            // waking the guardian. The slot is not in the guardian yet, so no due time can start
            // its daemon while the watch is out being polled.
            slot.poll_watch();
        }
        let mut state = lock(&shared.state);
        // The watch may have fired already (its daemon then runs): only a waiting slot goes in.
        // Whatever starts or stops the slot from now on takes it out again (`leave`).
        if !matches!(*lock(&slot.inner), SlotState::Waiting { .. }) {
            return slot;
        }
        state.slots.insert(id, Arc::clone(&slot));
        if let Some(due) = due {
            state.timers.insert((due, id), ());
        }
        if !state.task_alive {
            state.task_alive = true;
            state.armed = None;
            // The flag's guard goes in as an argument, so that it is dropped with the task also
            // when its runtime drops it before its first poll.
            tokio::spawn(run(Alive(Arc::clone(shared))));
        } else if due.is_some_and(|due| state.armed.is_none_or(|armed| due < armed)) {
            shared.wake.notify_one();
        }
        drop(state);
        slot
    }
}

#[cfg(test)]
impl Guardian {
    /// Guards whose daemon has not started.
    pub(crate) fn waiting(&self) -> usize {
        lock(&self.shared.state).slots.len()
    }

    /// Daemons started so far.
    pub(crate) fn started(&self) -> u64 {
        self.shared.started.load(Ordering::Relaxed)
    }

    /// Whether a guardian task runs.
    pub(crate) fn task_alive(&self) -> bool {
        lock(&self.shared.state).task_alive
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

impl Slot {
    /// The guard lets go: the daemon never starts, or is aborted if it runs.
    pub(crate) fn stop(&self) {
        let previous = std::mem::replace(&mut *lock(&self.inner), SlotState::Stopped);
        match previous {
            SlotState::Running(daemon) => daemon.abort(),
            SlotState::Waiting { .. } => self.leave(),
            SlotState::Stopped => {}
        }
    }

    /// Takes this slot out of the guardian's state.
    fn leave(&self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut state = lock(&shared.state);
        state.slots.remove(&self.id);
        if let Some(due) = self.due {
            state.timers.remove(&(due, self.id));
        }
        if state.slots.is_empty() && shared.closed.load(Ordering::SeqCst) {
            shared.wake.notify_one();
        }
    }

    /// Starts the daemon, if the slot still waits. `fired`: the watch already resolved.
    fn start(&self, fired: bool) {
        let mut inner = lock(&self.inner);
        let (start, watch) = match std::mem::replace(&mut *inner, SlotState::Stopped) {
            SlotState::Waiting { start, watch } => (start, watch),
            // Stopped or started already: as it was.
            other => {
                *inner = other;
                return;
            }
        };
        let watch: Wakeup = match (fired, watch) {
            (true, _) => Box::pin(std::future::ready(())),
            (false, Some(watch)) => watch,
            // A watch out being polled cannot be due (see `register`); none at all waits for
            // nothing.
            (false, None) => Box::pin(std::future::pending()),
        };
        *inner = SlotState::Running(start.spawn(watch));
        drop(inner);
        if let Some(shared) = self.shared.upgrade() {
            shared.started.fetch_add(1, Ordering::Relaxed);
        }
        self.leave();
    }

    /// Polls the watch until it is pending with no wake-up missed, or starts the daemon when it
    /// fired. Whoever takes the watch out polls it; a wake-up during a poll is seen afterwards.
    fn poll_watch(self: &Arc<Self>) {
        loop {
            let mut watch = {
                let mut inner = lock(&self.inner);
                match &mut *inner {
                    SlotState::Waiting { watch, .. } => match watch.take() {
                        Some(watch) => watch,
                        None => return,
                    },
                    _ => return,
                }
            };
            self.woken.store(false, Ordering::SeqCst);
            let mut cx = Context::from_waker(&self.waker);
            if watch.as_mut().poll(&mut cx).is_ready() {
                self.start(true);
                return;
            }
            match &mut *lock(&self.inner) {
                SlotState::Waiting { watch: slot, .. } => *slot = Some(watch),
                _ => return,
            }
            if !self.woken.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

/// Clears `task_alive` when the task ends, also when its runtime drops it (polled or not).
struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.task_alive = false;
        state.armed = None;
    }
}

/// The guardian task: starts the daemons whose time came or whose watch fired.
async fn run(alive: Alive) {
    let shared = &alive.0;
    loop {
        let notified = shared.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (due, woken, next) = {
            let mut state = lock(&shared.state);
            if state.slots.is_empty() && shared.closed.load(Ordering::SeqCst) {
                break;
            }
            let now = Instant::now();
            let mut due = Vec::new();
            while let Some(entry) = state.timers.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let (_, id) = entry.remove_entry().0;
                if let Some(slot) = state.slots.get(&id) {
                    due.push(Arc::clone(slot));
                }
            }
            let woken = std::mem::take(&mut state.woken);
            let tick = now + shared.tick;
            let next = state
                .timers
                .keys()
                .next()
                .map_or(tick, |(at, _)| (*at).min(tick));
            state.armed = Some(next);
            (due, woken, next)
        };
        for slot in woken {
            slot.poll_watch();
        }
        for slot in due {
            slot.start(false);
        }
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = notified => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{LockBackend, LockKey, Locker, MemoryBackend};

    fn locker(backend: &MemoryBackend) -> Locker {
        Locker::builder(backend.clone())
            .lease_duration(Duration::from_secs(3))
            .refresh_interval(Duration::from_secs(1))
            .build()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_released_before_its_first_refresh_starts_no_task() {
        let locker = locker(&MemoryBackend::new());
        for _ in 0..100 {
            let guard = locker.acquire("k").await.unwrap().unwrap();
            assert_eq!(locker.guardian().waiting(), 1);
            assert!(guard.release().await.unwrap());
            assert_eq!(locker.guardian().waiting(), 0);
        }
        let dropped = locker.acquire("k").await.unwrap().unwrap();
        drop(dropped);
        assert_eq!(locker.guardian().waiting(), 0);
        assert_eq!(locker.guardian().started(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_daemon_starts_when_its_first_refresh_is_due_and_keeps_the_lease() {
        let backend = MemoryBackend::new();
        let locker = locker(&backend);
        let guard = locker.acquire("k").await.unwrap().unwrap();
        let first = guard.lease().unwrap().expires_at.unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(locker.guardian().started(), 0);
        // Past the first refresh: the daemon runs and has refreshed (the memory store's expiry
        // follows the real clock, so the new one is later by the real time that passed).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(locker.guardian().started(), 1);
        assert_eq!(locker.guardian().waiting(), 0);
        let refreshed = guard.lease().unwrap().expires_at.unwrap();
        assert!(refreshed >= first, "{refreshed:?} < {first:?}");
        // Past three lease durations without a loss: only refreshes could keep it.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!guard.is_lost(), "{:?}", guard.lost().reason());
        assert!(guard.release().await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_loss_before_the_first_refresh_starts_the_daemon_and_tells_the_work() {
        let backend = MemoryBackend::new();
        let locker = locker(&backend);
        let guard = locker.acquire("k").await.unwrap().unwrap();
        assert_eq!(locker.guardian().started(), 0);
        backend
            .force_release(&LockKey::new("k").unwrap())
            .await
            .unwrap()
            .unwrap();
        let reason = tokio::time::timeout(Duration::from_millis(500), guard.lost().wait())
            .await
            .expect("the watch told the holder before its first refresh");
        assert!(reason.contains("gone"), "{reason}");
        assert_eq!(locker.guardian().started(), 1);
        assert_eq!(locker.guardian().waiting(), 0);
        assert!(!guard.release().await.unwrap());
    }

    #[test]
    fn each_runtime_gets_a_guardian_task_and_it_ends_with_its_locker() {
        let backend = MemoryBackend::new();
        let locker = locker(&backend);
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        first.block_on(async {
            let guard = locker.acquire("k").await.unwrap().unwrap();
            assert!(guard.release().await.unwrap());
        });
        assert!(locker.guardian().task_alive());
        drop(first);
        assert!(!locker.guardian().task_alive(), "its runtime dropped it");

        let second = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let guardian = second.block_on(async {
            let guard = locker.acquire("k").await.unwrap().unwrap();
            assert!(locker.guardian().task_alive());
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert!(!guard.is_lost(), "{:?}", guard.lost().reason());
            assert_eq!(locker.guardian().started(), 1);
            assert!(guard.release().await.unwrap());
            std::sync::Arc::downgrade(&locker.guardian().shared)
        });
        drop(locker);
        second.block_on(async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        });
        assert!(
            guardian.upgrade().is_none(),
            "the task ended with its locker"
        );
    }
}
