//! The sandbox of worker processes (Linux): what a compromised worker, one
//! whose task was exploited through a decoder bug, can still do.
//!
//! Applied between fork and exec, so it holds from the worker's first
//! instruction, for Offload's own workers and worker programs alike:
//! - a new user and network namespace: no network at all (when the
//!   kernel lets unprivileged processes make one);
//! - no_new_privs: no privilege gained by exec'ing a setuid program;
//! - Landlock: reads only beneath what the worker needs (its executable,
//!   the system's libraries, its allowances), writes only to its private
//!   scratch directory (its TMPDIR), execution only of its own executable
//!   and the programs it is allowed; no TCP, no abstract Unix sockets, no
//!   signals to processes outside it;
//! - a seccomp filter that fails (EPERM) what a task never needs: sockets
//!   other than Unix ones and any connect, bind or listen; ptrace and
//!   reading other processes' memory; mount, namespaces, kernel modules,
//!   BPF, perf, keyrings, io_uring, the clock, reboot.
//!
//! Each piece is used where the kernel has it; `--worker-sandbox strict`
//! refuses to start without all of them, `off` uses none. What is in force
//! is logged at start.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible as _, PathBeneath, PathFd, Ruleset, RulesetAttr as _,
    RulesetCreated, RulesetCreatedAttr as _, Scope,
};
use offload_worker::Allowances;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};
use serde::Deserialize;

/// The Landlock ABI whose rights are asked for (Linux 6.12: scopes).
const LANDLOCK_ABI: ABI = ABI::V6;

/// How much sandbox the workers get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// None (workers have the service user's rights).
    Off,
    /// Every piece the kernel offers; what is missing is logged.
    #[default]
    Auto,
    /// Every piece, or the server does not start.
    Strict,
}

/// The sandbox cannot be had as asked.
#[derive(Debug, thiserror::Error)]
#[error("--worker-sandbox strict: {0} (use --worker-sandbox auto to run without it)")]
pub struct SandboxError(String);

/// The pieces this kernel lets us use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Support {
    /// Landlock with the rights of ABI 6 (Linux 6.12) or later.
    landlock: bool,
    /// seccomp filters.
    seccomp: bool,
    /// Unprivileged user (and so network) namespaces.
    namespaces: bool,
}

/// The sandbox as configured and as this kernel allows, shared by every
/// worker spawn.
#[derive(Debug, Clone)]
pub struct Sandbox {
    mode: SandboxMode,
    support: Support,
    /// Without and with the network: [closed, open].
    filters: Option<[Arc<BpfProgram>; 2]>,
}

impl Sandbox {
    /// No sandbox.
    pub fn off() -> Self {
        Self {
            mode: SandboxMode::Off,
            support: Support { landlock: false, seccomp: false, namespaces: false },
            filters: None,
        }
    }

