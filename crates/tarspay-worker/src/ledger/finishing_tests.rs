//! A job acknowledged by the ledger step that writes its last effect (`Delivery::ack_in`):
//! against a private redis-server, with real stream entries held by real consumers.

use super::*;
use crate::queue::{Delivery, Envelope, Handover, Holder, InFlight, PreparedJob, SettleHandle};
use crate::redis_conn::RedisClient;
use local_redis::{Durability, LocalRedis};

struct Setup {
    redis: LocalRedis,
    conn: RedisConn,
    ledger: Ledger,
    queue: QueueKeys,
    /// The stop of the workers its deliveries come from.
    stop: tokio_util::sync::CancellationToken,
}

async fn setup() -> Setup {
    let redis = LocalRedis::start(Durability::Off).expect("redis-server on PATH");
    let conn = RedisClient::single(redis.url())
        .and_then(|client| client.connect(Default::default()))
        .expect("client");
    let queue = QueueKeys::new("t", "payouts").unwrap();
    let ledger = Ledger::new(conn.clone(), LedgerKeys::new("{t:payouts}", &queue));
    create_group(&conn, &queue).await;
    Setup {
        redis,
        conn,
        ledger,
        queue,
        stop: Default::default(),
    }
}

/// The queue's stream and consumer group, as a worker's first fetch makes them.
async fn create_group(conn: &RedisConn, queue: &QueueKeys) {
    let mut c = conn.clone();
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&queue.stream)
        .arg(&queue.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await
        .unwrap();
}

/// Registers order `id` (without a job) in `ledger`.
async fn register_in(ledger: &Ledger, id: &str) {
    let number = MchOrderNo::parse(id).unwrap();
    let currency = Currency::parse("INR").unwrap();
    let order = NewOrder {
        mch_order_no: &number,
        kind: OrderKind::Payout,
        fingerprint: "fp",
        amount: "10.00",
        currency: &currency,
        request: "{}",
        batch_id: None,
        merchant: &MerchantName::default(),
    };
    assert_eq!(ledger.register(&order).await.unwrap(), Registered::Created);
}

impl Setup {
    async fn register(&self, id: &str) {
        register_in(&self.ledger, id).await;
    }

    /// A job entry written to `stream` and delivered to `consumer` (as its fetcher would):
    /// the delivery, holding `unique` if given, and its holder's in-flight set.
    async fn deliver(
        &self,
        stream: &str,
        consumer: &str,
        unique: Option<&str>,
    ) -> (Delivery, InFlight) {
        let (delivery, inflight, _) = self.deliver_following(stream, consumer, unique).await;
        (delivery, inflight)
    }

    /// [`Setup::deliver`], and the due times its worker's promoter is given to follow.
    async fn deliver_following(
        &self,
        stream: &str,
        consumer: &str,
        unique: Option<&str>,
    ) -> (
        Delivery,
        InFlight,
        tokio::sync::mpsc::UnboundedReceiver<u64>,
    ) {
        self.deliver_after_reading(stream, consumer, unique, None)
            .await
    }

    /// [`Setup::deliver_following`], handed out after its fetch loop found the queue's pause
    /// flag clear at `pause_clear_read_at`.
    async fn deliver_after_reading(
        &self,
        stream: &str,
        consumer: &str,
        unique: Option<&str>,
        pause_clear_read_at: Option<std::time::Instant>,
    ) -> (
        Delivery,
        InFlight,
        tokio::sync::mpsc::UnboundedReceiver<u64>,
    ) {
        let times = crate::queue::FetchTimes {
            fetched_at: Some(std::time::Instant::now()),
            pause_clear_read_at,
            ..Default::default()
        };
        self.deliver_with_times(stream, consumer, unique, times)
            .await
    }

    /// [`Setup::deliver_following`], handed out with what its fetch loop knew (`times`).
    async fn deliver_with_times(
        &self,
        stream: &str,
        consumer: &str,
        unique: Option<&str>,
        times: crate::queue::FetchTimes,
    ) -> (
        Delivery,
        InFlight,
        tokio::sync::mpsc::UnboundedReceiver<u64>,
    ) {
        let mut c = self.conn.clone();
        let envelope = Envelope::new(
            format!("job-{consumer}-{}", rand::random::<u32>()),
            serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            unique.map(str::to_owned),
            None,
        );
        let entry_id: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("e")
            .arg(envelope.encode().unwrap())
            .query_async(&mut c)
            .await
            .unwrap();
        // The only undelivered entry: this one.
        let _: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.queue.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut c)
            .await
            .unwrap();
        let inflight = InFlight::default();
        inflight.add([entry_id.as_str()]);
        let (due_times, followed) = tokio::sync::mpsc::unbounded_channel();
        let holder = Arc::new(Holder {
            stream: stream.to_owned(),
            group: self.queue.group.clone(),
            consumer: consumer.to_owned(),
            paused: self.queue.paused.clone(),
            inflight: inflight.clone(),
            due_times,
            stop: self.stop.clone(),
            handover: Handover::new(self.conn.clone(), self.queue.wake.clone()),
            conn: self.conn.clone(),
            orphan_timeout: std::time::Duration::from_secs(30),
        });
        let (settle, _rx) = SettleHandle::channel();
        let delivery = Delivery::new(entry_id, envelope, 0, 10, settle, holder, times);
        (delivery, inflight, followed)
    }

    /// Wake markers written to the queue's wake stream.
    async fn wake_markers(&self) -> u64 {
        let mut c = self.conn.clone();
        c.xlen(&self.queue.wake).await.unwrap()
    }

    /// `consumer` takes `job`'s entry over, as another worker does after the orphan timeout.
    async fn take_over(&self, job: &Delivery, consumer: &str) {
        let mut c = self.conn.clone();
        let _: Value = redis::cmd("XCLAIM")
            .arg(&self.queue.stream)
            .arg(&self.queue.group)
            .arg(consumer)
            .arg(0)
            .arg(job.entry_id())
            .query_async(&mut c)
            .await
            .unwrap();
    }

    /// The consumer `entry_id` is pending for, if any.
    async fn holder_of(&self, entry_id: &str) -> Option<String> {
        let mut c = self.conn.clone();
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(&self.queue.stream)
            .arg(&self.queue.group)
            .arg(entry_id)
            .arg(entry_id)
            .arg(1)
            .query_async(&mut c)
            .await
            .unwrap();
        pending.into_iter().next().map(|p| p.1)
    }

    /// Whether the entry is still in the stream.
    async fn in_stream(&self, entry_id: &str) -> bool {
        let mut c = self.conn.clone();
        let found: Vec<Value> = redis::cmd("XRANGE")
            .arg(&self.queue.stream)
            .arg(entry_id)
            .arg(entry_id)
            .query_async(&mut c)
            .await
            .unwrap();
        !found.is_empty()
    }

    /// This ledger as a Redis user refused `ZADD` (so a step's held `ZADD` fails at the end
    /// of its script, after its other writes).
    async fn ledger_without_zadd(&self) -> Ledger {
        let mut admin = self.conn.clone();
        let () = redis::cmd("ACL")
            .arg(&[
                "SETUSER", "nozadd", "on", "nopass", "~*", "&*", "+@all", "-zadd",
            ])
            .query_async(&mut admin)
            .await
            .unwrap();
        let as_nozadd = self
            .redis
            .url()
            .replacen("redis://", "redis://nozadd:any@", 1);
        let limited = RedisClient::single(&as_nozadd)
            .and_then(|client| client.connect(Default::default()))
            .expect("client");
        Ledger::new(limited, LedgerKeys::new("{t:payouts}", &self.queue))
    }

    /// How many times Redis ran `command` (client and Lua calls alike).
    fn command_calls(&self, command: &str) -> u64 {
        self.redis.command_calls(command).unwrap()
    }

    async fn delayed_jobs(&self) -> u64 {
        let mut c = self.conn.clone();
        c.zcard(&self.queue.delayed).await.unwrap()
    }
}

