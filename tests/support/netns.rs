//! Network-namespace lab helpers for integration tests.
//!
//! * [`natlab_available`] decides whether lab tests can run here (root, `ip`,
//!   `nft`); it prints the reason and returns `false` to skip, or panics with
//!   the reason when `NATTER_REQUIRE_NATLAB=1` is set.
//! * [`Lab`] runs `scripts/natlab.sh up` with a unique id, parses its
//!   `KEY=VALUE` output and runs `natlab.sh down` when dropped (also while
//!   unwinding from a panic).
//! * [`udp_socket_in`] / [`in_netns`] create sockets inside a namespace
//!   without spawning a process: a short-lived thread `setns()`s into the
//!   namespace, creates the socket and hands it back. A socket stays in the
//!   namespace it was created in.
//! * [`NsChild`] is a process started with `ip netns exec`, killed on drop.
//!
//! Lab traffic never leaves the lab: its namespaces are not linked to the
//! root namespace and only use 203.0.113.0/24, 192.168.x/24 and 100.64.0.0/24.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Read/write timeout given to every socket made by [`udp_socket_in`].
pub const DEFAULT_SOCKET_TIMEOUT: Duration = Duration::from_secs(2);

/// Env var: when `1`, a missing prerequisite fails the test instead of skipping it.
pub const REQUIRE_ENV: &str = "NATTER_REQUIRE_NATLAB";

/// Path of `scripts/natlab.sh` in this workspace.
pub fn natlab_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join("natlab.sh")
}

/// PATH with the sbin directories added (where `ip`, `nft` and `tc` live).
fn search_path() -> String {
    let mut path = std::env::var("PATH").unwrap_or_default();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        if !path.split(':').any(|p| p == extra) {
            if !path.is_empty() {
                path.push(':');
            }
            path.push_str(extra);
        }
    }
    path
}

/// Absolute path of an executable found in [`search_path`].
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    search_path()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Why lab tests cannot run here, or `None` when they can.
pub fn natlab_unavailable_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("natlab tests need root (network namespaces, nftables)".into());
    }
    for prog in ["ip", "nft", "ethtool", "bash"] {
        if find_program(prog).is_none() {
            return Some(format!(
                "natlab tests need '{prog}' in PATH (or /usr/sbin, /sbin)"
            ));
        }
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Some("kernel has no network namespace support (/proc/self/ns/net missing)".into());
    }
    if !natlab_script().is_file() {
        return Some(format!("{} not found", natlab_script().display()));
    }
    None
}

/// `true` when lab tests can run. Otherwise prints why and returns `false`
/// (the caller should return early, i.e. skip), or panics with the reason if
/// `NATTER_REQUIRE_NATLAB=1`.
pub fn natlab_available() -> bool {
    available(natlab_unavailable_reason())
}

/// `true` when lab tests with a router that maps ports (`--port-mapping`)
/// can run: the lab, and miniupnpd (Debian's miniupnpd-nftables).
pub fn natlab_port_mapping_available() -> bool {
    available(natlab_unavailable_reason().or_else(|| {
        find_program("miniupnpd")
            .is_none()
            .then(|| "port mapping lab tests need 'miniupnpd' (Debian miniupnpd-nftables)".into())
    }))
}

fn available(unavailable: Option<String>) -> bool {
    match unavailable {
        None => true,
        Some(reason) => {
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                panic!("{REQUIRE_ENV}=1 but natlab cannot run: {reason}");
            }
            // Straight to the process's stderr: the test harness captures
            // `eprintln!` of passing tests, and a skip must show in CI logs.
            use std::io::Write;
            let _ = writeln!(
                io::stderr().lock(),
                "SKIPPED natlab test: {reason} (set {REQUIRE_ENV}=1 to make this a failure)"
            );
            false
        }
    }
}

/// A short lab id that is unique per process and call (`[a-z0-9]{1,12}`).
fn unique_lab_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let id = format!(
        "t{:x}{:02x}{:x}",
        std::process::id() & 0xff_ffff,
        (nanos >> 10) & 0xff,
        n
    );
    id.chars().take(12).collect()
}

/// A running lab; torn down (`natlab.sh down`) when dropped.
pub struct Lab {
    id: String,
    vars: BTreeMap<String, String>,
    torn_down: bool,
}

