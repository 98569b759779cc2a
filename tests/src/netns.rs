//! Hosts of their own on this machine, for tests of what crosses a network:
//! each [`Host`] is a network namespace joined to this one by a veth pair,
//! with an address at each end, so a front started in it reaches a database
//! here only over that link, and a test can cut the link mid-job and bring
//! it back. Needs root (as CI runs); removed when dropped.

use std::{
    net::Ipv4Addr,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// Hosts made by this test process so far (names and subnets differ).
static MADE: AtomicU32 = AtomicU32::new(0);

/// A network namespace linked to this one.
#[derive(Debug)]
pub struct Host {
    /// The namespace's name (`ip netns`).
    pub name: String,
    /// The host's address, inside the namespace.
    pub addr: Ipv4Addr,
    /// This side's address on the link: what the host reaches us by.
    pub gateway: Ipv4Addr,
    /// This side's end of the veth pair.
    link: String,
}

/// Runs `ip` with `args`, panicking with its error.
fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip (Debian's iproute2)");
    assert!(output.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
}

impl Host {
    /// Makes a host: its namespace, its link, their addresses (a /30 of
    /// 10.213.0.0/16 of its own), both ends up.
    pub fn new() -> Self {
        assert!(nix::unistd::geteuid().is_root(), "network namespaces need root");
        let index = MADE.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}{index}", std::process::id() % 0xffff);
        let subnet = (std::process::id() % 60) * 4 + index;
        let (third, fourth) = ((subnet / 64) as u8, ((subnet % 64) * 4) as u8);
        let gateway = Ipv4Addr::new(10, 213, third, fourth + 1);
        let addr = Ipv4Addr::new(10, 213, third, fourth + 2);
        let (name, link, peer) = (format!("offload-{tag}"), format!("ofl{tag}"), format!("ofl{tag}p"));
        ip(&["netns", "add", &name]);
        let host = Self { name, addr, gateway, link };
        ip(&["link", "add", &host.link, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &host.name]);
        ip(&["addr", "add", &format!("{gateway}/30"), "dev", &host.link]);
        ip(&["link", "set", &host.link, "up"]);
        let inside = ["netns", "exec", &host.name, "ip"];
        ip(&[&inside[..], &["addr", "add", &format!("{addr}/30"), "dev", &peer]].concat());
        ip(&[&inside[..], &["link", "set", &peer, "up"]].concat());
        ip(&[&inside[..], &["link", "set", "lo", "up"]].concat());
        host
    }

    /// Cuts the host's link: nothing crosses it until [`Host::restore`].
    pub fn cut(&self) {
        ip(&["link", "set", &self.link, "down"]);
    }

    /// Brings the link back.
    pub fn restore(&self) {
        ip(&["link", "set", &self.link, "up"]);
    }

    /// The words that run a program inside the host (`ip netns exec NAME`).
    pub fn exec_prefix(&self) -> [&str; 3] {
        ["netns", "exec", &self.name]
    }
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it ours.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = Command::new("ip").args(["link", "del", &self.link]).output();
    }
}
