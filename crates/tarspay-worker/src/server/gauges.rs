//! The queue gauges of `/metrics`, refreshed by one background task on a timer. A scrape only
//! renders what is in memory: it sends Redis nothing, so it writes nothing and costs the same
//! however large the queue or the stuck set is, and however often it is scraped.

use crate::deployment::Deployment;
use std::time::Duration;
use tokio::sync::watch;

/// How stale a queue gauge may be.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// Refreshes now, then every [`REFRESH_EVERY`] until `stop` turns true.
pub async fn run(deployment: Deployment, mut stop: watch::Receiver<bool>) {
    loop {
        refresh(&deployment).await;
        tokio::select! {
            _ = tokio::time::sleep(REFRESH_EVERY) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// One pipeline of O(1)/O(log n) reads (XLEN, XPENDING summary, ZCARD, ZCOUNT, EXISTS,
/// SCARD); a failure leaves the last values in place and is logged.
async fn refresh(deployment: &Deployment) {
    match deployment.queue_stats().await {
        Ok(stats) => {
            metrics::gauge!(crate::metrics::QUEUE_WAITING).set(stats.waiting as f64);
            metrics::gauge!(crate::metrics::QUEUE_PENDING).set(stats.pending as f64);
            metrics::gauge!(crate::metrics::QUEUE_DELAYED).set(stats.delayed as f64);
            metrics::gauge!(crate::metrics::QUEUE_DEAD).set(stats.dead as f64);
            metrics::gauge!(crate::metrics::QUEUE_OLDEST_AGE)
                .set(stats.oldest_job_age.map_or(0.0, |a| a.as_secs_f64()));
            metrics::gauge!(crate::metrics::QUEUE_PAUSED).set(if stats.paused { 1.0 } else { 0.0 });
            metrics::gauge!(crate::metrics::WORKERS_ALIVE).set(stats.workers_alive as f64);
        }
        Err(err) => tracing::warn!(error = %err, "queue gauges not refreshed"),
    }
    match deployment.stuck_len().await {
        Ok(stuck) => metrics::gauge!(crate::metrics::ORDERS_STUCK).set(stuck as f64),
        Err(err) => tracing::warn!(error = %err, "stuck-orders gauge not refreshed"),
    }
}
