//! One worker process as the front sees it: spawning it with its socket and
//! limits, the handshake, framed I/O (frames queued and written while the
//! front reads), running a batch of jobs (the worker runs them one at a time,
//! in order) with the stop ladder and heartbeats for the one running,
//! watching it while idle, and retiring it. The process is
//! owned: dropping a `WorkerProcess` kills its process group, and tokio reaps
//! the child, so no path leaves a zombie or an orphan.

use std::{
    collections::VecDeque,
    io::IoSlice,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::net::UnixStream as StdUnixStream,
    },
    path::PathBuf,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use super::sandbox::{Confinement, Sandbox};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use offload_proto::{
    framing::{self, PROTOCOL_VERSION},
    offload::worker::v1::{
        Cancel, FailureKind, Ping, RunTask, TaskDone, Welcome, WorkerRequest, worker_reply, worker_request,
    },
};
use offload_worker::{
    Allowances,
    process::{self as worker_process, Settings},
};
use tokio::{
    io::{AsyncWriteExt, unix::AsyncFd},
    process::{Child, Command},
};
use tokio_util::codec::FramedRead;

use super::{
    JobError, WorkerJob, WorkerRun,
    death::{DeathCause, Rung, StopReason},
    program::Declared,
    socket::{ReadHalf, WriteHalf},
    stderr::Stderr,
};

/// How the front starts and watches its workers.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The program to run; by default this executable, re-executed.
    pub program: PathBuf,
    /// The file `program` names (the sandbox lets the worker run it).
    pub executable: PathBuf,
    /// The sandbox workers run in.
    pub sandbox: Sandbox,
    /// What the sandbox allows this kind of worker beyond its base rules.
    pub allow: Allowances,
    /// Its arguments (`--worker-process` when re-executing the server).
    pub args: Vec<String>,
    /// What kind of worker it is, and what it is told at start.
    pub launch: Launch,
    /// Time a new worker has to say Hello.
    pub handshake_timeout: Duration,
    /// Interval between pings.
    pub heartbeat_interval: Duration,
    /// Silence after which a worker counts as hung.
    pub heartbeat_timeout: Duration,
    /// Time each rung of the stop ladder waits before the next.
    pub kill_grace: Duration,
}

/// The two kinds of worker processes.
#[derive(Debug, Clone)]
pub enum Launch {
    /// Offload's own worker (this executable re-executed, or
    /// `--worker-program`): it applies its settings itself and must offer
    /// `tasks`.
    Offload {
        /// Its settings, passed in the environment.
        settings: Settings,
        /// Tasks it must offer (checked at the handshake).
        tasks: Vec<&'static str>,
    },
    /// A worker program in any language: the front sets its limits up
    /// before it runs, and it declares its tasks in its Hello.
    Program {
        /// The program's name, its tasks' prefix.
        name: String,
        /// Its working directory.
        cwd: PathBuf,
        /// Variables added to the front's environment (minus OFFLOAD_*).
        env: std::collections::BTreeMap<String, String>,
        /// Its nice level.
        nice: i32,
        /// Resident memory at which it is killed while it runs a task (0: none).
        memory_limit: u64,
        /// Largest frame either side sends.
        max_frame: usize,
        /// The tasks its workers declared (the first one's, checked against
        /// every later one's).
        declared: Arc<Declared>,
    },
}

impl Launch {
    fn max_frame(&self) -> usize {
        match self {
            Launch::Offload { settings, .. } => settings.max_frame,
            Launch::Program { max_frame, .. } => *max_frame,
        }
    }

    /// The worker program's name, for one of its workers.
    pub fn program(&self) -> Option<&str> {
        match self {
            Launch::Offload { .. } => None,
            Launch::Program { name, .. } => Some(name),
        }
    }

    /// The resident memory the front watches for (Offload's own workers
    /// limit themselves with RLIMIT_AS).
    fn watched_memory(&self) -> u64 {
        match self {
            Launch::Offload { .. } => 0,
            Launch::Program { memory_limit, .. } => *memory_limit,
        }
    }
}

/// How long a worker that exited may take to close its stderr, whose last
/// lines explain it.
const STDERR_GRACE: Duration = Duration::from_millis(500);

/// How often the resident memory of a busy worker program is read against
/// its limit: a task allocating 1 GB/s overshoots by at most 50 MB.
const MEMORY_WATCH_INTERVAL: Duration = Duration::from_millis(50);

