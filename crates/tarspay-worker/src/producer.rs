//! The producer: validates a payout, registers it in the ledger (refused if its mchOrderNo
//! exists) and queues its create-payout job. Nothing is queued for input that fails
//! validation.

use crate::jobs::PayoutJob;
// Re-exported where callers have always found it; it belongs to the job type.
use crate::deployment::Deployment;
use crate::ids::{BatchId, Currency, MchOrderNo, MerchantName};
pub use crate::jobs::PAYOUT_JOB_MAX_ATTEMPTS;
use crate::ledger::{LedgerError, NewOrder, OrderKind, OrderRecord, Phase, Registered};
use crate::money::Amount;
use crate::payout::{PayoutRequest, PayoutRules, ValidationErrors};
use crate::queue::{JobOptions, QueueError};
use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Rows of a batch registered concurrently.
const REGISTRATIONS_IN_FLIGHT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    #[error("invalid payout: {0}")]
    Invalid(#[from] ValidationErrors),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// A payout built in code (not validated by these settings) naming a merchant the
    /// settings do not have. Nothing was queued.
    #[error("merchant: {0:?} is not a configured merchant profile; nothing was queued")]
    UnknownMerchant(MerchantName),
}

/// What happened to one enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// New order, create-payout job queued.
    Queued,
    /// The mchOrderNo was already registered: its current record. `same_request` is false when
    /// the earlier payout under this number had a different body.
    Exists {
        record: Box<OrderRecord>,
        same_request: bool,
    },
}

/// What a batch enqueue did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchEnqueued {
    pub batch_id: BatchId,
    pub queued: usize,
    /// Already registered with the same body (a re-run): not queued again.
    pub existing: usize,
    /// Already registered with a different body: not queued.
    pub conflicting: Vec<MchOrderNo>,
}

/// Registers orders in their partition (see `crate::partition`) and queues their first job
/// there, in one step.
#[derive(Clone)]
pub struct Producer {
    deployment: Deployment,
    rules: Arc<PayoutRules>,
}

/// Identifies a payout's content: SHA-256 of its canonical JSON (sorted keys).
pub fn fingerprint(request: &PayoutRequest) -> String {
    let value = serde_json::to_value(request).unwrap_or(Value::Null);
    let canonical = crate::gateway::callback::sorted_compact_json(&value);
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// What the ledger registers for a payout: its content's `fingerprint` and stored JSON
/// `body` (both from [`PayoutOrder::new`]) beside the request's own fields.
pub struct PayoutOrder {
    fingerprint: String,
    body: String,
}

impl PayoutOrder {
    pub fn new(request: &PayoutRequest) -> Self {
        Self {
            fingerprint: fingerprint(request),
            body: serde_json::to_string(request).unwrap_or_default(),
        }
    }

    pub fn order<'a>(
        &'a self,
        request: &'a PayoutRequest,
        batch_id: Option<&'a BatchId>,
    ) -> NewOrder<'a> {
        NewOrder {
            mch_order_no: &request.mch_order_no,
            kind: OrderKind::Payout,
            fingerprint: &self.fingerprint,
            amount: request.amount.as_str(),
            currency: &request.currency,
            request: &self.body,
            batch_id,
            merchant: &request.merchant,
        }
    }
}

/// Whether two registered payout bodies ask for the same payout: every field equal, the
/// amounts equal as numbers. Anything unreadable (a deposit's empty body) is not the same.
pub fn same_payout(stored: &str, new: &str) -> bool {
    let parsed = (
        serde_json::from_str::<PayoutRequest>(stored),
        serde_json::from_str::<PayoutRequest>(new),
    );
    let (Ok(stored), Ok(new)) = parsed else {
        return false;
    };
    stored.amount.value() == new.amount.value()
        && PayoutRequest {
            amount: new.amount.clone(),
            ..stored
        } == new
}

impl Producer {
    pub fn new(deployment: Deployment, rules: Arc<PayoutRules>) -> Self {
        Self { deployment, rules }
    }

    pub fn rules(&self) -> &PayoutRules {
        &self.rules
    }

    pub fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    /// Queues a one-off status query of `record` now, in its merchant's lane (the default
    /// lane if the profile is gone): for a callback that is not trusted, and the console's
    /// "look up now". Even for a final order: the query may find that the gateway now says
    /// otherwise (a refund, a late payment), which is a correction. Its own unique key: a
    /// regular poll may be waiting minutes away, and at most one such look waits per order.
    pub async fn queue_lookup(&self, record: &OrderRecord) -> Result<(), QueueError> {
        let job = PayoutJob::poll(record, true);
        let options = JobOptions {
            unique_key: job.unique_key(),
            max_attempts: Some(PAYOUT_JOB_MAX_ATTEMPTS),
            ..JobOptions::default()
        };
        let partition = self.deployment.partition_of(&record.mch_order_no);
        let queue = partition
            .lane(&record.merchant)
            .map_or(&partition.queue, |lane| &lane.queue);
        queue.enqueue_with(&job, options).await?;
        Ok(())
    }

    /// Validates a payout given as JSON, then enqueues it.
    pub async fn enqueue_json(
        &self,
        value: &Value,
        batch_id: Option<&BatchId>,
    ) -> Result<Enqueued, ProducerError> {
        let request = self.rules.validate_json(value)?;
        self.enqueue(&request, batch_id).await
    }

