//! The fetch loop of one worker: claiming of orphans, batched `XREADGROUP` into a bounded
//! buffer that apalis drains, and the pause check. Errors back off and retry; the loop only
//! ends when the worker stops.
//!
//! A pause parks the queue's consumer group (`queue::park`), so a read of new entries that
//! delivers anything proves the queue was not paused when it ran (by this version's pause,
//! API, console or guard; a flag written otherwise is followed up at the next flag check):
//! such a delivery is itself a reading of the flag, found clear, at the latest instant it
//! can be placed at (the read's sending, or, on a single Redis, the moment the server's
//! clock passed the newest entry's id, by the process' estimate of that clock). So a job
//! that comes to an idle worker costs no read of the flag, and its lease step none either
//! (`Delivery::pause_clear_read_at`). The flag itself is read (`park::CHECK`, which also
//! parks or unparks a group a flag written by hand disagrees with) before each orphan scan,
//! for the first jobs a loop fetches, for claimed entries without a fresh reading, and
//! while paused: then nothing is fetched and jobs fetched before are given back to the
//! stream at once (waiting, as if never fetched), to start after the resume; if the flag
//! cannot be read they are held (renewed, so no attempt is spent) until a reading decides.
//! Orphans are claimed only under a fresh "not paused" reading of the flag.
//!
//! Promotion of delayed jobs is not here: the promoter loop (`queue::promoter`) does it, on
//! time; wake markers read here are acknowledged (not deleted: `MAXLEN ~ 64` bounds them) and
//! their due times passed to it.

use apalis::prelude::{Task, TaskBuilder, TaskId};
use redis::Value;
use redis::streams::StreamId;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::queue::backend::release_unstarted;
use crate::queue::backoff::redis_backoff;
use crate::queue::delivery::Delivery;
use crate::queue::delivery::{FetchTimes, Holder};
use crate::queue::entries::{entry_id_ms, parse_claimed, parse_read, take_field};
use crate::queue::envelope::Envelope;
use crate::queue::inflight::InFlight;
use crate::queue::promoter::DueTimes;
use crate::queue::settle::{SettleHandle, Settlement};
use crate::queue::shared::Shared;
use crate::queue::{QueueError, clock, park, scripts};
use crate::redis_conn::RedisConn;

pub(crate) struct Fetcher<T> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) consumer: String,
    pub(crate) tx: mpsc::Sender<Task<T>>,
    pub(crate) settle: SettleHandle,
    pub(crate) inflight: InFlight,
    pub(crate) stop: CancellationToken,
    /// Due times read from wake markers, for this worker's promoter loop.
    pub(crate) due_times: DueTimes,
    /// Where its deliveries are held (for a ledger step that acknowledges one).
    pub(crate) holder: Arc<Holder>,
}

#[derive(Default)]
struct Schedule {
    paused: bool,
    /// The latest reading of the pause state found clear (or when the last reading that
    /// found it set was asked): the flag's, or a delivery's (see the module documentation).
    pause_checked: Option<Instant>,
    /// When the flag itself was last read (`park::CHECK`).
    flag_checked: Option<Instant>,
    /// Entries fetched when the pause flag could not be read: held (and renewed) until a
    /// reading decides, so a Redis blip costs them no attempt.
    held: Vec<StreamId>,
    claimed: Option<Instant>,
    claim_cursor: Option<String>,
    /// The last step failed (Redis out of reach, frozen, restarting).
    failing: bool,
    /// Since when steps succeed again (or the loop started).
    back_since: Option<Instant>,
    /// When the last read was sent, and on which generation of the blocking connection, if
    /// it found no job and nothing failed since: jobs the next read on that connection brings
    /// were added after then (see `queue::clock::AddedAfter`).
    empty_read_sent: Option<(Instant, u64)>,
}