/// Limits a worker program gets before it runs (between fork and exec):
/// killed with its front, no core dumps, its nice level.
fn limit_program(nice: i32) -> std::io::Result<()> {
    use rustix::process::{Resource, Rlimit, Signal, set_parent_process_death_signal, setpriority_process, setrlimit};
    set_parent_process_death_signal(Some(Signal::KILL))?;
    setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) })?;
    if nice != 0 {
        setpriority_process(None, nice)?;
    }
    Ok(())
}

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The process could not be spawned.
    #[error("cannot spawn {program}: {source}{hint}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
        /// What to do about it, when a likely cause is known ("" else).
        hint: String,
    },
    /// The worker did not complete the handshake.
    #[error("handshake with worker {pid} failed: {reason}{}", stderr_ended(stderr))]
    Handshake {
        /// The worker's pid.
        pid: u32,
        /// What went wrong.
        reason: String,
        /// What it wrote to stderr meanwhile.
        stderr: Vec<String>,
    },
}

/// The line of a failed start's stderr that says why, for its error: the
/// last that names an error (`ModuleNotFoundError: ...`, `TypeError: ...`;
/// Node follows it with its stack and version), else the last line.
fn stderr_ended(stderr: &[String]) -> String {
    let names_an_error = |line: &&String| {
        line.trim().split_once(": ").is_some_and(|(kind, _)| {
            !kind.contains(' ') && (kind.ends_with("Error") || kind.ends_with("Exception") || kind == "error")
        })
    };
    let line = stderr.iter().rev().find(names_an_error).or(stderr.last());
    line.map(|line| format!("; its stderr ended with: {}", line.trim())).unwrap_or_default()
}

/// Why a sandboxed spawn may be refused, for its error: execution is allowed
/// of the program's own file only, so a wrapper script or a version
/// manager's shim fails at its `#!` line.
fn spawn_hint(source: &std::io::Error, options: &WorkerOptions) -> String {
    if source.kind() != std::io::ErrorKind::PermissionDenied || !options.sandbox.enabled() {
        return String::new();
    }
    let script = std::fs::read(&options.executable).ok().filter(|head| head.starts_with(b"#!")).and_then(|head| {
        head[2..].split(|b| *b == b'\n').next().map(|line| String::from_utf8_lossy(line).trim().to_string())
    });
    let what = match script {
        Some(interpreter) => format!("{} is a script run by `{interpreter}`", options.executable.display()),
        None => format!("the sandbox may not allow what {} needs to run", options.executable.display()),
    };
    format!(
        " (the worker sandbox lets a worker execute only its program's own file, and {what}: name the interpreter's \
         real path in `command`, such as a venv's .venv/bin/python or the file `readlink -f $(which python3)` gives, or \
         allow more with the program's `sandbox` table)"
    )
}

/// What became of a worker after a task or a wait.
#[derive(Debug)]
pub enum Fate {
    /// It is alive and can take another task.
    Alive,
    /// It is gone, for this reason.
    Dead(DeathCause),
}

/// Payloads up to this size are copied next to their frame head, so that a
/// pipelined batch of small tasks goes out in one write; larger ones are
/// written from the caller's buffer.
const COPY_PAYLOAD_BELOW: usize = 16 << 10;

/// Bytes queued for the worker: frames coalesced into shared buffers, large
/// payloads as their own chunks. They are written while the front reads
/// (see [`Link::next_frame`]), so neither side can block the other with a
/// full socket buffer, and frames never interleave.
#[derive(Debug, Default)]
struct Outgoing {
    chunks: VecDeque<Bytes>,
    /// Frames not yet sealed into a chunk.
    building: Vec<u8>,
    /// Bytes of the first chunk already written.
    written: usize,
}

impl Outgoing {
    fn push(&mut self, request: &WorkerRequest, payload: &Bytes) {
        framing::append_head(request, payload.len(), &mut self.building);
        if payload.len() < COPY_PAYLOAD_BELOW {
            self.building.extend_from_slice(payload);
        } else {
            self.seal();
            self.chunks.push_back(payload.clone());
        }
    }

    fn seal(&mut self) {
        if !self.building.is_empty() {
            self.chunks.push_back(Bytes::from(std::mem::take(&mut self.building)));
        }
    }

    fn advance(&mut self, mut n: usize) {
        while let Some(first) = self.chunks.front() {
            let left = first.len() - self.written;
            if n < left {
                self.written += n;
                return;
            }
            n -= left;
            self.written = 0;
            self.chunks.pop_front();
        }
    }

    fn clear(&mut self) {
        self.chunks.clear();
        self.building.clear();
        self.written = 0;
    }
}

