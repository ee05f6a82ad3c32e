use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "zrelay",
    version,
    about = "Replication and HA sidecar proxy for ZEO storage servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with the given configuration file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit (0 = valid).
    CheckConfig { file: PathBuf },
    /// Create a cluster CA in DIR (if absent) and a certificate for each node
    /// NAME (DIR/NAME.pem, DIR/NAME-key.pem), for replication TLS.
    Cert {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Compare a primary and a replica transaction by transaction up to the
    /// replica's last tid (backend or zrelay addresses: host:port or a unix
    /// socket path). Exit 0 identical, 1 different, 2 could not compare.
    Verify {
        #[arg(long)]
        primary: String,
        #[arg(long)]
        replica: String,
        #[arg(long, default_value = "1")]
        storage: String,
        /// Skip fetching and comparing blob files.
        #[arg(long)]
        no_blobs: bool,
        #[arg(long, default_value = "10s", value_parser = zrelay::admin::cli::parse_duration)]
        timeout: Duration,
        #[arg(long, default_value_t = 20)]
        max_differences: usize,
    },
    /// Benchmark helper: read SOURCE's whole history into memory, replay it
    /// into the empty backend TARGET with the replica's pipelined applier, and
    /// print JSON timings (the ceiling for catch-up through the stream).
    #[command(hide = true)]
    BenchRestore {
        #[arg(long)]
        source: String,
        #[arg(long)]
        target: String,
        #[arg(long, default_value = "1")]
        storage: String,
    },
    /// Make this node's Data.fs and blob directory a copy of the primary's
    /// (over the replication channel) or of a backup file, at disk speed.
    /// Run it while this node's runzeo is stopped; then start runzeo and
    /// the replica zrelay, which streams from the copy's last tid.
    Clone {
        /// This node's config: [replication] upstream, upstream_name,
        /// cluster and TLS files, [backend] data_fs and blob_dir.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The primary zrelay's replication address (default: the config's
        /// replication.upstream).
        #[arg(long)]
        upstream: Option<String>,
        /// Node name the primary's certificate must carry (default: the
        /// config's, else the host of --upstream).
        #[arg(long)]
        upstream_name: Option<String>,
        /// Where to write Data.fs (default: the config's backend.data_fs).
        #[arg(long)]
        data_fs: Option<PathBuf>,
        /// Where to write the blob files (default: the config's
        /// backend.blob_dir).
        #[arg(long)]
        blob_dir: Option<PathBuf>,
        /// Copy this local Data.fs (a backup) instead of asking the primary.
        #[arg(long)]
        from_file: Option<PathBuf>,
        /// With --from-file: the backup's blob directory.
        #[arg(long, requires = "from_file")]
        from_blob_dir: Option<PathBuf>,
        /// Replace an existing Data.fs and blob directory.
        #[arg(long)]
        force: bool,
        /// No progress bar even on a terminal.
        #[arg(long)]
        quiet: bool,
    },
    /// Show every node's role, state and lag (like `patronictl list`).
    Status {
        #[arg(long = "admin", required_unless_present = "config")]
        admins: Vec<String>,
        /// A node's config file with [coordinator]: show the cluster as etcd
        /// sees it (leader, epoch, lease time left, members).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Pause automatic failover (maintenance mode, stored in etcd).
    Pause {
        /// A node's config file with [coordinator].
        #[arg(long, short)]
        config: PathBuf,
        /// Stored as the maintenance key's value, for whoever looks.
        #[arg(long, default_value = "paused by zrelay pause")]
        reason: String,
    },
    /// Resume automatic failover (clears maintenance mode).
    Resume {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Stop accepting new client sessions on a node; open ones end at their
    /// next safe point (POST /drain). Exit 0 done, 1 refused, 2 unreachable.
    Drain {
        /// host:port, or https://host:port for an admin listener with TLS.
        #[arg(long)]
        admin: String,
        /// File holding the admin bearer token (the node's admin.token_file).
        #[arg(long, env = "ZRELAY_ADMIN_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        tls: AdminTlsArgs,
        #[arg(long, default_value = "10s", value_parser = zrelay::admin::cli::parse_duration)]
        timeout: Duration,
    },
    /// Make a node re-read its configuration file, like SIGHUP (POST /reload).
    Reload {
        #[arg(long)]
        admin: String,
        #[arg(long, env = "ZRELAY_ADMIN_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        tls: AdminTlsArgs,
        #[arg(long, default_value = "10s", value_parser = zrelay::admin::cli::parse_duration)]
        timeout: Duration,
    },
    /// Offline: truncate a stopped FileStorage after the transaction TID,
    /// keeping the cut bytes in DATA_FS.rewound-TID (the way back for a
    /// diverged old primary: afterwards it follows the new primary).
    Rewind {
        #[arg(long)]
        data_fs: PathBuf,
        /// The last transaction to keep (16 hex digits).
        #[arg(long)]
        to: String,
    },
    /// Promote a replica to primary now (POST /promote).
    Promote {
        #[command(flatten)]
        call: RoleCallArgs,
    },
    /// Fence a primary and make it follow NODE (POST /demote?follow=NODE);
    /// NODE is promoted separately.
    Demote {
        /// The node to follow.
        #[arg(long)]
        follow: String,
        #[command(flatten)]
        call: RoleCallArgs,
    },
    /// Swap the primary and a replica without losing a commit (POST
    /// /switchover?to=NODE, sent to the primary).
    Switchover {
        /// The replica to promote.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        call: RoleCallArgs,
    },
    /// Make a replica an independent primary of a new cluster (POST /detach).
    Detach {
        #[command(flatten)]
        call: RoleCallArgs,
    },
    /// Nagios/SlapOS check: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    Check {
        #[arg(long)]
        admin: String,
        #[arg(long, default_value = "5s", value_parser = zrelay::admin::cli::parse_duration)]
        max_lag: Duration,
        #[arg(long, default_value = "5s", value_parser = zrelay::admin::cli::parse_duration)]
        timeout: Duration,
    },
}

/// What the role-change commands share (same auth options as `drain`).
#[derive(clap::Args)]
struct RoleCallArgs {
    /// host:port, or https://host:port for an admin listener with TLS.
    #[arg(long)]
    admin: String,
    /// File holding the admin bearer token (the node's admin.token_file).
    #[arg(long, env = "ZRELAY_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: AdminTlsArgs,
    #[arg(long, default_value = "90s", value_parser = zrelay::admin::cli::parse_duration)]
    timeout: Duration,
}

fn rewind(data_fs: &std::path::Path, to: &str) -> ExitCode {
    use zrelay::replication::rewind;
    let tid = match rewind::parse_tid(to) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("zrelay: --to {e}");
            return ExitCode::from(2);
        }
    };
    match rewind::rewind(data_fs, &tid) {
        Ok(r) => {
            for t in &r.cut {
                println!("cut {}", zrelay::replication::txn::tid_hex(t));
            }
            match &r.saved {
                Some(p) => println!(
                    "rewound to {to}: {} transaction(s) cut, kept in {}; size {}",
                    r.cut.len(),
                    p.display(),
                    r.new_size
                ),
                None => println!("nothing after {to}: unchanged"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("zrelay: rewind: {e}");
            ExitCode::FAILURE
        }
    }
}

fn role_call(c: RoleCallArgs, path: &str) -> ExitCode {
    control(c.admin, path, c.token_file, c.tls, c.timeout)
}

/// TLS options of the commands that call mutating admin endpoints.
#[derive(clap::Args)]
struct AdminTlsArgs {
    /// https:// admin address: CA that issued the admin certificate.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Client certificate to authenticate with (a name in admin_allowed).
    #[arg(long, requires = "key_file", requires = "ca_file")]
    cert_file: Option<PathBuf>,
    #[arg(long, requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// Name the admin certificate must carry (default: the address's host).
    #[arg(long)]
    server_name: Option<String>,
}

impl AdminTlsArgs {
    fn load(&self) -> Result<Option<zrelay::admin::cli::AdminTls>, String> {
        let Some(ca) = &self.ca_file else {
            return Ok(None);
        };
        let client = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        zrelay::admin::cli::AdminTls::load(ca, client, self.server_name.clone()).map(Some)
    }
}

fn control(
    admin: String,
    path: &str,
    token_file: Option<PathBuf>,
    tls: AdminTlsArgs,
    timeout: Duration,
) -> ExitCode {
    let tls = match tls.load() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("zrelay: {e}");
            return ExitCode::from(2);
        }
    };
    block_on(async move {
        zrelay::admin::cli::control_command(
            &admin,
            path,
            token_file.as_deref(),
            tls.as_ref(),
            timeout,
        )
        .await
    })
}

