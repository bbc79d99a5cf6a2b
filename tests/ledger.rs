//! The order ledger against a real redis-server: registration, the submit lease, the one
//! final transition and its one outcome.

mod common;

use common::redis_server::RedisServer;
use std::time::Duration;
use tarspay_worker::ledger::history::OrderEvent;
use tarspay_worker::ledger::{
    FinalResult, Finalized, Ledger, LedgerKeys, NewOrder, OrderKind, OrderRecord, Phase,
    Registered, SubmitTicket,
};
use tarspay_worker::queue::QueueKeys;

const PAUSED: &str = "{ltest:payouts}:paused";

/// A checked value that lives as long as the test process (test orders borrow them).
fn typed<T: std::str::FromStr>(text: &str) -> &'static T
where
    T::Err: std::fmt::Debug,
{
    Box::leak(Box::new(text.parse().unwrap()))
}

fn order<'a>(id: &str, fingerprint: &'a str) -> NewOrder<'a> {
    NewOrder {
        mch_order_no: typed(id),
        kind: OrderKind::Payout,
        fingerprint,
        amount: "150.50",
        currency: typed("INR"),
        request: "{}",
        batch_id: Some(typed("B1")),
        merchant: typed("default"),
    }
}

fn queue_keys() -> QueueKeys {
    let keys = QueueKeys::new("ltest", "payouts").unwrap();
    assert_eq!(keys.paused, PAUSED);
    keys
}

async fn ledger(server: &RedisServer) -> Ledger {
    Ledger::new(
        server.conn().await,
        LedgerKeys::new("{ltest:payouts}", &queue_keys()),
    )
}

/// The payout queue whose jobs the test ledger queues.
async fn queue(server: &RedisServer) -> tarspay_worker::queue::RedisQueue<serde_json::Value> {
    use tarspay_worker::queue::{QueueConfig, RedisQueue};
    let queue = RedisQueue::connect(
        &server.url(),
        QueueConfig::new("payouts").with_prefix("ltest"),
    )
    .await
    .unwrap();
    assert_eq!(queue.keys(), &queue_keys());
    queue
}

async fn record(ledger: &Ledger, id: &str) -> OrderRecord {
    ledger.get(id).await.unwrap().unwrap()
}

#[tokio::test]
async fn register_is_refused_once_the_number_exists() {
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    assert_eq!(
        ledger.register(&order("A-1", "f1")).await.unwrap(),
        Registered::Created
    );
    assert_eq!(
        ledger.register(&order("A-1", "f1")).await.unwrap(),
        Registered::Exists {
            phase: Phase::Queued,
            same_request: true
        }
    );
    assert_eq!(
        ledger.register(&order("A-1", "other")).await.unwrap(),
        Registered::Exists {
            phase: Phase::Queued,
            same_request: false
        }
    );
    let record = ledger.get("A-1").await.unwrap().unwrap();
    assert_eq!(
        (record.phase, record.amount.as_str(), record.attempts),
        (Phase::Queued, "150.50", 0)
    );
    assert_eq!(record.batch_id.as_deref(), Some("B1"));
    assert_eq!(
        ledger.batch_members("B1").await.unwrap(),
        vec!["A-1".to_string()]
    );
    assert!(ledger.get("nope").await.unwrap().is_none());
}

#[tokio::test]
async fn the_submit_lease_admits_one_holder() {
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    ledger.register(&order("L-1", "f")).await.unwrap();
    let first = ledger
        .begin_submit("L-1", "t1", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        first,
        SubmitTicket::Go {
            previous: Phase::Queued,
            attempt: 1
        }
    );
    match ledger
        .begin_submit("L-1", "t2", Duration::from_secs(30))
        .await
        .unwrap()
    {
        SubmitTicket::Busy { retry_in } => assert!(retry_in <= Duration::from_secs(30)),
        other => panic!("expected Busy, got {other:?}"),
    }
    // Only the holder can give the lease back.
    assert!(
        !ledger
            .release("L-1", "t2", Phase::Queued, false, Some(-1), "x")
            .await
            .unwrap()
    );
    assert!(
        ledger
            .release("L-1", "t1", Phase::Queued, false, Some(-1), "system error")
            .await
            .unwrap()
    );
    let record = ledger.get("L-1").await.unwrap().unwrap();
    assert_eq!(
        (record.phase, record.last_code, record.last_msg.as_deref()),
        (Phase::Queued, Some(-1), Some("system error"))
    );
    assert_eq!(
        ledger
            .begin_submit("L-1", "t3", Duration::from_secs(30))
            .await
            .unwrap(),
        SubmitTicket::Go {
            previous: Phase::Queued,
            attempt: 2
        }
    );
    assert!(
        ledger
            .release("L-1", "t3", Phase::Unknown, true, None, "timeout")
            .await
            .unwrap()
    );
    assert_eq!(
        ledger
            .begin_submit("L-1", "t4", Duration::from_secs(30))
            .await
            .unwrap(),
        SubmitTicket::Go {
            previous: Phase::Unknown,
            attempt: 3
        }
    );
    assert!(ledger.accept("L-1", Some("P1"), None).await.unwrap());
    assert_eq!(
        ledger
            .begin_submit("L-1", "t5", Duration::from_secs(30))
            .await
            .unwrap(),
        SubmitTicket::Accepted {
            poll_in_hand: false
        }
    );
    assert_eq!(
        ledger
            .begin_submit("missing", "t", Duration::from_secs(1))
            .await
            .unwrap(),
        SubmitTicket::Missing
    );
}