/// Writes some of `out` in one vectored write.
async fn write_some(writer: &mut WriteHalf, out: &Outgoing) -> std::io::Result<usize> {
    const SLICES: usize = 32;
    let mut slices: [IoSlice<'_>; SLICES] = [IoSlice::new(&[]); SLICES];
    let mut count = 0;
    for (i, chunk) in out.chunks.iter().take(SLICES).enumerate() {
        let skip = if i == 0 { out.written } else { 0 };
        slices[i] = IoSlice::new(&chunk[skip..]);
        count += 1;
    }
    writer.write_vectored(&slices[..count]).await
}

/// The socket to one worker: framed reads, queued writes.
#[derive(Debug)]
struct Link {
    reader: FramedRead<ReadHalf, framing::FrameCodec>,
    writer: WriteHalf,
    out: Outgoing,
}

impl Link {
    /// Queues a frame without payload; it is written by the next
    /// [`Link::next_frame`] or [`Link::flush`].
    fn queue(&mut self, body: worker_request::Body) {
        self.out.push(&WorkerRequest { body: Some(body), payload: Bytes::new() }, &Bytes::new());
    }

    /// The next frame from the worker, writing queued frames meanwhile.
    /// Cancel-safe: a frame half read or bytes half written stay where they were.
    async fn next_frame(&mut self) -> Option<std::io::Result<bytes::BytesMut>> {
        loop {
            self.out.seal();
            if self.out.chunks.is_empty() {
                return self.reader.next().await;
            }
            tokio::select! {
                biased;
                frame = self.reader.next() => return frame,
                written = write_some(&mut self.writer, &self.out) => match written {
                    Ok(n) if n > 0 => self.out.advance(n),
                    // The worker is gone; the read side says how.
                    _ => self.out.clear(),
                },
            }
        }
    }

    /// Writes everything queued (only where the worker is not writing: the
    /// handshake and retirement).
    async fn flush(&mut self) -> std::io::Result<()> {
        self.out.seal();
        while !self.out.chunks.is_empty() {
            match write_some(&mut self.writer, &self.out).await? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                n => self.out.advance(n),
            }
        }
        Ok(())
    }
}

/// A live worker process.
#[derive(Debug)]
pub struct WorkerProcess {
    pid: u32,
    child: Child,
    link: Link,
    stderr: Stderr,
    next_id: u64,
    /// The last job answered (jobs are answered in the order sent).
    answered: u64,
    /// The task of the last job sent.
    last_task: &'static str,
    /// The execution span of the last job sent, while it is unanswered:
    /// whoever stops that job for a caller who left exports the worker's
    /// span under it.
    last_span: tracing::Span,
    /// When it last sent a frame (or started, or began a job).
    last_heard: Instant,
    /// Tasks it has finished, for recycling.
    pub tasks_done: u64,
    /// When its resident memory was last read.
    rss_read: Option<Instant>,
    /// Readable once the process exits (see [`WorkerProcess::exit_watch`]).
    exit: Option<Arc<AsyncFd<OwnedFd>>>,
    /// Its scratch folder (sandboxed workers), removed when it is dropped.
    _scratch: Option<tempfile::TempDir>,
}

/// A job sent to the worker and not answered yet.
struct Sent {
    id: u64,
    job: WorkerJob,
    span: tracing::Span,
    queued: Duration,
    /// When it became the oldest unanswered job (the one the worker runs).
    begun: Option<Instant>,
}

impl Sent {
    /// The worker starts this job now: its predecessors are answered.
    fn begin(&mut self) {
        self.queued = self.job.ticket.start();
        drop(std::mem::replace(&mut self.job.queue_span, tracing::Span::none()));
        self.job.started.store(true, std::sync::atomic::Ordering::Release);
        if let Some(sink) = &self.job.progress {
            sink(0.0, "");
        }
        self.begun = Some(Instant::now());
    }

    fn answer(self, result: Result<(Bytes, Duration), JobError>, pid: u32) {
        crate::telemetry::record_run(&self.span, result.as_ref().map(|(output, _)| output.len()));
        let (queued, run) = (self.queued, self.begun.map_or(Duration::ZERO, |b| b.elapsed()));
        let _ = self.job.reply.send(result.map(|(output, task_run)| WorkerRun { output, queued, run, task_run, pid }));
    }
}

/// A job sent to a worker whose caller stopped waiting before its answer.
#[derive(Debug)]
pub struct Unanswered {
    /// Its id on the worker's connection.
    pub id: u64,
    /// Its task.
    pub task: &'static str,
    /// Its execution span, the parent of the span the worker reports.
    pub span: tracing::Span,
}

/// How a run of jobs on one worker ended.
pub struct RunEnd {
    /// What became of the worker.
    pub fate: Fate,
    /// The task it was running last (the one that killed it, if it died).
    pub task: &'static str,
    /// Jobs sent but never started (the worker died or was stopped before
    /// reaching them): they go back to the queue.
    pub unstarted: Vec<WorkerJob>,
}

/// Serialises spawns: the child's socket end is inheritable only while one
/// spawn runs, so no other worker inherits it.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