fn poll_job(id: &str) -> PreparedJob {
    poll_job_in(id, 60_000)
}

fn poll_job_in(id: &str, delay_ms: u64) -> PreparedJob {
    PreparedJob {
        text: format!(r#"{{"id":"poll-{id}","p":{{}}}}"#),
        id: format!("poll-{id}"),
        unique: String::new(),
        run_at_ms: crate::queue::now_ms() + delay_ms,
        delay_ms,
    }
}

#[tokio::test]
async fn a_due_time_its_worker_can_no_longer_follow_is_handed_to_another_worker() {
    // The step is sent while the worker runs (no marker asked for), and its promoter ends
    // before the reply comes: the due time goes out as a marker after all.
    let s = setup().await;
    s.register("FOLLOW-9").await;
    let (job, _, followed) = s.deliver_following(&s.queue.stream, "w1", None).await;
    drop(followed);
    let poll = poll_job_in("FOLLOW-9", 60_000);
    s.ledger
        .accept_finishing("FOLLOW-9", Some("P9"), Some(&poll), Some(&job))
        .await
        .unwrap();
    assert!(job.is_settled());
    // Written by a task of its own: waited for (the bound only guards against a hang).
    let mut c = s.conn.clone();
    let mut markers: redis::streams::StreamRangeReply = Default::default();
    for _ in 0..1000 {
        markers = c.xrange_all(&s.queue.wake).await.unwrap();
        if !markers.ids.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let due: Vec<Option<String>> = markers.ids.iter().map(|m| m.get("w")).collect();
    assert_eq!(
        due,
        [Some(poll.run_at_ms.to_string())],
        "one marker, for the poll"
    );
}

#[tokio::test]
async fn a_worker_that_queues_the_earliest_poll_wakes_for_it_itself_without_a_marker() {
    let s = setup().await;
    for id in ["FOLLOW-1", "FOLLOW-2", "FOLLOW-3"] {
        s.register(id).await;
    }
    let (job, _, mut followed) = s.deliver_following(&s.queue.stream, "w1", None).await;
    let poll = poll_job_in("FOLLOW-1", 60_000);
    let accepted = s
        .ledger
        .accept_finishing("FOLLOW-1", Some("P1"), Some(&poll), Some(&job))
        .await
        .unwrap();
    assert!(accepted && job.is_settled());
    assert_eq!(s.delayed_jobs().await, 1);
    assert_eq!(
        followed.try_recv().ok(),
        Some(poll.run_at_ms),
        "its worker's promoter follows the poll's due time"
    );
    assert_eq!(s.wake_markers().await, 0, "no marker wakes another worker");

    // A poll due after one already queued: nobody needs waking.
    let (later_job, _, mut later_followed) = s.deliver_following(&s.queue.stream, "w2", None).await;
    let later = poll_job_in("FOLLOW-2", 90_000);
    s.ledger
        .accept_finishing("FOLLOW-2", Some("P2"), Some(&later), Some(&later_job))
        .await
        .unwrap();
    assert!(later_followed.try_recv().is_err());
    assert_eq!(s.wake_markers().await, 0);

    // The earliest poll queued without a delivery (no worker of this queue to follow it):
    // a marker, for whichever worker reads it.
    let earliest = poll_job_in("FOLLOW-3", 30_000);
    s.ledger
        .accept("FOLLOW-3", Some("P3"), Some(&earliest))
        .await
        .unwrap();
    assert_eq!(s.wake_markers().await, 1);
    assert_eq!(s.delayed_jobs().await, 3);

    // A worker that is stopping (its promoter ends) follows nothing: a marker again.
    s.register("FOLLOW-4").await;
    let (stopping, _, mut stopping_followed) =
        s.deliver_following(&s.queue.stream, "w3", None).await;
    s.stop.cancel();
    let sooner = poll_job_in("FOLLOW-4", 20_000);
    s.ledger
        .accept_finishing("FOLLOW-4", Some("P4"), Some(&sooner), Some(&stopping))
        .await
        .unwrap();
    assert!(stopping.is_settled(), "acknowledged all the same");
    assert!(stopping_followed.try_recv().is_err());
    assert_eq!(s.wake_markers().await, 2);
}

#[tokio::test]
async fn an_acceptance_acknowledges_the_job_it_finishes_in_the_same_step() {
    let s = setup().await;
    s.register("ACK-1").await;
    // The registration's create job is not in the stream (registered without a job).
    let (job, inflight) = s.deliver(&s.queue.stream, "w1", None).await;
    assert_eq!(s.holder_of(job.entry_id()).await.as_deref(), Some("w1"));

    let accepted = s
        .ledger
        .accept_finishing("ACK-1", Some("P1"), Some(&poll_job("ACK-1")), Some(&job))
        .await
        .unwrap();
    assert!(accepted);
    assert!(
        job.is_settled(),
        "the layer must have nothing left to settle"
    );
    assert_eq!(s.holder_of(job.entry_id()).await, None, "acknowledged");
    assert!(
        !s.in_stream(job.entry_id()).await,
        "deleted, as a settlement does"
    );
    assert!(inflight.snapshot().is_empty(), "no longer renewed");
    assert_eq!(
        s.delayed_jobs().await,
        1,
        "the poll job came with the acceptance"
    );
    assert!(s.ledger.get("ACK-1").await.unwrap().unwrap().accepted);

    // A repeated acceptance (a redelivered job) answers 0 and finishes its job too.
    let (again, _) = s.deliver(&s.queue.stream, "w1", None).await;
    let accepted = s
        .ledger
        .accept_finishing("ACK-1", Some("P1"), None, Some(&again))
        .await
        .unwrap();
    assert!(!accepted);
    assert!(again.is_settled());
    assert_eq!(s.holder_of(again.entry_id()).await, None);
}

#[tokio::test]
async fn an_acceptance_with_history_lines_keeps_them_and_still_acknowledges_its_job() {
    // The lines noted before the acceptance (a create's answer) come before the delivery in
    // each operation's arguments.
    let s = setup().await;
    s.register("EVT-1").await;
    let (job, _) = s.deliver(&s.queue.stream, "w1", None).await;
    let mut sent = history::OrderEvent::now(history::EventKind::Create);
    sent.code = Some(0);
    s.ledger.note_soon("EVT-1", sent.clone());
    s.ledger.note_soon("EVT-1", sent);
    let accepted = s
        .ledger
        .accept_finishing("EVT-1", Some("P1"), Some(&poll_job("EVT-1")), Some(&job))
        .await
        .unwrap();
    assert!(accepted);
    assert!(job.is_settled());
    assert_eq!(s.holder_of(job.entry_id()).await, None);
    let events = s.ledger.events("EVT-1").await.unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.iter().all(|e| e.kind == history::EventKind::Create));
}

#[tokio::test]
async fn an_acknowledgement_that_fails_leaves_the_job_to_its_settler_and_the_effect_stands() {
    let s = setup().await;
    s.register("NOGROUP-1").await;
    let (job, inflight) = s.deliver(&s.queue.stream, "w1", None).await;
    // The consumer group is gone (a restarted server without its data, say): the ownership
    // check fails inside the script.
    let mut c = s.conn.clone();
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&s.queue.stream)
        .arg(&s.queue.group)
        .query_async(&mut c)
        .await
        .unwrap();
    let accepted = s
        .ledger
        .accept_finishing(
            "NOGROUP-1",
            Some("P1"),
            Some(&poll_job("NOGROUP-1")),
            Some(&job),
        )
        .await
        .unwrap();
    assert!(accepted, "the acceptance is written");
    assert_eq!(s.delayed_jobs().await, 1, "with its poll job");
    assert!(!job.is_settled(), "its settlement is the settler's");
    assert_eq!(inflight.snapshot(), vec![job.entry_id().to_owned()]);
    assert!(s.in_stream(job.entry_id()).await);
}

