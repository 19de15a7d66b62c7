//! Connection slots for the agent's servers: at most `cap` connections at
//! once, so that a flood cannot take the process's file descriptors, and
//! a flood of idle connections cannot lock out a real caller either. A
//! connection is *idle* while it waits for a request (until the request
//! has arrived whole); when every slot is taken, a new connection takes the slot of the
//! oldest idle one, which is closed. Only when no connection is idle
//! (every one is mid-request) is the new one turned away.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// The process's limit on open files, raised to the hard limit first.
pub fn open_files_limit() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(super::socket::raise_open_files)
}

pub struct Slots {
    /// What the slots serve, for the log.
    what: &'static str,
    cap: usize,
    free: Arc<Semaphore>,
    /// Idle connections by age (ids grow), each with the sender that
    /// closes it.
    idle: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
    next_id: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

/// Held while a connection is idle; dropped when its request has begun.
pub struct Idle {
    slots: Arc<Slots>,
    id: u64,
}

impl Drop for Idle {
    fn drop(&mut self) {
        if let Ok(mut idle) = self.slots.idle.lock() {
            idle.remove(&self.id);
        }
    }
}

impl Slots {
    pub fn new(what: &'static str, cap: usize) -> Arc<Self> {
        Arc::new(Slots {
            what,
            cap,
            free: Arc::new(Semaphore::new(cap)),
            idle: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            last_log: Mutex::new(None),
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// A slot for a new connection: a free one, or the oldest idle
    /// connection's (that connection is closed). `None` when every
    /// connection is busy with a request: the new one is to be closed.
    pub async fn admit(self: &Arc<Self>) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.free.clone().try_acquire_owned() {
            return Some(p);
        }
        let oldest = self.idle.lock().ok().and_then(|mut i| i.pop_first());
        let Some((_, close)) = oldest else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.log();
            return None;
        };
        let _ = close.send(());
        self.evicted.fetch_add(1, Ordering::Relaxed);
        self.log();
        // The closed connection's task gives its slot back at once.
        tokio::time::timeout(Duration::from_secs(1), self.free.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Marks the calling connection idle until the guard drops; the
    /// receiver fires when a newer connection takes its slot.
    pub fn idle(self: &Arc<Self>) -> (Idle, oneshot::Receiver<()>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut idle) = self.idle.lock() {
            idle.insert(id, tx);
        }
        (
            Idle {
                slots: self.clone(),
                id,
            },
            rx,
        )
    }

    /// How many connections were closed to make room, and turned away.
    pub fn pressure(&self) -> (u64, u64) {
        (
            self.evicted.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    /// A warning at most every 10 s while the cap is reached.
    fn log(&self) {
        let Ok(mut last) = self.last_log.lock() else {
            return;
        };
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            return;
        }
        *last = Some(Instant::now());
        let (evicted, refused) = self.pressure();
        tracing::warn!(
            max = self.cap,
            closed_idle = evicted,
            turned_away = refused,
            "{}: connection cap reached; the oldest idle connections are closed to make room",
            self.what
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_house_makes_room_by_closing_the_oldest_idle_connection() {
        let slots = Slots::new("test", 2);
        let a = slots.admit().await.expect("a free slot");
        let (idle_a, mut closed_a) = slots.idle();
        let b = slots.admit().await.expect("a free slot");
        let (idle_b, mut closed_b) = slots.idle();
        // Full: the third connection takes the oldest idle one's slot.
        let drop_a = tokio::spawn(async move {
            let _ = (&mut closed_a).await;
            drop((idle_a, a));
        });
        let c = slots.admit().await.expect("the oldest idle slot");
        drop_a.await.unwrap();
        assert!(closed_b.try_recv().is_err(), "the newer one stays");
        assert_eq!(slots.pressure(), (1, 0));
        // B starts a request (no longer idle); C is busy too: nobody to
        // close, so a fourth is turned away.
        drop(idle_b);
        assert!(slots.admit().await.is_none());
        assert_eq!(slots.pressure(), (1, 1));
        drop((b, c));
        assert!(slots.admit().await.is_some());
    }
}
