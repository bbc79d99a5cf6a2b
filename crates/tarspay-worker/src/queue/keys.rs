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
    /// Sorted set of worker heartbeats: member = consumer name, score = last seen (ms).
    pub workers: String,
    /// Consumer group name inside [`QueueKeys::stream`].
    pub group: String,
}

impl QueueKeys {
    /// Builds the key layout; `prefix` and `queue` must not contain braces (they would break the
    /// hash tag) and must not be empty.
    pub fn new(prefix: &str, queue: &str) -> Result<Self, QueueError> {
        for (what, value) in [("prefix", prefix), ("queue", queue)] {
            if value.is_empty() || value.contains(['{', '}']) {
                return Err(QueueError::InvalidConfig(format!(
                    "{what} must be non-empty and must not contain '{{' or '}}': {value:?}"
                )));
            }
        }
        let tag = format!("{{{prefix}:{queue}}}");
        Ok(Self {
            stream: format!("{tag}:stream"),
            delayed: format!("{tag}:delayed"),
            dead: format!("{tag}:dead"),
            unique: format!("{tag}:unique"),
            paused: format!("{tag}:paused"),
            workers: format!("{tag}:workers"),
            group: "workers".to_owned(),
        })
    }
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
            &keys.workers,
        ] {
            assert!(key.starts_with("{tp:payouts}:"), "{key}");
        }
    }

    #[test]
    fn braces_are_refused() {
        assert!(QueueKeys::new("tp", "a}b").is_err());
        assert!(QueueKeys::new("", "q").is_err());
    }
}