#[tokio::test]
async fn a_job_taken_over_by_another_worker_is_left_to_it_while_the_effect_stands() {
    let s = setup().await;
    s.register("STALE-1").await;
    let (job, inflight) = s.deliver(&s.queue.stream, "w1", None).await;
    // w1 froze past the orphan timeout: w2 took the entry over.
    s.take_over(&job, "w2").await;

    let accepted = s
        .ledger
        .accept_finishing("STALE-1", Some("P1"), None, Some(&job))
        .await
        .unwrap();
    assert!(accepted, "the acceptance itself is written");
    assert_eq!(
        s.holder_of(job.entry_id()).await.as_deref(),
        Some("w2"),
        "w1 must not acknowledge an entry w2 holds"
    );
    assert!(s.in_stream(job.entry_id()).await);
    // Nothing for w1's settler either (its settle script would drop it as stale).
    assert!(job.is_settled());
    assert!(inflight.snapshot().is_empty());
}

#[tokio::test]
async fn an_acceptance_whose_poll_job_cannot_be_written_leaves_its_job_pending() {
    let s = setup().await;
    s.register("HELD-1").await;
    let (job, inflight) = s.deliver(&s.queue.stream, "w1", None).await;
    // The delayed set is broken (wrong type): the poll job cannot be added.
    let mut c = s.conn.clone();
    let () = c.set(&s.queue.delayed, "not a zset").await.unwrap();

    let result = s
        .ledger
        .accept_finishing("HELD-1", Some("P1"), Some(&poll_job("HELD-1")), Some(&job))
        .await;
    assert!(result.is_err(), "the caller sees the failure: {result:?}");
    assert!(!job.is_settled(), "its retry is the settler's");
    assert_eq!(s.holder_of(job.entry_id()).await.as_deref(), Some("w1"));
    assert_eq!(inflight.snapshot(), vec![job.entry_id().to_owned()]);
}

#[tokio::test]
async fn an_acceptance_that_fails_after_queueing_its_earliest_poll_wakes_a_worker_by_marker() {
    // The step notes the poll as the earliest for its own worker to follow, then its held
    // `ZADD` is refused (a Redis user without `ZADD`): the acceptance answers with the error,
    // so its worker is told of nothing and the step writes the usual marker instead.
    let s = setup().await;
    s.register("REFUSED-1").await;
    let ledger = s.ledger_without_zadd().await;
    let (job, inflight, mut followed) = s.deliver_following(&s.queue.stream, "w1", None).await;
    let poll = poll_job_in("REFUSED-1", 60_000);

    let result = ledger
        .accept_finishing("REFUSED-1", Some("P1"), Some(&poll), Some(&job))
        .await;
    assert!(result.is_err(), "the caller sees the failure: {result:?}");
    assert!(followed.try_recv().is_err(), "its worker follows nothing");
    let mut c = s.conn.clone();
    let markers: redis::streams::StreamRangeReply = c.xrange_all(&s.queue.wake).await.unwrap();
    let due: Vec<Option<String>> = markers.ids.iter().map(|m| m.get("w")).collect();
    assert_eq!(
        due,
        [Some(poll.run_at_ms.to_string())],
        "one marker, for the poll"
    );
    assert_eq!(s.delayed_jobs().await, 0, "the poll was not added");
    assert!(!job.is_settled(), "its retry is the settler's");
    assert_eq!(inflight.snapshot(), vec![job.entry_id().to_owned()]);
}

