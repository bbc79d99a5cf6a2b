//! `serve`: the callback receiver and the HTTP API.

use crate::config::Settings;
use crate::deployment::Deployment;
use anyhow::{Context, Result};
use std::process::ExitCode;

pub async fn run(settings: &Settings) -> Result<ExitCode> {
    // Refuse to start without a token (or an explicit opt-out) before binding anything.
    settings.server.api_token()?;
    crate::redis_safety::ensure(settings).await?;
    let deployment = Deployment::connect(settings).await?;
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
    crate::server::serve(settings, deployment, listener, crate::shutdown::signal()).await?;
    Ok(ExitCode::SUCCESS)
}
