//! Several "hosts" on one machine, for tests and benchmarks that need a real
//! network between nodes: each host is a Linux network namespace with its own
//! address (10.77.0.x/24, `eth0`), joined by a veth pair to a bridge that lives
//! in a namespace of its own, so nothing is added to the root namespace and
//! parallel [`Hosts`] (names unique per process and counter) never collide.
//!
//! - Links: each host's link can be capped with `tc tbf` in both directions
//!   ([`HostsOptions::link_rate`]). Latency cannot be emulated on this kernel
//!   (no `sch_netem` module); [`LinkShape::delay`] is the hook for it, and
//!   asking for a delay fails with a message naming the missing module.
//! - Names: host `i` is `host{i}.tierckpt.test` (alias `host{i}`), listed in
//!   every host's `/etc/netns/<ns>/hosts`, whose `resolv.conf` names the DNS
//!   server: a real `dnsmasq` in the bridge namespace on 10.77.0.1, serving
//!   the host names and records a test sets at run time ([`Hosts::set_dns`]:
//!   A records, reloaded by SIGHUP; [`Hosts::set_srv`]: SRV records, dnsmasq
//!   restarted).
//! - Processes: [`Hosts::command`] runs any program inside a host through
//!   `ip netns exec` (which bind-mounts those files over `/etc/hosts` and
//!   `/etc/resolv.conf`); a daemon runs there with
//!   [`DaemonOptions::netns`](crate::daemon::DaemonOptions::netns). A client
//!   reaches a daemon in any host through its Unix socket (one filesystem).
//!   [`Hosts::enter`] runs a closure on a thread inside a host's namespace,
//!   for sockets this process opens there (it resolves names as the root
//!   namespace does).
//! - Failures: [`Hosts::kill`] SIGKILLs every process of a host and brings its
//!   link down; [`Hosts::replace`] puts a fresh host with a new address in its
//!   place, under the same name.
//!
//! Dropping [`Hosts`] kills every process in its namespaces, dnsmasq
//! included, and removes the namespaces, their `/etc/netns` directories and
//! its tmpfs directory. Needs root, `ip`, `tc` and `dnsmasq`.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::daemon::{die_with_parent, DaemonOptions, NodePlace};

/// The DNS zone of the hosts' names.
pub const DOMAIN: &str = "tierckpt.test";

/// The port a daemon listens on in every host (each host has its own ports).
pub const DAEMON_PORT: u16 = 7070;

/// The bridge's address, where dnsmasq answers.
pub const BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// The last octet of the first host's address; later hosts count up.
const FIRST_HOST_OCTET: u8 = 10;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// How a link is shaped (both directions alike).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkShape {
    /// A rate cap as `tc` writes it ("1gbit", "500mbit"), applied with tbf.
    pub rate: Option<String>,
    /// One-way delay. Needs the `sch_netem` module, which this kernel lacks:
    /// asking for it fails with an error that says so. The hook for latency
    /// once a kernel has it.
    pub delay: Option<Duration>,
}

/// What [`Hosts::new`] builds.
#[derive(Debug, Clone, Default)]
pub struct HostsOptions {
    /// How many hosts.
    pub hosts: usize,
    /// Every host's link cap, as `tc` writes rates ("1gbit"); none: uncapped.
    pub link_rate: Option<String>,
    /// Whether to run dnsmasq on the bridge (the hosts' resolver).
    pub dns: bool,
}

/// One host: a network namespace with an address on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// The network namespace (`ip netns` name).
    pub netns: String,
    /// Its address on the bridge.
    pub addr: Ipv4Addr,
    /// Its short name (`host{i}`); the full one adds [`DOMAIN`].
    pub name: String,
    /// The interface on the bridge's side (in the bridge namespace).
    bridge_if: String,
    /// Whether it is up (not killed).
    pub up: bool,
}

impl Host {
    /// Its fully qualified name.
    pub fn fqdn(&self) -> String {
        format!("{}.{DOMAIN}", self.name)
    }

    /// `addr:port`.
    pub fn socket_addr(&self, port: u16) -> String {
        format!("{}:{port}", self.addr)
    }
}

/// The DNS server: dnsmasq in the bridge namespace.
struct Dns {
    child: Option<Child>,
    conf: PathBuf,
    addn_hosts: PathBuf,
    /// Records set by [`Hosts::set_dns`]: name, addresses.
    a: Vec<(String, Vec<Ipv4Addr>)>,
    /// Records set by [`Hosts::set_srv`]: name, (target, port) pairs.
    srv: Vec<(String, Vec<(String, u16)>)>,
}