#[tokio::test]
async fn only_a_delivery_of_the_ledgers_own_queue_without_a_unique_key_is_acknowledged() {
    let s = setup().await;
    for id in ["OTHER-1", "UNIQUE-1"] {
        s.register(id).await;
    }
    // From another queue's stream (a job written into the wrong lane, say).
    let other = QueueKeys::new("t", "elsewhere").unwrap();
    create_group(&s.conn, &other).await;
    let (foreign, _) = s.deliver(&other.stream, "w1", None).await;
    s.ledger
        .accept_finishing("OTHER-1", Some("P1"), None, Some(&foreign))
        .await
        .unwrap();
    assert!(!foreign.is_settled());

    // A job holding a unique key: releasing it is the settle script's job.
    let (unique, _) = s
        .deliver(&s.queue.stream, "w1", Some("poll-once:UNIQUE-1"))
        .await;
    s.ledger
        .accept_finishing("UNIQUE-1", Some("P2"), None, Some(&unique))
        .await
        .unwrap();
    assert!(!unique.is_settled());
    assert_eq!(s.holder_of(unique.entry_id()).await.as_deref(), Some("w1"));
}

#[tokio::test]
async fn a_final_state_found_by_a_poll_acknowledges_the_poll_each_time() {
    let s = setup().await;
    s.register("FIN-1").await;
    s.ledger.accept("FIN-1", Some("P1"), None).await.unwrap();
    let record = s.ledger.get("FIN-1").await.unwrap().unwrap();
    let result = FinalResult {
        gateway_state: Some(2),
        pay_order_id: Some("P1".into()),
        ..FinalResult::default()
    };
    // Recorded, then unchanged (a redelivered poll), then a correction: each finishes its job.
    let expected = [
        (Phase::Succeeded, Finalized::Recorded),
        (Phase::Succeeded, Finalized::Unchanged),
        (Phase::Failed, Finalized::Corrected),
    ];
    for (phase, want) in expected {
        let (job, _) = s.deliver(&s.queue.stream, "w1", None).await;
        let applied = s
            .ledger
            .apply_gateway_final_finishing(&record, phase, &result, Some(&job))
            .await
            .unwrap();
        assert_eq!(applied, want);
        assert!(job.is_settled(), "{want:?}");
        assert_eq!(s.holder_of(job.entry_id()).await, None, "{want:?}");
    }
    let mut c = s.conn.clone();
    let outcomes: u64 = c.xlen(s.ledger.keys().outcomes()).await.unwrap();
    assert_eq!(outcomes, 2, "one final and one correction");
}

#[tokio::test]
async fn a_lone_final_state_acknowledges_its_job_whoever_holds_it_without_an_ownership_read() {
    // A final order leaves no run of its job anything to do: the lone finalisation's
    // acknowledgement is written while the entry is pending at all, and its count tells
    // acknowledged from stale (one command fewer than reading the holder first).
    let s = setup().await;
    s.register("LONE-1").await;
    s.ledger.accept("LONE-1", Some("P1"), None).await.unwrap();
    let record = s.ledger.get("LONE-1").await.unwrap().unwrap();
    let result = FinalResult {
        gateway_state: Some(2),
        pay_order_id: Some("P1".into()),
        ..FinalResult::default()
    };
    // w1 froze, w2 took the entry over; w1 wakes and writes the final state.
    let (taken, _) = s.deliver(&s.queue.stream, "w1", None).await;
    s.take_over(&taken, "w2").await;
    let xpending_before = s.command_calls("xpending");
    let applied = s
        .ledger
        .apply_gateway_final_finishing(&record, Phase::Succeeded, &result, Some(&taken))
        .await
        .unwrap();
    assert_eq!(applied, Finalized::Recorded);
    assert_eq!(
        s.command_calls("xpending"),
        xpending_before,
        "no ownership read"
    );
    assert!(taken.is_settled());
    assert_eq!(s.holder_of(taken.entry_id()).await, None, "acknowledged");
    assert!(!s.in_stream(taken.entry_id()).await, "and deleted");

    // A delivery no longer pending at all (settled by the run that took it over): stale,
    // while the effect (here: none left to write) stands.
    let (gone, inflight) = s.deliver(&s.queue.stream, "w1", None).await;
    let mut c = s.conn.clone();
    let _: i64 = c
        .xack(&s.queue.stream, &s.queue.group, &[gone.entry_id()])
        .await
        .unwrap();
    let xpending_before = s.command_calls("xpending");
    let applied = s
        .ledger
        .apply_gateway_final_finishing(&record, Phase::Succeeded, &result, Some(&gone))
        .await
        .unwrap();
    assert_eq!(applied, Finalized::Unchanged);
    assert_eq!(
        s.command_calls("xpending"),
        xpending_before,
        "no ownership read"
    );
    assert!(gone.is_settled(), "nothing left for its settler");
    assert!(inflight.snapshot().is_empty());
    assert!(
        s.in_stream(gone.entry_id()).await,
        "a stale entry is not deleted"
    );

    let outcomes: u64 = c.xlen(s.ledger.keys().outcomes()).await.unwrap();
    assert_eq!(outcomes, 1);
}

#[tokio::test]
async fn an_operation_that_does_not_answer_as_its_caller_asked_acknowledges_nothing() {
    // The script acknowledges only on the replies the caller finishes its job on (a
    // finalisation's lost lease or unproven absence sends its job round again).
    let s = setup().await;
    s.register("ASKED-1").await;
    let (job, inflight) = s.deliver(&s.queue.stream, "w1", None).await;
    let stuck = s.ledger.op("S", "ASKED-1").arg("ASKED-1");
    let flagged = s
        .ledger
        .apply_int_finishing(stuck, Some(&job), "0", "mark_stuck", "ASKED-1")
        .await
        .unwrap();
    assert_eq!(flagged, 1, "answered 1, not the 0 asked for");
    assert!(!job.is_settled());
    assert_eq!(s.holder_of(job.entry_id()).await.as_deref(), Some("w1"));
    assert_eq!(inflight.snapshot(), vec![job.entry_id().to_owned()]);
}