impl WorkerProcess {
    /// Starts a worker and completes the handshake.
    ///
    /// Must be called on a runtime thread (never `spawn_blocking`): the
    /// worker's parent-death signal fires when the spawning thread exits.
    pub async fn spawn(options: &WorkerOptions) -> Result<Self, StartError> {
        let spawn_error = |source| StartError::Spawn {
            program: options.program.display().to_string(),
            hint: spawn_hint(&source, options),
            source,
        };
        let (ours, theirs) = StdUnixStream::pair().map_err(spawn_error)?;
        let mut command = Command::new(&options.program);
        command.args(&options.args);
        // Its private scratch folder, the only one it may write to when
        // sandboxed (removed with the worker).
        let scratch = match options.sandbox.enabled() {
            true => Some(tempfile::Builder::new().prefix("offload-worker-").tempdir().map_err(spawn_error)?),
            false => None,
        };
        let mut confinement = match &scratch {
            Some(dir) => {
                options.sandbox.prepare(&options.executable, &options.allow, dir.path()).map_err(spawn_error)?
            }
            None => Confinement::default(),
        };
        let nice = match &options.launch {
            Launch::Offload { settings, .. } => {
                command
                    .env_clear()
                    .envs(settings.to_env())
                    // glibc reserves 64 MiB of address space per malloc arena and
                    // thread; two arenas keep RLIMIT_AS about real memory.
                    .env("MALLOC_ARENA_MAX", "2");
                // It limits itself (its settings say how).
                None
            }
            Launch::Program { cwd, env, nice, max_frame, .. } => {
                // The front's environment without its own settings.
                for (key, _) in std::env::vars_os() {
                    if key.to_str().is_some_and(|k| k.starts_with("OFFLOAD_")) {
                        command.env_remove(key);
                    }
                }
                command.current_dir(cwd).envs(env).env(worker_process::env::MAX_FRAME, max_frame.to_string());
                Some(*nice)
            }
        };
        if let Some(dir) = &scratch {
            command.env("TMPDIR", dir.path());
        }
        // SAFETY: between fork and exec the closure only makes system calls
        // (unshare, open/write of /proc/self files, prctl, landlock,
        // seccomp, setrlimit, setpriority) through rustix, the landlock
        // crate and seccompiler, on what was prepared before the fork; none
        // allocates or takes a lock.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                confinement.apply()?;
                match nice {
                    Some(nice) => limit_program(nice),
                    None => Ok(()),
                }
            });
        }
        command
            .env(worker_process::env::FD, theirs.as_raw_fd().to_string())
            .env(worker_process::env::PARENT_PID, std::process::id().to_string())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = {
            let _serial = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            rustix::io::fcntl_setfd(theirs.as_fd(), rustix::io::FdFlags::empty()).map_err(|e| spawn_error(e.into()))?;
            let spawned = command.spawn();
            drop(theirs);
            spawned.map_err(spawn_error)?
        };
        let pid = child.id().unwrap_or(0);
        let stderr = Stderr::read(child.stderr.take(), pid);
        ours.set_nonblocking(true).map_err(spawn_error)?;
        let (read, writer) = super::socket::split(ours).map_err(spawn_error)?;
        let codec = framing::FrameCodec::new(options.launch.max_frame());
        let mut worker = Self {
            pid,
            child,
            link: Link { reader: FramedRead::new(read, codec), writer, out: Outgoing::default() },
            stderr,
            next_id: 0,
            answered: 0,
            last_task: "",
            last_span: tracing::Span::none(),
            last_heard: Instant::now(),
            tasks_done: 0,
            rss_read: None,
            exit: exit_watch(pid).map(Arc::new),
            _scratch: scratch,
        };
        let reason = match tokio::time::timeout(options.handshake_timeout, worker.handshake(&options.launch)).await {
            Ok(Ok(())) => {
                worker.stderr.started(pid);
                return Ok(worker);
            }
            Ok(Err(reason)) => reason,
            Err(_) => format!("no Hello within {:?}", options.handshake_timeout),
        };
        // What it wrote before it failed says why, most often in its last line.
        worker.kill().await;
        let stderr = worker.stderr.startup(STDERR_GRACE).await;
        Err(StartError::Handshake { pid, reason, stderr })
    }

    async fn handshake(&mut self, launch: &Launch) -> Result<(), String> {
        let hello = match decode(self.link.next_frame().await) {
            Ok(Some((worker_reply::Body::Hello(hello), _))) => hello,
            Ok(Some((other, _))) => return Err(format!("expected Hello, got {other:?}")),
            Ok(None) => {
                let status = self.child.wait().await.map_err(|e| e.to_string())?;
                return Err(format!("worker {} before saying Hello", self.describe_exit(status).await));
            }
            Err(err) => return Err(err),
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(format!("worker speaks protocol {}, this front {PROTOCOL_VERSION}", hello.protocol_version));
        }
        if hello.pid != self.pid {
            return Err(format!("worker says its pid is {}, the front started {}", hello.pid, self.pid));
        }
        match launch {
            Launch::Offload { tasks, .. } => {
                let missing: Vec<&str> =
                    tasks.iter().copied().filter(|t| !hello.tasks.iter().any(|h| h == t)).collect();
                if !missing.is_empty() {
                    return Err(format!("worker lacks tasks {}", missing.join(", ")));
                }
            }
            Launch::Program { name, declared, .. } => {
                declared.accept(name, &hello.declared)?;
                if !hello.runtime.is_empty() {
                    tracing::debug!(worker.pid = self.pid, "worker of program {name} runs on {}", hello.runtime);
                }
            }
        }
        self.link.queue(worker_request::Body::Welcome(Welcome { protocol_version: PROTOCOL_VERSION }));
        self.link.flush().await.map_err(|e| format!("sending Welcome: {e}"))
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Why the worker ended, from its reaped status.
    async fn exit_cause(&mut self, status: std::io::Result<ExitStatus>) -> DeathCause {
        match status {
            Ok(status) => self.describe_exit(status).await,
            Err(_) => DeathCause::Exited(-1),
        }
    }

    /// A heartbeat tick: kills a worker silent for longer than the timeout
    /// (returning why), else pings it; `task` is what it
    /// runs, if anything. A broken socket shows up in the next read or wait.
    async fn beat(&mut self, seq: u64, task: Option<&str>, options: &WorkerOptions) -> Option<DeathCause> {
        if self.last_heard.elapsed() > options.heartbeat_timeout {
            match task {
                Some(task) => {
                    tracing::warn!(worker.pid = self.pid, task.name = task, "worker stopped answering; killing it")
                }
                None => tracing::warn!(worker.pid = self.pid, "idle worker stopped answering; killing it"),
            }
            self.kill().await;
            return Some(DeathCause::Unresponsive);
        }
        self.link.queue(worker_request::Body::Ping(Ping { seq }));
        None
    }

    /// Describes how the worker ended, waiting briefly for its last stderr lines.
    async fn describe_exit(&mut self, status: ExitStatus) -> DeathCause {
        DeathCause::from_status(status, &self.stderr.tail(STDERR_GRACE).await)
    }

    /// Sends `signal` to the worker's process group (it and anything it started).
    fn signal_group(&self, signal: Signal) {
        if self.pid != 0 {
            let _ = killpg(Pid::from_raw(self.pid as i32), signal);
        }
    }

    /// Waits up to `bound` for the worker to exit.
    async fn exited_within(&mut self, bound: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(bound, self.child.wait()).await.ok().and_then(Result::ok)
    }

    /// Kills the process group and reaps the worker.
    async fn kill(&mut self) {
        self.signal_group(Signal::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// Sends `jobs` to the worker at once (it runs them in order) and
    /// answers each; returns what became of the worker, and the jobs it
    /// never started if it died or was killed on the way.
    pub async fn run(&mut self, jobs: Vec<WorkerJob>, options: &WorkerOptions) -> RunEnd {
        let mut flight: VecDeque<Sent> = jobs.into_iter().map(|job| self.send(job)).collect();
        let mut heartbeat = heartbeat(options);
        let memory_limit = options.launch.watched_memory();
        let mut memory_watch = ticker(MEMORY_WATCH_INTERVAL);
        let deadline_reached = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(deadline_reached);
        let mut head_deadline = None;
        loop {
            let Some(head) = flight.front_mut() else {
                return RunEnd { fate: Fate::Alive, task: "", unstarted: Vec::new() };
            };
            if head.begun.is_none() {
                head.begin();
                self.last_heard = Instant::now();
                head_deadline = head.job.deadline;
                if let Some(d) = head_deadline {
                    deadline_reached.as_mut().reset(d.into());
                }
            }
            let (id, task) = (head.id, head.job.task);
            let cancel = head.job.cancel.clone();
            let stop_reason = tokio::select! {
                // Frames first: a worker that answers and then exits (after a
                // panic, or out of memory) has its answer read before its
                // exit is seen, whichever the runtime noticed first.
                biased;
                frame = self.link.next_frame() => match decode(frame) {
                    Ok(Some((worker_reply::Body::Done(done), output))) if done.id == id => {
                        self.tasks_done += 1;
                        self.answered_up_to(id);
                        let fate = self.finished(&done, &flight[0].span, &options.launch).await;
                        let head = flight.pop_front().expect("the head");
                        head.answer(done_result(done, output), self.pid);
                        if let Fate::Dead(_) = fate {
                            return self.ended(fate, task, flight);
                        }
                        continue;
                    }
                    Ok(Some((worker_reply::Body::Progress(p), _))) => {
                        self.last_heard = Instant::now();
                        // A task behind the head may report before the head's
                        // answer arrives (tiny ones' answers are written late).
                        if p.id == id && let Some(sink) = &flight[0].job.progress {
                            sink(p.fraction, &p.message);
                        }
                        continue;
                    }
                    Ok(Some((worker_reply::Body::Pong(_), _))) => {
                        self.last_heard = Instant::now();
                        continue;
                    }
                    Ok(Some((other, _))) => {
                        let cause = self.protocol_breach(format!("unexpected frame {other:?}")).await;
                        return self.died(cause, flight);
                    }
                    Ok(None) => {
                        let cause = self.death().await;
                        return self.died(cause, flight);
                    }
                    Err(detail) => {
                        let cause = self.protocol_breach(detail).await;
                        return self.died(cause, flight);
                    }
                },
                status = self.child.wait() => {
                    let cause = self.exit_cause(status).await;
                    return self.died(cause, flight);
                }
                () = &mut deadline_reached, if head_deadline.is_some() => StopReason::Deadline,
                // The caller gives up at its deadline too: that is the deadline.
                () = cancel.cancelled() => match head_deadline {
                    Some(d) if Instant::now() >= d => StopReason::Deadline,
                    _ => StopReason::Cancelled,
                },
                _ = heartbeat.tick() => {
                    if let Some(cause) = self.beat(id, Some(task), options).await {
                        return self.died(cause, flight);
                    }
                    continue;
                }
                _ = memory_watch.tick(), if memory_limit > 0 => {
                    if let Some(rss) = self.resident_bytes().filter(|rss| *rss > memory_limit) {
                        tracing::warn!(
                            worker.pid = self.pid,
                            task.name = task,
                            "worker {} holds {rss} bytes, over its memory limit of {memory_limit}; killing it",
                            self.pid
                        );
                        self.kill().await;
                        return self.died(DeathCause::MemoryLimit, flight);
                    }
                    continue;
                }
            };
            let execution = flight[0].span.clone();
            let (rung, fate) = self.stop(id, task, stop_reason, options, &execution).await;
            let head = flight.pop_front().expect("the head");
            head.answer(Err(JobError::Stopped { reason: stop_reason, rung }), self.pid);
            if let Fate::Dead(_) = fate {
                return self.ended(fate, task, flight);
            }
        }
    }

    /// Queues one job's RunTask frame.
    fn send(&mut self, mut job: WorkerJob) -> Sent {
        self.next_id += 1;
        self.last_task = job.task;
        let id = self.next_id;
        let span = crate::telemetry::execution_span(&job.span, job.task, "ISOLATED", job.input.len());
        span.record("worker.pid", i64::from(self.pid));
        self.last_span = span.clone();
        let run = RunTask {
            id,
            task: job.task.to_string(),
            params: std::mem::take(&mut job.params),
            deadline_unix_nanos: job.deadline.map_or(0, unix_nanos),
            traceparent: crate::telemetry::traceparent(&span),
            inline: job.tiny(),
        };
        let mut request = WorkerRequest { body: Some(worker_request::Body::Run(run)), payload: Bytes::new() };
        self.link.out.push(&request, &job.input);
        // Kept with the job in case it must go to another worker.
        if let Some(worker_request::Body::Run(run)) = &mut request.body {
            job.params = std::mem::take(&mut run.params);
        }
        Sent { id, job, span, queued: Duration::ZERO, begun: None }
    }

    /// The head job's worker died: the head gets the death, the rest go back.
    fn died(&self, cause: DeathCause, mut flight: VecDeque<Sent>) -> RunEnd {
        let head = flight.pop_front().expect("the head");
        let task = head.job.task;
        head.answer(Err(JobError::Died { pid: self.pid, task, cause: cause.clone() }), self.pid);
        self.ended(Fate::Dead(cause), task, flight)
    }

    fn ended(&self, fate: Fate, task: &'static str, flight: VecDeque<Sent>) -> RunEnd {
        RunEnd { fate, task, unstarted: flight.into_iter().map(|sent| sent.job).collect() }
    }

    /// The stop ladder for job `id` (running `task`): a cancel frame, then
    /// SIGTERM, then SIGKILL, each given `kill_grace`. Returns the rung that
    /// worked, and logs it.
    pub(super) async fn stop(
        &mut self,
        id: u64,
        task: &str,
        reason: StopReason,
        options: &WorkerOptions,
        execution: &tracing::Span,
    ) -> (Rung, Fate) {
        self.answered_up_to(id);
        let (rung, fate) = self.climb(id, reason, options, execution).await;
        match rung {
            Rung::CancelFrame => {
                tracing::info!(worker.pid = self.pid, task.name = task, reason = ?reason, "{task} stopped by {rung}")
            }
            _ => tracing::warn!(
                worker.pid = self.pid,
                task.name = task,
                reason = ?reason,
                "{task} stopped by {rung}; worker killed"
            ),
        }
        (rung, fate)
    }

    async fn climb(
        &mut self,
        id: u64,
        reason: StopReason,
        options: &WorkerOptions,
        execution: &tracing::Span,
    ) -> (Rung, Fate) {
        self.link.queue(worker_request::Body::Cancel(Cancel { id }));
        // Tasks are answered in order: nothing but the head's progress and
        // pongs can come before its TaskDone.
        let answered = tokio::time::timeout(options.kill_grace, async {
            loop {
                match decode(self.link.next_frame().await) {
                    Ok(Some((worker_reply::Body::Done(done), _))) if done.id == id => return Some(done),
                    Ok(Some((worker_reply::Body::Progress(_) | worker_reply::Body::Pong(_), _))) => continue,
                    _ => return None,
                }
            }
        })
        .await;
        if let Ok(Some(done)) = answered {
            self.tasks_done += 1;
            return (Rung::CancelFrame, self.finished(&done, execution, &options.launch).await);
        }
        self.signal_group(Signal::SIGTERM);
        if self.exited_within(options.kill_grace).await.is_some() {
            self.signal_group(Signal::SIGKILL);
            return (Rung::Terminate, Fate::Dead(DeathCause::StopKilled(reason, Rung::Terminate)));
        }
        self.kill().await;
        (Rung::Kill, Fate::Dead(DeathCause::StopKilled(reason, Rung::Kill)))
    }

    /// After a TaskDone: exports the span the worker reported under the
    /// task's `execution` span; a worker whose task ran out of memory or
    /// panicked exits by itself.
    async fn finished(&mut self, done: &TaskDone, execution: &tracing::Span, launch: &Launch) -> Fate {
        if let Some(reported) = &done.span {
            crate::telemetry::export_worker_span(execution, reported, launch.program());
        }
        let cause = match FailureKind::try_from(done.failure) {
            Ok(FailureKind::OutOfMemory) => DeathCause::MemoryLimit,
            Ok(FailureKind::Panicked) => DeathCause::Panicked,
            _ => return Fate::Alive,
        };
        if self.exited_within(Duration::from_secs(2)).await.is_none() {
            self.kill().await;
        }
        Fate::Dead(cause)
    }

    /// The worker's socket closed or it exited: reap it and say why.
    pub(super) async fn death(&mut self) -> DeathCause {
        match self.exited_within(Duration::from_secs(2)).await {
            Some(status) => self.describe_exit(status).await,
            None => {
                // Alive but its socket is gone: useless; make sure it is dead.
                self.kill().await;
                DeathCause::Protocol("the socket closed while the process lived".into())
            }
        }
    }

    async fn protocol_breach(&mut self, detail: String) -> DeathCause {
        tracing::warn!(worker.pid = self.pid, "worker broke the protocol: {detail}");
        self.kill().await;
        DeathCause::Protocol(detail)
    }

    /// A heartbeat tick of an idle worker, which nobody reads from while it
    /// waits on the bench: reads what it sent meanwhile (pongs) without
    /// waiting, then kills it if it has been silent too long, else pings it.
    pub async fn beat_idle(&mut self, options: &WorkerOptions) -> Fate {
        while let Some(frame) = self.link.next_frame().now_or_never() {
            match decode(frame) {
                Ok(Some((worker_reply::Body::Pong(_), _))) => self.last_heard = Instant::now(),
                Ok(Some((other, _))) => {
                    return Fate::Dead(self.protocol_breach(format!("unexpected frame {other:?} while idle")).await);
                }
                Ok(None) => return Fate::Dead(self.death().await),
                Err(detail) => return Fate::Dead(self.protocol_breach(detail).await),
            }
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            return Fate::Dead(self.describe_exit(status).await);
        }
        if let Some(cause) = self.beat(0, None, options).await {
            return Fate::Dead(cause);
        }
        // Written now: nobody reads (and so writes) this socket until the
        // worker's next task. A worker too stuck to take a ping's few bytes
        // is found silent at a later tick.
        let _ = self.link.flush().now_or_never();
        Fate::Alive
    }

    /// Jobs up to `id` are answered; once all are, the last one's span is
    /// let go (it ends when the job's other holders are done with it).
    fn answered_up_to(&mut self, id: u64) {
        self.answered = id;
        if id == self.next_id {
            self.last_span = tracing::Span::none();
        }
    }

    /// The job a caller stopped waiting for while the worker ran it (its
    /// id, task and execution span), if there is one: a lent worker runs one
    /// job, and jobs are answered in order.
    pub fn unanswered(&self) -> Option<Unanswered> {
        (self.answered < self.next_id).then(|| Unanswered {
            id: self.answered + 1,
            task: self.last_task,
            span: self.last_span.clone(),
        })
    }

    /// A descriptor that becomes readable when the process exits (a pidfd),
    /// registered with the runtime; `None` where the kernel has no pidfds
    /// (an idle worker's death then shows at its next heartbeat).
    pub fn exit_watch(&self) -> Option<Arc<AsyncFd<OwnedFd>>> {
        self.exit.clone()
    }

    /// Resident memory of the worker from /proc, read at most once per
    /// `interval` (three syscalls: not on every task of a busy worker).
    pub fn resident_bytes_every(&mut self, interval: Duration) -> Option<u64> {
        if self.rss_read.is_some_and(|at| at.elapsed() < interval) {
            return None;
        }
        self.rss_read = Some(Instant::now());
        self.resident_bytes()
    }

    /// Resident memory of the worker now, from /proc.
    fn resident_bytes(&self) -> Option<u64> {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.pid)).ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * rustix::param::page_size() as u64)
    }

    /// Retires the worker between tasks: closing its socket makes it exit;
    /// one that lingers is killed.
    pub async fn retire(mut self, grace: Duration) {
        let link = &mut self.link;
        let _ = tokio::time::timeout(grace, async move {
            let _ = link.flush().await;
            let _ = link.writer.shutdown().await;
        })
        .await;
        if self.exited_within(grace).await.is_none() {
            self.kill().await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // Whatever happened, nothing of this worker outlives its handle; a
        // group already gone makes this a no-op. tokio reaps the child.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal_group(Signal::SIGKILL);
        }
    }
}

