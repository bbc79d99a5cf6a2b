//! The serialized form of a job, identical in the stream, the delayed set and the dead stream.
//!
//! The job's own JSON is kept as raw JSON, so a job that no longer decodes into its Rust type can
//! still be moved, listed and re-enqueued byte for byte.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::queue::QueueError;
use crate::queue::clock::now_ms;

/// Job envelope as stored in Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Job id, unique per enqueue.
    pub id: String,
    /// Attempts already made (durable; counts retries and crash redeliveries).
    #[serde(rename = "a", default)]
    pub attempts: u32,
    /// Hard ceiling on attempts for this job.
    #[serde(rename = "m", default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Unique key held by this job, if any.
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<String>,
    /// Enqueue time, ms since the epoch on the Redis server's clock (estimated).
    #[serde(rename = "t", default)]
    pub enqueued_at_ms: u64,
    /// The job itself.
    #[serde(rename = "p")]
    pub payload: Box<RawValue>,
}

impl Envelope {
    /// Wraps an already serialized job.
    pub fn new(
        id: String,
        payload: Box<RawValue>,
        unique: Option<String>,
        max_attempts: Option<u32>,
    ) -> Self {
        Self {
            id,
            attempts: 0,
            max_attempts,
            unique,
            enqueued_at_ms: now_ms(),
            payload,
        }
    }

    /// Parses an envelope from its stored text.
    pub fn decode(text: &str) -> Result<Self, QueueError> {
        serde_json::from_str(text).map_err(QueueError::Decode)
    }

    /// The stored text.
    pub fn encode(&self) -> Result<String, QueueError> {
        serde_json::to_string(self).map_err(QueueError::Encode)
    }
}

/// A new job id: time-ordered and random enough to be unique across processes.
pub fn new_job_id() -> String {
    format!("{:011x}{:016x}", now_ms(), rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_payload_bytes() {
        let payload = RawValue::from_string(r#"{"amount":"10.50","n":1}"#.to_owned()).unwrap();
        let env = Envelope::new("j1".into(), payload, Some("k".into()), Some(3));
        let text = env.encode().unwrap();
        let back = Envelope::decode(&text).unwrap();
        assert_eq!(back.payload.get(), r#"{"amount":"10.50","n":1}"#);
        assert_eq!(back.unique.as_deref(), Some("k"));
        assert_eq!(back.max_attempts, Some(3));
    }

    #[test]
    fn job_ids_differ() {
        assert_ne!(new_job_id(), new_job_id());
    }
}