/// The latest local instant a read of new entries (sent at `read_sent`) that delivered
/// `entries` can be said to have run at, or after: its sending, or, on a single Redis, when
/// the server's clock passed the newest entry's id (an entry is delivered after it is
/// added, and its id is the server's clock then), placed by the upper end of the process'
/// estimate of that clock so that it is never later than the truth while the estimate
/// holds. An id runs with the server's clock, or stands still (only its sequence grows)
/// while that clock is behind the last id (a step back, a failover to a host whose clock is
/// behind): it never runs faster, so an estimate sampled before such a step only dates a
/// delivery earlier, and an id above the estimate's upper end (sampled after it) is not
/// used. On a cluster a read may be answered by another node than the one whose clock was
/// sampled.
fn delivered_not_before(entries: &[StreamId], read_sent: Instant, cluster: bool) -> Instant {
    let newest = entries
        .iter()
        .filter_map(|entry| entry_id_ms(&entry.id))
        .max();
    match newest {
        Some(ms) if !cluster => {
            clock::at_or_before_server_ms(ms).map_or(read_sent, |at| at.max(read_sent))
        }
        _ => read_sent,
    }
}

fn due(last: Option<Instant>, every: Duration) -> bool {
    last.is_none_or(|at| at.elapsed() >= every)
}

/// Whether orphans may be claimed: not while this loop cannot reach Redis, and only two
/// heartbeats after it reached it again (or started). After an outage longer than the orphan
/// timeout every worker's entries look orphaned (their idle time runs on the server's clock,
/// and survives a restart or a failover), so a worker whose fetch loop came back first (or a
/// worker started meanwhile) would take the running jobs of live workers and start them
/// again: claims wait until those workers' renewers have had two heartbeats.
fn may_claim(schedule: &Schedule, heartbeat: Duration, now: Instant) -> bool {
    !schedule.failing
        && schedule
            .back_since
            .is_none_or(|at| now.saturating_duration_since(at) >= 2 * heartbeat)
}

