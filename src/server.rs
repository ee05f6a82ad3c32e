//! Process wiring: logging, metrics recorder, the runtime, listeners, the
//! role's tasks and signal handling. Owns no protocol logic.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{Config, ReplicationConfig, RoleConfig};
use crate::relay::listener::{ClientListener, HooksFactory};
use crate::relay::{PassThrough, SessionHooks, SessionLimits};
use crate::replication::applied::AppliedLog;
use crate::replication::applier::Applier;
use crate::replication::feed::{self, BackendLink, FeedHandle, ListenerConfig};
use crate::replication::replica::{self, ReplicaConfig};
use crate::replication::replica_session::ReplicaHooks;
use crate::replication::sender::SenderConfig;
use crate::replication::tls;
use crate::replication::txn::Z64;
use crate::status::{Role, StatusHub};

pub fn run(cfg: Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cfg.log_level))
        .with_writer(std::io::stderr)
        .init();
    // One worker thread by default: a session's hops then never cross
    // threads (no futex wake-ups between the I/O driver and the task), which
    // is what costs latency on a small host shared with the ZEO server.
    let runtime = if cfg.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.worker_threads)
            .enable_all()
            .thread_name("zrelay")
            .build()
    }
    .context("start the tokio runtime")?;
    runtime.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&crate::admin::LATENCY_BUCKETS)
        .context("configure histogram buckets")?
        .build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).context("install the metrics recorder")?;
    crate::metrics::describe();
    tls::describe();
    crate::tls::expiry::describe();
    // Zero series even on a plaintext port: dashboards query them everywhere.
    crate::tls::client::describe_and_init();

    let role = match cfg.replication.as_ref().map(|r| r.role) {
        Some(RoleConfig::Replica) => Role::Replica,
        _ => Role::Primary,
    };
    crate::metrics::init_series(role == Role::Replica, cfg.replication.is_some());
    let storage = cfg.backend.storages[0].clone();
    let status = Arc::new(StatusHub::new(
        cfg.node_name.clone(),
        role,
        cfg.backend.addr().to_string(),
    ));
    let shutdown = CancellationToken::new();
    if let (Some(t), Some(name)) = (&cfg.backend.tls, cfg.backend.tls_server_name()) {
        crate::tls::expiry::track(&status, "backend", &t.cert_file, Some(&t.ca_file))
            .context("read backend certificate expiry")?;
        let upgrade =
            crate::tls::backend::BackendTls::new(t, name.clone(), cfg.backend.connect_timeout())
                .context("load backend TLS files")?;
        crate::relay::backend::install_upgrade(Arc::new(upgrade));
        info!(server_name = %name, "backend connections over TLS");
    }
    let mut tasks = Vec::new();

    tasks.push(tokio::spawn(crate::monitor::backend_monitor(
        cfg.backend.addr(),
        cfg.backend.storages[0].clone(),
        cfg.backend.connect_timeout(),
        cfg.backend.probe_interval(),
        status.clone(),
        shutdown.clone(),
    )));

    let link = BackendLink {
        addr: cfg.backend.addr(),
        storage: storage.clone(),
        connect_timeout: cfg.backend.connect_timeout(),
        call_timeout: cfg.backend.call_timeout(),
        max_message_bytes: cfg.client.max_message_bytes,
    };

    let hooks: HooksFactory = match &cfg.replication {
        Some(r) if r.role == RoleConfig::Primary => {
            start_feed(r, &cfg, &link, &status, &shutdown, &mut tasks).await?;
            Arc::new(|| Box::new(PassThrough) as Box<dyn SessionHooks>)
        }
        Some(r) => {
            let applied = Arc::new(AppliedLog::new(r.applied_log_txns));
            start_replica(
                r,
                &cfg,
                &link,
                applied.clone(),
                &status,
                &shutdown,
                &mut tasks,
            )?;
            if r.listen.is_some() {
                // Cascading: what this replica's backend commits (the
                // applier's replays, in tid order) is fed downstream exactly
                // as a primary feeds its replicas.
                start_feed(r, &cfg, &link, &status, &shutdown, &mut tasks).await?;
            }
            let allow_pack = r.allow_pack;
            Arc::new(move || {
                Box::new(ReplicaHooks::new(applied.clone(), allow_pack)) as Box<dyn SessionHooks>
            })
        }
        None => Arc::new(|| Box::new(PassThrough) as Box<dyn SessionHooks>),
    };

    if let Some(a) = &cfg.admin {
        let l = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("listen for admin HTTP on {}", a.listen))?;
        info!(listen = %a.listen, "admin HTTP (metrics, health, status)");
        tasks.push(tokio::spawn(crate::admin::http::serve(
            l,
            crate::admin::http::AdminState {
                status: status.clone(),
                prometheus: prometheus.clone(),
                max_replica_lag: a.max_replica_lag(),
            },
            shutdown.clone(),
        )));
    }

    let listener = tokio::net::TcpListener::bind(cfg.client.listen)
        .await
        .with_context(|| format!("listen for clients on {}", cfg.client.listen))?;
    info!(
        listen = %listener.local_addr()?,
        backend = %cfg.backend.addr(),
        node = %cfg.node_name,
        role = ?role,
        version = env!("CARGO_PKG_VERSION"),
        "zrelay serving ZEO clients"
    );
    let limits = SessionLimits {
        max_message_bytes: cfg.client.max_message_bytes,
        handshake_timeout: cfg.client.handshake_timeout(),
        shutdown_grace: cfg.client.shutdown_grace(),
        backend: cfg.backend.addr(),
        connect_timeout: cfg.backend.connect_timeout(),
        budget: crate::relay::limits::Budget::new(cfg.client.buffer_budget_bytes),
        buffer_wait: cfg.client.buffer_wait(),
        write_stall: cfg.client.write_stall_timeout(),
    };
    crate::metrics::describe_limits(cfg.client.buffer_budget_bytes);
    if cfg.client.buffer_budget_bytes < cfg.client.max_message_bytes {
        tracing::warn!(
            budget = cfg.client.buffer_budget_bytes,
            max_message_bytes = cfg.client.max_message_bytes,
            "client.buffer_budget_bytes is below client.max_message_bytes: larger client messages can never be received"
        );
    }
    let clients = ClientListener {
        listener,
        limits,
        max_connections: cfg.client.max_connections,
        hooks,
        door: client_door(&cfg, &status)?,
        peer_limit: crate::relay::limits::PeerLimit::new(cfg.client.max_connections_per_peer),
    };
    let serving = tokio::spawn(clients.serve(shutdown.clone()));

    wait_for_signal().await?;
    info!(
        grace_ms = cfg.client.shutdown_grace_ms,
        "shutting down: no new clients; draining sessions"
    );
    shutdown.cancel();
    let _ = serving.await;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    info!("shut down");
    Ok(())
}