    /// Finds out what the kernel offers; `strict` fails without all of it.
    pub fn detect(mode: SandboxMode) -> Result<Self, SandboxError> {
        if mode == SandboxMode::Off {
            return Ok(Self::off());
        }
        let filters = match (filter(false), filter(true)) {
            (Ok(closed), Ok(open)) => Some([Arc::new(closed), Arc::new(open)]),
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!(error = %err, "cannot build the workers' seccomp filter");
                None
            }
        };
        let support = Support {
            landlock: landlock_supported(),
            seccomp: filters.as_ref().is_some_and(|[closed, _]| {
                let closed = Arc::clone(closed);
                probe(move || apply_filter(&closed))
            }),
            namespaces: {
                let maps = IdMaps::current();
                probe(move || new_namespaces(&maps))
            },
        };
        let sandbox = Self { mode, support, filters };
        if mode == SandboxMode::Strict {
            let missing = sandbox.missing();
            if !missing.is_empty() {
                return Err(SandboxError(format!("this kernel does not allow {}", missing.join(", "))));
            }
        }
        Ok(sandbox)
    }

    fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.support.landlock {
            missing.push("Landlock (ABI 6 or later)");
        }
        if !self.support.seccomp {
            missing.push("seccomp filters");
        }
        if !self.support.namespaces {
            missing.push("unprivileged user and network namespaces");
        }
        missing
    }

    /// Whether any piece is used.
    pub fn enabled(&self) -> bool {
        self.mode != SandboxMode::Off
    }

    /// Logs what workers get.
    pub fn log_start(&self) {
        if self.mode == SandboxMode::Off {
            tracing::warn!("worker sandbox off (--worker-sandbox off): workers have the service user's rights");
            return;
        }
        let Support { landlock, seccomp, namespaces } = self.support;
        let missing = self.missing();
        if missing.is_empty() {
            tracing::info!(
                landlock,
                seccomp,
                namespaces,
                "worker sandbox: Landlock, seccomp, a network namespace without network, no_new_privs"
            );
        } else {
            tracing::warn!(
                landlock,
                seccomp,
                namespaces,
                "worker sandbox without {} (not allowed by this kernel); the rest is in force",
                missing.join(", ")
            );
        }
    }

    /// The sandbox of one worker: `base` and `allow` rules, `scratch` its
    /// only writable folder. Built before the fork (it opens files and
    /// allocates), applied after it.
    pub fn prepare(&self, executable: &Path, allow: &Allowances, scratch: &Path) -> std::io::Result<Confinement> {
        if self.mode == SandboxMode::Off {
            return Ok(Confinement::default());
        }
        let ruleset = if self.support.landlock { Some(ruleset(executable, allow, scratch)?) } else { None };
        let filter = self
            .filters
            .as_ref()
            .filter(|_| self.support.seccomp)
            .map(|filters| Arc::clone(&filters[usize::from(allow.network)]));
        let namespaces = (self.support.namespaces && !allow.network).then(IdMaps::current);
        Ok(Confinement { ruleset, filter, namespaces })
    }
}

/// One worker's sandbox, ready to apply between fork and exec.
#[derive(Debug, Default)]
pub struct Confinement {
    ruleset: Option<RulesetCreated>,
    filter: Option<Arc<BpfProgram>>,
    namespaces: Option<IdMaps>,
}

impl Confinement {
    /// Confines the calling process. Runs between fork and exec: system
    /// calls only, no allocation (everything was prepared before the fork).
    pub fn apply(&mut self) -> std::io::Result<()> {
        // Namespaces first: the seccomp filter forbids making them.
        if let Some(maps) = &self.namespaces {
            new_namespaces(maps)?;
        }
        rustix::thread::set_no_new_privs(true)?;
        // Errors are the system call's errno: nothing is allocated here.
        if let Some(ruleset) = self.ruleset.take() {
            ruleset.restrict_self().map_err(|_| std::io::Error::last_os_error())?;
        }
        if let Some(filter) = &self.filter {
            apply_filter(filter)?;
        }
        Ok(())
    }
}

/// Whether a child can be confined by `confine` (tried on a short-lived
/// child: nothing of it sticks to this process).
fn probe(confine: impl Fn() -> std::io::Result<()> + Send + Sync + 'static) -> bool {
    use std::os::unix::process::CommandExt as _;
    let mut command = std::process::Command::new("/proc/self/exe");
    command.arg("--version").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    // SAFETY: `confine` makes system calls only (prepared before the fork).
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(confine);
    }
    command.status().is_ok_and(|status| status.success())
}

fn landlock_supported() -> bool {
    Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .and_then(|r| r.handle_access(AccessNet::from_all(LANDLOCK_ABI)))
        .and_then(|r| r.scope(Scope::from_all(LANDLOCK_ABI)))
        .and_then(|r| r.create())
        .is_ok()
}

/// Folders of the system's shared libraries and dynamic loader: read and
/// mapped by every dynamically linked program.
const LIBRARY_DIRS: &[&str] = &["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/libexec"];
/// Files every program may read: the loader's cache, the time zone,
/// OpenSSL's configuration (Node reads it at start), the random devices.
const READABLE_FILES: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/ssl/openssl.cnf",
    "/usr/share/zoneinfo",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
];

