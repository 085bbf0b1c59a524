//! The in-flight guard: at most one settlement per authorization `(from, nonce)` in this process.
//!
//! The same signed header sent twice (a retrying client, a double click, two requests racing) must not be settled
//! or rewarded twice. A [`Claim`] is taken after verification and before settlement; a second claim of the same
//! key fails while the first is in flight, and after it settled (the entry is kept until the authorization's
//! `validBefore` has passed, after which the token refuses it anyway). A claim dropped without being marked
//! settled (verification or a definite settlement failure) frees the key so the client may retry.
//!
//! This is per process; the chain's `authorizationState` is the cross-process truth (a second settlement of the
//! same authorization reverts), and callers must still redeem a settled payment at most once in the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use alloy::primitives::{Address, B256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    Done,
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// Unix seconds after which the authorization is dead on chain (its `validBefore`).
    expires_at: u64,
}

type Key = (Address, B256);

/// A concurrent set of authorizations being (or having been) settled.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    entries: Arc<Mutex<HashMap<Key, Entry>>>,
}

impl InFlight {
    pub fn new() -> InFlight {
        InFlight::default()
    }

    /// Claims `(from, nonce)`; `None` if it is already claimed or settled. `expires_at` is the authorization's
    /// `validBefore` (unix seconds); `now` prunes settled entries that can no longer be replayed.
    pub fn try_claim(
        &self,
        from: Address,
        nonce: B256,
        expires_at: u64,
        now: u64,
    ) -> Option<Claim> {
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, e| e.state == State::InFlight || e.expires_at >= now);
        let key = (from, nonce);
        if map.contains_key(&key) {
            return None;
        }
        map.insert(
            key,
            Entry {
                state: State::InFlight,
                expires_at,
            },
        );
        Some(Claim {
            set: self.clone(),
            key,
            finished: false,
        })
    }

    /// Whether `(from, nonce)` is claimed or settled.
    pub fn contains(&self, from: Address, nonce: B256) -> bool {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&(from, nonce))
    }

    /// Number of entries (in flight and settled, not yet pruned).
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An exclusive claim on one authorization. Dropping it frees the key unless [`Claim::settled`] was called.
#[derive(Debug)]
pub struct Claim {
    set: InFlight,
    key: Key,
    finished: bool,
}

impl Claim {
    /// The authorization was settled (or may have been: a sent transaction without a receipt): keep the key
    /// blocked until it expires.
    pub fn settled(mut self) {
        self.finished = true;
        let mut map = self
            .set
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get_mut(&self.key) {
            e.state = State::Done;
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.finished {
            self.set
                .entries
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_fails_until_released() {
        let set = InFlight::new();
        let (a, n) = (Address::repeat_byte(1), B256::repeat_byte(2));
        let c = set.try_claim(a, n, 100, 10).unwrap();
        assert!(set.try_claim(a, n, 100, 10).is_none());
        assert!(set.try_claim(a, B256::repeat_byte(3), 100, 10).is_some());
        drop(c);
        let c = set.try_claim(a, n, 100, 10).unwrap();
        c.settled();
        assert!(
            set.try_claim(a, n, 100, 50).is_none(),
            "settled stays blocked"
        );
        assert!(
            set.try_claim(a, n, 100, 101).is_some(),
            "pruned after validBefore"
        );
    }

    #[test]
    fn concurrent_claims_yield_exactly_one_winner() {
        let set = InFlight::new();
        let (a, n) = (Address::repeat_byte(1), B256::repeat_byte(2));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let set = set.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    set.try_claim(a, n, 100, 10).map(Claim::settled).is_some()
                })
            })
            .collect();
        let winners = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|w| *w)
            .count();
        assert_eq!(winners, 1);
        assert_eq!(set.len(), 1);
    }
}