#[tokio::test]
async fn many_jobs_of_two_consumers_in_one_batch_are_each_acknowledged_or_left() {
    let s = setup().await;
    let ids: Vec<String> = (0..24).map(|i| format!("MANY-{i}")).collect();
    let mut jobs = Vec::new();
    let mut followed = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        s.register(id).await;
        let consumer = if i % 2 == 0 { "w1" } else { "w2" };
        let (job, _, follows) = s.deliver_following(&s.queue.stream, consumer, None).await;
        jobs.push(job);
        followed.push(follows);
    }
    // Every third job was taken over by w3 meanwhile.
    for job in jobs.iter().step_by(3) {
        s.take_over(job, "w3").await;
    }
    // Concurrent callers: all 24 operations reach the batcher before its task runs (one
    // poll of every future on this one-thread runtime), so they share one script call and
    // each consumer's ownership is one ranged XPENDING.
    let xpending_before = s.command_calls("xpending");
    let polls: Vec<PreparedJob> = ids.iter().map(|id| poll_job(id)).collect();
    let accepts = ids.iter().zip(&jobs).zip(&polls).map(|((id, job), poll)| {
        s.ledger
            .accept_finishing(id, Some("P"), Some(poll), Some(job))
    });
    for accepted in futures::future::join_all(accepts).await {
        assert!(accepted.unwrap());
    }
    assert_eq!(
        s.command_calls("xpending") - xpending_before,
        2,
        "one ownership check per consumer"
    );
    for (i, job) in jobs.iter().enumerate() {
        let holder = s.holder_of(job.entry_id()).await;
        if i % 3 == 0 {
            assert_eq!(
                holder.as_deref(),
                Some("w3"),
                "job {i}: left to its new holder"
            );
        } else {
            assert_eq!(holder, None, "job {i}: acknowledged");
            assert!(!s.in_stream(job.entry_id()).await);
        }
        assert!(job.is_settled(), "job {i}");
    }
    assert_eq!(s.delayed_jobs().await, 24);
    // The polls are due in the order they were made: only the first is due before every
    // other, and only its worker is told to wake for it (its entry was taken over, but that
    // worker lives); nobody needed a marker.
    let told: Vec<usize> = followed
        .iter_mut()
        .enumerate()
        .filter_map(|(i, follows)| follows.try_recv().ok().map(|_| i))
        .collect();
    assert_eq!(told, [0]);
    assert_eq!(s.wake_markers().await, 0);
}

