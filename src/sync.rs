//! Locks and atomics of the paths the concurrency model checker explores.
//!
//! Built normally these are the standard library's. With `--features shuttle` they are
//! [shuttle](https://docs.rs/shuttle)'s, whose scheduler then tries many interleavings
//! of the threads using them (see the `shuttle` tests of the dirty map and freeze).
//! Only the modules those tests drive (volume bitmaps, dirty maps, freezes and the
//! in-memory storage) use this module; everything else uses `std::sync` directly.

#[cfg(feature = "shuttle")]
pub use shuttle::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, atomic};
#[cfg(not(feature = "shuttle"))]
pub use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, atomic};

/// Locks `mutex`, ignoring poisoning: the data these locks guard stays consistent
/// when a holder panics (every update is a single assignment or insertion).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}
