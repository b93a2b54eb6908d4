//! Token-bucket rate limiting for virtio queues (disk bytes/s and ops/s, net bytes/s and
//! packets/s per direction).
//!
//! A bucket holds up to `burst` tokens and gains `rate` tokens per second. A request takes
//! its cost when the tokens are there. A request costing more than the whole bucket would
//! never fit, so it is allowed when the bucket is full and drives it into debt (as
//! Firecracker does): the average rate still holds. Time comes in as an argument, so tests
//! drive the clock. Arithmetic is in nano-tokens on `i128`: a second's refill of the largest
//! rate is far from overflowing, and fractional refills are not lost between calls.
//!
//! A device that is refused leaves the chain in the ring and arms its [`RefillTimer`] for the
//! instant the tokens will be there, so a limited queue neither blocks a vCPU nor spins.
//! Limits can change while the device runs ([`Throttle::update`]); the buckets keep the
//! tokens they hold.

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use super::refill::{RefillTimer, RefillWorker};

const NANOS: i128 = 1_000_000_000;
/// Largest rate a bucket accepts (tokens per second); specs are validated well below.
pub const MAX_RATE: u64 = 1 << 50;
/// Longest burst, in milliseconds of traffic at the full rate.
pub const MAX_BURST_MS: u64 = 60_000;
/// Burst when none is given: a tenth of a second at the full rate.
pub const DEFAULT_BURST_MS: u64 = 100;

/// One bucket: `rate` tokens per second, holding at most `capacity`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: i128,
    /// In nano-tokens.
    capacity: i128,
    /// In nano-tokens; negative while in debt.
    level: i128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` tokens/s holding `burst_ms` milliseconds of them (at least
    /// one token). Out-of-range arguments are clamped: zero rate to 1, huge ones to the maxima.
    pub fn new(rate: u64, burst_ms: u64, now: Instant) -> TokenBucket {
        let rate = i128::from(rate.clamp(1, MAX_RATE));
        let burst_ms = i128::from(burst_ms.clamp(1, MAX_BURST_MS));
        let tokens = (rate * burst_ms / 1000).max(1);
        let capacity = tokens * NANOS;
        TokenBucket {
            rate,
            capacity,
            level: capacity,
            last: now,
        }
    }

    /// Whole tokens in the bucket now (negative in debt).
    pub fn tokens(&mut self, now: Instant) -> i128 {
        self.refill(now);
        self.level.div_euclid(NANOS)
    }

    fn refill(&mut self, now: Instant) {
        // A clock that went backwards (it cannot with Instant, but tests pass any) adds nothing.
        let dt = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        let ns = i128::try_from(dt.as_nanos()).unwrap_or(i128::MAX / 2);
        // Bounded: rate ≤ 2^50 and a refill beyond a full bucket is cut at capacity.
        let gain = self.rate.saturating_mul(ns);
        self.level = self.level.saturating_add(gain).min(self.capacity);
    }

    /// When `cost` tokens can be taken: `None` if now, else the instant they will be there.
    fn ready_at(&mut self, cost: u64, now: Instant) -> Option<Instant> {
        self.refill(now);
        let need = i128::from(cost) * NANOS;
        // An oversized request waits for a full bucket, then goes into debt.
        let need = need.min(self.capacity);
        if self.level >= need {
            return None;
        }
        let missing = need - self.level;
        // Round up, so a wake-up never comes a nanosecond early and finds too little.
        let ns = (missing + self.rate - 1) / self.rate;
        let ns = u64::try_from(ns).unwrap_or(u64::MAX);
        // A debt of 2^64 tokens at 1 token/s lies beyond what Instant can hold: cap at a
        // century, which for the guest is "stopped", without panicking on the addition.
        let wait = Duration::from_nanos(ns).min(Duration::from_secs(100 * 365 * 86400));
        Some(now.checked_add(wait).unwrap_or(now))
    }

    fn take(&mut self, cost: u64) {
        self.level -= i128::from(cost) * NANOS;
    }

    /// Gives the bucket a new rate and burst while it is in use. Time up to `now` still
    /// counts at the old rate, and the tokens held stay held (cut to the new capacity; a debt
    /// stays owed), so a change neither hands out a fresh burst nor forgives past traffic.
    fn reconfigure(&mut self, rate: u64, burst_ms: u64, now: Instant) {
        self.refill(now);
        let fresh = TokenBucket::new(rate, burst_ms, now);
        self.rate = fresh.rate;
        self.capacity = fresh.capacity;
        self.level = self.level.min(self.capacity);
    }
}

/// What one device direction may do: optional bytes and operations buckets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes per second.
    pub bytes: Option<u64>,
    /// Requests (disk) or frames (net) per second.
    pub ops: Option<u64>,
    /// Milliseconds of traffic at the full rate that may go at once after a quiet time.
    pub burst_ms: u64,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }

    /// The burst in force: the default when none is given.
    fn burst(&self) -> u64 {
        if self.burst_ms == 0 {
            DEFAULT_BURST_MS
        } else {
            self.burst_ms
        }
    }
}

/// New limits for a whole device while it runs ([`super::VirtioDevice::update_limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSet {
    /// A disk's reads and writes together.
    Disk(Limits),
    /// A network device's directions: rx is host to guest, tx guest to host.
    Net { rx: Limits, tx: Limits },
}

