//! `serve`: the callback receiver and the HTTP API.

use crate::config::Settings;
use anyhow::{Context, Result};
use std::process::ExitCode;

pub async fn run(settings: &Settings) -> Result<ExitCode> {
    // From now on a stop signal means a graceful stop, even while starting.
    let mut shutdown = crate::shutdown::signal();
    // Refuse to start without a token (or an explicit opt-out) before binding anything.
    settings.server.api_token()?;
    let deployment = tokio::select! {
        deployment = crate::startup::connect(settings) => deployment?,
        () = &mut shutdown => {
            tracing::info!("stopped while starting");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let listener = tokio::net::TcpListener::bind(&settings.server.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (TARSPAY_LISTEN)",
                settings.server.listen
            )
        })?;
    let addr = listener.local_addr()?;
    println!(
        "listening on http://{addr} (callbacks at {})",
        settings.server.callback_path
    );
    crate::server::serve(settings, deployment, listener, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