#[tokio::test]
async fn an_expired_lease_means_the_create_may_have_happened() {
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    ledger.register(&order("E-1", "f")).await.unwrap();
    ledger
        .begin_submit("E-1", "dead-worker", Duration::from_millis(50))
        .await
        .unwrap();
    // Waiting past the lease is all that matters here, however fast the machine is.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        ledger
            .begin_submit("E-1", "live-worker", Duration::from_secs(30))
            .await
            .unwrap(),
        SubmitTicket::Go {
            previous: Phase::Unknown,
            attempt: 2
        }
    );
    // Its create may have reached the gateway: never failed on a lookup alone from now on.
    assert!(record(&ledger, "E-1").await.ambiguous);
    // The dead worker's late release changes nothing.
    assert!(
        !ledger
            .release("E-1", "dead-worker", Phase::Queued, false, None, "")
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn finalize_emits_exactly_one_outcome_whoever_races() {
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    ledger.register(&order("F-1", "f")).await.unwrap();
    ledger
        .begin_submit("F-1", "t", Duration::from_secs(30))
        .await
        .unwrap();
    ledger.accept("F-1", Some("P123"), None).await.unwrap();
    let seen = record(&ledger, "F-1").await;

    let mut racers = Vec::new();
    for i in 0..40 {
        let ledger = ledger.clone();
        let seen = seen.clone();
        racers.push(tokio::spawn(async move {
            let (phase, state) = if i % 2 == 0 {
                (Phase::Succeeded, 2)
            } else {
                (Phase::Failed, 3)
            };
            ledger
                .finalize(
                    &seen,
                    phase,
                    &FinalResult {
                        gateway_state: Some(state),
                        fee: Some("1.50".into()),
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for racer in racers {
        winners += usize::from(racer.await.unwrap());
    }
    assert_eq!(winners, 1);
    assert_eq!(ledger.outcome_count().await.unwrap(), 1);
    let outcomes = ledger.outcomes_after("0", 10).await.unwrap();
    let (_, outcome) = &outcomes[0];
    let record = ledger.get("F-1").await.unwrap().unwrap();
    assert_eq!(
        outcome.status,
        record.phase.as_str(),
        "the ledger and the outcome agree"
    );
    assert_eq!(outcome.kind, OrderKind::Payout);
    assert_eq!(outcome.mch_order_no, "F-1");
    assert_eq!(outcome.pay_order_id.as_deref(), Some("P123"));
    assert_eq!(
        (outcome.amount.as_str(), outcome.currency.as_str()),
        ("150.50", "INR")
    );
    assert_eq!(outcome.fee.as_deref(), Some("1.50"));
    assert_eq!(outcome.attempts, 1);
    assert_eq!(outcome.batch_id.as_deref(), Some("B1"));
    assert!(
        outcome.at.ends_with('Z') && outcome.at.contains('T'),
        "{}",
        outcome.at
    );

    // Final never changes.
    assert!(!ledger.accept("F-1", Some("P999"), None).await.unwrap());
    assert!(!ledger.mark_stuck("F-1").await.unwrap());
    assert!(matches!(
        ledger
            .begin_submit("F-1", "t", Duration::from_secs(1))
            .await
            .unwrap(),
        SubmitTicket::Final(_)
    ));
    let after = ledger.get("F-1").await.unwrap().unwrap();
    assert_eq!(
        (after.phase, after.pay_order_id.as_deref()),
        (record.phase, Some("P123"))
    );
    assert_eq!(ledger.outcome_count().await.unwrap(), 1);
}

#[tokio::test]
async fn outcomes_page_in_order_and_stuck_orders_are_flagged() {
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    for i in 0..5 {
        let id = format!("P-{i}");
        ledger.register(&order(&id, "f")).await.unwrap();
        ledger
            .finalize(
                &record(&ledger, &id).await,
                Phase::Rejected,
                &FinalResult {
                    gateway_state: Some(8),
                    code: None,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let first = ledger.outcomes_after("0", 3).await.unwrap();
    assert_eq!(first.len(), 3);
    let rest = ledger.outcomes_after(&first[2].0, 10).await.unwrap();
    let ids: Vec<String> = first
        .iter()
        .chain(rest.iter())
        .map(|(_, o)| o.mch_order_no.to_string())
        .collect();
    assert_eq!(ids, vec!["P-0", "P-1", "P-2", "P-3", "P-4"]);

    ledger.register(&order("S-1", "f")).await.unwrap();
    assert!(ledger.mark_stuck("S-1").await.unwrap());
    assert!(ledger.get("S-1").await.unwrap().unwrap().stuck);
    assert_eq!(ledger.stuck_count().await.unwrap(), 1);
    ledger
        .finalize(
            &record(&ledger, "S-1").await,
            Phase::Succeeded,
            &FinalResult::default(),
        )
        .await
        .unwrap();
    assert!(!ledger.get("S-1").await.unwrap().unwrap().stuck);
    assert_eq!(ledger.stuck_count().await.unwrap(), 0);

    // Flagged after the finaliser read it: the stale member is pruned when counted.
    ledger.register(&order("S-2", "f")).await.unwrap();
    let before_flag = record(&ledger, "S-2").await;
    assert!(ledger.mark_stuck("S-2").await.unwrap());
    assert!(
        ledger
            .finalize(&before_flag, Phase::Succeeded, &FinalResult::default())
            .await
            .unwrap()
    );
    assert!(!record(&ledger, "S-2").await.stuck);
    assert_eq!(ledger.stuck_count().await.unwrap(), 0);
}

#[tokio::test]
async fn nothing_is_submitted_while_the_queue_is_paused() {
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    ledger.register(&order("PZ-1", "f")).await.unwrap();
    let mut conn = server.conn().await;
    redis::cmd("SET")
        .arg(PAUSED)
        .arg(1)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        ledger
            .begin_submit("PZ-1", "t", Duration::from_secs(30))
            .await
            .unwrap(),
        SubmitTicket::Paused
    );
    assert_eq!(
        ledger.get("PZ-1").await.unwrap().unwrap().phase,
        Phase::Queued,
        "a paused check changes nothing"
    );
    redis::cmd("DEL")
        .arg(PAUSED)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        ledger
            .begin_submit("PZ-1", "t", Duration::from_secs(30))
            .await
            .unwrap(),
        SubmitTicket::Go { .. }
    ));
}

#[tokio::test]
async fn a_run_that_lost_its_lease_cannot_finalise_and_ambiguity_is_remembered() {
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    ledger.register(&order("LL-1", "f")).await.unwrap();
    ledger
        .begin_submit("LL-1", "old-run", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        ledger
            .release("LL-1", "old-run", Phase::Unknown, true, None, "timeout")
            .await
            .unwrap()
    );
    assert!(ledger.get("LL-1").await.unwrap().unwrap().ambiguous);
    ledger
        .begin_submit("LL-1", "new-run", Duration::from_secs(30))
        .await
        .unwrap();
    let failed = FinalResult {
        code: Some(5004006),
        ..Default::default()
    };
    let seen = record(&ledger, "LL-1").await;
    let window = Duration::from_secs(3600);
    assert_eq!(
        ledger
            .finalize_leased(&seen, "old-run", Phase::Failed, &failed, window)
            .await
            .unwrap(),
        Finalized::LeaseLost
    );
    // The holder may not fail an order that may exist until the gateway's absence is
    // proven: twice, over the settle window.
    assert_eq!(
        ledger
            .finalize_leased(&seen, "new-run", Phase::Failed, &failed, window)
            .await
            .unwrap(),
        Finalized::MayExist
    );
    assert_eq!(ledger.note_absent("LL-1", "old-run").await.unwrap(), None);
    let first = ledger
        .note_absent("LL-1", "new-run")
        .await
        .unwrap()
        .unwrap();
    let second = ledger
        .note_absent("LL-1", "new-run")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.lookups, second.lookups), (1, 2));
    assert_eq!(first.since_ms, second.since_ms, "one streak");
    assert!(!second.proven(window) && second.proven(Duration::ZERO));
    assert_eq!(
        ledger
            .finalize_leased(&seen, "new-run", Phase::Failed, &failed, window)
            .await
            .unwrap(),
        Finalized::MayExist,
        "two lookups, but not over the window"
    );
    assert_eq!(ledger.outcome_count().await.unwrap(), 0);
    // A create that may have landed after the streak began starts it over.
    assert!(
        ledger
            .release("LL-1", "new-run", Phase::Unknown, true, None, "timeout")
            .await
            .unwrap()
    );
    ledger
        .begin_submit("LL-1", "third-run", Duration::from_secs(30))
        .await
        .unwrap();
    let restarted = ledger
        .note_absent("LL-1", "third-run")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restarted.lookups, 1);
    assert_eq!(
        ledger
            .finalize_leased(&seen, "third-run", Phase::Failed, &failed, Duration::ZERO)
            .await
            .unwrap(),
        Finalized::MayExist,
        "one lookup is not a streak"
    );
    ledger.note_absent("LL-1", "third-run").await.unwrap();
    assert_eq!(
        ledger
            .finalize_leased(&seen, "third-run", Phase::Failed, &failed, Duration::ZERO)
            .await
            .unwrap(),
        Finalized::Recorded
    );
    assert_eq!(ledger.outcome_count().await.unwrap(), 1);
}

#[tokio::test]
async fn an_order_whose_number_the_gateway_said_exists_is_never_failed_on_absence() {
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    let failed = FinalResult {
        code: Some(5003011),
        ..Default::default()
    };
    // DUP-1: a create answered "the number exists" (5003011); ANY-1: one that timed out.
    for (id, code) in [("DUP-1", Some(5003011)), ("ANY-1", None)] {
        ledger.register(&order(id, "f")).await.unwrap();
        ledger
            .begin_submit(id, "first", Duration::from_secs(30))
            .await
            .unwrap();
        assert!(
            ledger
                .release(id, "first", Phase::Unknown, true, code, "create answered")
                .await
                .unwrap()
        );
        // A later run whose create timed out (its own code none): the mark stays.
        ledger
            .begin_submit(id, "second", Duration::from_secs(30))
            .await
            .unwrap();
        assert!(
            ledger
                .release(id, "second", Phase::Unknown, true, None, "timeout")
                .await
                .unwrap()
        );
        // The gateway's "no such order", twice, over a window of zero: proven, by the streak.
        ledger
            .begin_submit(id, "third", Duration::from_secs(30))
            .await
            .unwrap();
        ledger.note_absent(id, "third").await.unwrap();
        let streak = ledger.note_absent(id, "third").await.unwrap().unwrap();
        assert!(streak.proven(Duration::ZERO), "{id}");
    }
    let dup = record(&ledger, "DUP-1").await;
    assert_eq!(
        ledger
            .finalize_leased(&dup, "third", Phase::Failed, &failed, Duration::ZERO)
            .await
            .unwrap(),
        Finalized::MayExist,
        "the gateway holds the number: its absence is lag"
    );
    // Without the gateway's word that the number exists, the same streak fails the order.
    let any = record(&ledger, "ANY-1").await;
    assert_eq!(
        ledger
            .finalize_leased(&any, "third", Phase::Failed, &failed, Duration::ZERO)
            .await
            .unwrap(),
        Finalized::Recorded
    );
    assert_eq!(ledger.outcome_count().await.unwrap(), 1);
    // The gateway's own state still settles it.
    let found = FinalResult {
        gateway_state: Some(2),
        pay_order_id: Some("P-DUP-1".into()),
        ..Default::default()
    };
    assert_eq!(
        ledger
            .apply_gateway_final(&dup, Phase::Succeeded, &found)
            .await
            .unwrap(),
        Finalized::Recorded
    );
    assert_eq!(ledger.outcome_count().await.unwrap(), 2);
}

#[tokio::test]
async fn a_run_stalled_past_its_lease_neither_extends_the_absence_streak_nor_fails_the_order() {
    // A run frozen between the gateway's "no such order" and recording it would otherwise
    // count that lookup at the end of the freeze, and fail an order whose create may have
    // become visible at the gateway meanwhile.
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    ledger.register(&order("LS-1", "f")).await.unwrap();
    let lease = Duration::from_secs(2);
    ledger.begin_submit("LS-1", "run", lease).await.unwrap();
    assert!(
        ledger
            .release("LS-1", "run", Phase::Unknown, true, None, "timeout")
            .await
            .unwrap()
    );
    ledger.begin_submit("LS-1", "run-2", lease).await.unwrap();
    let seen = record(&ledger, "LS-1").await;
    assert!(seen.ambiguous);
    for _ in 0..2 {
        ledger.note_absent("LS-1", "run-2").await.unwrap().unwrap();
    }
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    assert_eq!(
        ledger.note_absent("LS-1", "run-2").await.unwrap(),
        None,
        "a lookup noted after the lease ran out"
    );
    let failed = FinalResult {
        code: Some(5004006),
        ..Default::default()
    };
    assert_eq!(
        ledger
            .finalize_leased(&seen, "run-2", Phase::Failed, &failed, Duration::ZERO)
            .await
            .unwrap(),
        Finalized::LeaseLost,
        "two lookups over the (zero) window, but the lease ran out"
    );
    assert_eq!(ledger.outcome_count().await.unwrap(), 0);
    assert!(!ledger.get("LS-1").await.unwrap().unwrap().phase.is_final());
}

#[tokio::test]
async fn acceptance_queues_the_one_poll_job_and_never_unfinalises() {
    use tarspay_worker::queue::JobOptions;
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    let queue = queue(&server).await;
    let poll = |n: u32| {
        queue
            .prepare(
                &serde_json::json!({"poll": n}),
                &JobOptions {
                    delay: Some(Duration::from_secs(60)),
                    ..JobOptions::default()
                },
            )
            .unwrap()
    };

    ledger.register(&order("AC-1", "f")).await.unwrap();
    assert!(
        ledger
            .accept("AC-1", Some("P1"), Some(&poll(1)))
            .await
            .unwrap()
    );
    // A second acceptance (a redelivered create, a reconcile) changes nothing, queues nothing.
    assert!(
        !ledger
            .accept("AC-1", Some("P2"), Some(&poll(2)))
            .await
            .unwrap()
    );
    assert_eq!(queue.stats().await.unwrap().delayed, 1);
    let accepted = record(&ledger, "AC-1").await;
    assert_eq!(
        (accepted.phase, accepted.pay_order_id.as_deref()),
        (Phase::Accepted, Some("P1"))
    );

    // Finalised before any acceptance: a late acceptance leaves it final.
    ledger.register(&order("AC-2", "f")).await.unwrap();
    let seen = record(&ledger, "AC-2").await;
    assert!(
        ledger
            .finalize(&seen, Phase::Rejected, &FinalResult::default())
            .await
            .unwrap()
    );
    ledger.accept("AC-2", Some("P3"), None).await.unwrap();
    assert_eq!(record(&ledger, "AC-2").await.phase, Phase::Rejected);
    assert_eq!(
        ledger.register(&order("AC-2", "f")).await.unwrap(),
        Registered::Exists {
            phase: Phase::Rejected,
            same_request: true
        }
    );
}

#[tokio::test]
async fn an_acceptance_that_leaves_the_first_poll_in_hand_queues_nothing_and_says_so() {
    use tarspay_worker::ledger::InHandAcceptance;
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    let queue = queue(&server).await;
    let lease = |id: &'static str, token: &'static str, ms: u64| {
        let ledger = ledger.clone();
        async move {
            let ticket = ledger
                .begin_submit(id, token, Duration::from_millis(ms))
                .await
                .unwrap();
            assert!(matches!(ticket, SubmitTicket::Go { .. }), "{ticket:?}");
        }
    };
    // What a create job that finds the order now is told.
    let ticket = |id: &'static str| {
        let ledger = ledger.clone();
        async move {
            ledger
                .begin_submit(id, "later", Duration::from_secs(30))
                .await
                .unwrap()
        }
    };
    let in_hand = |poll_in_hand: bool| SubmitTicket::Accepted { poll_in_hand };

    ledger.register(&order("IH-1", "f")).await.unwrap();
    lease("IH-1", "t1", 30_000).await;
    assert_eq!(
        ledger.accept_polling_in_hand("IH-1", "P1").await.unwrap(),
        InHandAcceptance::Recorded
    );
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.waiting, stats.delayed), (0, 0), "no poll job queued");
    let accepted = record(&ledger, "IH-1").await;
    assert_eq!(
        (accepted.phase, accepted.pay_order_id.as_deref()),
        (Phase::Accepted, Some("P1"))
    );
    // A create job that finds it (its holder died) learns that it is the poll job now.
    assert_eq!(ticket("IH-1").await, in_hand(true));
    // Written once: a later acceptance (a lookup's) neither queues nor clears the mark.
    assert!(!ledger.accept("IH-1", Some("P2"), None).await.unwrap());
    assert_eq!(ticket("IH-1").await, in_hand(true));

    // An order already accepted the usual way (an adoption) is not taken for one polled in
    // hand.
    ledger.register(&order("IH-2", "f")).await.unwrap();
    lease("IH-2", "t1", 30_000).await;
    assert!(ledger.accept("IH-2", Some("P3"), None).await.unwrap());
    assert_eq!(
        ledger.accept_polling_in_hand("IH-2", "P3").await.unwrap(),
        InHandAcceptance::AlreadyAccepted
    );
    assert_eq!(ticket("IH-2").await, in_hand(false));

    // A run whose lease lapsed and was taken over still leaves the poll in hand (no lease
    // check, so no read). The run that took over, adopting the order, finds that acceptance
    // and queues its poll job all the same, so the order is polled should the first run
    // die; a create job that finds the order afterwards is not told to poll it.
    use tarspay_worker::queue::JobOptions;
    let poll = || {
        queue
            .prepare(
                &serde_json::json!({"poll": "IH-3"}),
                &JobOptions {
                    delay: Some(Duration::from_secs(60)),
                    ..JobOptions::default()
                },
            )
            .unwrap()
    };
    ledger.register(&order("IH-3", "f")).await.unwrap();
    lease("IH-3", "stale", 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    lease("IH-3", "new", 30_000).await;
    assert_eq!(
        ledger.accept_polling_in_hand("IH-3", "P4").await.unwrap(),
        InHandAcceptance::Recorded
    );
    assert_eq!(queue.stats().await.unwrap().delayed, 0);
    assert!(
        ledger
            .accept("IH-3", Some("P4"), Some(&poll()))
            .await
            .unwrap(),
        "the adopting run's poll job is queued"
    );
    assert_eq!(queue.stats().await.unwrap().delayed, 1);
    assert_eq!(ticket("IH-3").await, in_hand(false));
    // Once: a further adoption queues nothing more.
    assert!(
        !ledger
            .accept("IH-3", Some("P4"), Some(&poll()))
            .await
            .unwrap()
    );
    assert_eq!(queue.stats().await.unwrap().delayed, 1);
    // An acceptance made the usual way is never taken for one left in hand.
    assert!(
        !ledger
            .accept("IH-2", Some("P3"), Some(&poll()))
            .await
            .unwrap()
    );
    assert_eq!(queue.stats().await.unwrap().delayed, 1);
    // Nor does a run that holds the poll in hand too queue or hold anything once the
    // adoption's poll job is there.
    assert_eq!(
        ledger.accept_polling_in_hand("IH-3", "P4").await.unwrap(),
        InHandAcceptance::AlreadyAccepted
    );

    // Two runs in hand (the second took the create job over and was answered as accepted):
    // the second polls too rather than ending the job, since the first may have lost its
    // lease and die.
    ledger.register(&order("IH-4", "f")).await.unwrap();
    lease("IH-4", "stale", 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    lease("IH-4", "new", 30_000).await;
    for _ in 0..2 {
        assert_eq!(
            ledger.accept_polling_in_hand("IH-4", "P5").await.unwrap(),
            InHandAcceptance::Recorded
        );
    }
    assert_eq!(
        queue.stats().await.unwrap().delayed,
        1,
        "no poll job for IH-4"
    );
    assert_eq!(ticket("IH-4").await, in_hand(true));
}

#[tokio::test]
async fn an_accepted_create_resets_the_guard_even_for_failures_counted_during_its_call() {
    // A payroll's creates are leased together; a few rows refused with auth-class codes while
    // the others were in flight must not add up to a pause once those others are accepted
    // (the count is of failures in a row). So every acceptance resets the count, whatever
    // it was when its lease was taken.
    use redis::AsyncCommands;
    use tarspay_worker::ledger::InHandAcceptance;
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    let guard = ledger.keys().guard();
    let mut conn = server.conn().await;
    for (id, in_hand) in [("GU-1", true), ("GU-2", false)] {
        ledger.register(&order(id, "f")).await.unwrap();
        let ticket = ledger
            .begin_submit(id, "t", Duration::from_secs(30))
            .await
            .unwrap();
        assert!(matches!(ticket, SubmitTicket::Go { .. }), "{ticket:?}");
        // Refusals of other rows, counted while this create was in flight.
        let _: i64 = conn.sadd(&guard, &["OTHER-1", "OTHER-2"]).await.unwrap();
        if in_hand {
            let accepted = ledger.accept_polling_in_hand(id, "P").await.unwrap();
            assert_eq!(accepted, InHandAcceptance::Recorded);
        } else {
            assert!(ledger.accept(id, Some("P"), None).await.unwrap());
        }
        let left: bool = conn.exists(&guard).await.unwrap();
        assert!(!left, "{id}: the count starts over");
    }
}

#[tokio::test]
async fn a_gateway_state_for_a_record_that_expired_meanwhile_brings_nothing_back() {
    use redis::AsyncCommands;
    let server = RedisServer::start(false);
    let retention = Duration::from_secs(60);
    let ledger = ledger(&server).await.with_retention(Some(retention));
    let keys = ledger.keys().clone();
    let mut conn = server.conn().await;
    let result = FinalResult {
        gateway_state: Some(2),
        pay_order_id: Some("P1".into()),
        ..FinalResult::default()
    };
    ledger.register(&order("EXP-1", "f")).await.unwrap();
    assert!(ledger.accept("EXP-1", Some("P1"), None).await.unwrap());
    let in_flight = record(&ledger, "EXP-1").await;

    // An outcome that cannot be written: nothing final, and no expiry on a record in flight.
    let () = conn.set(keys.outcomes(), "not a stream").await.unwrap();
    let failed = ledger
        .apply_gateway_final(&in_flight, Phase::Succeeded, &result)
        .await;
    assert!(failed.is_err(), "{failed:?}");
    let ttl: i64 = conn.pttl(keys.order("EXP-1")).await.unwrap();
    assert_eq!(ttl, -1, "an order in flight never expires");
    let _: i64 = conn.del(keys.outcomes()).await.unwrap();

    // Final, with its expiry.
    let applied = ledger
        .apply_gateway_final(&in_flight, Phase::Succeeded, &result)
        .await
        .unwrap();
    assert_eq!(applied, Finalized::Recorded);
    let ttl: i64 = conn.pttl(keys.order("EXP-1")).await.unwrap();
    assert!(ttl > 0 && ttl <= retention.as_millis() as i64, "ttl {ttl}");
    let final_seen = record(&ledger, "EXP-1").await;

    // A repeated report (a duplicate callback, a poll asked for again) and a correction keep
    // the expiry the record got when it became final: nobody can keep it alive by asking.
    let _: bool = conn.pexpire(keys.order("EXP-1"), 30_000).await.unwrap();
    for phase in [Phase::Succeeded, Phase::Failed] {
        ledger
            .apply_gateway_final(&final_seen, phase, &result)
            .await
            .unwrap();
        let ttl: i64 = conn.pttl(keys.order("EXP-1")).await.unwrap();
        assert!(ttl > 0 && ttl <= 30_000, "{phase:?}: ttl {ttl} kept");
    }

    // The retention runs out while readers that saw the record stall: a duplicate callback
    // (the final record), a poll that read it in flight, a correction. None brings it back.
    let _: i64 = conn.del(keys.order("EXP-1")).await.unwrap();
    for (seen, phase) in [
        (&final_seen, Phase::Succeeded),
        (&in_flight, Phase::Succeeded),
        (&final_seen, Phase::Failed),
    ] {
        let applied = ledger
            .apply_gateway_final(seen, phase, &result)
            .await
            .unwrap();
        assert_eq!(applied, Finalized::Unchanged, "{phase:?}");
        let back: bool = conn.exists(keys.order("EXP-1")).await.unwrap();
        assert!(!back, "{phase:?}: no bare record");
    }
    let outcomes: u64 = conn.xlen(keys.outcomes()).await.unwrap();
    assert_eq!(
        outcomes, 2,
        "exactly one final outcome, and the one correction"
    );
}

#[tokio::test]
async fn concurrent_changes_share_script_calls_and_each_gets_its_own_answer() {
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    let before = server.command_calls("evalsha");
    // 300 registrations at once, every third one a number registered twice.
    let mut tasks = Vec::new();
    for i in 0..300 {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            // Every third one reuses the number before it for a different request: whichever
            // of the two lands first is created, the other is a clash.
            let (id, fingerprint) = if i % 3 == 2 {
                (format!("G-{}", i - 1), "other")
            } else {
                (format!("G-{i}"), "f")
            };
            ledger.register(&order(&id, fingerprint)).await.unwrap()
        }));
    }
    let mut created = 0;
    let mut clashes = 0;
    for task in tasks {
        match task.await.unwrap() {
            Registered::Created => created += 1,
            Registered::Exists {
                same_request: false,
                ..
            } => clashes += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((created, clashes), (200, 100));
    let calls = server.command_calls("evalsha") - before;
    assert!(
        calls < 300,
        "300 concurrent changes took {calls} script calls"
    );
}

#[tokio::test]
async fn one_failing_operation_does_not_fail_the_others_in_its_batch() {
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    let mut conn = server.conn().await;
    // A key of the wrong type where an order hash should be.
    let _: () = redis::AsyncCommands::set(&mut conn, "{ltest:payouts}:order:BAD", "x")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let id = if i == 25 {
                "BAD".to_owned()
            } else {
                format!("OK-{i}")
            };
            (id.clone(), ledger.register(&order(&id, "f")).await)
        }));
    }
    for task in tasks {
        let (id, registered) = task.await.unwrap();
        if id == "BAD" {
            let err = registered.expect_err("a string is not an order");
            assert!(err.to_string().contains("WRONGTYPE"), "{err}");
        } else {
            assert_eq!(registered.unwrap(), Registered::Created, "{id}");
        }
    }
}

