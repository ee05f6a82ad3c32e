//! Real etcd members (Debian `etcd-server`, installed by
//! scripts/ensure-tools.sh), started in a test's namespace: one member, or a
//! three-member cluster on one address with distinct ports. Killed on drop.

use std::path::PathBuf;
use std::time::Duration;

use super::netns::{in_ns, Net};
use super::proc::Proc;
use super::wait_for;

pub struct EtcdMember {
    pub name: String,
    pub client_url: String,
    proc: Option<Proc>,
    log: PathBuf,
}

pub struct Etcd {
    pub ns: String,
    pub members: Vec<EtcdMember>,
    pub tls: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// `n` members in namespace `ns`, all on `ip` (client port 2379 + 2k,
    /// peer port 2380 + 2k). Returns once every member answers `status`.
    pub fn start(ns: &str, ip: &str, n: usize) -> Etcd {
        Self::start_with(ns, ip, n, None)
    }

    /// With `tls = Some(dir)`: clients must use https and a certificate from
    /// the CA in `dir` (`ca.pem`); the server presents `dir/etcd.pem` (issued
    /// for the name "etcd"). Peers stay on plain http inside the namespace.
    pub fn start_with(ns: &str, ip: &str, n: usize, tls: Option<PathBuf>) -> Etcd {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let dir = super::temp_dir("zrelay-etcd");
        let peers: Vec<(String, String)> = (0..n)
            .map(|k| (format!("m{k}"), format!("http://{ip}:{}", 2380 + 2 * k)))
            .collect();
        let initial = peers
            .iter()
            .map(|(n, p)| format!("{n}={p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (k, (name, peer)) in peers.iter().enumerate() {
            let client_url = format!("{scheme}://{ip}:{}", 2379 + 2 * k);
            let log = dir.path().join(format!("{name}.log"));
            let data = dir.path().join(format!("{name}.etcd"));
            let mut cmd = Net::cmd(ns, "etcd");
            cmd.args([
                "--name",
                name,
                "--data-dir",
                &data.display().to_string(),
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                ns,
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--log-level",
                "warn",
            ]);
            if let Some(d) = &tls {
                let f = |n: &str| d.join(n).display().to_string();
                cmd.args([
                    "--cert-file",
                    &f("etcd.pem"),
                    "--key-file",
                    &f("etcd-key.pem"),
                ]);
                cmd.args(["--trusted-ca-file", &f("ca.pem"), "--client-cert-auth"]);
            }
            // ETCD_UNSUPPORTED_ARCH etc. are not needed on amd64; keep the
            // environment clean of ETCD_* from the caller.
            for (k, _) in std::env::vars() {
                if k.starts_with("ETCD_") {
                    cmd.env_remove(k);
                }
            }
            let proc = Proc::spawn(&format!("etcd {name}"), cmd, &log, 1);
            members.push(EtcdMember {
                name: name.clone(),
                client_url,
                proc: Some(proc),
                log,
            });
        }
        let e = Etcd {
            ns: ns.to_string(),
            members,
            tls,
            _dir: dir,
        };
        for k in 0..n {
            let url = e.members[k].client_url.clone();
            wait_for(Duration::from_secs(30), &format!("etcd {url} up"), || {
                e.status(k).map(|_| ())
            });
        }
        e
    }

    /// One member on 127.0.0.1 in this (the root) namespace, on free ports:
    /// for tests of whole nodes (runzeo + zrelay on loopback).
    #[allow(dead_code)]
    pub fn start_loopback() -> Etcd {
        let dir = super::temp_dir("zrelay-etcd");
        let (client, peer) = (super::free_port(), super::free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.path().join("m0.log");
        let mut cmd = std::process::Command::new("etcd");
        cmd.args(["--name", "m0", "--data-dir"])
            .arg(dir.path().join("m0.etcd"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("m0={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--log-level", "warn"]);
        for (k, _) in std::env::vars() {
            if k.starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        let proc = Proc::spawn("etcd m0", cmd, &log, 1);
        let e = Etcd {
            ns: String::new(),
            members: vec![EtcdMember {
                name: "m0".into(),
                client_url,
                proc: Some(proc),
                log,
            }],
            tls: None,
            _dir: dir,
        };
        wait_for(Duration::from_secs(30), "etcd on loopback up", || {
            e.status(0).map(|_| ())
        });
        e
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.proc.is_some())
            .map(|m| m.client_url.clone())
            .collect()
    }

    /// (member id, leader id) as member `k` reports them, None if it does not
    /// answer or knows no leader.
    pub fn status(&self, k: usize) -> Option<(u64, u64)> {
        let url = self.members[k].client_url.clone();
        let opts = self.connect_options();
        let ask = move || async move {
            let mut c = etcd_client::Client::connect([url], Some(opts)).await.ok()?;
            let s = c.status().await.ok()?;
            let id = s.header()?.member_id();
            (s.leader() != 0).then_some((id, s.leader()))
        };
        if self.ns.is_empty() {
            // Loopback: no namespace to enter.
            return std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(ask())
            })
            .join()
            .expect("status thread");
        }
        in_ns(&self.ns, ask).join().expect("status thread")
    }

    /// Options for a test client (with the "p" client certificate under TLS).
    pub fn connect_options(&self) -> etcd_client::ConnectOptions {
        let mut o = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(1));
        if let Some(d) = &self.tls {
            let r = |n: &str| std::fs::read(d.join(n)).expect("read test certificate");
            o = o.with_tls(
                etcd_client::TlsOptions::new()
                    .domain_name("etcd")
                    .ca_certificate(etcd_client::Certificate::from_pem(r("ca.pem")))
                    .identity(etcd_client::Identity::from_pem(r("p.pem"), r("p-key.pem"))),
            );
        }
        o
    }

    /// Index of the member that is the raft leader now.
    pub fn leader(&self) -> usize {
        wait_for(Duration::from_secs(20), "an etcd leader", || {
            (0..self.members.len())
                .filter(|k| self.members[*k].proc.is_some())
                .find(|k| matches!(self.status(*k), Some((id, l)) if id == l))
        })
    }

    pub fn kill(&mut self, k: usize) {
        if let Some(mut p) = self.members[k].proc.take() {
            p.kill();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for m in &self.members {
                super::print_tail(&format!("etcd {}", m.name), &m.log);
            }
        }
        for k in 0..self.members.len() {
            self.kill(k);
        }
    }
}
