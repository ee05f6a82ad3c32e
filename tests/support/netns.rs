//! Network namespaces for fault tests (root only; no skipping: a test that
//! needs them fails with a clear message when not root).
//!
//! [`Net`] makes a private L2 segment: a *hub* namespace holding a bridge,
//! and per node a namespace with `eth0` (10.77.0.N/24) veth-linked to the
//! bridge. Addresses exist only inside these namespaces, so tests running in
//! parallel never clash (each `Net` has its own hub). Everything is deleted
//! when the `Net` is dropped, also on panic (deleting a namespace destroys its
//! veths and nft rules).
//!
//! Code runs inside a namespace either as a process (`ip netns exec`, see
//! [`Net::cmd`]) or as an in-process thread: [`in_ns`] moves a fresh thread
//! into the namespace with setns(2) (the network namespace is per thread)
//! and runs a current-thread tokio runtime there, so every socket its tasks
//! open lives in that namespace.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Panics unless we are root: namespaces, veth and nft need it (CI is root).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, veth, nftables); run it as root, as CI does"
    );
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e} (scripts/ensure-tools.sh installs it)"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces left by test processes that were killed before their `Net`
/// was dropped (named `zr<pid>x...`, pid no longer running).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix("zr")
            .and_then(|r| r.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// A test's private network: a hub namespace with a bridge, and nodes.
pub struct Net {
    tag: String,
    hub: String,
    nodes: Vec<String>,
}

impl Net {
    pub fn new() -> Net {
        require_root();
        remove_stale();
        let tag = format!(
            "zr{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let hub = format!("{tag}hub");
        run(&["ip", "netns", "add", &hub]);
        let net = Net {
            tag,
            hub,
            nodes: Vec::new(),
        };
        net.ip(&net.hub, &["link", "set", "lo", "up"]);
        net.ip(&net.hub, &["link", "add", "br0", "type", "bridge"]);
        net.ip(&net.hub, &["link", "set", "br0", "up"]);
        net
    }

    fn ip(&self, ns: &str, args: &[&str]) {
        let mut v = vec!["ip", "-n", ns];
        v.extend_from_slice(args);
        run(&v);
    }

    /// A node namespace with `eth0` = 10.77.0.`host`/24 on the bridge; returns
    /// its name.
    pub fn node(&mut self, host: u8) -> String {
        let ns = format!("{}n{host}", self.tag);
        run(&["ip", "netns", "add", &ns]);
        self.nodes.push(ns.clone());
        self.ip(&ns, &["link", "set", "lo", "up"]);
        let peer = format!("v{host}");
        self.ip(
            &ns,
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", &self.hub,
            ],
        );
        self.ip(&self.hub, &["link", "set", &peer, "master", "br0"]);
        self.ip(&self.hub, &["link", "set", &peer, "up"]);
        let addr = format!("{}/24", Self::addr(host));
        self.ip(&ns, &["addr", "add", &addr, "dev", "eth0"]);
        self.ip(&ns, &["link", "set", "eth0", "up"]);
        ns
    }

    pub fn addr(host: u8) -> String {
        format!("10.77.0.{host}")
    }

    /// `ip netns exec NS program` (the program keeps its pid: ip execs it).
    pub fn cmd(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// Drop every packet between namespace `ns` and `peer` (an address), both
    /// ways, with nftables inside `ns`. [`Net::heal`] removes it.
    pub fn partition(ns: &str, peer: &str) {
        let rules = format!(
            "table inet zrpart {{\n\
               chain input {{ type filter hook input priority 0; ip saddr {peer} drop; }}\n\
               chain output {{ type filter hook output priority 0; ip daddr {peer} drop; }}\n\
             }}\n"
        );
        let dir = std::env::temp_dir().join(format!("{ns}-nft"));
        std::fs::write(&dir, rules).expect("write nft rules");
        run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "nft",
            "-f",
            &dir.display().to_string(),
        ]);
        let _ = std::fs::remove_file(dir);
    }

    /// Cut namespace `ns` off the bridge entirely (every packet in or out
    /// of `eth0` dropped, nftables inside `ns`); its own loopback and its own
    /// address keep working, so processes inside still reach each other.
    /// [`Net::rejoin`] removes it.
    pub fn isolate(ns: &str) {
        run(&[
            "ip", "netns", "exec", ns, "nft", "add", "table", "inet", "zriso",
        ]);
        for (chain, hook, dir) in [
            ("input", "input", "iifname"),
            ("output", "output", "oifname"),
        ] {
            let spec = format!("{{ type filter hook {hook} priority 0; }}");
            run(&[
                "ip", "netns", "exec", ns, "nft", "add", "chain", "inet", "zriso", chain, &spec,
            ]);
            run(&[
                "ip", "netns", "exec", ns, "nft", "add", "rule", "inet", "zriso", chain, dir,
                "eth0", "drop",
            ]);
        }
    }

    pub fn rejoin(ns: &str) {
        run(&[
            "ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "zriso",
        ]);
    }

    /// Limits what reaches node `host` from source port `sport` (e.g. a
    /// primary's replication port) to `rate` (tc's syntax, e.g. "64kbit"):
    /// on the egress of its veth's hub end, an htb class of that rate takes
    /// that traffic (it queues, then drops) and everything else (etcd,
    /// doors) passes through an unshaped one. `None` lifts it.
    pub fn limit_into(&self, host: u8, sport: u16, rate: Option<&str>) {
        let peer = format!("v{host}");
        let tc = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &self.hub, "tc"];
            v.extend_from_slice(args);
            run(&v);
        };
        let Some(r) = rate else {
            tc(&["qdisc", "del", "dev", &peer, "root"]);
            return;
        };
        let sport = sport.to_string();
        tc(&[
            "qdisc", "replace", "dev", &peer, "root", "handle", "1:", "htb", "default", "2", "r2q",
            "1000",
        ]);
        tc(&[
            "class", "add", "dev", &peer, "parent", "1:", "classid", "1:2", "htb", "rate", "10gbit",
        ]);
        tc(&[
            "class", "add", "dev", &peer, "parent", "1:", "classid", "1:3", "htb", "rate", r,
            "ceil", r,
        ]);
        tc(&[
            "filter", "add", "dev", &peer, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "sport", &sport, "0xffff", "flowid", "1:3",
        ]);
    }

    pub fn heal(ns: &str) {
        run(&[
            "ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "zrpart",
        ]);
    }
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain([&self.hub]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Run blocking `f` on a new thread inside namespace `ns` and wait for it.
pub fn in_ns_blocking<T, F>(ns: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    in_ns(ns, move || async move { f() })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Run `f` on a new thread inside namespace `ns`, on a current-thread tokio
/// runtime; returns the thread's handle.
pub fn in_ns<T, F, Fut>(ns: &str, f: F) -> thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let path = format!("/run/netns/{ns}");
    thread::Builder::new()
        .name(format!("ns-{ns}"))
        .spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            use std::os::fd::AsRawFd;
            // SAFETY: setns(2) on a valid namespace fd; it changes only this
            // thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(f())
        })
        .expect("spawn namespace thread")
}