/// The buckets of one direction; a request goes only when every bucket has room.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// `None` when `limits` limits nothing, so unlimited devices pay nothing.
    pub fn new(limits: Limits, now: Instant) -> Option<RateLimiter> {
        if limits.is_unlimited() {
            return None;
        }
        let burst = limits.burst();
        Some(RateLimiter {
            bytes: limits.bytes.map(|r| TokenBucket::new(r, burst, now)),
            ops: limits.ops.map(|r| TokenBucket::new(r, burst, now)),
        })
    }

    /// Applies new limits at `now`: a bucket that stays keeps its tokens
    /// ([`TokenBucket::reconfigure`]), a new one starts full as at start, a removed one goes.
    /// Returns whether anything is still limited.
    pub fn update(&mut self, limits: Limits, now: Instant) -> bool {
        let burst = limits.burst();
        let apply = |bucket: Option<TokenBucket>, rate: Option<u64>| match (bucket, rate) {
            (_, None) => None,
            (None, Some(r)) => Some(TokenBucket::new(r, burst, now)),
            (Some(mut b), Some(r)) => {
                b.reconfigure(r, burst, now);
                Some(b)
            }
        };
        self.bytes = apply(self.bytes.take(), limits.bytes);
        self.ops = apply(self.ops.take(), limits.ops);
        self.bytes.is_some() || self.ops.is_some()
    }

    /// `None` when a request of `bytes` (one operation) may go now, else when it may.
    pub fn check(&mut self, bytes: u64, now: Instant) -> Option<Instant> {
        let a = self.bytes.as_mut().and_then(|b| b.ready_at(bytes, now));
        let b = self.ops.as_mut().and_then(|b| b.ready_at(1, now));
        a.max(b)
    }

    /// Charges a request that [`check`](Self::check) allowed.
    pub fn consume(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bytes {
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(1);
        }
    }

    /// Checks and, when allowed, charges.
    pub fn try_consume(&mut self, bytes: u64, now: Instant) -> Option<Instant> {
        let wait = self.check(bytes, now);
        if wait.is_none() {
            self.consume(bytes);
        }
        wait
    }
}

/// Where a device reads the time; tests substitute their own.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// A limiter bound to the queue it guards and the timer that resumes that queue.
pub struct Throttle {
    limiter: RateLimiter,
    queue: usize,
    timer: Arc<RefillTimer>,
    clock: Clock,
}

impl Throttle {
    /// `None` when `limits` limit nothing.
    pub fn new(limits: Limits, queue: usize, timer: Arc<RefillTimer>) -> Option<Throttle> {
        let clock: Clock = Arc::new(Instant::now);
        Some(Throttle {
            limiter: RateLimiter::new(limits, clock())?,
            queue,
            timer,
            clock,
        })
    }

    /// Sets the limits of the device direction whose throttle `slot` holds (`None`: unlimited)
    /// while the device runs; buckets keep their tokens ([`RateLimiter::update`]). A queue
    /// that was limited is served again at once, so requests waiting for tokens at the old
    /// rate are measured against the new one (and go now if the limit was lifted).
    pub fn update(
        slot: &mut Option<Throttle>,
        limits: Limits,
        queue: usize,
        timer: &Arc<RefillTimer>,
    ) {
        let Some(t) = slot.as_mut() else {
            // Nothing can be waiting for tokens of a direction that had no limit.
            *slot = Throttle::new(limits, queue, timer.clone());
            return;
        };
        let now = (t.clock)();
        if !t.limiter.update(limits, now) {
            *slot = None;
        }
        timer.arm(queue, Instant::now());
    }

    /// Replaces the clock (tests), restarting the buckets full at the new clock's now.
    pub fn set_clock(&mut self, clock: Clock, limits: Limits) {
        if let Some(l) = RateLimiter::new(limits, clock()) {
            self.limiter = l;
        }
        self.clock = clock;
    }

    /// Whether a request of `bytes` may go now; when not, the timer is armed for when it may.
    pub fn check(&mut self, bytes: u64) -> bool {
        match self.limiter.check(bytes, (self.clock)()) {
            None => true,
            Some(at) => {
                self.timer.arm(self.queue, at);
                false
            }
        }
    }

    /// Charges a request [`check`](Self::check) allowed.
    pub fn consume(&mut self, bytes: u64) {
        self.limiter.consume(bytes);
    }

    /// Checks and, when allowed, charges.
    pub fn admit(&mut self, bytes: u64) -> bool {
        let ok = self.check(bytes);
        if ok {
            self.consume(bytes);
        }
        ok
    }
}

#[cfg(test)]
#[path = "rate_limit_tests.rs"]
mod tests;