#[tokio::test]
async fn an_acceptance_after_our_own_failure_is_kept_visible() {
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    ledger.register(&order("LATE-1", "f")).await.unwrap();
    ledger
        .begin_submit("LATE-1", "run", Duration::from_secs(30))
        .await
        .unwrap();
    let seen = record(&ledger, "LATE-1").await;
    let failed = FinalResult {
        code: Some(5004006),
        ..Default::default()
    };
    assert_eq!(
        ledger
            .finalize_leased(&seen, "run", Phase::Failed, &failed, Duration::ZERO)
            .await
            .unwrap(),
        Finalized::Recorded
    );
    // A run that outlived its lease comes back with an accepted create.
    ledger.accept("LATE-1", Some("P-LATE"), None).await.unwrap();
    let after = record(&ledger, "LATE-1").await;
    assert_eq!(
        (after.phase, after.gateway_state, after.accepted),
        (Phase::Failed, None, true),
        "the outcome stands and the acceptance is on record"
    );
    assert_eq!(ledger.outcome_count().await.unwrap(), 1);
}

/// A write that fails after the write-once claim (here: the outcome stream or the job
/// stream is of the wrong type, as an OOM or a misconfiguration would make it fail) undoes
/// the claim: never a final order without its outcome, never an order without its job.
#[tokio::test]
async fn a_failed_outcome_or_job_write_undoes_the_claim() {
    use redis::AsyncCommands;
    use tarspay_worker::queue::JobOptions;
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    let mut conn = server.conn().await;
    let keys = LedgerKeys::new("{ltest:payouts}", &queue_keys());

    ledger.register(&order("XF-1", "f")).await.unwrap();
    let seen = record(&ledger, "XF-1").await;
    let _: () = conn.set(keys.outcomes(), "not a stream").await.unwrap();
    assert!(
        ledger
            .finalize(&seen, Phase::Succeeded, &FinalResult::default())
            .await
            .is_err()
    );
    assert!(!record(&ledger, "XF-1").await.phase.is_final());
    let _: () = conn.del(keys.outcomes()).await.unwrap();
    assert!(
        ledger
            .finalize(&seen, Phase::Succeeded, &FinalResult::default())
            .await
            .unwrap()
    );
    assert_eq!(ledger.outcome_count().await.unwrap(), 1);

    let queue = queue(&server).await;
    let job = queue
        .prepare(&serde_json::json!({"create": 1}), &JobOptions::default())
        .unwrap();
    let stream = queue.keys().stream.clone();
    let _: () = conn.del(&stream).await.unwrap();
    let _: () = conn.set(&stream, "not a stream").await.unwrap();
    assert!(
        ledger
            .register_with_job(&order("XR-1", "f"), Phase::Queued, &job)
            .await
            .is_err()
    );
    assert!(
        ledger.get("XR-1").await.unwrap().is_none(),
        "not registered"
    );
    assert!(
        !ledger
            .batch_members("B1")
            .await
            .unwrap()
            .contains(&"XR-1".to_string())
    );
    let _: () = conn.del(&stream).await.unwrap();
    assert_eq!(
        ledger
            .register_with_job(&order("XR-1", "f"), Phase::Queued, &job)
            .await
            .unwrap(),
        Registered::Created
    );
}

