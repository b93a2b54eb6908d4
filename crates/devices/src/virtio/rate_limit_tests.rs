use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn a_bucket_starts_full_and_refills_at_its_rate() {
    let t0 = Instant::now();
    // 1000 tokens/s, 100 ms of burst: 100 tokens.
    let mut b = TokenBucket::new(1000, 100, t0);
    assert_eq!(b.tokens(t0), 100);
    assert_eq!(b.ready_at(100, t0), None);
    b.take(100);
    assert_eq!(b.tokens(t0), 0);
    // 10 tokens need 10 ms.
    assert_eq!(b.ready_at(10, t0), Some(t0 + ms(10)));
    assert_eq!(b.tokens(t0 + ms(5)), 5);
    assert_eq!(b.ready_at(10, t0 + ms(10)), None);
    // Fractions are kept: 0.5 ms twice is one token.
    let mut b = TokenBucket::new(1000, 100, t0);
    b.take(100);
    b.refill(t0 + Duration::from_micros(500));
    assert_eq!(b.tokens(t0 + ms(1)), 1);
    // Refill stops at the burst.
    assert_eq!(b.tokens(t0 + ms(10_000)), 100);
}

#[test]
fn an_oversized_request_waits_for_a_full_bucket_then_goes_into_debt() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(1000, 100, t0);
    b.take(50);
    // 500 tokens never fit a 100-token bucket: it waits until full (50 ms), not forever.
    assert_eq!(b.ready_at(500, t0), Some(t0 + ms(50)));
    let t1 = t0 + ms(50);
    assert_eq!(b.ready_at(500, t1), None);
    b.take(500);
    assert_eq!(b.tokens(t1), -400);
    // Paying the debt back takes 400 ms before even one token is there.
    assert_eq!(b.ready_at(1, t1), Some(t1 + ms(401)));
}

#[test]
fn huge_and_zero_values_neither_overflow_nor_divide_by_zero() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(u64::MAX, u64::MAX, t0);
    assert!(b.tokens(t0) > 0);
    assert_eq!(b.ready_at(u64::MAX, t0), None);
    b.take(u64::MAX);
    assert!(b.ready_at(u64::MAX, t0).is_some());
    // Years later the bucket is full again, no wrap-around.
    let later = t0 + Duration::from_secs(10 * 365 * 86400);
    assert_eq!(b.ready_at(u64::MAX, later), None);
    let mut z = TokenBucket::new(0, 0, t0);
    assert_eq!(z.tokens(t0), 1);
    z.take(1);
    assert_eq!(z.ready_at(1, t0), Some(t0 + ms(1000)));
    // An earlier instant than the last one adds nothing and does not panic.
    assert_eq!(z.tokens(t0 - ms(1)), 0);
    // The largest debt at the smallest rate: a far deadline, no overflow on the addition.
    let mut d = TokenBucket::new(1, 1000, t0);
    assert_eq!(d.ready_at(u64::MAX, t0), None);
    d.take(u64::MAX);
    assert!(d.ready_at(1, t0).unwrap() > t0 + Duration::from_secs(86400 * 365));
}

#[test]
fn a_limiter_needs_room_in_every_bucket_and_charges_only_when_allowed() {
    let t0 = Instant::now();
    assert!(RateLimiter::new(Limits::default(), t0).is_none());
    let limits = Limits {
        bytes: Some(10_000),
        ops: Some(100),
        burst_ms: 100,
    };
    // 1000 bytes and 10 operations of burst.
    let mut l = RateLimiter::new(limits, t0).unwrap();
    for _ in 0..10 {
        assert_eq!(l.try_consume(10, t0), None);
    }
    // Operations ran out, bytes did not: the wait is the ops bucket's (10 ms per op).
    assert_eq!(l.try_consume(10, t0), Some(t0 + ms(10)));
    let t1 = t0 + ms(10);
    assert_eq!(l.try_consume(10, t1), None);
    // Now bytes: 900 left plus 100 refilled; 1000 fits after the refill of an op.
    let t2 = t1 + ms(10);
    assert_eq!(l.check(1000, t2), None);
    assert_eq!(
        l.check(1001, t2),
        None,
        "oversized, but the byte bucket is full"
    );
    l.consume(1001);
    // A refused check charged nothing: the ops bucket still has its token after refusals.
    let wait = l.try_consume(1, t2).unwrap();
    assert!(wait > t2);
    assert_eq!(l.ops.as_mut().unwrap().tokens(t2), 0);
}

