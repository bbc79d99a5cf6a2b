//! The invariants, checked over one pass's reads, and the report.

use super::jobs::JobIndex;
use super::orders::{OrderView, OutcomeEntries};
use crate::jobs::PayoutJob;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "violation", rename_all = "snake_case")]
pub enum Violation {
    /// Not final, and no job waits, runs or is delayed for it: nothing will ever move it.
    #[serde(rename_all = "camelCase")]
    OrderWithoutWork {
        mch_order_no: String,
        phase: String,
        /// Its jobs in the dead stream (0: the job is gone altogether).
        dead_jobs: usize,
    },
    /// More than one job that would move the order.
    #[serde(rename_all = "camelCase")]
    DuplicateWork {
        mch_order_no: String,
        phase: String,
        jobs: usize,
    },
    /// Final, yet no `final` outcome entry (within the stream's retention).
    #[serde(rename_all = "camelCase")]
    FinalWithoutOutcome {
        mch_order_no: String,
        status: String,
    },
    /// More than one `final` outcome entry for one order.
    #[serde(rename_all = "camelCase")]
    ManyOutcomes {
        mch_order_no: String,
        entries: usize,
    },
    /// A job for an order the ledger does not hold.
    #[serde(rename_all = "camelCase")]
    JobWithoutOrder {
        mch_order_no: String,
        job_id: String,
    },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OrderWithoutWork {
                mch_order_no,
                phase,
                dead_jobs,
            } => write!(
                f,
                "{mch_order_no}: {phase}, not final, and no job will move it ({dead_jobs} dead)"
            ),
            Self::DuplicateWork {
                mch_order_no,
                phase,
                jobs,
            } => write!(
                f,
                "{mch_order_no}: {phase}, with {jobs} jobs instead of one"
            ),
            Self::FinalWithoutOutcome {
                mch_order_no,
                status,
            } => write!(
                f,
                "{mch_order_no}: final ({status}) without its outcome entry"
            ),
            Self::ManyOutcomes {
                mch_order_no,
                entries,
            } => write!(f, "{mch_order_no}: {entries} final outcome entries"),
            Self::JobWithoutOrder {
                mch_order_no,
                job_id,
            } => write!(
                f,
                "job {job_id}: for {mch_order_no}, which the ledger does not hold"
            ),
        }
    }
}

/// What an audit found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditReport {
    pub orders: usize,
    /// Orders per phase (final ones by their recorded status).
    pub phases: BTreeMap<String, usize>,
    pub stuck: usize,
    /// Orders whose acceptance left the first poll to the create job (held in hand, see
    /// `jobs::in_hand`): how often holds were exercised.
    pub polled_in_hand: usize,
    pub live_jobs: usize,
    pub dead_jobs: usize,
    pub undecodable_jobs: u64,
    pub outcome_entries: u64,
    pub violations: Vec<Violation>,
}

impl AuditReport {
    pub fn holds(&self) -> bool {
        self.violations.is_empty()
    }

    /// Another partition's report added to this one.
    pub fn merge(mut self, other: Self) -> Self {
        self.orders += other.orders;
        for (phase, count) in other.phases {
            *self.phases.entry(phase).or_default() += count;
        }
        self.stuck += other.stuck;
        self.polled_in_hand += other.polled_in_hand;
        self.live_jobs += other.live_jobs;
        self.dead_jobs += other.dead_jobs;
        self.undecodable_jobs += other.undecodable_jobs;
        self.outcome_entries += other.outcome_entries;
        self.violations.extend(other.violations);
        self
    }
}

/// One pass's reads.
pub(crate) struct Pass {
    pub orders: Vec<OrderView>,
    pub jobs: JobIndex,
    pub outcomes: Option<OutcomeEntries>,
}

