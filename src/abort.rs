//! A one-shot "abort every connection" broadcast that costs each idle connection one waker slot.
//!
//! At the end of a shutdown the server must wake every open connection so it can close. A
//! `watch` or `Notify` future stored in each connection task would cost ~100 bytes per
//! connection; instead each task registers its waker here once, on its first poll (a tokio
//! task's waker does not change), and checks one atomic flag per poll.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::Waker;

/// The abort flag and the wakers of every connection that may need to see it.
#[derive(Debug, Default)]
pub struct AbortSignal {
    aborted: AtomicBool,
    wakers: Mutex<WakerSlab>,
}

#[derive(Debug, Default)]
struct WakerSlab {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl AbortSignal {
    /// Has [`AbortSignal::abort_all`] been called?
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// Remember `waker` until [`AbortSignal::unregister`]; returns its key.
    pub fn register(&self, waker: &Waker) -> usize {
        let mut slab = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        match slab.free.pop() {
            Some(key) => {
                slab.slots[key] = Some(waker.clone());
                key
            }
            None => {
                slab.slots.push(Some(waker.clone()));
                slab.slots.len() - 1
            }
        }
    }

    /// Forget the waker registered under `key`.
    pub fn unregister(&self, key: usize) {
        let mut slab = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slab.slots.get_mut(key) {
            if slot.take().is_some() {
                slab.free.push(key);
            }
        }
    }

    /// Set the flag and wake every registered connection. Connections registering later see
    /// the flag on their first poll.
    pub fn abort_all(&self) {
        self.aborted.store(true, Ordering::Release);
        let slab = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        for waker in slab.slots.iter().flatten() {
            waker.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::Wake;

    struct Counter(AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn wakes_registered_wakers_once_and_reuses_slots() {
        let signal = AbortSignal::default();
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let a = signal.register(&waker);
        let b = signal.register(&waker);
        signal.unregister(a);
        assert_eq!(signal.register(&waker), a, "freed slot is reused");
        signal.unregister(b);
        assert!(!signal.is_aborted());
        signal.abort_all();
        assert!(signal.is_aborted());
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "only live registrations are woken"
        );
    }
}