#[test]
fn the_refill_timer_keeps_the_earliest_deadline_per_queue() {
    let t0 = Instant::now();
    let timer = RefillTimer::new();
    timer.arm(1, t0 + ms(20));
    timer.arm(1, t0 + ms(10));
    timer.arm(1, t0 + ms(30));
    assert_eq!(timer.due(1), Some(t0 + ms(10)));
    assert_eq!(timer.due(0), None);
    assert!(timer.take_due(t0).is_empty());
    assert_eq!(timer.take_due(t0 + ms(10)), vec![1]);
    assert_eq!(timer.due(1), None);
}

#[test]
fn the_refill_thread_kicks_due_queues_and_not_while_paused() {
    use std::sync::mpsc;
    let timer = RefillTimer::new();
    let (tx, rx) = mpsc::channel();
    let worker = timer
        .spawn(
            "test",
            Box::new(move |q| {
                let _ = tx.send(q);
                true
            }),
        )
        .unwrap();
    timer.arm(3, Instant::now() + ms(20));
    assert_eq!(rx.recv_timeout(ms(5000)), Ok(3));
    timer.set_paused(true);
    timer.arm(2, Instant::now());
    assert!(rx.recv_timeout(ms(100)).is_err(), "kicked while paused");
    timer.set_paused(false);
    assert_eq!(rx.recv_timeout(ms(5000)), Ok(2));
    drop(worker);
    assert!(rx.recv_timeout(ms(50)).is_err());
}

#[test]
fn a_changed_bucket_keeps_its_tokens_and_its_debt() {
    let t0 = Instant::now();
    // 1000 tokens/s, 100 ms: 100 tokens; 60 spent.
    let mut b = TokenBucket::new(1000, 100, t0);
    b.take(60);
    // 10 ms later, at the old rate: 50. Raising the rate grants no fresh burst...
    b.reconfigure(10_000, 100, t0 + ms(10));
    assert_eq!(b.tokens(t0 + ms(10)), 50);
    // ...but refills at the new rate from then on, up to the new capacity (1000).
    assert_eq!(b.tokens(t0 + ms(20)), 150);
    assert_eq!(b.tokens(t0 + ms(1000)), 1000);
    // Lowering the capacity cuts what is held to it.
    b.reconfigure(100, 100, t0 + ms(1000));
    assert_eq!(b.tokens(t0 + ms(1000)), 10);
    // A debt stays owed across a change: 90 tokens short at 100/s is 900 ms.
    b.take(100);
    b.reconfigure(100, 50, t0 + ms(1000));
    assert_eq!(b.tokens(t0 + ms(1000)), -90);
    assert_eq!(b.ready_at(1, t0 + ms(1000)), Some(t0 + ms(1910)));
}

#[test]
fn a_limiter_update_adds_keeps_and_removes_buckets() {
    let t0 = Instant::now();
    let both = Limits {
        bytes: Some(10_000),
        ops: Some(100),
        burst_ms: 100,
    };
    let mut l = RateLimiter::new(both, t0).unwrap();
    l.consume(600);
    // Ops removed, bytes kept with their 400 tokens, rate doubled.
    let bytes_only = Limits {
        bytes: Some(20_000),
        ops: None,
        burst_ms: 100,
    };
    assert!(l.update(bytes_only, t0));
    assert!(l.ops.is_none());
    assert_eq!(l.bytes.as_mut().unwrap().tokens(t0), 400);
    // A new ops bucket starts full (its burst), as it would at start.
    let t1 = t0 + ms(5);
    assert!(l.update(both, t1));
    assert_eq!(l.ops.as_mut().unwrap().tokens(t1), 10);
    // 5 ms at 20,000/s added 100 before the change back to 10,000/s.
    assert_eq!(l.bytes.as_mut().unwrap().tokens(t1), 500);
    // Nothing left to limit.
    assert!(!l.update(Limits::default(), t1));
}

#[test]
fn a_throttle_update_creates_drops_and_serves_a_waiting_queue_again() {
    let timer = RefillTimer::new();
    let limits = Limits {
        bytes: None,
        ops: Some(10),
        burst_ms: 100,
    };
    let mut slot = None;
    Throttle::update(&mut slot, limits, 1, &timer);
    assert!(slot.is_some());
    assert_eq!(
        timer.due(1),
        None,
        "nothing waited on a queue that had no limit"
    );
    let t = slot.as_mut().unwrap();
    assert!(t.admit(0));
    assert!(!t.admit(0), "one request of burst");
    let refill = timer.due(1).unwrap();
    assert!(refill > Instant::now() + ms(50));
    // A change serves the waiting queue now instead of at the old rate's deadline.
    Throttle::update(
        &mut slot,
        Limits {
            ops: Some(1000),
            ..limits
        },
        1,
        &timer,
    );
    assert!(timer.due(1).unwrap() < refill);
    Throttle::update(&mut slot, Limits::default(), 1, &timer);
    assert!(slot.is_none());
}