/// The job that moves an order in this state: its create job until the gateway holds it,
/// then its regular poll job, or its create job still when that polls it in hand. (A
/// one-off look, or a create job left over from before the acceptance, moves nothing.)
pub(crate) fn moves(order: &OrderView, job: &PayoutJob) -> bool {
    match job {
        PayoutJob::CreatePayout { .. } => !order.accepted || order.poll_in_hand,
        PayoutJob::PollStatus { once, .. } => order.accepted && !once,
    }
}

impl Pass {
    pub fn new(orders: Vec<OrderView>, jobs: JobIndex, outcomes: Option<OutcomeEntries>) -> Self {
        Self {
            orders,
            jobs,
            outcomes,
        }
    }

    /// Orders that are not final and have no job that moves them.
    pub fn without_work(&self) -> Vec<&OrderView> {
        self.orders
            .iter()
            .filter(|order| order.final_status.is_none() && self.working_jobs(order) == 0)
            .collect()
    }

    fn working_jobs(&self, order: &OrderView) -> usize {
        self.jobs.live.get(&order.id).map_or(0, |jobs| {
            jobs.iter().filter(|j| moves(order, &j.job)).count()
        })
    }

    pub fn violations(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        for order in &self.orders {
            let Some(status) = &order.final_status else {
                let jobs = self.working_jobs(order);
                if jobs == 0 {
                    out.push(Violation::OrderWithoutWork {
                        mch_order_no: order.id.clone(),
                        phase: order.shown_phase(),
                        dead_jobs: self.jobs.dead.get(&order.id).copied().unwrap_or(0),
                    });
                } else if jobs > 1 {
                    out.push(Violation::DuplicateWork {
                        mch_order_no: order.id.clone(),
                        phase: order.shown_phase(),
                        jobs,
                    });
                }
                continue;
            };
            let Some(outcomes) = &self.outcomes else {
                continue;
            };
            // Only this registration's: a number re-submitted after its record expired
            // (the retention) has the earlier registration's entry too, if not yet trimmed.
            // A second of slack covers the clock estimate behind `registered_at_ms`.
            let since = order
                .registered_at_ms
                .map_or(0, |at| at.saturating_sub(1_000));
            let entries = outcomes
                .finals
                .get(&order.id)
                .map_or(0, |times| times.iter().filter(|&&at| at >= since).count());
            // Entries older than the stream's oldest were trimmed (outcome_max_len).
            let retained = match (outcomes.oldest_ms, order.finished_at_ms) {
                (Some(oldest), Some(finished)) => finished >= oldest,
                _ => true,
            };
            if entries == 0 && retained {
                out.push(Violation::FinalWithoutOutcome {
                    mch_order_no: order.id.clone(),
                    status: status.clone(),
                });
            } else if entries > 1 {
                out.push(Violation::ManyOutcomes {
                    mch_order_no: order.id.clone(),
                    entries,
                });
            }
        }
        let known: HashSet<&str> = self.orders.iter().map(|o| o.id.as_str()).collect();
        for (id, jobs) in &self.jobs.live {
            if !known.contains(id.as_str()) {
                for job in jobs {
                    out.push(Violation::JobWithoutOrder {
                        mch_order_no: id.clone(),
                        job_id: job.id.clone(),
                    });
                }
            }
        }
        out
    }

    pub fn report(&self, violations: Vec<Violation>) -> AuditReport {
        let mut phases = BTreeMap::new();
        for order in &self.orders {
            *phases.entry(order.shown_phase()).or_default() += 1;
        }
        AuditReport {
            orders: self.orders.len(),
            phases,
            stuck: self
                .orders
                .iter()
                .filter(|o| o.stuck && o.final_status.is_none())
                .count(),
            polled_in_hand: self.orders.iter().filter(|o| o.poll_in_hand).count(),
            live_jobs: self.jobs.live_count(),
            dead_jobs: self.jobs.dead_count(),
            undecodable_jobs: self.jobs.undecodable,
            outcome_entries: self.outcomes.as_ref().map_or(0, |o| o.total),
            violations,
        }
    }
}
