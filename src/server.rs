//! Process wiring: logging, metrics recorder, the runtime, listeners, the
//! role's tasks and signal handling. Owns no protocol logic.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admin::auth::AdminAuth;
use crate::admin::http::AdminSettings;
use crate::cluster::ClusterView;
use crate::config::{AckMode, Config, ReplicationConfig, RoleConfig};
use crate::control::Control;
use crate::door::{Door, DoorParts};
use crate::live::Live;
use crate::relay::hooks::Chain;
use crate::relay::listener::{ClientListener, HooksFactory, InjectedClient};
use crate::relay::{PassThrough, SessionHooks, SessionLimits};
use crate::reload::{LogFilterSetter, Reloadables};
use crate::replication::applied::AppliedLog;
use crate::replication::applier::Applier;
use crate::replication::capture::{self, CaptureHooks, CaptureHub};
use crate::replication::feed::{
    self, BackendLink, CaptureLink, DoorSink, FeedHandle, ListenerConfig,
};
use crate::replication::pack::{self, PackCapture, PackOp, PackRunner};
use crate::replication::replica::{self, ReplicaConfig};
use crate::replication::replica_session::ReplicaHooks;
use crate::replication::semisync::{self, SemiSync, SemiSyncConfig, SemiSyncHooks};
use crate::replication::sender::SenderConfig;
use crate::replication::tls;
use crate::replication::txn::{Tid, Z64};
use crate::status::{Role, StatusHub};

