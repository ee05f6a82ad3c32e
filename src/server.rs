//! Process wiring: logging, metrics recorder, the runtime, listeners, the
//! role's tasks and signal handling. Owns no protocol logic.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admin::auth::AdminAuth;
use crate::admin::http::AdminSettings;
use crate::cluster::ClusterView;
use crate::config::{Config, RoleConfig};
use crate::control::Control;
use crate::door::{Door, DoorParts};
use crate::live::Live;
use crate::relay::listener::{ClientListener, HooksFactory, InjectedClient};
use crate::relay::{PassThrough, SessionHooks, SessionLimits};
use crate::reload::{LogFilterSetter, Reloadables};
use crate::replication::capture;
use crate::replication::feed::{self, BackendLink, DoorSink};
use crate::replication::pack;
use crate::replication::tls;
use crate::replication::txn::Z64;
use crate::rolectl::RoleCtl;
use crate::status::{Role, StatusHub};

pub fn run(cfg: Config) -> anyhow::Result<()> {
    run_file(cfg, None)
}

/// Runs the proxy; `path` is the file `cfg` came from, re-read on SIGHUP
/// and `POST /reload` (None: reload reports an error).
pub fn run_file(cfg: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cfg.log_level))
        .with_writer(std::io::stderr)
        .with_filter_reloading();
    let handle = builder.reload_handle();
    builder.init();
    let log_filter: LogFilterSetter = Box::new(move |directive: &str| {
        let filter =
            tracing_subscriber::EnvFilter::try_new(directive).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
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
    runtime.block_on(serve(cfg, path, log_filter))
}

async fn serve(
    cfg: Config,
    path: Option<PathBuf>,
    log_filter: LogFilterSetter,
) -> anyhow::Result<()> {
    let hup = crate::reload::hangup_signal();
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&crate::admin::LATENCY_BUCKETS)
        .context("configure histogram buckets")?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                crate::replication::stages::STAGE_SECONDS.to_string(),
            ),
            &crate::replication::stages::STAGE_BUCKETS,
        )
        .context("configure the replication stage buckets")?
        .build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).context("install the metrics recorder")?;
    crate::metrics::describe();
    tls::describe();
    crate::reload::describe();
    pack::describe();
    crate::own_conns::describe();
    capture::describe();
    crate::replication::stages::describe();
    crate::tls::expiry::describe();
    // Zero series even on a plaintext port: dashboards query them everywhere.
    crate::tls::client::describe_and_init();
    if cfg.replication.is_some() {
        crate::rolectl::describe();
    }

    let role = match cfg.replication.as_ref().map(|r| r.role) {
        Some(RoleConfig::Replica) => Role::Replica,
        _ => Role::Primary,
    };
    crate::metrics::init_series(role == Role::Replica, cfg.replication.is_some());
    if cfg.replication.is_some() {
        pack::init_series(role == Role::Replica);
    }
    let storage = cfg.backend.storages[0].clone();
    let status = Arc::new(StatusHub::new(
        cfg.node_name.clone(),
        role,
        cfg.backend.addr().to_string(),
    ));
    let shutdown = CancellationToken::new();
    // Drain (POST /drain) stops the client listener only; shutdown implies it.
    let drain = shutdown.child_token();
    let (control, reload_requests) = Control::new(drain.clone(), status.clone());
    let mut reloadables = Reloadables {
        log_filter: Some(log_filter),
        status: Some(status.clone()),
        ..Reloadables::default()
    };
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
    let cluster = Arc::new(ClusterView::new(
        cfg.cluster.clone(),
        cfg.node_name.clone(),
        cfg.client.listen.to_string(),
        cfg.replication
            .as_ref()
            .and_then(|r| r.listen)
            .map(|a| a.to_string()),
        status.clone(),
    ));
    // Sessions other nodes' doors relay here join the client listener.
    let (door_tx, door_rx) = tokio::sync::mpsc::channel::<InjectedClient>(64);
    let door_sink: DoorSink = Arc::new(move |c: feed::DoorConn| {
        let peer = format!("door:{}@{}", c.node, c.peer_addr);
        if door_tx
            .try_send(InjectedClient {
                stream: Box::new(c.stream),
                peer,
            })
            .is_err()
        {
            tracing::warn!(door = %c.node, "too many door sessions waiting; dropped one");
        }
    });
    crate::metrics::describe_door();
    let env = crate::rolectl::Env {
        cluster: cluster.clone(),
        doors: door_sink,
    };

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

    // The applied position of a replica (the door's offload waits on it);
    // a primary's never moves.
    let (applied_tx, applied_rx) = watch::channel(Z64);
    let applied_tx = Arc::new(applied_tx);
    // Every node of a cluster is a door: it decides at register where each
    // session is served (see crate::door). The role-dependent pieces run
    // under the role controller, which swaps them at run time.
    let hooks: HooksFactory = match &cfg.replication {
        Some(_) => {
            let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
            let mut ctl = RoleCtl::new(
                crate::rolectl::Parts {
                    cfg: cfg.clone(),
                    env,
                    link: link.clone(),
                    applied_tx: applied_tx.clone(),
                    status: status.clone(),
                    shutdown: shutdown.clone(),
                },
                events_tx,
            )?;
            status.update(|s| s.role = ctl.initial_role());
            if let Some(cc) = &cfg.coordinator {
                // Automatic failover: etcd's leader key decides who is
                // primary (see crate::coordinator and rolectl::CoordLink).
                let (member_tx, member_rx) = watch::channel(ctl.member_record());
                let co = crate::coordinator::spawn(
                    cc.clone(),
                    cfg.node_name.clone(),
                    member_rx,
                    shutdown.clone(),
                );
                cluster.set_coordinator(co.snapshot.clone());
                ctl.attach_coordinator(crate::rolectl::CoordLink {
                    member: member_tx,
                    events: co.events,
                    snapshot: co.snapshot,
                    requests: co.requests,
                });
                tasks.push(co.task);
                info!(endpoints = ?cc.endpoints, name = %cc.name, ttl_secs = cc.ttl_secs, "coordinator: roles follow the leader key in etcd");
            }
            ctl.start().await?;
            reloadables.repl_connector = Some(ctl.connector());
            reloadables.repl_acceptor = ctl.acceptor();
            reloadables.repl_allowed = Some(ctl.allowed());
            let door = Door::new(DoorParts {
                cfg: cfg.door.clone(),
                cluster: cluster.clone(),
                connector: ctl.connector(),
                cluster_name: ctl.cluster_name(),
                storage: storage.clone(),
                node: cfg.node_name.clone(),
                connect_timeout: cfg.backend.connect_timeout(),
                local_hooks: ctl.local_hooks(),
                status: status.clone(),
                role: Some(ctl.cell()),
            });
            let (role_tx, role_rx) = tokio::sync::mpsc::channel(4);
            control.set_roles(role_tx);
            tasks.push(tokio::spawn(ctl.run(role_rx, events_rx)));
            let keep_sender = applied_tx.clone();
            let (d, st, sd) = (door.clone(), status.clone(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                crate::door::run_monitor(d, applied_rx, st, sd).await;
                drop(keep_sender);
            }));
            Arc::new(move || door.hooks())
        }
        None => Arc::new(|| Box::new(PassThrough) as Box<dyn SessionHooks>),
    };

    if let Some(a) = &cfg.admin {
        let l = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("listen for admin HTTP on {}", a.listen))?;
        let settings = Live::new(AdminSettings {
            max_replica_lag: a.max_replica_lag(),
            auth: AdminAuth::load(a)
                .map_err(anyhow::Error::msg)
                .context("admin.token_file")?,
        });
        let admin_tls = match &a.tls {
            Some(files) => {
                crate::tls::expiry::track(&status, "admin", &files.cert_file, Some(&files.ca_file))
                    .context("read admin certificate expiry")?;
                Some(Live::new(tokio_rustls::TlsAcceptor::from(
                    tls::admin_server_config(files).context("load admin TLS files")?,
                )))
            }
            None => None,
        };
        info!(listen = %a.listen, tls = admin_tls.is_some(), "admin HTTP (metrics, health, status, control)");
        reloadables.admin = Some(settings.clone());
        reloadables.admin_tls = admin_tls.clone();
        tasks.push(tokio::spawn(crate::admin::http::serve(
            l,
            crate::admin::http::AdminState {
                status: status.clone(),
                prometheus: prometheus.clone(),
                settings,
                control: Some(control.clone()),
                tls: admin_tls,
                cluster: Some(cluster.clone()),
            },
            shutdown.clone(),
        )));
    }
    let source = match path {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("read {}", path.display()))?;
            Some((path, text))
        }
        None => None,
    };
    tasks.push(tokio::spawn(crate::reload::run(
        source,
        hup,
        reloadables,
        reload_requests,
        shutdown.clone(),
    )));

    let listener = tokio::net::TcpListener::bind(cfg.client.listen)
        .await
        .with_context(|| format!("listen for clients on {}", cfg.client.listen))?;
    info!(
        listen = %listener.local_addr()?,
        backend = %cfg.backend.addr(),
        node = %cfg.node_name,
        role = ?status.role(),
        version = env!("CARGO_PKG_VERSION"),
        "zrelay serving ZEO clients"
    );
    for w in cfg.warnings() {
        tracing::warn!("config: {w}");
    }
    if cfg.coordinator.is_some() && cfg.replication.is_none() {
        tracing::warn!(
            "[coordinator] needs [replication]: a node without it has no role to fail over; \
             `zrelay status/pause/resume --config` still use etcd"
        );
    }
    let limits = SessionLimits {
        max_message_bytes: cfg.client.max_message_bytes,
        handshake_timeout: cfg.client.handshake_timeout(),
        shutdown_grace: cfg.client.shutdown_grace(),
        backend: cfg.backend.addr(),
        connect_timeout: cfg.backend.connect_timeout(),
        budget: crate::relay::limits::Budget::new(cfg.client.buffer_budget_bytes),
        buffer_wait: cfg.client.buffer_wait(),
        write_stall: cfg.client.write_stall_timeout(),
        dead_peer_timeout: cfg.client.dead_peer_timeout(),
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
        injected: Some(door_rx),
        gate: client_gate(&cfg, &status)?,
        peer_limit: crate::relay::limits::PeerLimit::new(cfg.client.max_connections_per_peer),
    };
    let serving = tokio::spawn(clients.serve(drain.clone()));

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

/// The client port's TLS door, if `[client.tls]` is configured.
fn client_gate(
    cfg: &Config,
    status: &StatusHub,
) -> anyhow::Result<Option<Arc<dyn crate::relay::listener::Gate>>> {
    let Some(t) = &cfg.client.tls else {
        return Ok(None);
    };
    crate::tls::expiry::track(status, "client", &t.cert_file, t.ca_file.as_deref())
        .context("read client certificate expiry")?;
    let door = crate::tls::client::ClientTlsGate::new(t, cfg.client.handshake_timeout())
        .context("load client TLS files")?;
    info!(
        require_client_cert = t.require_client_cert,
        read_write_clients = ?t.read_write_clients,
        "clients connect over TLS"
    );
    Ok(Some(Arc::new(door)))
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