/// A history event of `kind` now, with `code`.
fn event(kind: tarspay_worker::ledger::history::EventKind, code: i64) -> OrderEvent {
    let mut event = OrderEvent::now(kind);
    event.code = Some(code);
    event
}

#[tokio::test]
async fn a_payouts_history_rides_in_its_milestones_and_a_list_goes_with_its_index_entry() {
    use redis::AsyncCommands;
    use tarspay_worker::ledger::history::EventKind;
    let server = RedisServer::start(false);
    let retention = Duration::from_secs(60);
    let ledger = ledger(&server).await.with_retention(Some(retention));
    let keys = ledger.keys().clone();
    let mut conn = server.conn().await;
    let retention_ms = retention.as_millis() as i64;

    // Created and found final by its poll: the two events are kept by the acceptance and the
    // final milestone; no list.
    ledger.register(&order("H-1", "f")).await.unwrap();
    ledger
        .begin_submit("H-1", "t", Duration::from_secs(30))
        .await
        .unwrap();
    ledger.note_soon("H-1", event(EventKind::Create, 0));
    assert!(ledger.accept("H-1", Some("P1"), None).await.unwrap());
    ledger.note_soon("H-1", event(EventKind::Query, 0));
    let seen = record(&ledger, "H-1").await;
    assert!(
        ledger
            .finalize(&seen, Phase::Succeeded, &FinalResult::default())
            .await
            .unwrap()
    );
    let listed: bool = conn.exists(keys.events("H-1")).await.unwrap();
    assert!(
        !listed,
        "no history list for a payout created and polled once"
    );
    let kinds: Vec<EventKind> = ledger
        .events("H-1")
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, [EventKind::Create, EventKind::Query]);
    let ttl: i64 = conn.pttl(keys.order("H-1")).await.unwrap();
    assert!(ttl > 0 && ttl <= retention_ms, "record ttl {ttl}");

    // A failed create first: its line starts a list while the order is in flight (no expiry
    // of its own); the later lines ride in the milestones; all three are the history.
    ledger.register(&order("H-2", "f")).await.unwrap();
    ledger
        .begin_submit("H-2", "t", Duration::from_secs(30))
        .await
        .unwrap();
    ledger.note_soon("H-2", event(EventKind::Create, -1));
    assert!(
        ledger
            .release("H-2", "t", Phase::Queued, false, Some(-1), "busy")
            .await
            .unwrap()
    );
    ledger
        .begin_submit("H-2", "t2", Duration::from_secs(30))
        .await
        .unwrap();
    ledger.note_soon("H-2", event(EventKind::Create, 0));
    ledger.accept("H-2", Some("P2"), None).await.unwrap();
    ledger.note_soon("H-2", event(EventKind::Callback, 0));
    let seen = record(&ledger, "H-2").await;
    ledger
        .apply_gateway_final(&seen, Phase::Succeeded, &FinalResult::default())
        .await
        .unwrap();
    let codes: Vec<(EventKind, Option<i64>)> = ledger
        .events("H-2")
        .await
        .unwrap()
        .iter()
        .map(|e| (e.kind, e.code))
        .collect();
    assert_eq!(
        codes,
        [
            (EventKind::Create, Some(-1)),
            (EventKind::Create, Some(0)),
            (EventKind::Callback, Some(0))
        ]
    );
    // Begun in flight: its own expiry is twice the retention from its start (the index trim
    // takes it earlier); the finalisation did not touch it.
    let ttl: i64 = conn.pttl(keys.events("H-2")).await.unwrap();
    assert!(
        ttl > retention_ms && ttl <= 2 * retention_ms,
        "list begun in flight: {ttl}"
    );

    // A list begun after the order became final expires with the record.
    ledger
        .note("H-1", event(EventKind::Operator, 0))
        .await
        .unwrap();
    let ttl: i64 = conn.pttl(keys.events("H-1")).await.unwrap();
    assert!(
        ttl > 0 && ttl <= retention_ms,
        "list begun after final: {ttl}"
    );

    // The index trim (twice the retention after registration) takes each trimmed order's
    // list along, in flight or not, and leaves the records to their own expiry.
    let short = self::ledger(&server)
        .await
        .with_retention(Some(Duration::from_millis(100)));
    short.register(&order("T-1", "f")).await.unwrap();
    short
        .note("T-1", event(EventKind::Operator, 0))
        .await
        .unwrap();
    // More old entries than one trim call removes (500).
    let mut tasks = Vec::new();
    for i in 0..600 {
        let short = short.clone();
        tasks.push(tokio::spawn(async move {
            short
                .register(&order(&format!("TO-{i}"), "f"))
                .await
                .unwrap()
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    short.register(&order("T-2", "f")).await.unwrap();
    short
        .note("T-2", event(EventKind::Operator, 0))
        .await
        .unwrap();
    // H-1, H-2, T-1 and the 600 (their batch's index entry too).
    assert!(short.trim_indexes().await.unwrap() >= 603);
    for gone in ["H-1", "H-2", "T-1"] {
        let listed: bool = conn.exists(keys.events(gone)).await.unwrap();
        assert!(!listed, "{gone}'s list");
    }
    let kept: bool = conn.exists(keys.events("T-2")).await.unwrap();
    assert!(kept, "a list registered within the bound stays");
    assert_eq!(record(&short, "T-1").await.phase, Phase::Queued);
    let indexed: Vec<String> = conn.zrange(keys.index(), 0, -1).await.unwrap();
    assert_eq!(indexed, ["T-2"]);

    // Records kept for ever: so is a list, and nothing is trimmed.
    let keep = self::ledger(&server).await;
    keep.register(&order("H-4", "f")).await.unwrap();
    keep.note("H-4", event(EventKind::Operator, 0))
        .await
        .unwrap();
    let seen = record(&keep, "H-4").await;
    keep.finalize(&seen, Phase::Failed, &FinalResult::default())
        .await
        .unwrap();
    keep.register(&order("H-5", "f")).await.unwrap();
    let seen = record(&keep, "H-5").await;
    keep.finalize(&seen, Phase::Failed, &FinalResult::default())
        .await
        .unwrap();
    keep.note("H-5", event(EventKind::Operator, 0))
        .await
        .unwrap();
    assert_eq!(keep.trim_indexes().await.unwrap(), 0);
    for key in [
        keys.order("H-4"),
        keys.events("H-4"),
        keys.order("H-5"),
        keys.events("H-5"),
    ] {
        let ttl: i64 = conn.pttl(&key).await.unwrap();
        assert_eq!(ttl, -1, "{key}");
    }
}

#[tokio::test]
async fn a_batchs_poll_jobs_and_index_entries_go_in_one_command_and_fail_only_their_owners() {
    use redis::AsyncCommands;
    use tarspay_worker::queue::JobOptions;
    let server = RedisServer::start(false);
    let ledger = ledger(&server).await;
    let keys = ledger.keys().clone();
    let mut conn = server.conn().await;
    let queue = queue(&server).await;
    let accept_all = async |ids: Vec<String>| {
        let mut tasks = Vec::new();
        for id in ids {
            let ledger = ledger.clone();
            let poll = queue
                .prepare(
                    &serde_json::json!({ "poll": id }),
                    &JobOptions {
                        delay: Some(Duration::from_secs(60)),
                        ..JobOptions::default()
                    },
                )
                .unwrap();
            tasks.push(tokio::spawn(async move {
                ledger.accept(&id, Some("P"), Some(&poll)).await
            }));
        }
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        answers
    };

    // 40 registrations at once: their time index entries go in far fewer ZADDs than 40.
    let ids: Vec<String> = (0..40).map(|i| format!("HB-{i}")).collect();
    let zadds = server.command_calls("zadd");
    let mut tasks = Vec::new();
    for id in ids.clone() {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            ledger.register(&order(&id, "f")).await.unwrap()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), Registered::Created);
    }
    let indexed: u64 = conn.zcard(keys.index()).await.unwrap();
    assert_eq!(indexed, 40);
    let registering = server.command_calls("zadd") - zadds;

    // Their 40 acceptances at once: the poll jobs too.
    let zadds = server.command_calls("zadd");
    for answer in accept_all(ids.clone()).await {
        assert!(answer.unwrap());
    }
    let accepting = server.command_calls("zadd") - zadds;
    assert_eq!(queue.stats().await.unwrap().delayed, 40);
    assert!(
        registering < 20 && accepting < 20,
        "ZADDs for 40 orders: {registering} registering, {accepting} accepting"
    );

    // A delayed set that cannot be added to: each acceptance says so (the milestone stays,
    // as when the job was added in its own step: the lifeline finds the order); a
    // finalisation in the same batches is not touched.
    let late: Vec<String> = (0..10).map(|i| format!("HL-{i}")).collect();
    for id in late.iter().chain(["HF-1".to_owned()].iter()) {
        ledger.register(&order(id, "f")).await.unwrap();
    }
    let seen = record(&ledger, "HF-1").await;
    let _: () = conn.rename(&queue.keys().delayed, "parked").await.unwrap();
    let _: () = conn.set(&queue.keys().delayed, "not a set").await.unwrap();
    let finalizing = {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            ledger
                .finalize(&seen, Phase::Failed, &FinalResult::default())
                .await
        })
    };
    for answer in accept_all(late.clone()).await {
        let err = answer.expect_err("no poll job, no quiet success");
        assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    }
    assert!(finalizing.await.unwrap().unwrap());
    assert_eq!(record(&ledger, "HL-3").await.phase, Phase::Accepted);

    // Indexes that cannot be added to fail no registration: the order and its job stand.
    let _: () = conn.del(&queue.keys().delayed).await.unwrap();
    let _: () = conn.rename("parked", &queue.keys().delayed).await.unwrap();
    let _: () = conn.del(keys.index()).await.unwrap();
    let _: () = conn.set(keys.index(), "not a sorted set").await.unwrap();
    let _: () = conn.del(keys.batches()).await.unwrap();
    let _: () = conn.set(keys.batches(), "not a sorted set").await.unwrap();
    let job = queue
        .prepare(&serde_json::json!({"create": 1}), &JobOptions::default())
        .unwrap();
    assert_eq!(
        ledger
            .register_with_job(&order("HI-1", "f"), Phase::Queued, &job)
            .await
            .unwrap(),
        Registered::Created
    );
    assert_eq!(record(&ledger, "HI-1").await.phase, Phase::Queued);
    assert_eq!(queue.stats().await.unwrap().waiting, 1);
}