    /// Registers and queues an already validated payout, in one atomic step. Safe to repeat:
    /// a second call for the same mchOrderNo queues nothing and reports the order.
    pub async fn enqueue(
        &self,
        request: &PayoutRequest,
        batch_id: Option<&BatchId>,
    ) -> Result<Enqueued, ProducerError> {
        request.check_pass_through()?;
        let registered = PayoutOrder::new(request);
        let order = registered.order(request, batch_id);
        let job = PayoutJob::CreatePayout {
            mch_order_no: request.mch_order_no.clone(),
            merchant: request.merchant.clone(),
        };
        self.register(&order, Phase::Queued, &job).await
    }

    /// Enqueues validated payouts under one batch id. Rows whose mchOrderNo already exists are
    /// not queued again (a re-run pays no one twice); they are counted in `existing`.
    pub async fn enqueue_batch(
        &self,
        requests: &[PayoutRequest],
        batch_id: &BatchId,
    ) -> Result<BatchEnqueued, ProducerError> {
        // Every row first: a batch with a bad one queues nothing.
        for request in requests {
            request.check_pass_through()?;
        }
        let mut result = BatchEnqueued {
            batch_id: batch_id.clone(),
            conflicting: Vec::new(),
            queued: 0,
            existing: 0,
        };
        // Registrations in flight together share the ledger's script calls (group commit);
        // results come back in row order.
        let pending: Vec<_> = requests
            .iter()
            .map(|request| self.enqueue(request, Some(batch_id)))
            .collect();
        let mut registrations = futures::stream::iter(pending).buffered(REGISTRATIONS_IN_FLIGHT);
        let mut rows = requests.iter();
        while let (Some(registered), Some(request)) = (registrations.next().await, rows.next()) {
            match registered? {
                Enqueued::Queued => result.queued += 1,
                Enqueued::Exists {
                    same_request: true, ..
                } => result.existing += 1,
                Enqueued::Exists {
                    same_request: false,
                    ..
                } => result.conflicting.push(request.mch_order_no.clone()),
            }
        }
        Ok(result)
    }

    async fn register(
        &self,
        order: &NewOrder<'_>,
        initial: Phase,
        job: &PayoutJob,
    ) -> Result<Enqueued, ProducerError> {
        let options = JobOptions {
            unique_key: job.unique_key(),
            max_attempts: Some(PAYOUT_JOB_MAX_ATTEMPTS),
            ..JobOptions::default()
        };
        let partition = self.deployment.partition_of(order.mch_order_no);
        // The merchant's lane: its jobs wait there, fetched fairly beside other merchants'.
        let lane = partition
            .lane(order.merchant)
            .ok_or_else(|| ProducerError::UnknownMerchant(order.merchant.clone()))?;
        let prepared = lane.queue.prepare(job, &options)?;
        match lane
            .ledger
            .register_with_job(order, initial, &prepared)
            .await?
        {
            Registered::Created => Ok(Enqueued::Queued),
            Registered::Exists { same_request, .. } => {
                let record = lane.ledger.get(order.mch_order_no).await?.ok_or_else(|| {
                    LedgerError::Corrupt {
                        id: order.mch_order_no.to_string(),
                        reason: "registered but unreadable".into(),
                    }
                })?;
                // The fingerprint compares text; "100" and "100.00" are one payout.
                let same_request = same_request || same_payout(&record.request, order.request);
                Ok(Enqueued::Exists {
                    record: Box::new(record),
                    same_request,
                })
            }
        }
    }

    /// Follows a deposit the merchant created itself: registers it as accepted and polls it.
    pub async fn track_deposit(
        &self,
        mch_order_no: &MchOrderNo,
        amount: &Amount,
        currency: &Currency,
    ) -> Result<Enqueued, ProducerError> {
        // Deposits are followed under the default merchant.
        let merchant = MerchantName::default_profile();
        let order = NewOrder {
            mch_order_no,
            kind: OrderKind::Deposit,
            fingerprint: "",
            amount: amount.as_str(),
            currency,
            request: "",
            batch_id: None,
            merchant: &merchant,
        };
        let job = PayoutJob::PollStatus {
            mch_order_no: mch_order_no.clone(),
            merchant: merchant.clone(),
            kind: OrderKind::Deposit,
            once: false,
        };
        self.register(&order, Phase::Accepted, &job).await
    }
}

#[cfg(test)]
mod tests {
    use super::same_payout;

    #[test]
    fn amounts_compare_as_numbers_and_every_other_field_as_text() {
        let body = |amount: &str, name: &str| {
            format!(
                r#"{{"mchOrderNo":"X","amount":"{amount}","currency":"INR","wayCode":"UPI","customerName":"{name}"}}"#
            )
        };
        assert!(same_payout(&body("100", "Asha"), &body("100.00", "Asha")));
        assert!(same_payout(&body("150.5", "Asha"), &body("150.50", "Asha")));
        assert!(!same_payout(&body("100", "Asha"), &body("100.01", "Asha")));
        assert!(!same_payout(&body("100", "Asha"), &body("100", "Ravi")));
        assert!(!same_payout("", &body("100", "Asha")));
    }
}