impl Lab {
    /// `natlab.sh up <unique id> <args...>`; panics with the script's stderr on failure.
    pub fn up(args: &[&str]) -> Lab {
        let id = unique_lab_id();
        let out = natlab_command()
            .arg("up")
            .arg(&id)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run scripts/natlab.sh");
        // From here on the guard owns whatever exists, so a failed parse still tears down.
        let mut lab = Lab {
            id,
            vars: BTreeMap::new(),
            torn_down: false,
        };
        if !out.status.success() {
            panic!(
                "natlab.sh up {} {:?} failed ({}):\n{}",
                lab.id,
                args,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((k, v)) = line.split_once('=') {
                lab.vars.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        assert_eq!(
            lab.vars.get("LAB_ID"),
            Some(&lab.id),
            "unexpected natlab.sh output"
        );
        lab
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// All `KEY=VALUE` pairs printed by `natlab.sh up`.
    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.vars
    }

    /// The value of `key`; panics if the lab did not print it.
    pub fn var(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("lab {} has no {key} (vars: {:?})", self.id, self.vars))
    }

    pub fn opt_var(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// An address variable, e.g. `lab.ip("RV_IP")`.
    pub fn ip(&self, key: &str) -> Ipv4Addr {
        self.var(key)
            .parse()
            .unwrap_or_else(|e| panic!("{key}={} is not an IPv4 address: {e}", self.var(key)))
    }

    /// Namespace name of `host` (`rv`, `a`, `ra`, `b`, `rb`, `pub`, `a2`, `cgn`, `inet`).
    pub fn ns(&self, host: &str) -> String {
        let ns = format!("nl-{}-{host}", self.id);
        assert!(
            Path::new("/var/run/netns").join(&ns).exists(),
            "lab {} has no host {host}",
            self.id
        );
        ns
    }

    /// A UDP socket bound to `bind` inside `host`'s namespace.
    pub fn udp_socket(&self, host: &str, bind: SocketAddr) -> UdpSocket {
        let ns = self.ns(host);
        udp_socket_in(&ns, bind).unwrap_or_else(|e| panic!("udp socket {bind} in {ns}: {e}"))
    }

    /// Runs `program args...` in `host`'s namespace and waits for it.
    pub fn exec<I, S>(&self, host: &str, program: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = ns_command(&self.ns(host), program);
        cmd.args(args).stdin(Stdio::null());
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {host}: {e}"))
    }

    /// Like [`Lab::exec`] but panics unless the command succeeds; returns stdout.
    pub fn exec_ok<I, S>(&self, host: &str, program: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.exec(host, program, args);
        assert!(
            out.status.success(),
            "{program} in {host} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `program args...` in `host`'s namespace; killed when the result is dropped.
    pub fn spawn<I, S>(&self, host: &str, program: &str, args: I) -> io::Result<NsChild>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        NsChild::spawn(&self.ns(host), program, args)
    }

    /// `ip netns exec <host's namespace> program` as a [`Command`] to add
    /// arguments, environment and pipes to; start it with [`NsChild::from_command`].
    pub fn command(&self, host: &str, program: impl AsRef<OsStr>) -> Command {
        ns_command(&self.ns(host), program)
    }

    /// Starts `program args...` in `host`'s namespace with stdin, stdout and
    /// stderr piped (take them from the child); killed when the result is dropped.
    pub fn spawn_piped<I, S>(
        &self,
        host: &str,
        program: impl AsRef<OsStr>,
        args: I,
    ) -> io::Result<NsChild>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = ns_command(&self.ns(host), program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        NsChild::from_command(&mut cmd)
    }

    /// Tears the lab down now (instead of at drop) and reports failure.
    pub fn down(mut self) -> io::Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> io::Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let out = natlab_command()
            .arg("down")
            .arg(&self.id)
            .stdin(Stdio::null())
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "natlab.sh down {} failed: {}",
                self.id,
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("warning: {e}");
        }
    }
}

fn natlab_command() -> Command {
    let mut cmd = Command::new(find_program("bash").unwrap_or_else(|| "bash".into()));
    cmd.arg(natlab_script()).env("PATH", search_path());
    cmd
}

/// Runs `f` on a fresh thread that has joined the network namespace `ns`
/// (`/var/run/netns/<ns>`), and returns its result. File descriptors created
/// by `f` (sockets) stay bound to that namespace after the thread exits.
pub fn in_netns<T, F>(ns: &str, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let path = Path::new("/var/run/netns").join(ns);
    std::thread::Builder::new()
        .name(format!("setns-{ns}"))
        .spawn(move || -> io::Result<T> {
            let file = File::open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread's network namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// A UDP socket bound to `bind` inside namespace `ns`, with read and write
/// timeouts of [`DEFAULT_SOCKET_TIMEOUT`] so nothing hangs.
pub fn udp_socket_in(ns: &str, bind: SocketAddr) -> io::Result<UdpSocket> {
    in_netns(ns, move || {
        let sock = UdpSocket::bind(bind)?;
        sock.set_read_timeout(Some(DEFAULT_SOCKET_TIMEOUT))?;
        sock.set_write_timeout(Some(DEFAULT_SOCKET_TIMEOUT))?;
        Ok(sock)
    })
}

/// `ip netns exec <ns> <program>` as a [`Command`] to add arguments to.
pub fn ns_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(find_program("ip").unwrap_or_else(|| "ip".into()));
    cmd.env("PATH", search_path())
        .args(["netns", "exec", ns])
        .arg(program);
    cmd
}

/// A child process inside a namespace, killed (and reaped) on drop.
#[derive(Debug)]
pub struct NsChild {
    child: Child,
}

impl NsChild {
    /// `ip netns exec <ns> program args...` with stdin closed; stdout/stderr inherited.
    pub fn spawn<I, S>(ns: &str, program: impl AsRef<OsStr>, args: I) -> io::Result<NsChild>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = ns_command(ns, program);
        cmd.args(args).stdin(Stdio::null());
        NsChild::from_command(&mut cmd)
    }

    /// Spawns a command built with [`ns_command`] (set pipes etc. first).
    pub fn from_command(cmd: &mut Command) -> io::Result<NsChild> {
        Ok(NsChild {
            child: cmd.spawn()?,
        })
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl NsChild {
    /// Sends SIGTERM, waits up to `grace` for the child to exit, then kills it.
    /// Returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: plain kill(2) on our own, not yet reaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        let _ = self.child.kill();
        self.child.wait()
    }
}

impl Deref for NsChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for NsChild {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        // `ip netns exec` execs the program, so this pid is the program itself.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
