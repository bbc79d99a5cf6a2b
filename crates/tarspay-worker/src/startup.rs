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
            Self::Safety(RedisSafetyError::Connect(err))
            | Self::Deployment(DeploymentError::Redis(err))
            | Self::Deployment(DeploymentError::Queue(QueueError::Redis(err))) => not_ready(err),
            _ => false,
        }
    }
}

/// Redis cannot be reached (refused, dropped, timed out, an unreachable host or a name that
/// does not resolve yet) or asks to wait (`LOADING` its data after a restart, `TRYAGAIN`,
/// `MASTERDOWN`, `CLUSTERDOWN`). Not: a wrong password, a bad URL, a refused command, or an
/// io error no retry mends (permission denied on a unix socket).
fn not_ready(err: &redis::RedisError) -> bool {
    use redis::{ErrorKind, RetryMethod};
    if matches!(
        err.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    ) {
        return false;
    }
    if err.is_timeout() || err.is_connection_refusal() || err.is_connection_dropped() {
        return true;
    }
    match err.retry_method() {
        RetryMethod::WaitAndRetry => true,
        // Io errors other than permission denied and unsupported.
        RetryMethod::RetryImmediately => err.is_io_error(),
        _ => false,
    }
}

/// Checks the Redis settings ([`crate::redis_safety::ensure`]) and connects the deployment,
/// trying again (50 ms doubling to 2 s, each failure logged) for as long as Redis cannot be
/// reached or is not ready. The caller races this against its stop signal.
pub async fn connect(settings: &Settings) -> Result<Deployment, StartError> {
    let mut backoff = redis_backoff();
    let waiting_since = std::time::Instant::now();
    // The settings check runs until it passes once (its warnings are logged once).
    let mut checked = false;
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        let tried = async {
            if !checked {
                crate::redis_safety::ensure(settings).await?;
                checked = true;
            }
            Ok::<_, StartError>(Deployment::connect(settings).await?)
        };
        match tried.await {
            Ok(deployment) => return Ok(deployment),
            Err(err) if err.redis_not_ready() => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(2));
                let waited = waiting_since.elapsed();
                tracing::warn!(error = %err, attempt, ?waited, "Redis is not ready; waiting for it");
                tokio::time::sleep(wait).await;
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::{ErrorKind, RedisError, ServerErrorKind};
    use std::io;

    fn io_error(kind: io::ErrorKind) -> RedisError {
        RedisError::from(io::Error::new(kind, "test"))
    }

    #[test]
    fn a_redis_that_cannot_be_reached_or_is_loading_is_waited_for() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::TimedOut,
            io::ErrorKind::HostUnreachable,
            io::ErrorKind::Other,
        ] {
            assert!(not_ready(&io_error(kind)), "{kind:?}");
        }
        for kind in [
            ServerErrorKind::BusyLoading,
            ServerErrorKind::TryAgain,
            ServerErrorKind::MasterDown,
            ServerErrorKind::ClusterDown,
        ] {
            let err = RedisError::from((ErrorKind::Server(kind), "test"));
            assert!(not_ready(&err), "{kind:?}");
        }
        let refused = StartError::Safety(RedisSafetyError::Connect(io_error(
            io::ErrorKind::ConnectionRefused,
        )));
        assert!(refused.redis_not_ready());
    }

    #[test]
    fn what_waiting_cannot_mend_ends_the_start() {
        let permanent = [
            RedisError::from((ErrorKind::AuthenticationFailed, "wrong password")),
            RedisError::from((ErrorKind::InvalidClientConfig, "bad URL")),
            RedisError::from((ErrorKind::Server(ServerErrorKind::NoPerm), "NOPERM")),
            RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "ERR")),
            io_error(io::ErrorKind::PermissionDenied),
        ];
        for err in permanent {
            assert!(!not_ready(&err), "{err}");
        }
        let wrong_password = StartError::Safety(RedisSafetyError::Connect(RedisError::from((
            ErrorKind::AuthenticationFailed,
            "wrong password",
        ))));
        assert!(!wrong_password.redis_not_ready());
        let unsafe_settings = StartError::Safety(RedisSafetyError::Unsafe(vec!["x".into()]));
        assert!(!unsafe_settings.redis_not_ready());
        let too_old = StartError::Safety(RedisSafetyError::TooOld {
            version: "6.2.14".into(),
        });
        assert!(!too_old.redis_not_ready());
        let mismatch = StartError::Deployment(DeploymentError::PartitionMismatch {
            prefix: "t".into(),
            stored: "2".into(),
            configured: 1,
        });
        assert!(!mismatch.redis_not_ready());
    }
}
