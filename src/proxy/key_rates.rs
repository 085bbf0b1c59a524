//! Per-key rate limits: requests per minute and tokens per minute for each API key, configured per product
//! (`[credits]` and each `[[pools]]`: `requests_per_minute`, `tokens_per_minute`), with OpenAI's rate-limit
//! headers. Budgets bound what a key may *spend*; these bound how *fast* it may spend it, so one agent cannot take
//! a deployment's whole capacity in a burst.
//!
//! This module owns the in-process buckets and the header values; the request handler owns the policy around them
//! (which key id, which product's [`KeyRate`], the token bound, and the 429 / 400 answers). The id is any `i64`
//! the caller picks per bucket: a key's row id gives a rotated key fresh buckets (rotation has its own per-IP
//! claim limit); an id shared by an account's keys would carry them over.
//!
//! - **Token buckets refilling continuously**: each axis holds at most its per-minute figure and refills
//!   `figure / 60 s`. State is kept as a *deficit* (what the bucket misses to be full) in integer units of
//!   1/60 000 token, so one millisecond refills exactly `figure` units: no rounding, no drift however often it is
//!   read. A full bucket has deficit 0 whatever the rate, which makes "carries no state" trivial to test.
//! - **Admission is all or nothing**: a request takes one request and its token bound (prompt bound + output
//!   bound, as OpenAI counts `max_tokens` up front), or, refused, takes nothing from either bucket.
//! - **A bound larger than the whole per-minute capacity never fits**: waiting does not help, so the refusal says
//!   so ([`Refusal::never_fits`]) and the handler answers "lower max_tokens" instead of an endless 429.
//! - **Settling** gives back `bound − actual` tokens when the request ends ([`Admission::settle`]); it never gives
//!   back more than was taken and the deficit cannot go below zero, so a bucket never exceeds its capacity.
//!   Dropping an [`Admission`] unsettled keeps the whole charge (the safe side for a request whose outcome is
//!   unknown).
//! - **Headers** ([`RateHeaders`]): `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` as OpenAI sends them,
//!   only for the axes that have a limit. `remaining` is what is left after this request; `reset` is the time until
//!   the bucket is full again ("resets to its initial state" in OpenAI's words), written like OpenAI's (Go
//!   durations: `20ms`, `1s`, `1.5s`, `6m0s`).
//! - **Time** is the caller's `now_ms` (unix milliseconds); the module never reads a clock. A clock that steps back
//!   refills nothing and does not move a bucket's timestamp back (it cannot mint tokens).
//! - **Memory is bounded**: at most `max_keys` keys (rounded up to a multiple of the shard count), in shards each
//!   behind its own short lock. When a shard is full, keys whose buckets are full are forgotten first (they lose
//!   nothing), then the key closest to full.
//! - **Per process**: several replicas each keep their own buckets, so N replicas allow up to N times the rate, as
//!   with the per-IP limits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::http::{HeaderMap, HeaderName, HeaderValue};

/// One token (or request) in bucket units. A per-minute figure `f` refills `f × UNIT / 60 000 ms = f` units per
/// millisecond: integer refill, exact at millisecond resolution.
const UNIT: u64 = 60_000;
/// Shards of the key map (a power of two): concurrent requests of different keys rarely share a lock.
const SHARDS: usize = 16;

/// The largest `tokens_per_minute` a product may set: keeps every bucket quantity (`figure × UNIT`) far inside
/// `u64`. Larger figures are treated as this one.
pub const MAX_TOKENS_PER_MINUTE: u64 = 1_000_000_000_000;

/// A product's per-key rates (`None` = unlimited on that axis). The config refuses zero; this module treats a zero
/// as one (it would otherwise divide by zero, and nothing could ever be admitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyRate {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

impl KeyRate {
    /// Whether no axis is limited (such keys are never tracked).
    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_minute.is_none()
    }

    fn requests(&self) -> Option<u64> {
        self.requests_per_minute.map(|r| u64::from(r).max(1))
    }

    fn tokens(&self) -> Option<u64> {
        self.tokens_per_minute
            .map(|t| t.clamp(1, MAX_TOKENS_PER_MINUTE))
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    Requests,
    Tokens,
}

impl Axis {
    /// OpenAI's name of the limit in its messages.
    fn label(self) -> &'static str {
        match self {
            Axis::Requests => "requests per min (RPM)",
            Axis::Tokens => "tokens per min (TPM)",
        }
    }
}