/// The `[coordinator]` section of a node's config file, or exit 2.
fn coordinator_config(
    path: &std::path::Path,
) -> Result<zrelay::coordinator::CoordinatorConfig, ExitCode> {
    match zrelay::config::Config::load(path) {
        Ok(c) => c.coordinator.ok_or_else(|| {
            eprintln!("zrelay: {}: no [coordinator] section", path.display());
            ExitCode::from(2)
        }),
        Err(e) => {
            eprintln!("zrelay: {e}");
            Err(ExitCode::from(2))
        }
    }
}

fn block_on(f: impl std::future::Future<Output = i32>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => ExitCode::from(rt.block_on(f).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("zrelay: start the tokio runtime: {e}");
            ExitCode::from(3)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Cert { dir, days, names } => {
            match zrelay::certgen::run_cert_command(&dir, &names, days) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("zrelay cert: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Verify {
            primary,
            replica,
            storage,
            no_blobs,
            timeout,
            max_differences,
        } => block_on(async move {
            zrelay::verify::run(&zrelay::verify::VerifyOptions {
                primary,
                replica,
                storage,
                blobs: !no_blobs,
                timeout,
                max_differences: max_differences.max(1),
            })
            .await
        }),
        Command::BenchRestore {
            source,
            target,
            storage,
        } => block_on(async move {
            match zrelay::replication::restore_bench::run(&source, &target, &storage).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("zrelay bench-restore: {e:#}");
                    1
                }
            }
        }),
        Command::Clone {
            config,
            upstream,
            upstream_name,
            data_fs,
            blob_dir,
            from_file,
            from_blob_dir,
            force,
            quiet,
        } => {
            let args = zrelay::replication::clone::CloneArgs {
                config,
                upstream,
                upstream_name,
                data_fs,
                blob_dir,
                from_file,
                from_blob_dir,
                force,
                progress: !quiet,
            };
            block_on(async move { zrelay::replication::clone::run_command(args).await })
        }
        Command::Status { admins, config } => {
            let coord = match config.as_deref().map(coordinator_config).transpose() {
                Ok(c) => c,
                Err(code) => return code,
            };
            block_on(async move {
                let mut code = 0;
                if let Some(c) = &coord {
                    code = zrelay::coordinator::view::status_command(c).await;
                }
                if !admins.is_empty() {
                    code = code.max(zrelay::admin::cli::status_command(&admins).await);
                }
                code
            })
        }
        Command::Pause { config, reason } => match coordinator_config(&config) {
            Ok(c) => block_on(async move {
                zrelay::coordinator::view::set_maintenance(&c, true, &reason).await
            }),
            Err(code) => code,
        },
        Command::Resume { config } => {
            match coordinator_config(&config) {
                Ok(c) => block_on(async move {
                    zrelay::coordinator::view::set_maintenance(&c, false, "").await
                }),
                Err(code) => code,
            }
        }
        Command::Check {
            admin,
            max_lag,
            timeout,
        } => block_on(zrelay::admin::cli::check_command(&admin, max_lag, timeout)),
        Command::Drain {
            admin,
            token_file,
            tls,
            timeout,
        } => control(admin, "/drain", token_file, tls, timeout),
        Command::Reload {
            admin,
            token_file,
            tls,
            timeout,
        } => control(admin, "/reload", token_file, tls, timeout),
        Command::Rewind { data_fs, to } => rewind(&data_fs, &to),
        Command::Promote { call } => role_call(call, "/promote"),
        Command::Demote { follow, call } => role_call(call, &format!("/demote?follow={follow}")),
        Command::Switchover { to, call } => role_call(call, &format!("/switchover?to={to}")),
        Command::Detach { call } => role_call(call, "/detach"),
        Command::CheckConfig { file } => match zrelay::config::Config::load(&file) {
            Ok(cfg) => {
                for w in cfg.warnings() {
                    eprintln!("zrelay: warning: {}: {w}", file.display());
                }
                println!("{}: OK", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("zrelay: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let cfg = match zrelay::config::Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("zrelay: {e}");
                    return ExitCode::from(2);
                }
            };
            match zrelay::server::run_file(cfg, Some(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("zrelay: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
