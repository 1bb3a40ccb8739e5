//! Real network faults between broker processes on one machine: every node runs in a network
//! namespace of its own with its own address on a private bridge (`10.77.0.N/24`), the test's
//! own clients in one more (`10.77.0.100`), and iptables rules inside a node's namespace cut its
//! links (packets silently dropped: connections hang as on a real partition, unlike a refused
//! connection). The addresses exist only inside the namespaces the test made; everything is
//! deleted when the [`Netns`] is dropped, and namespaces left by a crashed test run (their
//! process gone) are deleted by the next one.
//!
//! Needs root, `ip` (iproute2) and `iptables`: [`Netns::create`] answers `None` without them and
//! the test says it skipped (`scripts/test.sh` installs both when it runs as root).

use std::process::Command;

/// Prefix of every namespace these tests create; the creating process's id follows.
const PREFIX: &str = "cairnt";

/// The client namespace's host number on the bridge.
const CLIENT_HOST: u32 = 100;

/// A bridge, one namespace per node, and one for the test's clients.
pub(crate) struct Netns {
    tag: String,
    nodes: u32,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Creates the namespaces for nodes `1..=nodes`, or says why it cannot (not root, no `ip` or
    /// `iptables`, no namespace support).
    pub(crate) fn create(nodes: u32) -> Result<Netns, String> {
        if !std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        {
            return Err("not root".into());
        }
        run(&["iptables", "--version"])?;
        remove_stale();
        let netns = Netns {
            tag: format!("{PREFIX}{}", std::process::id()),
            nodes,
        };
        let bridge = netns.bridge();
        run(&["ip", "netns", "add", &bridge])?;
        run(&["ip", "-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &bridge, "link", "set", "br0", "up"])?;
        for host in (1..=nodes).chain([CLIENT_HOST]) {
            let ns = netns.ns_of_host(host);
            let veth = format!("v{host}");
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip", "-n", &bridge, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            run(&[
                "ip", "-n", &bridge, "link", "set", &veth, "master", "br0", "up",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            let addr = format!("10.77.0.{host}/24");
            run(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        }
        // iptables must work inside a namespace (the kernel's netfilter support).
        netns.iptables(1, &["-L", "-n"])?;
        Ok(netns)
    }

    fn bridge(&self) -> String {
        format!("{}-br", self.tag)
    }

    fn ns_of_host(&self, host: u32) -> String {
        if host == CLIENT_HOST {
            format!("{}-c", self.tag)
        } else {
            format!("{}-n{host}", self.tag)
        }
    }

    /// Node `id`'s namespace.
    pub(crate) fn ns(&self, id: u32) -> String {
        self.ns_of_host(id)
    }

    /// Node `id`'s address.
    pub(crate) fn host(id: u32) -> String {
        format!("10.77.0.{id}")
    }

    /// Moves the calling thread into the clients' namespace: every thread and process it starts
    /// afterwards (runtimes, clients, `cairn` CLI runs, `ip netns exec` launches) starts there.
    /// Call it first in the test, before any runtime exists.
    pub(crate) fn enter_client(&self) {
        let path = format!("/var/run/netns/{}", self.ns_of_host(CLIENT_HOST));
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap_or_else(|e| panic!("entering {path}: {e}"));
    }

    fn iptables(&self, id: u32, args: &[&str]) -> Result<(), String> {
        let ns = self.ns(id);
        let mut all = vec!["ip", "netns", "exec", &ns, "iptables", "-w"];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Cuts node `a` off from node `b` in both directions: every packet between them is dropped
    /// (the rules live in `a`'s namespace). Other links stay up.
    pub(crate) fn cut(&self, a: u32, b: u32) {
        let peer = Netns::host(b);
        for rule in [["-A", "INPUT", "-s", &peer], ["-A", "OUTPUT", "-d", &peer]] {
            let mut args = rule.to_vec();
            args.extend(["-j", "DROP"]);
            self.iptables(a, &args).unwrap();
        }
    }

    /// Node `a` can no longer send to node `b` (its packets to `b` are dropped); `b`'s packets
    /// still reach `a`. TCP needs both directions, so connections between them hang either way,
    /// but datagrams and the order in which each side notices differ from a full cut.
    pub(crate) fn cut_one_way(&self, a: u32, b: u32) {
        let peer = Netns::host(b);
        self.iptables(a, &["-A", "OUTPUT", "-d", &peer, "-j", "DROP"])
            .unwrap();
    }

    /// Drops each packet node `id` receives from the other nodes with probability `p`.
    pub(crate) fn lossy(&self, id: u32, p: f64) {
        let probability = format!("{p}");
        self.iptables(
            id,
            &[
                "-A",
                "INPUT",
                "-s",
                "10.77.0.0/24",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &probability,
                "-j",
                "DROP",
            ],
        )
        .unwrap();
    }

    /// Removes every rule in node `id`'s namespace: its links are whole again.
    pub(crate) fn heal(&self, id: u32) {
        self.iptables(id, &["-F"]).unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for host in (1..=self.nodes).chain([CLIENT_HOST]) {
            let _ = run(&["ip", "netns", "del", &self.ns_of_host(host)]);
        }
        let _ = run(&["ip", "netns", "del", &self.bridge()]);
    }
}

/// Deletes namespaces whose creating test process is gone (a run killed before its drop).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}