/// One axis's header values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AxisState {
    /// The per-minute figure (the bucket's capacity).
    pub limit: u64,
    /// Whole requests or tokens left now.
    pub remaining: u64,
    /// Milliseconds until the bucket is full again (0 when it is).
    pub reset_ms: u64,
}

/// The rate-limit headers of one answer; an axis without a limit is `None` and sends no headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateHeaders {
    pub requests: Option<AxisState>,
    pub tokens: Option<AxisState>,
}

impl RateHeaders {
    /// Writes `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the limited axes (replacing any such
    /// header already present, e.g. an upstream's).
    pub fn apply(&self, headers: &mut HeaderMap) {
        let axes = [
            (
                self.requests,
                [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
            ),
            (
                self.tokens,
                [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
            ),
        ];
        for (state, [limit, remaining, reset]) in axes {
            let Some(s) = state else { continue };
            for (name, value) in [
                (limit, s.limit.to_string()),
                (remaining, s.remaining.to_string()),
                (reset, go_duration(s.reset_ms)),
            ] {
                // Digits and ASCII letters only: always a valid header value.
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            }
        }
    }
}

impl RateHeaders {
    /// Anthropic's rate-limit headers as well (`/v1/messages`): `anthropic-ratelimit-{requests,tokens}-{limit,
    /// remaining,reset}`, the reset as the RFC 3339 time the bucket is full again (Anthropic's format), from
    /// `now_ms`.
    pub fn apply_anthropic(&self, headers: &mut HeaderMap, now_ms: i64) {
        let axes = [
            (
                self.requests,
                [
                    "anthropic-ratelimit-requests-limit",
                    "anthropic-ratelimit-requests-remaining",
                    "anthropic-ratelimit-requests-reset",
                ],
            ),
            (
                self.tokens,
                [
                    "anthropic-ratelimit-tokens-limit",
                    "anthropic-ratelimit-tokens-remaining",
                    "anthropic-ratelimit-tokens-reset",
                ],
            ),
        ];
        for (state, [limit, remaining, reset]) in axes {
            let Some(s) = state else { continue };
            // Rounded up to the second: the bucket is full by then.
            let full_at = now_ms
                .saturating_add(i64::try_from(s.reset_ms).unwrap_or(i64::MAX))
                .saturating_add(999)
                .div_euclid(1000);
            for (name, value) in [
                (limit, s.limit.to_string()),
                (remaining, s.remaining.to_string()),
                (reset, crate::billing::rfc3339(full_at)),
            ] {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            }
        }
    }
}

/// A duration in milliseconds the way OpenAI writes its resets (Go's `time.Duration` format at millisecond
/// resolution): `0s`, `20ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`.
pub fn go_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m) = (ms / 3_600_000, ms / 60_000 % 60);
    let (s, frac) = (ms / 1000 % 60, ms % 1000);
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        let digits = format!("{frac:03}");
        format!("{s}.{}s", digits.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

/// A request this key may not make now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The key's state (nothing was taken): send them with the refusal.
    pub headers: RateHeaders,
    /// Whole seconds until this request would be admitted (at least 1), for `Retry-After`; 0 when
    /// [`never_fits`](Refusal::never_fits).
    pub retry_after_secs: u64,
    /// The axis that refused. When both are short, the one that takes longer to refill (it decides the wait).
    pub exhausted: Axis,
    /// The token bound exceeds the whole per-minute token capacity: no wait admits it; the client must send a
    /// smaller prompt or `max_tokens` (a 400-style answer, not a 429).
    pub never_fits: bool,
    /// An OpenAI-style explanation for the error body.
    pub message: String,
}

/// An admitted request: the headers to answer with, and what to give back when it ends.
#[derive(Debug)]
#[must_use = "an admission carries the rate headers; settle it when the request ends"]
pub struct Admission {
    headers: RateHeaders,
    /// `None` when nothing can be given back (no token limit, or a bound of 0).
    refund: Option<Refund>,
}

#[derive(Debug)]
struct Refund {
    rates: KeyRates,
    key_id: i64,
    /// The bucket this charge went into: a key forgotten and seen again has a new bucket, which must not receive
    /// tokens the old one charged.
    generation: u64,
    charged_tokens: u64,
}

impl Admission {
    /// The headers to answer with: what is left after this request.
    pub fn headers(&self) -> &RateHeaders {
        &self.headers
    }