/// A TCP hop to Redis that can lose the next reply: it reads it from the server, then closes
/// the client's connection instead of passing it on (a connection dropped after the command
/// ran, as a failover or a network fault can).
async fn lossy_hop(target: &str) -> (String, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let lose_next = Arc::new(AtomicBool::new(false));
    let armed = Arc::clone(&lose_next);
    let target = target.to_owned();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let armed = Arc::clone(&armed);
            tokio::spawn(async move {
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = from_server.read(&mut buf).await {
                    if n == 0 || armed.swap(false, Ordering::SeqCst) {
                        break;
                    }
                    if to_client.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    (url, lose_next)
}

#[tokio::test]
async fn a_lost_reply_after_the_step_ran_leaves_the_job_done_and_acknowledged() {
    let s = setup().await;
    s.register("LOST-1").await;
    let host = format!("127.0.0.1:{}", s.redis.port());
    let (url, lose_next) = lossy_hop(&host).await;
    let through_hop = RedisClient::single(&url)
        .and_then(|client| client.connect(Default::default()))
        .expect("client");
    let ledger = Ledger::new(through_hop, s.ledger.keys().clone());
    // Connects through the hop (the batch script is loaded: the registration ran it, so the
    // next ledger step runs it).
    assert!(ledger.get("LOST-1").await.unwrap().is_some());
    let (job, inflight, mut followed) = s.deliver_following(&s.queue.stream, "w1", None).await;

    lose_next.store(true, std::sync::atomic::Ordering::SeqCst);
    let poll = poll_job("LOST-1");
    let lost = ledger
        .accept_finishing("LOST-1", Some("P1"), Some(&poll), Some(&job))
        .await;
    assert!(lost.is_err(), "the caller never heard: {lost:?}");
    // Its poll was queued without a marker, for this worker to follow: it still does.
    assert_eq!(followed.try_recv().ok(), Some(poll.run_at_ms));
    assert_eq!(s.wake_markers().await, 0);
    // Its handler fails, so its layer asks for a retry: that settlement meets an entry
    // no longer pending (dropped as stale), and the job is not run again.
    assert!(!job.is_settled());
    assert_eq!(inflight.snapshot(), vec![job.entry_id().to_owned()]);
    // What the script did stands, together: the acceptance, its poll job, the ack.
    assert!(s.ledger.get("LOST-1").await.unwrap().unwrap().accepted);
    assert_eq!(s.delayed_jobs().await, 1);
    assert_eq!(s.holder_of(job.entry_id()).await, None);
    assert!(!s.in_stream(job.entry_id()).await);
}

#[tokio::test]
async fn a_lease_relies_on_its_fetch_loops_fresh_pause_reading_and_reads_the_flag_otherwise() {
    use std::time::Instant;
    let s = setup().await;
    for id in ["FRESH-1", "STALE-1", "UNREAD-1"] {
        s.register(id).await;
    }
    // Paused after the fetch loops read the flag clear.
    let mut c = s.conn.clone();
    let () = c.set(&s.queue.paused, 1).await.unwrap();
    let deliver = |read_at| s.deliver_after_reading(&s.queue.stream, "w1", None, read_at);
    // A reading taken "now" for the whole test (an instant ahead of now reads as 0 ms old:
    // the test does not depend on how fast this machine runs it).
    let (fresh, _, _) = deliver(Some(Instant::now() + Duration::from_secs(3600))).await;
    let stale_at = Instant::now()
        .checked_sub(FRESH_PAUSE_READING + Duration::from_millis(50))
        .unwrap();
    let (stale, _, _) = deliver(Some(stale_at)).await;
    let (unread, _, _) = deliver(None).await;
    let lease = Duration::from_secs(60);

    let pause_reads = s.command_calls("exists");
    let (ticket, record) = s
        .ledger
        .begin_submit_for("FRESH-1", "tok-1", lease, Some(&fresh))
        .await
        .unwrap();
    assert!(
        matches!(ticket, SubmitTicket::Go { .. }) && record.is_some(),
        "a clear reading {FRESH_PAUSE_READING:?} old or less stands for the flag: {ticket:?}"
    );
    assert_eq!(
        s.command_calls("exists"),
        pause_reads,
        "the lease step did not read the flag again"
    );

    for (id, job) in [("STALE-1", Some(&stale)), ("UNREAD-1", Some(&unread))] {
        let (ticket, _) = s
            .ledger
            .begin_submit_for(id, "tok-2", lease, job)
            .await
            .unwrap();
        assert!(matches!(ticket, SubmitTicket::Paused), "{id}: {ticket:?}");
    }
    let (ticket, _) = s
        .ledger
        .begin_submit_for("UNREAD-1", "tok-3", lease, None)
        .await
        .unwrap();
    assert!(
        matches!(ticket, SubmitTicket::Paused),
        "no delivery: {ticket:?}"
    );

    // A reading of another queue's flag says nothing about this one.
    let other = QueueKeys::new("t", "other").unwrap();
    let elsewhere = Ledger::new(s.conn.clone(), LedgerKeys::new("{t:other}", &other));
    let () = c.set(&other.paused, 1).await.unwrap();
    register_in(&elsewhere, "FRESH-2").await;
    let (fresh_here, _, _) = deliver(Some(Instant::now() + Duration::from_secs(3600))).await;
    let (ticket, _) = elsewhere
        .begin_submit_for("FRESH-2", "tok-4", lease, Some(&fresh_here))
        .await
        .unwrap();
    assert!(matches!(ticket, SubmitTicket::Paused), "{ticket:?}");
}

#[tokio::test]
async fn an_adoptions_poll_job_that_cannot_be_written_leaves_the_poll_in_hand_unmarked() {
    // The poll left in hand (by a run that may have lost its lease) is taken over by an
    // adoption's poll job, marked `pollQueued`; if that job cannot be written the mark is
    // not left behind, so a create job that finds the order later still becomes its poll
    // job. Both ways the job can fail: its delayed set unreadable (the step raises before
    // the mark), or its held `ZADD` refused at the end of the script (the mark is undone).
    let s = setup().await;
    let refused = s.ledger_without_zadd().await;
    let mut c = s.conn.clone();
    for (id, broken_set) in [("UNMARK-1", true), ("UNMARK-2", false)] {
        s.register(id).await;
        assert_eq!(
            s.ledger.accept_polling_in_hand(id, "P1").await.unwrap(),
            InHandAcceptance::Recorded
        );
        let (job, _) = s.deliver(&s.queue.stream, "w2", None).await;
        let result = if broken_set {
            let () = c.set(&s.queue.delayed, "not a zset").await.unwrap();
            let result = s
                .ledger
                .accept_finishing(id, Some("P1"), Some(&poll_job(id)), Some(&job))
                .await;
            let () = c.del(&s.queue.delayed).await.unwrap();
            result
        } else {
            refused
                .accept_finishing(id, Some("P1"), Some(&poll_job(id)), Some(&job))
                .await
        };
        assert!(
            result.is_err(),
            "{id}: the caller sees the failure: {result:?}"
        );
        assert!(!job.is_settled(), "{id}: its retry is the settler's");
        assert_eq!(s.delayed_jobs().await, 0, "{id}: no poll job");
        let marked: Option<String> = c
            .hget(s.ledger.keys().order(id), "pollQueued")
            .await
            .unwrap();
        assert_eq!(marked, None, "{id}: no mark without its poll job");
        let (ticket, _) = s
            .ledger
            .begin_submit_with_record(id, "later", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            ticket,
            SubmitTicket::Accepted { poll_in_hand: true },
            "{id}"
        );
    }
}

#[tokio::test]
async fn a_flag_its_batch_already_read_set_outweighs_a_fresh_clear_reading() {
    // Two lease steps in one script call: the first (no reading of its own) reads the flag
    // and finds it set; the second carries a fresh clear reading, taken before the pause,
    // yet the batch knows better.
    use std::time::Instant;
    let s = setup().await;
    for id in ["BATCH-1", "BATCH-2"] {
        s.register(id).await;
    }
    let mut c = s.conn.clone();
    let () = c.set(&s.queue.paused, 1).await.unwrap();
    let (fresh, _, _) = s
        .deliver_after_reading(
            &s.queue.stream,
            "w1",
            None,
            Some(Instant::now() + Duration::from_secs(3600)),
        )
        .await;
    let lease = Duration::from_secs(60);
    let scripts = s.command_calls("evalsha");
    // Concurrent callers on this one-thread runtime: both reach the batcher before its task
    // runs, in this order, and share one script call.
    let (first, second) = tokio::join!(
        s.ledger.begin_submit_for("BATCH-1", "tok-1", lease, None),
        s.ledger
            .begin_submit_for("BATCH-2", "tok-2", lease, Some(&fresh)),
    );
    assert_eq!(s.command_calls("evalsha") - scripts, 1, "one script call");
    assert!(matches!(first.unwrap().0, SubmitTicket::Paused));
    let (ticket, _) = second.unwrap();
    assert!(matches!(ticket, SubmitTicket::Paused), "{ticket:?}");
}

#[tokio::test]
async fn a_lone_in_hand_acceptance_is_the_guards_reset_and_one_hsetnx_with_the_scripts_effect() {
    let s = setup().await;
    let guard = s.ledger.keys().guard();
    let mut c = s.conn.clone();
    let mut sent = history::OrderEvent::now(history::EventKind::Create);
    sent.code = Some(0);
    for id in ["LONE-1", "BATCHED-1", "BATCHED-2"] {
        s.register(id).await;
        s.ledger.note_soon(id, sent.clone());
    }
    let counts = |s: &Setup| ["evalsha", "del", "hsetnx"].map(|command| s.command_calls(command));
    let in_hand = |id: &'static str| {
        let ledger = s.ledger.clone();
        async move {
            ledger
                .accept_polling_in_hand(id, &format!("P-{id}"))
                .await
                .unwrap()
        }
    };

    // Alone in its batch: no script call, the guard's count cleared as the script would.
    let _: i64 = c.sadd(&guard, "REFUSED-1").await.unwrap();
    let before = counts(&s);
    assert_eq!(in_hand("LONE-1").await, InHandAcceptance::Recorded);
    let after = counts(&s);
    assert_eq!(
        [0, 1, 2].map(|i| after[i] - before[i]),
        [0, 1, 1],
        "EVALSHA, DEL, HSETNX"
    );
    let counted: bool = c.exists(&guard).await.unwrap();
    assert!(!counted, "an accepted create clears the guard's count");

    // Two at once (this one-thread runtime: both reach the batcher before its task runs)
    // share the script, which writes the same milestone.
    let _: i64 = c.sadd(&guard, "REFUSED-2").await.unwrap();
    let before = counts(&s);
    let (first, second) = tokio::join!(in_hand("BATCHED-1"), in_hand("BATCHED-2"));
    assert_eq!(first, InHandAcceptance::Recorded);
    assert_eq!(second, InHandAcceptance::Recorded);
    assert_eq!(counts(&s)[0] - before[0], 1, "one script call");
    let counted: bool = c.exists(&guard).await.unwrap();
    assert!(!counted);
    let milestone = |id: &'static str| {
        let mut c = s.conn.clone();
        let key = s.ledger.keys().order(id);
        async move {
            let text: String = c.hget(&key, "accepted").await.unwrap();
            let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
            let object = json.as_object_mut().unwrap();
            assert!(object.remove("at").is_some() && object.remove("payOrderId").is_some());
            json
        }
    };
    let lone = milestone("LONE-1").await;
    assert_eq!(lone, milestone("BATCHED-1").await);
    assert_eq!(lone["pollInHand"], true);
    assert_eq!(lone["events"][0]["kind"], "create", "{lone}");
    let listed: bool = c.exists(s.ledger.keys().events("LONE-1")).await.unwrap();
    assert!(
        !listed,
        "the answer is kept in the milestone, not the history list"
    );

    // An order found accepted: the script answers. Another run's acceptance in hand (it may
    // have lost its lease): polled here too; one accepted the usual way: nothing.
    s.register("USUAL-1").await;
    assert!(s.ledger.accept("USUAL-1", Some("P"), None).await.unwrap());
    let before = counts(&s);
    assert_eq!(in_hand("LONE-1").await, InHandAcceptance::Recorded);
    assert_eq!(in_hand("USUAL-1").await, InHandAcceptance::AlreadyAccepted);
    assert_eq!(counts(&s)[0] - before[0], 2, "each answered by the script");
}

#[tokio::test]
async fn an_acceptance_written_after_its_guard_reset_leaves_the_count_alone_and_keeps_its_time() {
    let s = setup().await;
    let guard = s.ledger.keys().guard();
    let mut c = s.conn.clone();
    let mut sent = history::OrderEvent::now(history::EventKind::Create);
    sent.code = Some(0);
    for id in ["LATE-1", "LATE-2", "LATE-3"] {
        s.register(id).await;
        s.ledger.note_soon(id, sent.clone());
    }
    let counts = |s: &Setup| ["evalsha", "del", "hsetnx"].map(|command| s.command_calls(command));
    let late = |id: &'static str, at_ms: u64| {
        let ledger = s.ledger.clone();
        async move {
            ledger
                .accept_in_hand_after_clearing(id, &format!("P-{id}"), at_ms)
                .await
                .unwrap()
        }
    };

    // The reset alone, when the gateway accepted: one DEL.
    let _: i64 = c.sadd(&guard, "REFUSED-1").await.unwrap();
    let before = counts(&s);
    s.ledger.clear_guard_for_acceptance().await.unwrap();
    let after = counts(&s);
    assert_eq!([0, 1, 2].map(|i| after[i] - before[i]), [0, 1, 0]);
    let counted: bool = c.exists(&guard).await.unwrap();
    assert!(!counted, "the reset clears the count");

    // A refusal counted after it stays counted when the acceptance is written: alone in its
    // batch, one HSETNX and no DEL.
    let _: i64 = c.sadd(&guard, "REFUSED-2").await.unwrap();
    let before = counts(&s);
    assert_eq!(late("LATE-1", 1_000).await, InHandAcceptance::Recorded);
    let after = counts(&s);
    assert_eq!(
        [0, 1, 2].map(|i| after[i] - before[i]),
        [0, 0, 1],
        "EVALSHA, DEL, HSETNX"
    );
    // Two at once share the script, which leaves the count alone too.
    let (first, second) = tokio::join!(late("LATE-2", 2_000), late("LATE-3", 3_000));
    assert_eq!(
        (first, second),
        (InHandAcceptance::Recorded, InHandAcceptance::Recorded)
    );
    assert_eq!(counts(&s)[0] - after[0], 1, "one script call");
    assert_eq!(counts(&s)[1] - after[1], 0, "no DEL");
    let left: Vec<String> = c.smembers(&guard).await.unwrap();
    assert_eq!(left, vec!["REFUSED-2".to_owned()]);

    // Each milestone is marked as polled in hand, dated when the gateway accepted, and keeps
    // the create's history line.
    for (id, at) in [("LATE-1", 1_000), ("LATE-2", 2_000), ("LATE-3", 3_000)] {
        let text: String = c.hget(s.ledger.keys().order(id), "accepted").await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["at"], at, "{json}");
        assert_eq!(json["pollInHand"], true, "{json}");
        assert_eq!(json["payOrderId"], format!("P-{id}"), "{json}");
        assert_eq!(json["events"][0]["kind"], "create", "{json}");
    }
    // Written again (the milestone is there, held in hand): the lone form's HSETNX finds it
    // and the script answers, still leaving the count alone.
    let before = counts(&s);
    assert_eq!(late("LATE-1", 4_000).await, InHandAcceptance::Recorded);
    let after = counts(&s);
    assert_eq!([0, 1].map(|i| after[i] - before[i]), [1, 0], "EVALSHA, DEL");
    let left: Vec<String> = c.smembers(&guard).await.unwrap();
    assert_eq!(left, vec!["REFUSED-2".to_owned()]);
    let text: String = c
        .hget(s.ledger.keys().order("LATE-1"), "accepted")
        .await
        .unwrap();
    assert!(text.contains("\"at\":1000"), "the first one stands: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_reading_is_judged_when_its_batch_is_sent_not_when_its_step_is_made() {
    // A lease step made just after its fetch loop's reading waits behind a batch that holds
    // the batcher's connection (a `WAIT` for a replica that does not exist): by the time its
    // own batch is sent the reading is stale, so the script reads the flag itself.
    use std::time::Instant;
    let s = setup().await;
    for id in ["WAITED-1", "BEHIND-1"] {
        s.register(id).await;
    }
    let waits = RedisClient::single(s.redis.url())
        .and_then(|client| client.connect(Default::default()))
        .expect("client");
    let waiting = Ledger::with_replicas(
        s.conn.clone(),
        waits,
        s.ledger.keys().clone(),
        Replication {
            replicas: 1,
            timeout: Duration::from_secs(3),
        },
    );
    let lease = Duration::from_secs(60);
    let first = {
        let waiting = waiting.clone();
        tokio::spawn(async move { waiting.begin_submit("WAITED-1", "tok-1", lease).await })
    };
    // Its batch was sent once its lease is written; its `WAIT` holds the connection now.
    let started = Instant::now();
    while s.ledger.get("WAITED-1").await.unwrap().unwrap().phase != Phase::Submitting {
        assert!(started.elapsed() < Duration::from_secs(10), "hang guard");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut c = s.conn.clone();
    let () = c.set(&s.queue.paused, 1).await.unwrap();
    // A reading "taken" 300 ms ahead: 0 ms old when the step is made (however slow this
    // machine), seconds old when its batch goes after the `WAIT`.
    let read_at = Instant::now() + Duration::from_millis(300);
    let (job, _, _) = s
        .deliver_after_reading(&s.queue.stream, "w1", None, Some(read_at))
        .await;
    let (ticket, _) = waiting
        .begin_submit_for("BEHIND-1", "tok-2", lease, Some(&job))
        .await
        .unwrap();
    assert!(
        matches!(ticket, SubmitTicket::Paused),
        "the reading was stale when its batch was sent: {ticket:?}"
    );
    let ticket = first.await.unwrap().unwrap();
    assert!(matches!(ticket, SubmitTicket::Unreplicated), "{ticket:?}");
    // The unconfirmed lease was given back with its attempt: nothing was sent.
    let record = s.ledger.get("WAITED-1").await.unwrap().unwrap();
    assert_eq!(record.phase, Phase::Queued);
    assert_eq!(record.attempts, 0, "an unconfirmed lease costs no attempt");
}

/// The server's clock (ms), by `TIME`.
async fn server_ms(conn: &RedisConn) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    secs * 1000 + micros / 1000
}