/// How long the feed waits for a client session whose `tpc_finish` reply
/// races the observer's invalidation of the same commit; past it, the commit
/// is read back (correct either way).
const CAPTURE_WAIT: Duration = Duration::from_millis(200);

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
        .build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).context("install the metrics recorder")?;
    crate::metrics::describe();
    tls::describe();
    crate::reload::describe();
    pack::describe();
    crate::own_conns::describe();
    capture::describe();
    crate::tls::expiry::describe();
    // Zero series even on a plaintext port: dashboards query them everywhere.
    crate::tls::client::describe_and_init();

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
    let env = Env {
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
    let mut door_connector = None;
    let local_hooks: HooksFactory = match &cfg.replication {
        Some(r) if r.role == RoleConfig::Primary => {
            let capture = (r.capture_max_bytes > 0).then(|| CaptureLink {
                hub: CaptureHub::new(),
                verify: r.capture_verify,
                wait: CAPTURE_WAIT,
            });
            let feed = start_feed(
                r,
                &cfg,
                &env,
                &link,
                &status,
                &shutdown,
                &mut tasks,
                &mut reloadables,
                capture.clone(),
            )
            .await?;
            let semisync = feed.semisync.clone();
            // The primary's own sessions: commits captured for the feed
            // (replication::capture), client packs replayed on the replicas
            // (replication::pack).
            let mut parts: Vec<HooksFactory> = Vec::new();
            if let Some(c) = capture {
                capture::init_series();
                let max = r.capture_max_bytes;
                let storage = storage.clone();
                parts.push(Arc::new(move || {
                    Box::new(CaptureHooks::new(c.hub.clone(), max, storage.clone()))
                        as Box<dyn SessionHooks>
                }));
            }
            if r.replicate_pack {
                let (captured, packs) = tokio::sync::mpsc::channel(16);
                tasks.push(tokio::spawn(pack::relay_packs(
                    link.clone(),
                    packs,
                    feed.published,
                    feed.packs,
                    shutdown.clone(),
                )));
                parts.push(Arc::new(move || {
                    Box::new(PackCapture::new(captured.clone())) as Box<dyn SessionHooks>
                }));
            }
            let role_hooks: HooksFactory = match parts.len() {
                0 => Arc::new(|| Box::new(PassThrough) as Box<dyn SessionHooks>),
                1 => parts.pop().expect("one"),
                _ => Arc::new(move || {
                    Box::new(Chain(parts.iter().map(|f| f()).collect())) as Box<dyn SessionHooks>
                }),
            };
            match semisync {
                // Nothing a client sees runs ahead of the replicas'
                // acknowledgements (invariant 6).
                Some(ss) => Arc::new(move || {
                    Box::new(SemiSyncHooks::new(role_hooks(), ss.subscribe()))
                        as Box<dyn SessionHooks>
                }),
                None => role_hooks,
            }
        }
        Some(r) => {
            let applied = Arc::new(AppliedLog::new(r.applied_log_txns));
            let downstream = if r.listen.is_some() {
                // Cascading: what this replica's backend commits (the
                // applier's replays, in tid order) is fed downstream exactly
                // as a primary feeds its replicas; so are its packs.
                let feed = start_feed(
                    r,
                    &cfg,
                    &env,
                    &link,
                    &status,
                    &shutdown,
                    &mut tasks,
                    &mut reloadables,
                    None,
                )
                .await?;
                Some(feed.packs)
            } else {
                None
            };
            let packer = r.replicate_pack.then(|| {
                let (p, task) = PackRunner::start(link.clone(), downstream, shutdown.clone());
                tasks.push(task);
                p
            });
            let connector = start_replica(
                r,
                &cfg,
                &link,
                applied.clone(),
                applied_tx.clone(),
                &status,
                &shutdown,
                &mut tasks,
                packer,
            )?;
            door_connector = Some(connector.clone());
            reloadables.repl_connector = Some(connector);
            let allow_pack = r.allow_pack;
            Arc::new(move || {
                Box::new(ReplicaHooks::new(applied.clone(), allow_pack)) as Box<dyn SessionHooks>
            })
        }
        None => Arc::new(|| Box::new(PassThrough) as Box<dyn SessionHooks>),
    };
    // Every node of a cluster is a door: it decides at register where each
    // session is served (see crate::door).
    let hooks: HooksFactory = match &cfg.replication {
        Some(r) => {
            let connector = match door_connector {
                Some(c) => c,
                None => Live::new(tokio_rustls::TlsConnector::from(
                    tls::client_config(&r.tls).context("load replication TLS files")?,
                )),
            };
            let door = Door::new(DoorParts {
                cfg: cfg.door.clone(),
                cluster: cluster.clone(),
                connector,
                cluster_name: r.cluster.clone(),
                storage: storage.clone(),
                node: cfg.node_name.clone(),
                connect_timeout: cfg.backend.connect_timeout(),
                local_hooks,
                status: status.clone(),
            });
            let keep_sender = applied_tx.clone();
            let (d, st, sd) = (door.clone(), status.clone(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                crate::door::run_monitor(d, applied_rx, st, sd).await;
                drop(keep_sender);
            }));
            Arc::new(move || door.hooks())
        }
        None => local_hooks,
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
        role = ?role,
        version = env!("CARGO_PKG_VERSION"),
        "zrelay serving ZEO clients"
    );
    if let Some(c) = &cfg.coordinator {
        // Not wired into the role yet (issue 9 builds on issue 8's role
        // machinery); say so rather than pretend to fail over.
        tracing::warn!(
            endpoints = ?c.endpoints,
            "[coordinator] is configured but automatic failover is not active yet: \
             roles stay static; `zrelay status/pause/resume --config` use etcd"
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

/// What every role's wiring shares.
struct Env {
    cluster: Arc<ClusterView>,
    doors: DoorSink,
}

/// What [`start_feed`] hands back: where packs to replay go, and the
/// feed's last published tid.
struct FeedOut {
    packs: watch::Sender<Option<PackOp>>,
    published: watch::Receiver<Tid>,
    /// Semi-sync primary: the acknowledgement count.
    semisync: Option<Arc<SemiSync>>,
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

/// The commit feed and the replication listener: on a primary, and on a
/// replica that feeds further replicas.
#[allow(clippy::too_many_arguments)]
async fn start_feed(
    r: &ReplicationConfig,
    cfg: &Config,
    env: &Env,
    link: &BackendLink,
    status: &Arc<StatusHub>,
    shutdown: &CancellationToken,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    reloadables: &mut Reloadables,
    capture: Option<CaptureLink>,
) -> anyhow::Result<FeedOut> {
    let server_cfg = tls::server_config(&r.tls).context("load replication TLS files")?;
    let acceptor = Live::new(tokio_rustls::TlsAcceptor::from(server_cfg));
    let allowed_peers = Live::new(r.allowed_peers.clone());
    reloadables.repl_acceptor = Some(acceptor.clone());
    reloadables.repl_allowed = Some(allowed_peers.clone());
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
    let (packs_tx, packs_rx) = watch::channel(None);
    let report = (r.role == RoleConfig::Primary).then(|| status.clone());
    let semisync = start_semisync(r, link, &last_rx, status, shutdown, tasks);
    tasks.push(tokio::spawn(feed::run_feed(
        link.clone(),
        commits.clone(),
        last_tx,
        report,
        shutdown.clone(),
        capture,
    )));
    let lcfg = ListenerConfig {
        acceptor,
        allowed_peers,
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
        cluster: Some(env.cluster.clone()),
        doors: Some(env.doors.clone()),
        clone_source: cfg.backend.clone_source(),
        semisync: semisync.clone(),
    };
    tasks.push(tokio::spawn(feed::serve_replicas(
        listener,
        lcfg,
        link.clone(),
        FeedHandle {
            commits,
            last_tid: last_rx.clone(),
            packs: packs_rx,
        },
        status.clone(),
        shutdown.clone(),
    )));
    Ok(FeedOut {
        packs: packs_tx,
        published: last_rx,
        semisync,
    })
}

/// A semi-sync primary's acknowledgement count and its coordinator.
fn start_semisync(
    r: &ReplicationConfig,
    link: &BackendLink,
    last: &watch::Receiver<Tid>,
    status: &Arc<StatusHub>,
    shutdown: &CancellationToken,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Option<Arc<SemiSync>> {
    if r.role != RoleConfig::Primary || r.ack_mode != AckMode::SemiSync {
        return None;
    }
    semisync::describe();
    info!(
        min_acks = r.min_acks,
        ack_level = ?r.ack_level,
        ack_timeout_ms = r.ack_timeout_ms,
        strict = r.strict,
        "replication: semi-synchronous commits"
    );
    let ss = SemiSync::new(SemiSyncConfig {
        min_acks: r.min_acks,
        level: r.ack_level,
        timeout: Duration::from_millis(r.ack_timeout_ms),
        strict: r.strict,
    });
    tasks.push(tokio::spawn(semisync::run_coordinator(
        ss.clone(),
        link.clone(),
        last.clone(),
        status.clone(),
        shutdown.clone(),
    )));
    Some(ss)
}

#[allow(clippy::too_many_arguments)]
fn start_replica(
    r: &ReplicationConfig,
    cfg: &Config,
    link: &BackendLink,
    applied: Arc<AppliedLog>,
    applied_tx: Arc<watch::Sender<Tid>>,
    status: &Arc<StatusHub>,
    shutdown: &CancellationToken,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    packer: Option<PackRunner>,
) -> anyhow::Result<Arc<Live<tokio_rustls::TlsConnector>>> {
    let client_cfg = tls::client_config(&r.tls).context("load replication TLS files")?;
    let connector = Live::new(tokio_rustls::TlsConnector::from(client_cfg));
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
        connector: connector.clone(),
        stale_after: Duration::from_millis(r.stale_after_ms),
        max_message_bytes: r.max_message_bytes,
        connect_timeout: link.connect_timeout,
        client_addr: Some(
            cfg.cluster
                .advertise_client
                .clone()
                .unwrap_or_else(|| cfg.client.listen.to_string()),
        ),
        replication_addr: cfg
            .cluster
            .advertise_replication
            .clone()
            .or_else(|| r.listen.map(|a| a.to_string())),
        applied: applied_tx,
        packer,
        spool_dir: r.data_dir.clone(),
        spool_max_bytes: r.spool_max_bytes,
    };
    tasks.push(tokio::spawn(replica::run_replica(
        rcfg,
        applier,
        status.clone(),
        shutdown.clone(),
    )));
    Ok(connector)
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
