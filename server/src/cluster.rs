//! The replica supervisor (`--replicas N`): the clustering layer on one
//! machine. It starts N front replicas, each a copy of this executable with
//! its own pool and workers, all serving the same address with SO_REUSEPORT
//! so the kernel spreads connections among them. It restarts a replica that
//! dies (with backoff while they keep dying), replaces them one at a time on
//! SIGHUP (the new one serving before the old one drains), and on SIGTERM
//! drains them all and exits.

use std::{
    ffi::OsString,
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The line a replica prints on stdout once it serves.
pub const READY_LINE: &str = "ready";

/// Binds `addr` with SO_REUSEPORT (so several processes can serve it).
pub fn reuse_port_listener(addr: SocketAddr, listen: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if listen {
        socket.listen(1024)?;
    }
    Ok(socket.into())
}

struct Replica {
    pid: u32,
    generation: u64,
    started: Instant,
    /// Cancelled when the process has exited (and was reaped).
    exited: CancellationToken,
}

/// A replica's exit, reported by the task that waits for it.
struct Exit {
    index: usize,
    generation: u64,
    status: std::io::Result<std::process::ExitStatus>,
}

/// Runs the supervisor until `stop` fires; `hangups` delivers SIGHUPs.
pub async fn supervise(
    config: &Config,
    args: Vec<OsString>,
    stop: CancellationToken,
    mut hangups: tokio::signal::unix::Signal,
) -> std::io::Result<()> {
    // Hold the address (port 0 becomes a real port) for the replicas.
    let reserved = reuse_port_listener(config.listen, false)?;
    let addr = reserved.local_addr()?;
    tracing::info!(addr = %addr, replicas = config.replicas, "listening on {addr}");
    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    // Each replica's budget: the supervisor's default is already one share.
    let mut args = args;
    args.extend(["--max-inflight-bytes".into(), config.max_inflight_bytes.to_string().into()]);
    let spawner = Spawner { args, addr, base: config.replica_name.clone(), exits: exits_tx, stop: stop.clone() };
    let mut replicas: Vec<Option<Replica>> = Vec::new();
    let mut generation = 0;
    for index in 0..config.replicas {
        generation += 1;
        replicas.push(spawner.start(index, generation).await);
    }
    let mut backoff = vec![Duration::from_millis(100); config.replicas];

    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(()) = hangups.recv() => {
                tracing::info!("SIGHUP: rolling restart");
                for (index, slot) in replicas.iter_mut().enumerate() {
                    generation += 1;
                    // The new one serves before the old one drains.
                    let Some(fresh) = spawner.start(index, generation).await else { continue };
                    if let Some(old) = slot.replace(fresh) {
                        drain(&[&old], config.shutdown_grace).await;
                    }
                }
                tracing::info!("rolling restart done");
            }
            Some(exit) = exits.recv() => {
                let Some(current) = replicas[exit.index].as_ref().filter(|r| r.generation == exit.generation) else {
                    continue; // a replaced replica finishing its drain
                };
                let lived = current.started.elapsed();
                tracing::warn!(replica = exit.index, pid = current.pid, status = ?exit.status, "replica exited; restarting it");
                backoff[exit.index] = if lived > Duration::from_secs(10) {
                    Duration::from_millis(100)
                } else {
                    (backoff[exit.index] * 2).min(Duration::from_secs(10))
                };
                replicas[exit.index] = None;
                tokio::select! {
                    () = tokio::time::sleep(backoff[exit.index]) => {}
                    () = stop.cancelled() => break,
                }
                generation += 1;
                replicas[exit.index] = spawner.start(exit.index, generation).await;
            }
        }
    }

    tracing::info!("draining every replica");
    let live: Vec<&Replica> = replicas.iter().flatten().collect();
    drain(&live, config.shutdown_grace).await;
    drop(reserved);
    tracing::info!("stopped");
    Ok(())
}

/// Asks `replicas` to drain and waits (bounded by `grace` and a margin) for
/// them to exit; kills the ones that do not. Exits are watched per replica,
/// so other replicas' exits stay in the supervisor's channel meanwhile.
async fn drain(replicas: &[&Replica], grace: Duration) {
    for replica in replicas {
        let _ = kill(Pid::from_raw(replica.pid as i32), Signal::SIGTERM);
    }
    let all_exited = futures::future::join_all(replicas.iter().map(|r| r.exited.cancelled()));
    if tokio::time::timeout(grace + Duration::from_secs(10), all_exited).await.is_err() {
        let left: Vec<u32> = replicas.iter().filter(|r| !r.exited.is_cancelled()).map(|r| r.pid).collect();
        tracing::warn!(?left, "replicas did not stop in time; killing them");
        for pid in left {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

struct Spawner {
    args: Vec<OsString>,
    addr: SocketAddr,
    base: String,
    exits: mpsc::UnboundedSender<Exit>,
    /// Stops waiting for a replica's readiness (the drain handles it then).
    stop: CancellationToken,
}

impl Spawner {
    /// Starts replica `index` and waits (up to 30 s) until it serves.
    async fn start(&self, index: usize, generation: u64) -> Option<Replica> {
        let name = format!("{}-{index}", self.base);
        let mut command = Command::new("/proc/self/exe");
        command
            .args(&self.args)
            .args(["--replicas", "1", "--replica", "--listen", &self.addr.to_string(), "--replica-name", &name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child: Child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                tracing::error!(replica = index, error = %err, "cannot start replica");
                return None;
            }
        };
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take().expect("piped stdout");
        let exits = self.exits.clone();
        let exited = CancellationToken::new();
        let reaped = exited.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            reaped.cancel();
            let _ = exits.send(Exit { index, generation, status });
        });
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                tokio::select! {
                    line = lines.next_line() => match line {
                        Ok(Some(line)) if line.trim() == READY_LINE => return true,
                        Ok(Some(_)) => continue,
                        _ => return false,
                    },
                    () = self.stop.cancelled() => return false,
                }
            }
        })
        .await;
        // Keep reading (and discarding) its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        if ready != Ok(true) {
            tracing::warn!(replica = index, pid, "replica did not become ready");
        } else {
            tracing::info!(replica = index, pid, name = %name, "replica {name} (pid {pid}) serving");
        }
        Some(Replica { pid, generation, started: Instant::now(), exited })
    }
}