    /// Gives back the unused part of the token bound once the request is over: `bound − actual` (nothing when the
    /// upstream reported more than the bound; the excess is not charged either, as the bound was what admitted
    /// it). The request itself stays counted.
    pub fn settle(self, actual_tokens: u64, now_ms: i64) {
        let Some(r) = self.refund else { return };
        let back = r.charged_tokens.saturating_sub(actual_tokens);
        if back > 0 {
            r.rates.give_back(r.key_id, r.generation, back, now_ms);
        }
    }
}

/// One key's buckets.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The rate of the last admission (refills use it until another one arrives).
    rate: KeyRate,
    /// Units missing to a full request bucket.
    requests_deficit: u64,
    /// Units missing to a full token bucket.
    tokens_deficit: u64,
    /// When the deficits were last brought up to date, unix ms (never moves back).
    at: i64,
    generation: u64,
}

impl Entry {
    /// The entry at `now`: each deficit shrunk by the refill since `at`.
    fn refilled(mut self, now: i64) -> Entry {
        let elapsed = u64::try_from(now.saturating_sub(self.at)).unwrap_or(0);
        if let Some(r) = self.rate.requests() {
            self.requests_deficit = self
                .requests_deficit
                .saturating_sub(elapsed.saturating_mul(r));
        }
        if let Some(t) = self.rate.tokens() {
            self.tokens_deficit = self
                .tokens_deficit
                .saturating_sub(elapsed.saturating_mul(t));
        }
        self.at = self.at.max(now);
        self
    }

    /// Switches to `rate` (a key's product may change between requests): no deficit beyond the new capacity,
    /// none on an axis without a limit.
    fn with_rate(mut self, rate: KeyRate) -> Entry {
        self.requests_deficit = rate
            .requests()
            .map_or(0, |r| self.requests_deficit.min(r * UNIT));
        self.tokens_deficit = rate
            .tokens()
            .map_or(0, |t| self.tokens_deficit.min(t * UNIT));
        self.rate = rate;
        self
    }

    fn is_full(&self) -> bool {
        self.requests_deficit == 0 && self.tokens_deficit == 0
    }

    /// Milliseconds until both buckets are full.
    fn full_in_ms(&self) -> u64 {
        let r = self
            .rate
            .requests()
            .map_or(0, |r| self.requests_deficit.div_ceil(r));
        let t = self
            .rate
            .tokens()
            .map_or(0, |t| self.tokens_deficit.div_ceil(t));
        r.max(t)
    }

    fn headers(&self) -> RateHeaders {
        let axis = |per_minute: Option<u64>, deficit: u64| {
            per_minute.map(|f| AxisState {
                limit: f,
                remaining: (f * UNIT).saturating_sub(deficit) / UNIT,
                reset_ms: deficit.div_ceil(f),
            })
        };
        RateHeaders {
            requests: axis(self.rate.requests(), self.requests_deficit),
            tokens: axis(self.rate.tokens(), self.tokens_deficit),
        }
    }
}

struct Inner {
    per_shard: usize,
    shards: Box<[Mutex<HashMap<i64, Entry>>]>,
    next_generation: AtomicU64,
}

/// In-process buckets per key. Cloning shares them.
#[derive(Clone)]
pub struct KeyRates {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KeyRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRates")
            .field("tracked", &self.tracked())
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

impl KeyRates {
    /// Buckets for at most `max_keys` keys (rounded up to a multiple of the shard count).
    pub fn new(max_keys: usize) -> KeyRates {
        KeyRates {
            inner: Arc::new(Inner {
                per_shard: max_keys.div_ceil(SHARDS).max(1),
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                next_generation: AtomicU64::new(0),
            }),
        }
    }

