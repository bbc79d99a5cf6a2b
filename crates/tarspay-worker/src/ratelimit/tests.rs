//! Against a private redis-server (local-redis), never the shared one. Correctness is judged
//! on the server's own clock as the script reports it (each decision carries the server's
//! `TIME`), so a slow machine changes how many calls fit in a span, never whether a decision
//! was right. Wall-clock bounds here are hang guards, generous by design.

use super::*;
use crate::redis_conn::RedisClient;
use local_redis::{Durability, LocalRedis};
use std::time::Instant;

fn start() -> LocalRedis {
    LocalRedis::start(Durability::Off).expect("redis-server on PATH")
}

/// A connection of its own (one per "process").
fn connect(redis: &LocalRedis) -> RedisConn {
    RedisClient::single(redis.url())
        .and_then(|client| client.connect(Default::default()))
        .expect("client")
}

fn limit(per_second: u32, burst: u32, max_in_flight: Option<u32>) -> RateLimit {
    RateLimit {
        per_second,
        burst,
        max_in_flight,
    }
}

fn limiter(conn: RedisConn, merchant: &str, limit: RateLimit) -> Limiter {
    Limiter::new(conn, "t", merchant, limit, Duration::from_secs(30)).expect("valid limiter")
}

/// The GCRA by the book, fed the server's clock of each decision: the script must answer
/// exactly as it does.
struct Model {
    interval: u64,
    tolerance: u64,
    tat: u64,
}

impl Model {
    fn new(limit: RateLimit) -> Self {
        Self {
            interval: limit.interval_us(),
            tolerance: limit.tolerance_us(),
            tat: 0,
        }
    }

    /// `None` when granted, else the wait in µs.
    fn decide(&mut self, now: u64) -> Option<u64> {
        let tat = self.tat.max(now);
        let conforming_at = tat.saturating_sub(self.tolerance);
        if conforming_at > now {
            Some(conforming_at - now)
        } else {
            self.tat = tat + self.interval;
            None
        }
    }
}

/// `calls` decisions in a row, each checked against the model; returns them.
async fn checked_run(limiter: &Limiter, calls: usize) -> Vec<Decision> {
    let mut model = Model::new(limiter.limit());
    let mut decisions = Vec::with_capacity(calls);
    for _ in 0..calls {
        let (decision, permit) = limiter.decide().await.unwrap();
        assert_eq!(
            decision.wait_us,
            model.decide(decision.now_us),
            "decision {} of {decisions:?}",
            decisions.len()
        );
        assert_eq!(permit.is_some(), decision.wait_us.is_none());
        decisions.push(decision);
    }
    decisions
}

async fn granted(limiter: &Limiter) -> Permit {
    match limiter.try_acquire().await.unwrap() {
        Acquire::Granted(permit) => permit,
        Acquire::Wait(wait) => panic!("{}: refused, wait {wait:?}", limiter.merchant()),
    }
}

async fn refused(limiter: &Limiter) -> Duration {
    match limiter.try_acquire().await.unwrap() {
        Acquire::Wait(wait) => wait,
        Acquire::Granted(permit) => panic!("{}: granted {permit:?}", limiter.merchant()),
    }
}

#[tokio::test]
async fn rate_is_one_per_emission_interval_and_refusals_consume_nothing() {
    let redis = start();
    let limiter = limiter(connect(&redis), "default", limit(10, 1, None));
    let decisions = checked_run(&limiter, 40).await;

    let grants: Vec<u64> = decisions
        .iter()
        .filter(|d| d.wait_us.is_none())
        .map(|d| d.now_us)
        .collect();
    let first = decisions[0].now_us;
    let last = decisions[decisions.len() - 1].now_us;
    // The count the server's clock allows: one at the start, then one per 100 ms.
    assert_eq!(grants.len() as u64, 1 + (last - first) / 100_000);
    assert_eq!(grants[0], first);
    for pair in grants.windows(2) {
        assert!(pair[1] - pair[0] >= 100_000, "grants {grants:?}");
    }
    // Each refusal names the next grant time: at most one interval away, and the first one
    // after a grant is the interval minus the time since that grant.
    for decision in &decisions {
        if let Some(wait) = decision.wait_us {
            assert!((1..=100_000).contains(&wait), "{decision:?}");
        }
    }
    if let Some(refusal) = decisions.get(1).filter(|d| d.wait_us.is_some()) {
        assert_eq!(
            refusal.wait_us,
            Some(first + 100_000 - refusal.now_us),
            "the wait is the emission interval from the grant"
        );
    }

    // The public answer: a wait of about one interval, after which a call is granted.
    let started = Instant::now();
    let permit = limiter.acquire(Duration::from_secs(5)).await.unwrap();
    let wait = refused(&limiter).await;
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(100),
        "{wait:?}"
    );
    let next = limiter.acquire(Duration::from_secs(5)).await.unwrap();
    assert!(next.granted_at_us() - permit.granted_at_us() >= 100_000);
    assert!(started.elapsed() < Duration::from_secs(5), "hang guard");
    assert_eq!(permit.lease_token(), None);
    assert_eq!(permit.merchant(), "default");
}