impl<T: DeserializeOwned + Send + 'static> Fetcher<T> {
    pub(crate) async fn run(self) {
        // The blocking read gets its own connection so it never delays acks or renewals.
        let mut blocking = match Shared::manager(
            &self.shared.client,
            &self.shared.config,
            self.shared.config.block,
        ) {
            Ok(conn) => conn,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the fetch connection; worker fetches nothing");
                return;
            }
        };
        let mut schedule = Schedule {
            back_since: Some(Instant::now()),
            ..Schedule::default()
        };
        self.fetch_until_stopped(&mut blocking, &mut schedule).await;
        self.give_back_held(&mut schedule).await;
    }

    /// Returns held entries to the stream (a pause reading said "paused", or the worker stops).
    async fn give_back_held(&self, schedule: &mut Schedule) {
        if schedule.held.is_empty() {
            return;
        }
        let ids: Vec<String> = schedule.held.drain(..).map(|entry| entry.id).collect();
        release_unstarted(&self.shared, &self.consumer, &ids).await;
        self.inflight.remove(ids.iter().map(String::as_str));
    }

    async fn fetch_until_stopped(&self, blocking: &mut RedisConn, schedule: &mut Schedule) {
        let mut backoff = redis_backoff();
        loop {
            let permit = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return,
                permit = self.tx.reserve() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            // Only this loop sends, so everything up to the free capacity fits without waiting.
            let room = self.tx.capacity() + 1;
            match self.step(blocking, schedule, room).await {
                Ok(tasks) => {
                    backoff = redis_backoff();
                    if schedule.failing {
                        schedule.failing = false;
                        schedule.back_since = Some(Instant::now());
                    }
                    let mut tasks = tasks.into_iter();
                    if let Some(first) = tasks.next() {
                        permit.send(first);
                    }
                    for task in tasks {
                        if self.tx.try_send(task).is_err() {
                            tracing::warn!(
                                "fetch buffer refused a job; it will be claimed again later"
                            );
                        }
                    }
                }
                Err(e) => {
                    drop(permit);
                    schedule.failing = true;
                    if e.is_no_group() {
                        // The group vanished (e.g. Redis restarted without persistence).
                        let _ = self.shared.ensure_group().await;
                    }
                    let wait = backoff.next().unwrap_or(Duration::from_secs(2));
                    tracing::warn!(error = %e, ?wait, "fetching jobs failed; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn step(
        &self,
        blocking: &mut RedisConn,
        schedule: &mut Schedule,
        room: usize,
    ) -> Result<Vec<Task<T>>, QueueError> {
        let config = &self.shared.config;
        // Only the read right after an empty one (an orphan scan that found nothing may come
        // between) stands for the server's clock: a step that ends otherwise, or fails,
        // leaves none for the next.
        let after_empty_read = schedule.empty_read_sent.take();
        if schedule.paused {
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(Vec::new()),
                _ = tokio::time::sleep(config.pause_check_interval) => {}
            }
            self.check_pause(schedule).await?;
            if schedule.paused {
                self.give_back_held(schedule).await;
                return Ok(Vec::new());
            }
            let held = std::mem::take(&mut schedule.held);
            // Held since an unknown time: each is checked to be still ours before it starts.
            let times = FetchTimes {
                pause_clear_read_at: schedule.pause_checked,
                ..FetchTimes::default()
            };
            return Ok(self.decode_all(held, times));
        }
        if due(schedule.claimed, config.claim_interval())
            && may_claim(schedule, config.heartbeat_interval, Instant::now())
        {
            // Orphans are claimed only under a fresh "not paused": giving a claimed entry back
            // would re-add it with a fresh delivery count, hiding the crashes it caused. The
            // flag itself, not a delivery: this is also where a flag written by hand is
            // followed up.
            if due(schedule.flag_checked, config.pause_check_interval) {
                self.check_pause(schedule).await?;
            }
            if schedule.paused {
                return Ok(Vec::new());
            }
            // Our own jobs, still running here, go idle when this worker could not renew them
            // for longer than the orphan timeout (Redis out of reach, this process frozen):
            // the claim gives them back to us, and they must not start a second time. Read
            // before the claim is sent: a job settled meanwhile leaves the set, yet the claim
            // may have taken it before its settlement ran.
            let held = self.inflight.held();
            // Taken before the claim is sent: a delivery's age is never understated.
            let read_at = Instant::now();
            let (claimed, cursor) = self
                .claim_orphans(schedule.claim_cursor.as_deref().unwrap_or("0-0"), room)
                .await?;
            let (own, claimed): (Vec<StreamId>, Vec<StreamId>) = claimed
                .into_iter()
                .partition(|entry| held.contains(&entry.id));
            if !own.is_empty() {
                tracing::warn!(jobs = own.len(), consumer = %self.consumer, "reclaimed jobs this worker still runs; not started again");
                self.uncount_own_claims(&own).await;
            }
            // A full scan ends when the cursor wraps to 0-0; until then keep scanning next step.
            if cursor == "0-0" {
                schedule.claimed = Some(Instant::now());
                schedule.claim_cursor = None;
            } else {
                schedule.claim_cursor = Some(cursor);
            }
            if !claimed.is_empty() {
                tracing::info!(jobs = claimed.len(), consumer = %self.consumer, "claimed orphaned jobs");
                return self.admit_after(schedule, claimed, read_at, None).await;
            }
        }
        let keys = &self.shared.keys;
        // A connection rebuilt since may reach another server (a promoted replica, its own
        // clock).
        let generation = blocking.generation();
        let after_empty_read = after_empty_read
            .filter(|(_, on)| *on == generation)
            .map(|(sent, _)| sent);
        let read_at = Instant::now();
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&keys.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(room)
            .arg("BLOCK")
            .arg(config.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&keys.stream)
            .arg(&keys.wake)
            .arg(">")
            .arg(">")
            .query_async(blocking)
            .await?;
        let entries = self.take_markers(parse_read(reply)?).await;
        if entries.is_empty() {
            metrics::counter!(
                crate::metrics::QUEUE_EMPTY_READS,
                "queue" => self.shared.config.label().to_owned()
            )
            .increment(1);
            // On a cluster a read redirected to another node could bring an entry stamped by
            // that node's clock: no bound there.
            if !blocking.is_cluster() && blocking.generation() == generation {
                schedule.empty_read_sent = Some((read_at, generation));
            }
            return Ok(Vec::new());
        }
        // Once this loop has read the flag (and so brought the group in line with a flag
        // written by hand), a delivery is a reading too.
        if schedule.flag_checked.is_some() {
            let delivered = delivered_not_before(&entries, read_at, blocking.is_cluster());
            if schedule.pause_checked.is_none_or(|at| at < delivered) {
                schedule.pause_checked = Some(delivered);
            }
        }
        self.admit_after(schedule, entries, read_at, after_empty_read)
            .await
    }

    /// Takes fetched entries into this worker's hands (renewed from now on) and decodes them,
    /// unless the queue turns out to be paused: then they go back to the stream, to start after
    /// the resume. If the flag cannot be read they are held, renewed, until a reading decides.
    /// `after_empty_read`: when the read before the one that returned them was sent, if it
    /// found no job (`None` for claimed entries).
    async fn admit_after(
        &self,
        schedule: &mut Schedule,
        entries: Vec<StreamId>,
        read_at: Instant,
        after_empty_read: Option<Instant>,
    ) -> Result<Vec<Task<T>>, QueueError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // Held from here until settled or given back: renewed while this worker lives.
        self.inflight
            .add(entries.iter().map(|entry| entry.id.as_str()));
        if due(
            schedule.pause_checked,
            self.shared.config.pause_check_interval,
        ) && let Err(e) = self.check_pause(schedule).await
        {
            schedule.held.extend(entries);
            schedule.paused = true;
            return Err(e);
        }
        if schedule.paused {
            tracing::info!(
                jobs = entries.len(),
                "queue paused: giving fetched jobs back"
            );
            schedule.held.extend(entries);
            self.give_back_held(schedule).await;
            return Ok(Vec::new());
        }
        let times = FetchTimes {
            fetched_at: Some(read_at),
            pause_clear_read_at: schedule.pause_checked,
            after_empty_read,
        };
        Ok(self.decode_all(entries, times))
    }

    async fn check_pause(&self, schedule: &mut Schedule) -> Result<(), QueueError> {
        let mut conn = self.shared.conn.clone();
        // The reading's instant is when it was asked for: a reading is never taken for
        // fresher than it is (see `Delivery::pause_clear_read_at`).
        let asked = Instant::now();
        let paused: i64 = park::invocation(&park::CHECK, &self.shared.keys)
            .invoke_async(&mut conn)
            .await?;
        schedule.paused = paused == 1;
        schedule.pause_checked = Some(asked);
        schedule.flag_checked = Some(asked);
        Ok(())
    }

    /// Removes wake markers (entries of the wake stream: a `w` due time, no job) from
    /// `entries`: each is acknowledged at once, its due time passed to the promoter loop.
    async fn take_markers(&self, entries: Vec<StreamId>) -> Vec<StreamId> {
        let (markers, jobs): (Vec<StreamId>, Vec<StreamId>) = entries
            .into_iter()
            .partition(|entry| !entry.map.contains_key("e") && entry.map.contains_key("w"));
        if markers.is_empty() {
            return jobs;
        }
        let ids: Vec<&str> = markers.iter().map(|m| m.id.as_str()).collect();
        let keys = &self.shared.keys;
        // Acknowledged, not deleted: `MAXLEN ~ 64` at every marker's `XADD` trims the stream.
        let removed: Result<i64, _> = redis::cmd("XACK")
            .arg(&keys.wake)
            .arg(&keys.group)
            .arg(&ids)
            .query_async(&mut self.shared.conn.clone())
            .await;
        // Best effort: the jobs read with them must reach the worker whatever happens to the
        // markers (a marker left behind is a hint that stays pending, nothing more).
        if let Err(e) = removed {
            tracing::debug!(error = %e, "wake markers not acknowledged");
        }
        for mut marker in markers {
            if let Some(due) = take_field(&mut marker.map, "w").and_then(|w| w.parse().ok()) {
                // Read by a worker whose promoter has ended (it is stopping): passed on.
                self.holder
                    .handover
                    .follow_or_hand_over(&self.due_times, due)
                    .await;
            }
        }
        jobs
    }

    /// `XAUTOCLAIM` entries idle longer than the orphan timeout, with their delivery counts.
    async fn claim_orphans(
        &self,
        cursor: &str,
        count: usize,
    ) -> Result<(Vec<StreamId>, String), QueueError> {
        let mut conn = self.shared.conn.clone();
        let reply: Value = scripts::CLAIM
            .key(&self.shared.keys.stream)
            .arg(&self.shared.keys.group)
            .arg(&self.consumer)
            .arg(self.shared.config.orphan_timeout.as_millis() as u64)
            .arg(cursor)
            .arg(count)
            .invoke_async(&mut conn)
            .await?;
        parse_claimed(&reply)
    }

    /// Takes back the delivery each claim of `own` (entries this worker still runs) counted:
    /// a later takeover of such a job would read it as one more lost worker. Best effort: a
    /// count left raised only brings a burial for lost workers nearer.
    async fn uncount_own_claims(&self, own: &[StreamId]) {
        let mut call = scripts::UNCOUNT_OWN.key(&self.shared.keys.stream);
        call.arg(&self.shared.keys.group).arg(&self.consumer);
        for entry in own {
            let Some(counted) = entry.delivered_count else {
                continue;
            };
            call.arg(&entry.id).arg(counted);
        }
        let restored: Result<u64, _> = call.invoke_async(&mut self.shared.conn.clone()).await;
        if let Err(e) = restored {
            tracing::debug!(error = %e, "delivery counts of reclaimed own jobs not restored");
        }
    }

    /// `times.pause_clear_read_at`: when the queue was last found not paused (its flag, or a
    /// delivery) before these entries were handed out (kept with each delivery: see
    /// `Delivery::pause_clear_read_at`).
    fn decode_all(&self, entries: Vec<StreamId>, times: FetchTimes) -> Vec<Task<T>> {
        entries
            .into_iter()
            .filter_map(|entry| self.decode(entry, times))
            .collect()
    }

    /// Turns an entry into a task, or buries it (undecodable, or out of attempts after crash
    /// redeliveries) and returns `None`.
    fn decode(&self, mut entry: StreamId, times: FetchTimes) -> Option<Task<T>> {
        // A fresh read is the first delivery; claimed entries carry their count.
        let deliveries = entry.delivered_count.map_or(1, |n| n as u32);
        let Some(stored) = take_field(&mut entry.map, "e") else {
            self.bury(
                &entry.id,
                "entry has no job field".into(),
                format!("{:?}", entry.map),
            );
            return None;
        };
        let mut envelope = match Envelope::decode(&stored) {
            Ok(envelope) => envelope,
            Err(e) => {
                self.bury(
                    &entry.id,
                    format!("undecodable job envelope: {e}"),
                    stored.to_owned(),
                );
                return None;
            }
        };
        // Deliveries beyond the first mean earlier holders died mid-job: those count as attempts.
        let attempts_before = envelope
            .attempts
            .saturating_add(deliveries.saturating_sub(1));
        let max_attempts = envelope
            .max_attempts
            .unwrap_or(self.shared.config.max_attempts);
        if attempts_before >= max_attempts {
            envelope.attempts = attempts_before;
            let text = envelope.encode().unwrap_or_else(|_| stored.to_owned());
            self.bury(
                &entry.id,
                format!("attempts exhausted: {attempts_before} of {max_attempts} made (workers lost mid-job)"),
                text,
            );
            return None;
        }
        let args: T = match serde_json::from_str(envelope.payload.get()) {
            Ok(args) => args,
            Err(e) => {
                self.bury(
                    &entry.id,
                    format!("undecodable job: {e}"),
                    stored.to_owned(),
                );
                return None;
            }
        };
        let job_id = envelope.id.clone();
        let delivery = Delivery::new(
            entry.id,
            envelope,
            attempts_before,
            max_attempts,
            self.settle.clone(),
            Arc::clone(&self.holder),
            times,
        );
        Some(
            TaskBuilder::new(args)
                .task_id(TaskId::from_string(job_id))
                .attempt(attempts_before as usize)
                .data(delivery)
                .build(),
        )
    }

    fn bury(&self, entry_id: &str, reason: String, envelope: String) {
        tracing::warn!(entry_id, %reason, "moving job to the dead stream");
        let settlement = Settlement::Dead {
            entry_id: entry_id.to_owned(),
            reason,
            envelope,
        };
        if self.settle.settle_detached(settlement).is_err() {
            tracing::warn!(
                entry_id,
                "settler stopped; the job will be claimed again later"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphans_are_claimed_only_two_heartbeats_after_redis_came_back() {
        let heartbeat = Duration::from_secs(5);
        let now = Instant::now();
        let mut schedule = Schedule {
            back_since: Some(now),
            ..Schedule::default()
        };
        assert!(!may_claim(&schedule, heartbeat, now), "just started");
        assert!(may_claim(&schedule, heartbeat, now + 2 * heartbeat));
        schedule.failing = true;
        assert!(
            !may_claim(&schedule, heartbeat, now + 10 * heartbeat),
            "Redis out of reach"
        );
        schedule.failing = false;
        schedule.back_since = Some(now + 10 * heartbeat);
        assert!(!may_claim(&schedule, heartbeat, now + 11 * heartbeat));
        assert!(may_claim(&schedule, heartbeat, now + 12 * heartbeat));
    }
}