#[tokio::test]
async fn a_lease_on_a_free_order_starts_on_its_deliverys_clock_bound_and_a_held_one_is_judged_on_time()
 {
    use crate::queue::FetchTimes;
    use std::time::Instant;
    let s = setup().await;
    // The process' estimate of the server's clock, against which a bound is checked.
    crate::queue::sync_clock(&mut s.conn.clone()).await.unwrap();
    for id in ["BOUND-1", "LOW-1", "HIGH-1", "OTHER-1", "OLD-1", "NONE-1"] {
        s.register(id).await;
    }
    let lease = Duration::from_secs(60);
    let lease_ms = lease.as_millis() as u64;
    let lease_until = |id: &'static str| {
        let mut c = s.conn.clone();
        let key = s.ledger.keys().order(id);
        async move {
            let until: String = c.hget(key, "leaseUntil").await.unwrap();
            until.parse::<u64>().unwrap()
        }
    };
    let after_empty = |sent: Instant| FetchTimes {
        fetched_at: Some(Instant::now()),
        after_empty_read: Some(sent),
        ..FetchTimes::default()
    };
    // Its fetch loop's empty read was sent 1.5 s before the job came (a bound that says so is
    // 1.5 s ahead of the clock, within what a true one may be: that it was used shows in the
    // lease's end).
    let early = Duration::from_millis(1500);
    let sent = Instant::now()
        .checked_sub(early)
        .expect("a machine up for 2 s");
    let before = server_ms(&s.conn).await;
    let (job, _, _) = s
        .deliver_with_times(&s.queue.stream, "w1", None, after_empty(sent))
        .await;
    let clock_reads = s.command_calls("time");
    let (ticket, _) = s
        .ledger
        .begin_submit_for("BOUND-1", "tok-1", lease, Some(&job))
        .await
        .unwrap();
    assert!(matches!(ticket, SubmitTicket::Go { .. }), "{ticket:?}");
    assert_eq!(
        s.command_calls("time"),
        clock_reads,
        "the lease step read no TIME"
    );
    let after = server_ms(&s.conn).await;
    let until = lease_until("BOUND-1").await;
    let early_ms = early.as_millis() as u64;
    // Started on the bound: the job's id plus the 1.5 s since the empty read (a generous hang
    // guard above: the step ran between the two readings).
    assert!(
        until >= before + lease_ms + early_ms,
        "{until} < {before} + lease + 1.5 s: not started on the bound"
    );
    assert!(
        until <= after + lease_ms + early_ms + 5_000,
        "{until} vs {after} + lease + 1.5 s"
    );

    // Another run finds it held: judged on the server's own clock, whatever its bound.
    let (second, _, _) = s
        .deliver_with_times(&s.queue.stream, "w2", None, after_empty(Instant::now()))
        .await;
    let clock_reads = s.command_calls("time");
    let (ticket, _) = s
        .ledger
        .begin_submit_for("BOUND-1", "tok-2", lease, Some(&second))
        .await
        .unwrap();
    assert!(matches!(ticket, SubmitTicket::Busy { .. }), "{ticket:?}");
    assert_eq!(
        s.command_calls("time"),
        clock_reads + 1,
        "a held lease reads TIME"
    );

    // No bound: one below the process' estimate of the clock (its premise failed: its "empty
    // read" was sent after the job was added, a second after this, and the job waited 100 ms
    // since), one too far above it (an empty read 5 s before: more than a true bound can be
    // ahead), one of another queue's stream, one whose empty read is too old, or no delivery;
    // each lease reads TIME.
    let (low, _, _) = s
        .deliver_with_times(
            &s.queue.stream,
            "w1",
            None,
            after_empty(Instant::now() + Duration::from_secs(1)),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (high, _, _) = s
        .deliver_with_times(
            &s.queue.stream,
            "w1",
            None,
            after_empty(Instant::now().checked_sub(Duration::from_secs(5)).unwrap()),
        )
        .await;
    let other = QueueKeys::new("t", "elsewhere").unwrap();
    create_group(&s.conn, &other).await;
    let (foreign, _, _) = s
        .deliver_with_times(&other.stream, "w1", None, after_empty(Instant::now()))
        .await;
    let long_ago =
        Instant::now().checked_sub(crate::queue::ADDED_AFTER_MAX_AGE + Duration::from_secs(1));
    let old = match long_ago {
        Some(at) => Some(
            s.deliver_with_times(&s.queue.stream, "w1", None, after_empty(at))
                .await
                .0,
        ),
        None => None,
    };
    for (id, job) in [
        ("LOW-1", Some(&low)),
        ("HIGH-1", Some(&high)),
        ("OTHER-1", Some(&foreign)),
        ("OLD-1", old.as_ref()),
        ("NONE-1", None),
    ] {
        let clock_reads = s.command_calls("time");
        let (ticket, _) = s
            .ledger
            .begin_submit_for(id, "tok-3", lease, job)
            .await
            .unwrap();
        assert!(
            matches!(ticket, SubmitTicket::Go { .. }),
            "{id}: {ticket:?}"
        );
        assert_eq!(s.command_calls("time"), clock_reads + 1, "{id}: TIME read");
    }
}