fn ruleset(executable: &Path, allow: &Allowances, scratch: &Path) -> std::io::Result<RulesetCreated> {
    let abi = LANDLOCK_ABI;
    let read = AccessFs::from_read(abi) & !AccessFs::Execute;
    let run = AccessFs::from_read(abi);
    let write = AccessFs::from_all(abi);
    let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> = Vec::new();
    rules.extend(LIBRARY_DIRS.iter().map(|d| (PathBuf::from(d), run)));
    rules.extend(READABLE_FILES.iter().map(|f| (PathBuf::from(f), read)));
    rules.push((PathBuf::from("/dev/null"), read | AccessFs::WriteFile));
    rules.push((executable.to_owned(), run));
    rules.push((scratch.to_owned(), write));
    rules.extend(allow.read.iter().map(|p| (p.clone(), read)));
    rules.extend(allow.exec.iter().map(|p| (p.clone(), run)));
    rules.extend(allow.write.iter().map(|p| (p.clone(), write)));
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| if allow.network { Ok(r) } else { r.handle_access(AccessNet::from_all(abi)) })
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .map_err(|e| std::io::Error::other(format!("Landlock: {e}")))?;
    for (path, access) in rules {
        // Paths this machine lacks (/lib64 on some systems) are skipped.
        let Ok(fd) = PathFd::new(&path) else { continue };
        // A file takes only the rights that apply to files.
        let is_dir = std::fs::metadata(&path).is_ok_and(|m| m.is_dir());
        let access = if is_dir { access } else { access & AccessFs::from_file(abi) };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| std::io::Error::other(format!("Landlock rule for {}: {e}", path.display())))?;
    }
    Ok(ruleset)
}

/// The uid and gid maps that keep the worker's ids in its new user
/// namespace (prepared before the fork).
#[derive(Debug, Clone)]
struct IdMaps {
    uid: Vec<u8>,
    gid: Vec<u8>,
}

impl IdMaps {
    fn current() -> Self {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        Self { uid: format!("{uid} {uid} 1\n").into_bytes(), gid: format!("{gid} {gid} 1\n").into_bytes() }
    }
}

/// Moves the calling process into new user and network namespaces, keeping
/// its user and group ids.
fn new_namespaces(maps: &IdMaps) -> std::io::Result<()> {
    use rustix::thread::{UnshareFlags, unshare_unsafe};
    // SAFETY: called in a single-threaded child between fork and exec, the
    // one case unshare is meant for; no file descriptor table is unshared.
    #[allow(unsafe_code)]
    unsafe {
        unshare_unsafe(UnshareFlags::NEWUSER | UnshareFlags::NEWNET)?;
    }
    write_proc(c"/proc/self/setgroups", b"deny")?;
    write_proc(c"/proc/self/uid_map", &maps.uid)?;
    write_proc(c"/proc/self/gid_map", &maps.gid)?;
    Ok(())
}

fn write_proc(path: &CStr, data: &[u8]) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags, open};
    let fd = open(path, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
    rustix::io::write(fd.as_fd(), data)?;
    Ok(())
}

/// Installs `program` (between fork and exec: the error is the errno of
/// the failed system call, nothing is allocated).
fn apply_filter(program: &BpfProgram) -> std::io::Result<()> {
    seccompiler::apply_filter(program).map_err(|_| std::io::Error::last_os_error())
}

/// Syscalls no task needs; each fails with EPERM.
const DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_fanotify_init,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
];

/// Denied too unless the worker keeps the network.
const NETWORK: &[libc::c_long] =
    &[libc::SYS_connect, libc::SYS_bind, libc::SYS_listen, libc::SYS_accept, libc::SYS_accept4];

/// The seccomp filter: everything allowed but [`DENIED`] (and the network
/// unless `network`), which fail with EPERM.
fn filter(network: bool) -> Result<BpfProgram, seccompiler::Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|&call| (call, Vec::new())).collect();
    if !network {
        rules.extend(NETWORK.iter().map(|&call| (call, Vec::new())));
        // Sockets of any family but Unix (socketpair stays allowed).
        let not_unix = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?;
        rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![not_unix])?]);
    }
    let arch = std::env::consts::ARCH.try_into()?;
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)?;
    Ok(filter.try_into()?)
}
