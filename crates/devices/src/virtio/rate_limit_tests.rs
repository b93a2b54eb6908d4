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
