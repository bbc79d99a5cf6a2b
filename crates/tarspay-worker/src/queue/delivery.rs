//! The stored delivery behind a task: which stream entry it is, its envelope and its attempt
//! count. Handlers read it with apalis' `Data<Delivery>`.

use std::sync::Arc;

use crate::queue::envelope::Envelope;
use crate::queue::settle::SettleHandle;

/// The stored delivery behind a task; handlers can read it with `Data<Delivery>`.
#[derive(Debug, Clone)]
pub struct Delivery(Arc<DeliveryInner>);

#[derive(Debug)]
struct DeliveryInner {
    entry_id: String,
    envelope: Envelope,
    attempts_before: u32,
    max_attempts: u32,
    /// Where this delivery's outcome is written: the settler of the queue (partition) it
    /// came from.
    settle: SettleHandle,
}

impl Delivery {
    pub(crate) fn new(
        entry_id: String,
        envelope: Envelope,
        attempts_before: u32,
        max_attempts: u32,
        settle: SettleHandle,
    ) -> Self {
        Self(Arc::new(DeliveryInner {
            entry_id,
            envelope,
            attempts_before,
            max_attempts,
            settle,
        }))
    }

    pub(crate) fn settler(&self) -> &SettleHandle {
        &self.0.settle
    }

    /// The job id given at enqueue.
    pub fn job_id(&self) -> &str {
        &self.0.envelope.id
    }

    /// The stream entry id of this delivery.
    pub fn entry_id(&self) -> &str {
        &self.0.entry_id
    }

    /// Attempts made before this one (retries and crash redeliveries).
    pub fn attempts_before(&self) -> u32 {
        self.0.attempts_before
    }

    /// The job's ceiling on attempts.
    pub fn max_attempts(&self) -> u32 {
        self.0.max_attempts
    }

    /// The unique key the job holds, if any.
    pub fn unique_key(&self) -> Option<&str> {
        self.0.envelope.unique.as_deref()
    }

    /// The job's stored JSON.
    pub fn payload_json(&self) -> &str {
        self.0.envelope.payload.get()
    }

    pub(crate) fn envelope(&self) -> &Envelope {
        &self.0.envelope
    }
}
