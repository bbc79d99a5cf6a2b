//! `audit`: check a deployment's invariants; exit 0 when they hold, 1 with the violations.

use crate::audit::{AuditReport, Auditor, Pace};
use crate::config::Settings;
use crate::deployment::Deployment;
use anyhow::Result;
use clap::Args;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args)]
pub struct AuditArgs {
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// A violation must still be there this much later (jobs move while they are read).
    #[arg(long, default_value = "2s", value_parser = super::parse_duration)]
    confirm: Duration,
}

pub async fn run(settings: &Settings, args: AuditArgs) -> Result<ExitCode> {
    let deployment = Deployment::connect(settings).await?;
    // Each partition holds its orders with their jobs and outcomes: audited one by one.
    let mut report: Option<AuditReport> = None;
    for partition in deployment.partitions() {
        let auditor = Auditor::new(
            partition.queue.connection(),
            partition.ledger.keys().clone(),
            partition.queues().map(|q| q.keys().clone()).collect(),
            Pace::FULL,
        );
        let part = auditor.audit(args.confirm).await?;
        report = Some(match report {
            Some(report) => report.merge(part),
            None => part,
        });
    }
    let report = report.ok_or_else(|| anyhow::anyhow!("the deployment has no partitions"))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("orders        {}", report.orders);
        for (phase, count) in &report.phases {
            println!("  {phase:<12}{count}");
        }
        println!("stuck         {}", report.stuck);
        println!("held polls    {}", report.polled_in_hand);
        println!("live jobs     {}", report.live_jobs);
        println!("dead jobs     {}", report.dead_jobs);
        println!("outcomes      {}", report.outcome_entries);
        if report.holds() {
            println!("invariants hold");
        } else {
            println!("{} violation(s):", report.violations.len());
            for violation in &report.violations {
                println!("  {violation}");
            }
        }
    }
    Ok(if report.holds() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