fn track_replication_certs(r: &ReplicationConfig, status: &StatusHub) -> anyhow::Result<()> {
    crate::tls::expiry::track(
        status,
        "replication",
        &r.tls.cert_file,
        Some(&r.tls.ca_file),
    )
    .context("read replication certificate expiry")
}

/// The client port's TLS door, if `[client.tls]` is configured.
fn client_door(
    cfg: &Config,
    status: &StatusHub,
) -> anyhow::Result<Option<Arc<dyn crate::relay::listener::Door>>> {
    let Some(t) = &cfg.client.tls else {
        return Ok(None);
    };
    crate::tls::expiry::track(status, "client", &t.cert_file, t.ca_file.as_deref())
        .context("read client certificate expiry")?;
    let door = crate::tls::client::ClientTlsDoor::new(t, cfg.client.handshake_timeout())
        .context("load client TLS files")?;
    info!(
        require_client_cert = t.require_client_cert,
        read_write_clients = ?t.read_write_clients,
        "clients connect over TLS"
    );
    Ok(Some(Arc::new(door)))
}

/// The commit feed and the replication listener: on a primary, and on a
/// replica that feeds further replicas.
async fn start_feed(
    r: &ReplicationConfig,
    cfg: &Config,
    link: &BackendLink,
    status: &Arc<StatusHub>,
    shutdown: &CancellationToken,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let server_cfg = tls::server_config(&r.tls).context("load replication TLS files")?;
    track_replication_certs(r, status)?;
    let listen = r.listen.context("replication.listen")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen for replicas on {listen}"))?;
    info!(listen = %listen, cluster = %r.cluster, "replication: accepting replicas over mutual TLS");
    // Bounded: a replica that falls this far behind the live feed reads
    // history instead (see SenderState). Each sender drains it into its own
    // byte-limited queue, so this only has to absorb a burst while a sender
    // is busy writing; it holds at most this many transactions.
    let (commits, _) = broadcast::channel(256);
    let (last_tx, last_rx) = watch::channel(Z64);
    let report = (r.role == RoleConfig::Primary).then(|| status.clone());
    tasks.push(tokio::spawn(feed::run_feed(
        link.clone(),
        commits.clone(),
        last_tx,
        report,
        shutdown.clone(),
    )));
    let lcfg = ListenerConfig {
        acceptor: tokio_rustls::TlsAcceptor::from(server_cfg),
        allowed_peers: r.allowed_peers.clone(),
        sender: SenderConfig {
            cluster: r.cluster.clone(),
            storage: link.storage.clone(),
            primary_node: cfg.node_name.clone(),
            heartbeat_interval: Duration::from_millis(r.heartbeat_interval_ms),
            live_queue_limit_txns: r.live_queue_txns,
            live_queue_limit_bytes: r.live_queue_bytes,
        },
        max_message_bytes: r.max_message_bytes,
        handshake_timeout: Duration::from_secs(10),
    };
    tasks.push(tokio::spawn(feed::serve_replicas(
        listener,
        lcfg,
        link.clone(),
        FeedHandle {
            commits,
            last_tid: last_rx,
        },
        status.clone(),
        shutdown.clone(),
    )));
    Ok(())
}

fn start_replica(
    r: &ReplicationConfig,
    cfg: &Config,
    link: &BackendLink,
    applied: Arc<AppliedLog>,
    status: &Arc<StatusHub>,
    shutdown: &CancellationToken,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let client_cfg = tls::client_config(&r.tls).context("load replication TLS files")?;
    track_replication_certs(r, status)?;
    let upstream = r.upstream.clone().context("replication.upstream")?;
    info!(upstream = %upstream, cluster = %r.cluster, "replication: replica, read-only service");
    let applier = Applier::new(
        link.addr.clone(),
        link.storage.clone(),
        link.connect_timeout,
        link.call_timeout,
        r.max_message_bytes,
        applied,
    );
    let rcfg = ReplicaConfig {
        cluster: r.cluster.clone(),
        storage: link.storage.clone(),
        node: cfg.node_name.clone(),
        upstream_name: r.upstream_server_name(),
        upstream,
        connector: tokio_rustls::TlsConnector::from(client_cfg),
        stale_after: Duration::from_millis(r.stale_after_ms),
        max_message_bytes: r.max_message_bytes,
        connect_timeout: link.connect_timeout,
    };
    tasks.push(tokio::spawn(replica::run_replica(
        rcfg,
        applier,
        status.clone(),
        shutdown.clone(),
    )));
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
