//! Process wiring: logging, metrics recorder, the runtime, listeners and
//! signal handling. Owns no protocol logic.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::relay::listener::{ClientListener, HooksFactory};
use crate::relay::{PassThrough, SessionHooks, SessionLimits};

pub fn run(cfg: Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cfg.log_level))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("zrelay")
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&crate::admin::LATENCY_BUCKETS)
        .context("configure histogram buckets")?
        .build_recorder();
    let _prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).context("install the metrics recorder")?;
    crate::metrics::describe();

    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(cfg.client.listen)
        .await
        .with_context(|| format!("listen for clients on {}", cfg.client.listen))?;
    info!(
        listen = %listener.local_addr()?,
        backend = %cfg.backend.addr(),
        node = %cfg.node_name,
        version = env!("CARGO_PKG_VERSION"),
        "zrelay serving ZEO clients"
    );
    let limits = SessionLimits {
        max_message_bytes: cfg.client.max_message_bytes,
        handshake_timeout: cfg.client.handshake_timeout(),
        shutdown_grace: cfg.client.shutdown_grace(),
        backend: cfg.backend.addr(),
        connect_timeout: cfg.backend.connect_timeout(),
    };
    let hooks: HooksFactory = Arc::new(|| Box::new(PassThrough) as Box<dyn SessionHooks>);
    let clients = ClientListener {
        listener,
        limits,
        max_connections: cfg.client.max_connections,
        hooks,
    };
    let serving = tokio::spawn(clients.serve(shutdown.clone()));

    wait_for_signal().await?;
    info!(
        grace_ms = cfg.client.shutdown_grace_ms,
        "shutting down: no new clients; draining sessions"
    );
    shutdown.cancel();
    let _ = serving.await;
    info!("shut down");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
