//! Redis key layout of one queue.
//!
//! Every key of a queue carries the same hash tag `{prefix:queue}`, so all of them live in one
//! Redis Cluster slot and every Lua script touches keys of a single slot only.

use crate::queue::QueueError;

/// The keys used by one queue. All share the hash tag `{prefix:queue}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    /// The stream jobs are delivered from (consumer group [`QueueKeys::group`]).
    pub stream: String,
    /// Sorted set of delayed jobs: score = due time (ms), member = job envelope.
    pub delayed: String,
    /// Stream of dead jobs (exhausted, given up or undecodable) with the reason.
    pub dead: String,
    /// Hash of unique keys held by live jobs: unique key -> job id.
    pub unique: String,
    /// Exists while the queue is paused.
    pub paused: String,
    /// While the queue is paused: where its consumer group's last delivered id (and entries
    /// read) was before the pause parked the group past every id (see `queue::park`).
    pub parked: String,
    /// Sorted set of worker heartbeats: member = consumer name, score = last seen (ms).
    pub workers: String,
    /// The promoter lease: the consumer that wakes on time for the next delayed job.
    pub promoter: String,
    /// Stream of wake markers (a delayed job due before all others), read with the job
    /// stream in one `XREADGROUP` (same group); named after [`QueueKeys::delayed`] by the
    /// scripts (`scripts::DELAY_JOB`).
    pub wake: String,
    /// Consumer group name inside [`QueueKeys::stream`].
    pub group: String,
}

impl QueueKeys {
    /// Builds the key layout; `prefix` and `queue` must not contain braces (they would break the
    /// hash tag) and must not be empty.
    pub fn new(prefix: &str, queue: &str) -> Result<Self, QueueError> {
        check_names(&[("prefix", prefix), ("queue", queue)])?;
        Ok(Self::under(&format!("{{{prefix}:{queue}}}")))
    }

    /// The layout of queue `queue` inside another queue's partition (hash tag
    /// `{prefix:partition}`), so one script can write both queues' keys (the ledger queues
    /// webhook deliveries in the step that appends an outcome).
    pub fn nested(prefix: &str, partition: &str, queue: &str) -> Result<Self, QueueError> {
        check_names(&[
            ("prefix", prefix),
            ("partition", partition),
            ("queue", queue),
        ])?;
        Ok(Self::under(&format!("{{{prefix}:{partition}}}:{queue}")))
    }

    /// Every key under `base`, which starts with the hash tag.
    pub(crate) fn under(base: &str) -> Self {
        Self {
            stream: format!("{base}:stream"),
            delayed: format!("{base}:delayed"),
            dead: format!("{base}:dead"),
            unique: format!("{base}:unique"),
            paused: format!("{base}:paused"),
            parked: format!("{base}:parked"),
            workers: format!("{base}:workers"),
            promoter: format!("{base}:promoter"),
            wake: format!("{base}:wake"),
            group: "workers".to_owned(),
        }
    }
}

fn check_names(names: &[(&str, &str)]) -> Result<(), QueueError> {
    for (what, value) in names {
        if value.is_empty() || value.contains(['{', '}']) {
            return Err(QueueError::InvalidConfig(format!(
                "{what} must be non-empty and must not contain '{{' or '}}': {value:?}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_keys_share_one_hash_tag() {
        let keys = QueueKeys::new("tp", "payouts").unwrap();
        for key in [
            &keys.stream,
            &keys.delayed,
            &keys.dead,
            &keys.unique,
            &keys.paused,
            &keys.parked,
            &keys.workers,
            &keys.promoter,
            &keys.wake,
        ] {
            assert!(key.starts_with("{tp:payouts}:"), "{key}");
        }
    }

    #[test]
    fn braces_are_refused() {
        assert!(QueueKeys::new("tp", "a}b").is_err());
        assert!(QueueKeys::new("", "q").is_err());
        assert!(QueueKeys::nested("tp", "pay{outs", "webhooks").is_err());
    }

    #[test]
    fn a_nested_queue_shares_its_partitions_tag_with_keys_of_its_own() {
        let outer = QueueKeys::new("tp", "payouts").unwrap();
        let inner = QueueKeys::nested("tp", "payouts", "webhooks").unwrap();
        assert_eq!(inner.stream, "{tp:payouts}:webhooks:stream");
        assert_eq!(inner.dead, "{tp:payouts}:webhooks:dead");
        assert_ne!(inner.paused, outer.paused);
        assert_ne!(inner.workers, outer.workers);
    }
}