/// A pidfd of process `pid`, registered with the runtime.
fn exit_watch(pid: u32) -> Option<AsyncFd<OwnedFd>> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()?;
    super::socket::register(pidfd, tokio::io::Interest::READABLE).ok()
}

/// The heartbeat timer.
pub(super) fn heartbeat(options: &WorkerOptions) -> tokio::time::Interval {
    ticker(options.heartbeat_interval)
}

/// A timer whose first tick is one `period` away: tokio's `interval` ticks
/// at once, which would ping the worker (or read its memory) on every task.
fn ticker(period: Duration) -> tokio::time::Interval {
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}

/// Decodes a frame read from a worker. A socket that closed or broke reads
/// as `Ok(None)` (the worker died: its exit status says why); a frame that is
/// too long or does not decode is a protocol breach.
fn decode(
    frame: Option<Result<bytes::BytesMut, std::io::Error>>,
) -> Result<Option<(worker_reply::Body, Bytes)>, String> {
    match frame {
        None => Ok(None),
        Some(Err(err)) if err.kind() == std::io::ErrorKind::InvalidData => Err(format!("reading a frame: {err}")),
        Some(Err(_)) => Ok(None),
        Some(Ok(frame)) => framing::decode_reply(frame.freeze()).map(Some).map_err(|e| e.to_string()),
    }
}

