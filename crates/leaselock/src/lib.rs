#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod backend;
mod config;
mod error;
mod guard;
mod guardian;
mod hooks;
mod locker;
mod memory;
mod refresher;
mod types;
mod unwind;

pub use backend::{refresh_in_chunks, LockBackend, Wakeup};
pub use config::{OnUnavailable, WaitPolicy};
pub use error::{BoxError, Error, Result};
pub use guard::{LockContext, LockGuard, LostSignal};
pub use hooks::{HookResult, LockHooks, NoHooks, Operation};
pub use locker::{
    Locker, LockerBuilder, RunIfNeeded, DEFAULT_LEASE_DURATION, DEFAULT_RELEASE_TIMEOUT,
};
pub use memory::MemoryBackend;
pub use types::{
    validate_lease_duration, AcquireOutcome, AcquireRequest, Capabilities, ExpiryClock,
    FencingToken, Lease, LockInfo, LockKey, LockKind, LockState, Namespace, OwnerId, MAX_KEY_BYTES,
    MAX_LEASE_DURATION, MAX_OWNER_BYTES, MIN_LEASE_DURATION,
};

/// Re-exported for backend crates implementing [`LockBackend`].
pub use async_trait::async_trait;