#[tokio::test]
async fn a_burst_is_granted_at_once_then_calls_wait() {
    let redis = start();
    // One call per second: the burst's five grants all fall well inside one interval.
    let limiter = limiter(connect(&redis), "default", limit(1, 5, None));
    let decisions = checked_run(&limiter, 8).await;
    let span = decisions[7].now_us - decisions[0].now_us;
    assert!(span < 1_000_000, "8 calls took {span} µs (hang guard)");
    let outcomes: Vec<bool> = decisions.iter().map(|d| d.wait_us.is_none()).collect();
    assert_eq!(
        outcomes,
        [true, true, true, true, true, false, false, false]
    );
    // The sixth call conforms one interval after the first grant.
    let sixth = decisions[5];
    assert_eq!(
        sixth.wait_us,
        Some(decisions[0].now_us + 1_000_000 - sixth.now_us)
    );
}

#[tokio::test]
async fn in_flight_cap_waits_for_a_release() {
    let redis = start();
    let limiter = limiter(connect(&redis), "default", limit(1000, 100, Some(2)));
    let one = granted(&limiter).await;
    let two = granted(&limiter).await;
    assert_ne!(one.lease_token(), two.lease_token());
    assert_eq!(one.lease_token().map(str::len), Some(32));
    // Full: the hint is the poll interval (the leases expire in 30 s).
    let wait = refused(&limiter).await;
    assert!(
        wait >= IN_FLIGHT_POLL_MIN && wait <= IN_FLIGHT_POLL_MAX,
        "{wait:?}"
    );
    // The refusals consumed nothing: after a release, exactly one more fits.
    for _ in 0..5 {
        refused(&limiter).await;
    }
    assert!(limiter.release(one.clone()).await.unwrap());
    let three = granted(&limiter).await;
    refused(&limiter).await;
    // A second release of the same permit is harmless and frees nothing.
    assert!(!limiter.release(one).await.unwrap());
    refused(&limiter).await;

    // acquire() waits for a release made meanwhile by another holder.
    let waiter = {
        let limiter = limiter.clone();
        tokio::spawn(async move { limiter.acquire(Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "granted while full");
    assert!(limiter.release(two).await.unwrap());
    let four = waiter.await.unwrap().unwrap();
    assert!(limiter.release(three).await.unwrap());
    assert!(limiter.release(four).await.unwrap());
    let mut conn = connect(&redis);
    let left: i64 = redis::cmd("EXISTS")
        .arg("{t:ratelimit:default}:inflight")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "no lease left once all are released");
}

#[tokio::test]
async fn an_unreleased_lease_frees_itself_after_its_ttl() {
    let redis = start();
    let ttl = Duration::from_millis(300);
    let limiter = Limiter::new(
        connect(&redis),
        "t",
        "default",
        limit(1000, 100, Some(1)),
        ttl,
    )
    .unwrap();
    // A worker takes the slot and dies without releasing it.
    let lost = granted(&limiter).await;
    let wait = refused(&limiter).await;
    assert!(wait <= Duration::from_millis(300), "{wait:?}");
    let started = Instant::now();
    let next = loop {
        if let Acquire::Granted(permit) = limiter.try_acquire().await.unwrap() {
            break permit;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "hang guard");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        next.granted_at_us() - lost.granted_at_us() >= 300_000,
        "freed only once expired: {lost:?} {next:?}"
    );
    // The late release of the expired lease frees nothing (the slot is the new holder's).
    assert!(!limiter.release(lost).await.unwrap());
    refused(&limiter).await;
    assert!(limiter.release(next).await.unwrap());
    granted(&limiter).await;
}

#[tokio::test]
async fn slow_down_blocks_grants_until_its_end_then_resumes_without_a_burst() {
    let redis = start();
    let limiter = limiter(connect(&redis), "default", limit(10, 5, None));
    granted(&limiter).await;
    let until = limiter
        .slow_down_until_us(Duration::from_millis(500))
        .await
        .unwrap();
    let wait = refused(&limiter).await;
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(500),
        "{wait:?}"
    );
    // A shorter Retry-After later does not cut the pause.
    limiter.slow_down(Duration::from_millis(10)).await.unwrap();
    let started = Instant::now();
    let first = limiter.acquire(Duration::from_secs(5)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "hang guard");
    assert!(
        first.granted_at_us() >= until,
        "granted at {} before the pause's end {until}",
        first.granted_at_us()
    );
    // No burst after the pause: the burst credit is spent, so the next call waits for the
    // rate's schedule, which starts at the pause's end (not at the first grant, which the
    // jitter may have made a little late).
    let wait = refused(&limiter).await;
    assert!(wait <= Duration::from_millis(100), "{wait:?}");
    let second = limiter.acquire(Duration::from_secs(5)).await.unwrap();
    assert!(
        second.granted_at_us() >= until + 100_000,
        "second grant at {}, pause ended {until}",
        second.granted_at_us()
    );
    let wait = refused(&limiter).await;
    assert!(wait > Duration::ZERO, "{wait:?}");

    // A pause beyond max_wait is refused at once, without sleeping towards it.
    limiter.slow_down(Duration::from_secs(60)).await.unwrap();
    let started = Instant::now();
    match limiter.acquire(Duration::from_secs(1)).await {
        Err(LimiterError::Timeout { retry_after, .. }) => {
            assert!(retry_after > Duration::from_secs(50), "{retry_after:?}")
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(900));
}

#[tokio::test]
async fn two_processes_share_one_limit() {
    let redis = start();
    let rate = limit(1, 3, Some(2));
    let a = limiter(connect(&redis), "default", rate);
    let b = limiter(connect(&redis), "default", rate);
    // Rate: three grants in all, whoever asks.
    let first = granted(&a).await;
    let second = granted(&b).await;
    // In flight: two slots in all.
    refused(&a).await;
    refused(&b).await;
    // A release by one process frees the slot for the other.
    assert!(a.release(first).await.unwrap());
    let third = granted(&b).await;
    assert!(b.release(second).await.unwrap());
    // The burst of three is spent across both: the next call waits for the rate.
    let wait = refused(&a).await;
    assert!(wait > Duration::from_millis(500), "{wait:?}");
    refused(&b).await;
    // Either may release the other's permit (a permit is a plain value).
    assert!(a.release(third).await.unwrap());
    // A slow-down by one holds the other.
    let c = limiter(connect(&redis), "kenya", limit(100, 10, None));
    let d = limiter(connect(&redis), "kenya", limit(100, 10, None));
    c.slow_down(Duration::from_secs(10)).await.unwrap();
    assert!(refused(&d).await > Duration::from_secs(9));
}

#[tokio::test]
async fn merchants_are_independent_and_their_keys_expire() {
    let redis = start();
    let rate = limit(1, 1, Some(1));
    let kenya = limiter(connect(&redis), "kenya", rate);
    let default = limiter(connect(&redis), "default", rate);
    granted(&kenya).await;
    refused(&kenya).await;
    kenya.slow_down(Duration::from_secs(5)).await.unwrap();
    // Another merchant is untouched by the first's rate, leases and slow-down.
    let permit = granted(&default).await;
    assert!(default.release(permit).await.unwrap());

    let mut conn = connect(&redis);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut keys = keys;
    keys.sort();
    assert_eq!(
        keys,
        [
            "{t:ratelimit:default}:tat",
            "{t:ratelimit:kenya}:inflight",
            "{t:ratelimit:kenya}:slowed",
            "{t:ratelimit:kenya}:tat",
        ]
    );
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        // tat: until it stops mattering (≤ the pause + one interval); inflight: the lease's
        // 30 s; slowed: the 5 s pause. Each a little over, never without expiry.
        assert!(ttl > 0 && ttl <= 31_000, "{key}: PTTL {ttl}");
    }
    // Same slot for every key of a merchant (the hash tag), so the script is cluster-safe.
    let slots: Vec<u16> = keys
        .iter()
        .filter(|k| k.contains("kenya"))
        .map(|k| crate::partition::slot(k))
        .collect();
    assert!(slots.windows(2).all(|p| p[0] == p[1]), "{slots:?}");
}

#[tokio::test]
async fn bad_values_are_refused_naming_the_field() {
    let cases = [
        (limit(0, 1, None), "per_second"),
        (limit(MAX_PER_SECOND + 1, 1, None), "per_second"),
        (limit(10, 0, None), "burst"),
        (limit(10, MAX_BURST + 1, None), "burst"),
        (limit(10, 1, Some(0)), "max_in_flight"),
    ];
    for (bad, field) in cases {
        let error = bad.validate().unwrap_err();
        assert_eq!(error.field(), field);
        assert!(error.to_string().starts_with(field), "{error}");
    }
    assert_eq!(limit(1, 1, Some(1)).validate(), Ok(()));

    // Limiter::new checks the limit and its own arguments before any Redis traffic (the
    // connection is lazy and points nowhere).
    let conn = RedisClient::single("redis://127.0.0.1:1/")
        .and_then(|client| client.connect(Default::default()))
        .unwrap();
    let ttl = Duration::from_secs(1);
    let new = |prefix: &str, merchant: &str, rate: RateLimit, ttl: Duration| {
        Limiter::new(conn.clone(), prefix, merchant, rate, ttl)
            .unwrap_err()
            .to_string()
    };
    assert!(new("t", "m", limit(10, 0, None), ttl).contains("burst"));
    assert!(new("t", "", limit(10, 1, None), ttl).contains("merchant"));
    assert!(new("t", "a}b", limit(10, 1, None), ttl).contains("merchant"));
    assert!(new("", "m", limit(10, 1, None), ttl).contains("prefix"));
    assert!(new("t", "m", limit(10, 1, None), Duration::ZERO).contains("lease_ttl"));
    assert!(Limiter::new(conn, "t", "m", limit(10, 1, None), ttl).is_ok());
}

/// Four tasks hammer one limiter at 20/s, burst 2, for 3 s: in any 1-s span of the server's
/// clock, at most 20 + 2 grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_never_exceed_rate_plus_burst_in_any_second() {
    let redis = start();
    let rate = limit(20, 2, None);
    let run_for = Duration::from_secs(3);
    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            // Separate connections, as separate processes would have.
            let limiter = limiter(connect(&redis), "default", rate);
            tokio::spawn(async move {
                let mut grants = Vec::new();
                while started.elapsed() < run_for {
                    let permit = limiter.acquire(Duration::from_secs(2)).await.unwrap();
                    grants.push(permit.granted_at_us());
                }
                grants
            })
        })
        .collect();
    let mut grants = Vec::new();
    for task in tasks {
        grants.extend(task.await.unwrap());
    }
    assert!(started.elapsed() < Duration::from_secs(10), "hang guard");
    grants.sort_unstable();
    // Every window starting at a grant, closed at both ends (the strictest reading).
    let mut busiest = 0;
    for (i, &start) in grants.iter().enumerate() {
        let within = grants[i..]
            .iter()
            .take_while(|&&t| t <= start + 1_000_000)
            .count();
        busiest = busiest.max(within);
    }
    eprintln!("{} grants, at most {busiest} in one second", grants.len());
    assert!(busiest <= 22, "{busiest} grants in one second: {grants:?}");
    // The limiter let calls through at all (not a speed assertion: 62 is the most possible).
    let span = grants[grants.len() - 1] - grants[0];
    assert!(grants.len() as u64 >= 2 + span / 50_000 / 2, "{grants:?}");
}