/// The answer a TaskDone carries: the output and the task's own run time.
fn done_result(done: TaskDone, output: Bytes) -> Result<(Bytes, Duration), JobError> {
    if done.failure == FailureKind::Unspecified as i32 {
        return Ok((output, Duration::from_micros(done.run_us)));
    }
    let kind = FailureKind::try_from(done.failure).unwrap_or(FailureKind::Failed);
    Err(JobError::Task(worker_process::task_error(kind, done.message, Duration::from_micros(done.run_us))))
}

fn unix_nanos(deadline: Instant) -> u64 {
    let left = deadline.saturating_duration_since(Instant::now());
    (SystemTime::now() + left).duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::stderr_ended;

    #[test]
    fn a_failed_start_is_explained_by_the_line_naming_its_error() {
        let lines = |text: &str| text.lines().map(String::from).collect::<Vec<_>>();
        let python = "Traceback (most recent call last):\n  File \"app.py\", line 1, in <module>\n\
                      ModuleNotFoundError: No module named 'offload_worker'";
        assert_eq!(
            stderr_ended(&lines(python)),
            "; its stderr ended with: ModuleNotFoundError: No module named 'offload_worker'"
        );
        let node = "/srv/app.js:3\nError: Cannot find module 'x'\nRequire stack:\n- /srv/app.js\n    at Module._load (node:internal)\n\
                    {\n  code: 'MODULE_NOT_FOUND'\n}\nNode.js v20.20.2";
        assert_eq!(stderr_ended(&lines(node)), "; its stderr ended with: Error: Cannot find module 'x'");
        assert_eq!(stderr_ended(&lines("starting\nbye")), "; its stderr ended with: bye");
        assert_eq!(stderr_ended(&[]), "");
    }
}