    fn shard(&self, key_id: i64) -> &Mutex<HashMap<i64, Entry>> {
        // Key ids are the store's sequential row ids, not chosen by clients: a multiplicative mix spreads them.
        let mixed = (key_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.inner.shards[(mixed >> 60) as usize & (SHARDS - 1)]
    }

    /// Takes one request and `tokens` (the request's token bound: prompt bound + output bound) from `key_id`'s
    /// buckets at `now_ms` (unix ms), or takes nothing and says why. A key whose rate limits nothing is admitted
    /// without being tracked (and its admission has no headers).
    pub fn admit(
        &self,
        key_id: i64,
        rate: KeyRate,
        tokens: u64,
        now_ms: i64,
    ) -> Result<Admission, Refusal> {
        if rate.is_unlimited() {
            return Ok(Admission {
                headers: RateHeaders::default(),
                refund: None,
            });
        }
        let mut map = self
            .shard(key_id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let tracked = map.get(&key_id).copied();
        let entry = match tracked {
            Some(e) => e.refilled(now_ms).with_rate(rate),
            None => Entry {
                rate,
                requests_deficit: 0,
                tokens_deficit: 0,
                at: now_ms,
                generation: 0,
            },
        };
        let taken = match decide(entry, tokens) {
            Ok(taken) => taken,
            Err(refusal) => {
                // Nothing taken. An untracked key is full (only a bound that never fits refuses it): nothing to
                // remember. A tracked one keeps its refill and rate brought up to date.
                if tracked.is_some() {
                    map.insert(key_id, entry);
                }
                return Err(refusal);
            }
        };
        let taken = match tracked {
            Some(_) => taken,
            None => {
                if map.len() >= self.inner.per_shard {
                    evict(&mut map, now_ms, self.inner.per_shard);
                }
                Entry {
                    generation: self.inner.next_generation.fetch_add(1, Ordering::Relaxed),
                    ..taken
                }
            }
        };
        map.insert(key_id, taken);
        drop(map);
        Ok(Admission {
            headers: taken.headers(),
            refund: (rate.tokens().is_some() && tokens > 0).then(|| Refund {
                rates: self.clone(),
                key_id,
                generation: taken.generation,
                charged_tokens: tokens,
            }),
        })
    }

    /// Returns `tokens` to the token bucket of `key_id`, if it is still the bucket they were taken from.
    fn give_back(&self, key_id: i64, generation: u64, tokens: u64, now_ms: i64) {
        let mut map = self
            .shard(key_id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get_mut(&key_id)
            && e.generation == generation
        {
            let mut refilled = e.refilled(now_ms);
            // The deficit cannot go below zero: the bucket never holds more than its capacity.
            refilled.tokens_deficit = refilled
                .tokens_deficit
                .saturating_sub(tokens.saturating_mul(UNIT));
            *e = refilled;
        }
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// The most keys tracked at once.
    pub fn capacity(&self) -> usize {
        self.inner.per_shard * SHARDS
    }
}

/// `entry` after taking one request and `tokens`, or the refusal (computed from the untouched entry).
fn decide(entry: Entry, tokens: u64) -> Result<Entry, Refusal> {
    let rate = entry.rate;
    if let Some(t) = rate.tokens()
        && tokens > t
    {
        return Err(Refusal {
            headers: entry.headers(),
            retry_after_secs: 0,
            exhausted: Axis::Tokens,
            never_fits: true,
            message: format!(
                "Request too large for this key on {}: Limit {t}, Requested {tokens}. The input or output tokens \
                 must be reduced in order to run successfully (lower max_tokens or the prompt).",
                Axis::Tokens.label()
            ),
        });
    }
    // Milliseconds until an axis has room for `need` units (0 = room now). `tokens ≤ t` here, so `tokens × UNIT`
    // cannot overflow.
    let wait = |per_minute: Option<u64>, deficit: u64, need: u64| {
        per_minute.map_or(0, |f| {
            let free = (f * UNIT).saturating_sub(deficit);
            need.saturating_sub(free).div_ceil(f)
        })
    };
    let request_wait = wait(rate.requests(), entry.requests_deficit, UNIT);
    let token_wait = wait(rate.tokens(), entry.tokens_deficit, tokens * UNIT);
    if request_wait == 0 && token_wait == 0 {
        // An axis without a limit keeps no deficit (`with_rate` zeroed it), so only limited axes are charged.
        return Ok(Entry {
            requests_deficit: match rate.requests() {
                Some(_) => entry.requests_deficit + UNIT,
                None => 0,
            },
            tokens_deficit: match rate.tokens() {
                Some(_) => entry.tokens_deficit + tokens * UNIT,
                None => 0,
            },
            ..entry
        });
    }
    // The longer wait decides when the request can pass, so its axis is the one reported.
    let (exhausted, wait_ms, limit, deficit, requested) = if token_wait > request_wait {
        let limit = rate.tokens().unwrap_or(0);
        (
            Axis::Tokens,
            token_wait,
            limit,
            entry.tokens_deficit,
            tokens,
        )
    } else {
        let limit = rate.requests().unwrap_or(0);
        (
            Axis::Requests,
            request_wait,
            limit,
            entry.requests_deficit,
            1,
        )
    };
    Err(Refusal {
        headers: entry.headers(),
        retry_after_secs: wait_ms.div_ceil(1000).max(1),
        exhausted,
        never_fits: false,
        message: format!(
            "Rate limit reached for this key on {}: Limit {limit}, Used {}, Requested {requested}. Please try \
             again in {}.",
            exhausted.label(),
            deficit.div_ceil(UNIT),
            go_duration(wait_ms)
        ),
    })
}

/// Makes room in a full shard: forgets keys whose buckets are full (they lose nothing), and if every key is
/// limited right now, the one closest to full (it loses the least).
fn evict(map: &mut HashMap<i64, Entry>, now: i64, per_shard: usize) {
    map.retain(|_, e| !e.refilled(now).is_full());
    if map.len() >= per_shard
        && let Some(closest) = map
            .iter()
            .min_by_key(|(_, e)| e.refilled(now).full_in_ms())
            .map(|(k, _)| *k)
    {
        map.remove(&closest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(rpm: Option<u32>, tpm: Option<u64>) -> KeyRate {
        KeyRate {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        }
    }

    fn state(limit: u64, remaining: u64, reset_ms: u64) -> AxisState {
        AxisState {
            limit,
            remaining,
            reset_ms,
        }
    }

    const T0: i64 = 1_700_000_000_000;

    /// An admission whose headers the test does not read (it keeps its whole charge).
    fn admitted(result: Result<Admission, Refusal>) {
        assert!(result.is_ok(), "{:?}", result.err());
    }

    #[test]
    fn requests_refill_continuously_at_the_per_minute_rate() {
        let rates = KeyRates::new(1000);
        let r = rate(Some(60), None);
        for i in 0..60 {
            let a = rates.admit(1, r, 0, T0).unwrap();
            // Remaining after this request; full again one second per request taken.
            assert_eq!(
                a.headers().requests,
                Some(state(60, 59 - i, (i + 1) * 1000))
            );
            assert_eq!(a.headers().tokens, None, "no token limit, no token headers");
        }
        let refused = rates.admit(1, r, 0, T0).unwrap_err();
        assert_eq!(refused.exhausted, Axis::Requests);
        assert_eq!(refused.retry_after_secs, 1);
        assert!(!refused.never_fits);
        assert_eq!(refused.headers.requests, Some(state(60, 0, 60_000)));
        assert!(
            refused.message.contains("Limit 60, Used 60, Requested 1")
                && refused.message.contains("try again in 1s"),
            "{}",
            refused.message
        );
        // One request a second: not a millisecond earlier.
        assert!(rates.admit(1, r, 0, T0 + 999).is_err());
        admitted(rates.admit(1, r, 0, T0 + 1000));
        assert!(rates.admit(1, r, 0, T0 + 1000).is_err());
        // Another key has its own bucket.
        admitted(rates.admit(2, r, 0, T0));
    }

    #[test]
    fn refill_is_exact_however_often_it_is_read() {
        // 7 tokens a minute: one every 8 571.43 ms, a rate that no whole number of milliseconds divides.
        let rates = KeyRates::new(1000);
        let r = rate(None, Some(7));
        admitted(rates.admit(1, r, 7, T0));
        let remaining = |t: i64| {
            // A bound of 0 takes nothing from the token bucket but brings it up to date.
            rates.admit(1, r, 0, t).unwrap().headers().tokens.unwrap()
        };
        for ms in 1..8571 {
            assert_eq!(remaining(T0 + ms).remaining, 0, "at {ms} ms");
        }
        assert_eq!(remaining(T0 + 8572).remaining, 1);
        for ms in 8573..60_000 {
            assert!(remaining(T0 + ms).remaining < 7, "at {ms} ms");
        }
        // Read 60 000 times, refilled exactly 7 tokens: no drift.
        assert_eq!(remaining(T0 + 60_000), state(7, 7, 0));
        let a = rates.admit(1, r, 7, T0 + 60_000).unwrap();
        assert_eq!(a.headers().tokens, Some(state(7, 0, 60_000)));
    }

    #[test]
    fn a_refused_request_takes_nothing_from_either_bucket() {
        let rates = KeyRates::new(1000);
        let r = rate(Some(10), Some(100));
        admitted(rates.admit(1, r, 90, T0));
        // Short of tokens: the request bucket is not charged either.
        let refused = rates.admit(1, r, 20, T0).unwrap_err();
        assert_eq!(refused.exhausted, Axis::Tokens);
        assert!(!refused.never_fits);
        assert_eq!(refused.headers.requests, Some(state(10, 9, 6000)));
        assert_eq!(refused.headers.tokens, Some(state(100, 10, 54_000)));
        // 10 tokens missing at 100 a minute: 6 s.
        assert_eq!(refused.retry_after_secs, 6);
        assert!(
            refused.message.contains("tokens per min (TPM)")
                && refused.message.contains("Limit 100, Used 90, Requested 20"),
            "{}",
            refused.message
        );
        let a = rates.admit(1, r, 10, T0).unwrap();
        assert_eq!(a.headers().requests, Some(state(10, 8, 12_000)));
        assert_eq!(a.headers().tokens, Some(state(100, 0, 60_000)));

        // Short of requests: the token bucket is not charged.
        let r = rate(Some(1), Some(100));
        admitted(rates.admit(2, r, 10, T0));
        let refused = rates.admit(2, r, 10, T0).unwrap_err();
        assert_eq!(refused.exhausted, Axis::Requests);
        assert_eq!(refused.retry_after_secs, 60);
        assert_eq!(refused.headers.tokens, Some(state(100, 90, 6000)));
    }

    #[test]
    fn when_both_axes_are_short_the_longer_wait_is_reported() {
        let rates = KeyRates::new(1000);
        let r = rate(Some(60), Some(60));
        for _ in 0..60 {
            admitted(rates.admit(1, r, 1, T0));
        }
        // Requests: 1 s for one. Tokens: 30 s for 30.
        let refused = rates.admit(1, r, 30, T0).unwrap_err();
        assert_eq!(
            (refused.exhausted, refused.retry_after_secs),
            (Axis::Tokens, 30)
        );
        let refused = rates.admit(1, r, 1, T0).unwrap_err();
        assert_eq!(refused.exhausted, Axis::Requests);
        assert_eq!(refused.retry_after_secs, 1);
        // Retry-After is whole seconds, rounded up, and at least 1.
        let refused = rates.admit(1, r, 1, T0 + 999).unwrap_err();
        assert_eq!(refused.retry_after_secs, 1);
        assert!(
            refused.message.contains("try again in 1ms"),
            "{}",
            refused.message
        );
        admitted(rates.admit(1, r, 1, T0 + 1000));
    }

    #[test]
    fn a_bound_beyond_the_whole_capacity_never_fits() {
        let rates = KeyRates::new(1000);
        let r = rate(Some(10), Some(1000));
        let refused = rates.admit(1, r, 1001, T0).unwrap_err();
        assert!(refused.never_fits);
        assert_eq!(
            (refused.exhausted, refused.retry_after_secs),
            (Axis::Tokens, 0)
        );
        assert!(
            refused.message.contains("Limit 1000, Requested 1001")
                && refused.message.contains("max_tokens"),
            "{}",
            refused.message
        );
        assert_eq!(refused.headers.tokens, Some(state(1000, 1000, 0)));
        assert_eq!(rates.tracked(), 0, "a refused, full key is not remembered");
        // It says so even when the request bucket is also empty: waiting would never help.
        for _ in 0..10 {
            admitted(rates.admit(1, r, 0, T0));
        }
        assert!(rates.admit(1, r, 1001, T0).unwrap_err().never_fits);
        assert!(!rates.admit(1, r, 1000, T0).unwrap_err().never_fits);
        // Exactly the capacity fits a full bucket.
        admitted(rates.admit(2, r, 1000, T0));
        // Huge bounds do not overflow.
        assert!(rates.admit(3, r, u64::MAX, T0).unwrap_err().never_fits);
    }

    #[test]
    fn settle_gives_back_the_unused_bound_and_never_more() {
        let rates = KeyRates::new(1000);
        let r = rate(Some(100), Some(1000));
        let a = rates.admit(1, r, 400, T0).unwrap();
        assert_eq!(a.headers().tokens.unwrap().remaining, 600);
        a.settle(150, T0);
        let b = rates.admit(1, r, 0, T0).unwrap();
        assert_eq!(b.headers().tokens.unwrap().remaining, 850);
        // The request itself stays counted.
        assert_eq!(b.headers().requests.unwrap().remaining, 98);

        // More than the bound used: nothing back, nothing more taken.
        let a = rates.admit(1, r, 100, T0).unwrap();
        a.settle(500, T0);
        let b = rates.admit(1, r, 0, T0).unwrap();
        assert_eq!(b.headers().tokens.unwrap().remaining, 750);

        // Dropped unsettled: the whole charge stays.
        drop(rates.admit(1, r, 250, T0).unwrap());
        let b = rates.admit(1, r, 0, T0).unwrap();
        assert_eq!(b.headers().tokens.unwrap().remaining, 500);

        // A refund after the bucket refilled never pushes it past its capacity.
        let late = rates.admit(1, r, 500, T0).unwrap();
        let b = rates.admit(1, r, 0, T0 + 60_000).unwrap();
        assert_eq!(b.headers().tokens, Some(state(1000, 1000, 0)));
        late.settle(0, T0 + 60_000);
        let b = rates.admit(1, r, 0, T0 + 60_000).unwrap();
        assert_eq!(b.headers().tokens, Some(state(1000, 1000, 0)));
        admitted(rates.admit(1, r, 1000, T0 + 60_000));
        assert!(rates.admit(1, r, 1, T0 + 60_000).is_err());
    }

    #[test]
    fn settle_does_not_feed_a_newer_bucket_of_a_forgotten_key() {
        // One key per shard at most: a second key in the same shard evicts the first.
        let rates = KeyRates::new(1);
        assert_eq!(rates.capacity(), SHARDS);
        let r = rate(None, Some(100));
        let a = rates.admit(1, r, 100, T0).unwrap();
        // Find another key of key 1's shard and let it push key 1 out (key 1 is the closest to full).
        let other = (2..)
            .find(|k| std::ptr::eq(rates.shard(*k), rates.shard(1)))
            .unwrap();
        admitted(rates.admit(other, r, 100, T0 + 30_000));
        // Key 1 comes back with a new bucket and spends it.
        admitted(rates.admit(1, r, 100, T0 + 30_000));
        // Its old admission's refund belongs to the forgotten bucket: the new one does not get it.
        a.settle(0, T0 + 30_000);
        assert!(rates.admit(1, r, 1, T0 + 30_000).is_err());
    }

    #[test]
    fn a_clock_going_backwards_mints_nothing() {
        let rates = KeyRates::new(1000);
        let r = rate(Some(60), Some(600));
        for _ in 0..60 {
            admitted(rates.admit(1, r, 10, T0 + 10_000));
        }
        assert!(rates.admit(1, r, 0, T0).is_err());
        // Back to the later time: the step back did not move the bucket's clock back, so nothing refilled twice.
        let refused = rates.admit(1, r, 0, T0 + 10_000).unwrap_err();
        assert_eq!(refused.headers.requests, Some(state(60, 0, 60_000)));
        assert_eq!(refused.headers.tokens, Some(state(600, 0, 60_000)));
        admitted(rates.admit(1, r, 10, T0 + 11_000));
        // A settle stamped before the bucket's time refunds but refills nothing.
        let a = rates.admit(2, r, 600, T0 + 20_000).unwrap();
        a.settle(300, T0);
        let b = rates.admit(2, r, 0, T0 + 20_000).unwrap();
        assert_eq!(b.headers().tokens.unwrap().remaining, 300);
        // Negative and extreme times neither panic nor overflow.
        admitted(rates.admit(3, r, 1, i64::MIN));
        admitted(rates.admit(3, r, 1, i64::MAX));
        admitted(rates.admit(3, r, 1, i64::MIN));
    }

    #[test]
    fn only_limited_axes_are_tracked_and_reported() {
        let rates = KeyRates::new(1000);
        for _ in 0..1000 {
            let a = rates.admit(1, KeyRate::default(), 1_000_000, T0).unwrap();
            assert_eq!(*a.headers(), RateHeaders::default());
        }
        assert_eq!(rates.tracked(), 0);
        let a = rates.admit(1, rate(None, Some(50)), 10, T0).unwrap();
        assert_eq!(a.headers().requests, None);
        let mut h = HeaderMap::new();
        a.headers().apply(&mut h);
        assert_eq!(h.len(), 3);
        assert!(h.get("x-ratelimit-limit-requests").is_none());
        assert_eq!(h["x-ratelimit-limit-tokens"], "50");
    }

    #[test]
    fn a_key_follows_its_products_rate_when_it_changes() {
        let rates = KeyRates::new(1000);
        for _ in 0..10 {
            admitted(rates.admit(1, rate(Some(10), None), 0, T0));
        }
        // A smaller rate: the key owes no more than the new capacity.
        let refused = rates.admit(1, rate(Some(5), None), 0, T0).unwrap_err();
        assert_eq!(refused.headers.requests, Some(state(5, 0, 60_000)));
        // No request limit any more: admitted, and no request headers.
        let a = rates.admit(1, rate(None, Some(100)), 1, T0).unwrap();
        assert_eq!(a.headers().requests, None);
        // The limit back: the bucket starts full (nothing was owed on an unlimited axis).
        let a = rates.admit(1, rate(Some(10), Some(100)), 1, T0).unwrap();
        assert_eq!(a.headers().requests, Some(state(10, 9, 6000)));
        // A zero (refused by the config) is read as one rather than dividing by zero.
        let a = rates.admit(2, rate(Some(0), Some(0)), 1, T0).unwrap();
        assert_eq!(a.headers().requests, Some(state(1, 0, 60_000)));
        assert!(rates.admit(2, rate(Some(0), Some(0)), 0, T0).is_err());
    }

    #[test]
    fn headers_match_openais_names_and_formats() {
        let h = RateHeaders {
            requests: Some(state(60, 59, 1000)),
            tokens: Some(state(150_000, 149_984, 360_000)),
        };
        let mut map = HeaderMap::new();
        map.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("7"),
        );
        h.apply(&mut map);
        let mut got: Vec<(String, String)> = map
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        got.sort();
        let mut want = [
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        want.sort();
        // An upstream's header is replaced, not doubled.
        assert_eq!(got, want);
        for (ms, text) in [
            (0, "0s"),
            (1, "1ms"),
            (20, "20ms"),
            (999, "999ms"),
            (1000, "1s"),
            (1500, "1.5s"),
            (17_280, "17.28s"),
            (1_001, "1.001s"),
            (59_999, "59.999s"),
            (60_000, "1m0s"),
            (61_500, "1m1.5s"),
            (360_000, "6m0s"),
            (3_600_000, "1h0m0s"),
            (90_061_001, "25h1m1.001s"),
        ] {
            assert_eq!(go_duration(ms), text, "{ms} ms");
        }
    }

    #[test]
    fn memory_is_bounded_and_full_buckets_go_first() {
        let rates = KeyRates::new(64);
        assert_eq!(rates.capacity(), 64);
        let r = rate(Some(1), None);
        for k in 0..10_000 {
            admitted(rates.admit(k, r, 0, T0));
        }
        assert!(rates.tracked() <= 64, "{}", rates.tracked());
        // A key that emptied its bucket is remembered while newcomers come and go: at T0 + 60 s the earlier keys
        // are full again (forgotten first), and the newcomers are closer to full than the limited key.
        let busy = -1;
        let later = T0 + 60_000;
        admitted(rates.admit(busy, r, 0, later));
        for k in 10_000..20_000 {
            admitted(rates.admit(k, rate(Some(60_000), None), 0, later));
        }
        assert!(rates.tracked() <= 64, "{}", rates.tracked());
        assert!(
            rates.admit(busy, r, 0, later).is_err(),
            "the limited key was forgotten"
        );
    }

    #[test]
    fn concurrent_admissions_take_exactly_the_capacity() {
        let rates = KeyRates::new(1000);
        let r = rate(Some(1000), Some(10_000));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let rates = rates.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| rates.admit(7, r, 7, T0).is_ok())
                        .count()
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        // 1 000 requests of 7 tokens need 7 000 of the 10 000 tokens: the request bucket decides.
        assert_eq!(admitted, 1000);
        let r = rate(None, Some(10_000));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let rates = rates.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| rates.admit(8, r, 7, T0).is_ok())
                        .count()
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 10_000 / 7);
    }
}
