//! Starting `worker` and `serve` against a Redis that may not answer yet. A process started
//! while Redis restarts, fails over or loads its data waits for it, as a running worker
//! does, instead of exiting (a deploy that coincides with a Redis restart would otherwise
//! leave the service with no workers, or in a restart loop). What Redis says once it answers
//! (settings that may drop acknowledged writes, a partition count that does not match the
//! stored one) still ends the start at once, as do bad settings.

use crate::config::Settings;
use crate::deployment::{Deployment, DeploymentError};
use crate::queue::QueueError;
use crate::queue::backoff::redis_backoff;
use crate::redis_safety::RedisSafetyError;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Safety(#[from] RedisSafetyError),
    #[error(transparent)]
    Deployment(#[from] DeploymentError),
}

impl StartError {
    /// Redis cannot be reached or is not ready yet: worth waiting for.
    fn redis_not_ready(&self) -> bool {
        match self {
            Self::Safety(RedisSafetyError::Connect(_)) => true,
            Self::Deployment(DeploymentError::Redis(err))
            | Self::Deployment(DeploymentError::Queue(QueueError::Redis(err))) => not_ready(err),
            _ => false,
        }
    }
}

/// Connection failures, timeouts, and a server that asks to wait (`LOADING` its data after a
/// restart, `TRYAGAIN`, `MASTERDOWN`, `CLUSTERDOWN`).
fn not_ready(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || matches!(err.retry_method(), redis::RetryMethod::WaitAndRetry)
}

/// Checks the Redis settings ([`crate::redis_safety::ensure`]) and connects the deployment,
/// trying again (50 ms doubling to 2 s, each failure logged) for as long as Redis cannot be
/// reached or is not ready. The caller races this against its stop signal.
pub async fn connect(settings: &Settings) -> Result<Deployment, StartError> {
    let mut backoff = redis_backoff();
    loop {
        match try_connect(settings).await {
            Ok(deployment) => return Ok(deployment),
            Err(err) if err.redis_not_ready() => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(2));
                tracing::warn!(error = %err, ?wait, "Redis is not ready; waiting for it");
                tokio::time::sleep(wait).await;
            }
            Err(err) => return Err(err),
        }
    }
}

async fn try_connect(settings: &Settings) -> Result<Deployment, StartError> {
    crate::redis_safety::ensure(settings).await?;
    Ok(Deployment::connect(settings).await?)
}