/// Hosts in network namespaces around one bridge; see the module docs.
pub struct Hosts {
    prefix: String,
    bridge_ns: String,
    hosts: Vec<Host>,
    next_octet: u8,
    shape: LinkShape,
    dns: Option<Dns>,
    dir: tempfile::TempDir,
}

/// Runs a command to completion; an error names it and says what it printed.
fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false)
}

/// Why hosts cannot be made here, if they cannot: not root, or a tool missing.
pub fn unavailable(dns: bool) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("hosts in network namespaces need root (ip netns add); run the tests as root".into());
    }
    let mut tools = vec!["ip", "tc"];
    if dns {
        tools.push("dnsmasq");
    }
    let missing: Vec<&str> = tools.into_iter().filter(|t| !on_path(t)).collect();
    if !missing.is_empty() {
        return Some(format!(
            "hosts in network namespaces need {} on PATH (iproute2; dnsmasq-base for dnsmasq)",
            missing.join(" and ")
        ));
    }
    None
}

/// Bits per second of a rate as `tc` writes it: a number and `bit`,
/// `kbit`, `mbit`, `gbit` or `tbit` (decimal multiples).
pub fn parse_rate(rate: &str) -> Result<u64> {
    let r = rate.trim().to_ascii_lowercase();
    let units = [("tbit", 1e12), ("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)];
    for (unit, mult) in units {
        if let Some(n) = r.strip_suffix(unit) {
            let n: f64 = n.trim().parse().with_context(|| format!("link rate {rate:?}: {n:?} is not a number"))?;
            if n <= 0.0 || !n.is_finite() {
                bail!("link rate {rate:?} must be positive");
            }
            return Ok((n * mult) as u64);
        }
    }
    bail!("link rate {rate:?} is not a number with bit, kbit, mbit, gbit or tbit (for example 1gbit)")
}

impl Hosts {
    /// Makes the bridge, the hosts and (if asked) the DNS server.
    pub fn new(opts: HostsOptions) -> Result<Self> {
        if let Some(why) = unavailable(opts.dns) {
            bail!(why);
        }
        let shape = LinkShape { rate: opts.link_rate.clone(), delay: None };
        if let Some(r) = &shape.rate {
            parse_rate(r)?;
        }
        remove_stale();
        let prefix = format!("tck{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let dir = tempfile::Builder::new()
            .prefix(&format!("tierckpt-{prefix}-"))
            .tempdir_in("/dev/shm")
            .context("creating the hosts' directory in /dev/shm")?;
        let bridge_ns = format!("{prefix}-br");
        let mut hosts =
            Self { prefix, bridge_ns, hosts: Vec::new(), next_octet: FIRST_HOST_OCTET, shape, dns: None, dir };
        hosts.make_bridge()?;
        for i in 0..opts.hosts {
            let h = hosts.make_host(i)?;
            hosts.hosts.push(h);
        }
        hosts.write_etc()?;
        if opts.dns {
            hosts.start_dns()?;
        }
        Ok(hosts)
    }

    fn make_bridge(&mut self) -> Result<()> {
        let ns = self.bridge_ns.clone();
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", "br0"])?;
        ip(&["-n", &ns, "link", "set", "br0", "up"])?;
        Ok(())
    }

    /// A new namespace for host `i` at the next free address, linked to the bridge.
    fn make_host(&mut self, i: usize) -> Result<Host> {
        if self.next_octet == 255 {
            bail!("no address left on 10.77.0.0/24 for another host");
        }
        let octet = self.next_octet;
        self.next_octet += 1;
        let addr = Ipv4Addr::new(10, 77, 0, octet);
        let netns = format!("{}-h{octet}", self.prefix);
        let bridge_if = format!("v{octet}");
        ip(&["netns", "add", &netns])?;
        let h = Host { netns: netns.clone(), addr, name: format!("host{i}"), bridge_if: bridge_if.clone(), up: true };
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &netns,
            "type",
            "veth",
            "peer",
            "name",
            &bridge_if,
            "netns",
            &self.bridge_ns,
        ])?;
        ip(&["-n", &self.bridge_ns, "link", "set", &bridge_if, "master", "br0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        self.apply_shape(&h, &self.shape.clone())?;
        Ok(h)
    }

    /// Shapes both directions of `h`'s link: egress of its `eth0` and of
    /// the bridge's port to it.
    fn apply_shape(&self, h: &Host, shape: &LinkShape) -> Result<()> {
        for (ns, dev) in [(&h.netns, "eth0"), (&self.bridge_ns, h.bridge_if.as_str())] {
            let _ = Command::new("tc").args(["-n", ns, "qdisc", "del", "dev", dev, "root"]).output();
            let mut parent = vec!["root".to_string()];
            if let Some(d) = shape.delay {
                let delay = format!("{}us", d.as_micros());
                run(Command::new("tc")
                    .args(["-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:"])
                    .args(["netem", "delay", &delay]))
                .context("link delay needs the sch_netem kernel module, which this kernel does not have")?;
                parent = vec!["parent".into(), "1:".into()];
            }
            if let Some(rate) = &shape.rate {
                let bytes_per_s = parse_rate(rate)? / 8;
                // Enough for one 64 KiB GSO packet, and about 4 ms at the rate.
                let burst = (bytes_per_s / 250).max(128 << 10);
                run(Command::new("tc").args(["-n", ns, "qdisc", "add", "dev", dev]).args(&parent).args([
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    &burst.to_string(),
                    "latency",
                    "100ms",
                ]))?;
            }
        }
        Ok(())
    }

    /// Reshapes every host's link (rate and, where the kernel allows, delay).
    pub fn set_links(&mut self, shape: LinkShape) -> Result<()> {
        for h in self.hosts.iter().filter(|h| h.up) {
            self.apply_shape(h, &shape)?;
        }
        self.shape = shape;
        Ok(())
    }

    /// The link shape in force.
    pub fn link_shape(&self) -> &LinkShape {
        &self.shape
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// How many hosts (killed ones included).
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        self.hosts[i].addr
    }

    /// A directory of host `i` on tmpfs (its "local disk"), made on first
    /// use; a replaced host gets a new one.
    pub fn dir(&self, i: usize) -> Result<PathBuf> {
        let d = self.dir.path().join(&self.hosts[i].netns);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(d)
    }

    /// The hosts' tmpfs directory (removed on drop).
    pub fn base_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `program` to run inside host `i` (through `ip netns exec`, so that
    /// the host's `/etc/hosts` and `/etc/resolv.conf` apply); it dies with
    /// the thread that spawns it.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].netns]).arg(program);
        die_with_parent(&mut c);
        c
    }

    /// Runs `args` inside host `i` to completion; an error says what it printed.
    pub fn exec(&self, i: usize, args: &[&str]) -> Result<Output> {
        let (program, rest) = args.split_first().context("no program given")?;
        run(self.command(i, program).args(rest).stdin(Stdio::null()))
    }

    /// The IPv4 addresses `name` resolves to inside host `i` (`getent
    /// ahostsv4`: /etc/hosts, then the DNS server); empty if none.
    pub fn resolve(&self, i: usize, name: &str) -> Result<Vec<Ipv4Addr>> {
        let out = self.command(i, "getent").args(["ahostsv4", name]).stdin(Stdio::null()).output()?;
        let mut addrs: Vec<Ipv4Addr> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        addrs.sort();
        addrs.dedup();
        Ok(addrs)
    }

    /// Options for a daemon on host `i`: its memory tier in the host's
    /// directory, its HTTP API on the host's address at [`DAEMON_PORT`],
    /// run inside the host.
    pub fn daemon_options(&self, i: usize) -> Result<DaemonOptions> {
        let mut o = DaemonOptions::new(self.dir(i)?.join("mem"));
        o.settings.http_addr = Some(self.hosts[i].socket_addr(DAEMON_PORT));
        o.netns = Some(self.hosts[i].netns.clone());
        Ok(o)
    }

    /// Where the nodes of a [`LocalCluster`](crate::daemon::LocalCluster)
    /// run, one per host in order: [`LocalCluster::start_at`](crate::daemon::LocalCluster::start_at)
    /// with these puts node `i` on host `i` at [`DAEMON_PORT`], peers named by address.
    pub fn places(&self) -> Vec<NodePlace> {
        self.hosts
            .iter()
            .map(|h| NodePlace { netns: Some(h.netns.clone()), http_addr: h.socket_addr(DAEMON_PORT) })
            .collect()
    }

    /// Runs `f` on a thread inside host `i`'s network namespace (sockets it
    /// opens belong to that host; names resolve as in the root namespace).
    pub fn enter<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> Result<T> {
        enter_netns(&self.hosts[i].netns, f)
    }

    /// SIGKILLs every process of host `i` and brings its link down (a host
    /// lost: power cut, cable pulled).
    pub fn kill(&mut self, i: usize) -> Result<()> {
        let h = self.hosts[i].clone();
        kill_all(&h.netns)?;
        ip(&["-n", &self.bridge_ns, "link", "set", &h.bridge_if, "down"])?;
        self.hosts[i].up = false;
        Ok(())
    }

    /// Cuts host `i` off the bridge, or with `linked` joins it again: a
    /// partition (its processes keep running and its trainer still reaches
    /// its daemon through the Unix socket).
    pub fn link(&mut self, i: usize, linked: bool) -> Result<()> {
        let state = if linked { "up" } else { "down" };
        ip(&["-n", &self.bridge_ns, "link", "set", &self.hosts[i].bridge_if, state])?;
        Ok(())
    }

    /// Kills host `i` (if up) and puts a fresh host in its place: same name,
    /// new namespace, new address, new (empty) directory. Host files and DNS
    /// names follow. Returns the new address.
    pub fn replace(&mut self, i: usize) -> Result<Ipv4Addr> {
        if self.hosts[i].up {
            self.kill(i)?;
        }
        let old = self.hosts[i].clone();
        let h = self.make_host(i)?;
        self.hosts[i] = h;
        remove_host(&old.netns);
        let _ = Command::new("ip").args(["-n", &self.bridge_ns, "link", "del", &old.bridge_if]).output();
        let _ = std::fs::remove_dir_all(self.dir.path().join(&old.netns));
        self.write_etc()?;
        self.reload_dns()?;
        Ok(self.hosts[i].addr)
    }

    /// Writes every host's `/etc/netns/<ns>/hosts` (every live host's
    /// names) and `resolv.conf` (the bridge's DNS server), in place so that
    /// running processes see the change.
    fn write_etc(&self) -> Result<()> {
        let table = self.hosts_table();
        let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost\n");
        hosts.push_str(&table);
        let resolv = format!("nameserver {BRIDGE_ADDR}\nsearch {DOMAIN}\noptions timeout:1 attempts:2\n");
        for h in &self.hosts {
            let d = PathBuf::from("/etc/netns").join(&h.netns);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            std::fs::write(d.join("hosts"), &hosts).with_context(|| format!("writing {}/hosts", d.display()))?;
            std::fs::write(d.join("resolv.conf"), &resolv)
                .with_context(|| format!("writing {}/resolv.conf", d.display()))?;
        }
        Ok(())
    }

    /// `addr fqdn name` for every live host.
    fn hosts_table(&self) -> String {
        self.hosts.iter().filter(|h| h.up).map(|h| format!("{} {} {}\n", h.addr, h.fqdn(), h.name)).collect()
    }

    fn start_dns(&mut self) -> Result<()> {
        let conf = self.dir.path().join("dnsmasq.conf");
        let addn_hosts = self.dir.path().join("dnsmasq.hosts");
        self.dns = Some(Dns { child: None, conf, addn_hosts, a: Vec::new(), srv: Vec::new() });
        self.write_dns()?;
        self.spawn_dns()
    }

    /// Writes dnsmasq's configuration and its hosts file (host names and
    /// the A records set).
    fn write_dns(&self) -> Result<()> {
        let Some(dns) = &self.dns else { return Ok(()) };
        let mut names = self.hosts_table();
        for (name, addrs) in &dns.a {
            for a in addrs {
                names.push_str(&format!("{a} {name}\n"));
            }
        }
        std::fs::write(&dns.addn_hosts, names).context("writing dnsmasq's hosts file")?;
        let mut conf = format!(
            "no-resolv\nno-hosts\nno-poll\nbind-interfaces\nlisten-address={BRIDGE_ADDR}\nuser=root\npid-file=\n\
             local=/{DOMAIN}/\nlocal-ttl=0\naddn-hosts={}\nlog-facility={}\n",
            dns.addn_hosts.display(),
            self.dir.path().join("dnsmasq.log").display()
        );
        for (name, targets) in &dns.srv {
            for (target, port) in targets {
                conf.push_str(&format!("srv-host={name},{target},{port}\n"));
            }
        }
        std::fs::write(&dns.conf, conf).context("writing dnsmasq's configuration")?;
        Ok(())
    }

    fn spawn_dns(&mut self) -> Result<()> {
        let Some(dns) = &mut self.dns else { return Ok(()) };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.bridge_ns, "dnsmasq", "--keep-in-foreground"])
            .arg(format!("--conf-file={}", dns.conf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().context("starting dnsmasq")?;
        // Ready once it accepts TCP on port 53 of the bridge.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().expect("piped"), &mut err);
                bail!("dnsmasq exited ({status}): {}", err.trim());
            }
            let up = enter_netns(&self.bridge_ns, || {
                std::net::TcpStream::connect_timeout(&(BRIDGE_ADDR, 53).into(), Duration::from_millis(200)).is_ok()
            })?;
            if up {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("dnsmasq did not answer on {BRIDGE_ADDR}:53 within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        dns.child = Some(child);
        Ok(())
    }

    /// Makes dnsmasq reread its hosts file (SIGHUP; it also drops its cache).
    fn reload_dns(&mut self) -> Result<()> {
        self.write_dns()?;
        if let Some(c) = self.dns.as_ref().and_then(|d| d.child.as_ref()) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGHUP) };
        }
        Ok(())
    }

    /// Sets the A records of `name` (a fully qualified name, e.g.
    /// `peers.tierckpt.test`) to `addrs`; an empty list removes them.
    /// dnsmasq rereads them on SIGHUP, a moment after this returns: poll
    /// with [`Hosts::resolve`].
    pub fn set_dns(&mut self, name: &str, addrs: &[Ipv4Addr]) -> Result<()> {
        let dns = self.dns.as_mut().context("these hosts have no DNS server (HostsOptions::dns)")?;
        dns.a.retain(|(n, _)| n != name);
        if !addrs.is_empty() {
            dns.a.push((name.to_string(), addrs.to_vec()));
        }
        self.reload_dns()
    }

    /// Sets the SRV records of `name` (e.g. `_tierckpt._tcp.tierckpt.test`)
    /// to (target, port) pairs; dnsmasq restarts to read them (it is
    /// answering again when this returns).
    pub fn set_srv(&mut self, name: &str, targets: &[(&str, u16)]) -> Result<()> {
        let dns = self.dns.as_mut().context("these hosts have no DNS server (HostsOptions::dns)")?;
        dns.srv.retain(|(n, _)| n != name);
        if !targets.is_empty() {
            dns.srv.push((name.to_string(), targets.iter().map(|(t, p)| (t.to_string(), *p)).collect()));
        }
        self.write_dns()?;
        if let Some(mut c) = self.dns.as_mut().and_then(|d| d.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn_dns()
    }
}

/// Runs `f` on a new thread that has entered the network namespace `netns`.
pub fn enter_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/var/run/netns/{netns}");
    let fd = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: fd is an open namespace file; entering a network
            // namespace changes this thread alone.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow::Error::from(std::io::Error::last_os_error()))
                    .with_context(|| format!("entering network namespace {netns}"));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in network namespace {netns} panicked"))?
    })
}

/// The processes in namespace `netns`.
fn pids(netns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// SIGKILLs every process in `netns` and waits (up to 10 s) until none is left.
fn kill_all(netns: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = pids(netns);
        if left.is_empty() {
            return Ok(());
        }
        for p in &left {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        if Instant::now() > deadline {
            bail!("processes {left:?} in network namespace {netns} survived SIGKILL for 10 s");
        }
        // A killed process leaves the list once dead (a zombie has no
        // namespace), reaped or not: its parent reaps it.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes the namespaces (and `/etc/netns` entries) left by [`Hosts`] of
/// processes that no longer run (killed before their drop).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(pid) = name.strip_prefix("tck").and_then(|r| r.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            remove_host(name);
        }
    }
}

/// Kills what runs in `netns` and removes it and its `/etc/netns` directory.
fn remove_host(netns: &str) {
    let _ = kill_all(netns);
    let _ = Command::new("ip").args(["netns", "del", netns]).output();
    let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(netns));
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &self.hosts {
            remove_host(&h.netns);
        }
        if let Some(mut c) = self.dns.as_mut().and_then(|d| d.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_host(&self.bridge_ns);
    }
}