/// On a 3-master Redis Cluster every script call touches one slot (no CROSSSLOT), and
/// merchants on different masters each get their own limit.
#[tokio::test]
async fn runs_on_a_redis_cluster() {
    let cluster = local_redis::LocalCluster::start(3, 0).expect("a local cluster");
    let client = RedisClient::open(&cluster.seeds(), crate::redis_conn::ClusterMode::On)
        .await
        .unwrap();
    assert!(client.is_cluster());
    let conn = client.connect(Default::default()).unwrap();
    // Merchants whose keys live on at least two different masters.
    let mut masters = std::collections::BTreeMap::new();
    for i in 0..50 {
        let merchant = format!("m{i}");
        let slot = crate::partition::slot(&Keys::new("t", &merchant).tat);
        if let Some(master) = cluster.master_of_slot(slot) {
            masters.entry(master).or_insert(merchant);
        }
    }
    assert!(masters.len() >= 2, "{masters:?}");
    for merchant in masters.values() {
        let limiter = limiter(conn.clone(), merchant, limit(1, 1, Some(1)));
        let permit = granted(&limiter).await;
        refused(&limiter).await;
        assert!(limiter.release(permit).await.unwrap());
        limiter.slow_down(Duration::from_secs(5)).await.unwrap();
        assert!(refused(&limiter).await > Duration::from_secs(4));
    }
}
