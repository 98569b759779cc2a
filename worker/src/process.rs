//! The worker process: serves tasks from the catalog to its front over one
//! Unix socket, one task at a time (see `proto/offload/worker/v1`).
//!
//! The main thread reads frames and answers pings at once, so a long task is
//! never mistaken for a hung worker; a second thread runs the tasks. The
//! front may pipeline tasks: they queue and run in arrival order, and tiny
//! ones (the front's `inline` hint) run on the reading thread when nothing is
//! ahead of them, their answers collected and written together. The
//! worker exits when the socket closes (its front is gone), when it receives
//! a malformed frame (it does not guess), or after a task ran out of memory.
//! At start it applies the limits the front asked for, and asks the kernel
//! to kill it when its parent dies.

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    os::{fd::FromRawFd, unix::net::UnixStream},
    process::ExitCode,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};
use offload_proto::{
    framing::{self, PROTOCOL_VERSION},
    offload::worker::v1::{
        FailureKind, Hello, Pong, RunTask, TaskDone, TaskProgress, WorkerReply, worker_reply, worker_request,
    },
};

use crate::{
    CancelFlag, Catalog, CatalogOptions, Context, ProgressSink, TaskError, TaskSet, run_job, tasks::exec::ExecSpec,
    trace::TaskSpan,
};

/// Exit status: the socket closed or the front retired the worker.
pub const EXIT_CLEAN: u8 = 0;
/// Exit status: the front sent something that is not the protocol.
pub const EXIT_PROTOCOL: u8 = 2;
/// Exit status: a task ran out of memory; the worker is not reused.
pub const EXIT_OUT_OF_MEMORY: u8 = 3;
/// Exit status: the settings or the set-up were unusable.
pub const EXIT_SETUP: u8 = 4;
/// Exit status: a task panicked; the worker answered its call and is not
/// reused, as the task may have left shared state half-changed.
pub const EXIT_PANICKED: u8 = 5;

/// Environment variables through which the front configures a worker.
pub mod env {
    /// The inherited socket's file descriptor number.
    pub const FD: &str = "OFFLOAD_WORKER_FD";
    /// The front's pid, to detect a parent that died before we started.
    pub const PARENT_PID: &str = "OFFLOAD_WORKER_PARENT_PID";
    /// Address-space limit in bytes (0: none).
    pub const MEMORY_LIMIT: &str = "OFFLOAD_WORKER_MEMORY_LIMIT";
    /// Nice level (0..=19).
    pub const NICE: &str = "OFFLOAD_WORKER_NICE";
    /// "1" to serve the debug tasks.
    pub const DEBUG_TASKS: &str = "OFFLOAD_WORKER_DEBUG_TASKS";
    /// Cap on decompressed output.
    pub const MAX_DECOMPRESSED: &str = "OFFLOAD_WORKER_MAX_DECOMPRESSED";
    /// Largest frame accepted.
    pub const MAX_FRAME: &str = "OFFLOAD_WORKER_MAX_FRAME";
    /// The exec task declarations, as TOML.
    pub const EXEC: &str = "OFFLOAD_WORKER_EXEC";
    /// The front's gRPC port (for `debug.probe`).
    pub const FRONT_PORT: &str = "OFFLOAD_WORKER_FRONT_PORT";
}

/// What the front tells a worker at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address-space limit in bytes; 0 for none.
    pub memory_limit: u64,
    /// Nice level of the worker's threads.
    pub nice: i32,
    /// The catalog to serve.
    pub catalog: CatalogOptions,
    /// Largest frame accepted, in bytes.
    pub max_frame: usize,
    /// The front's gRPC port (0: unknown).
    pub front_port: u16,
}

impl Settings {
    /// The environment variables that carry these settings.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        vec![
            (env::MEMORY_LIMIT, self.memory_limit.to_string()),
            (env::NICE, self.nice.to_string()),
            (env::DEBUG_TASKS, u8::from(self.catalog.debug_tasks).to_string()),
            (env::MAX_DECOMPRESSED, self.catalog.max_decompressed_bytes.to_string()),
            (env::MAX_FRAME, self.max_frame.to_string()),
            (env::FRONT_PORT, self.front_port.to_string()),
        ]
        .into_iter()
        .chain((!self.catalog.exec.is_empty()).then(|| {
            (env::EXEC, toml::to_string(&ExecList { exec: self.catalog.exec.clone() }).expect("exec specs serialize"))
        }))
        .collect()
    }

    fn from_env() -> Result<Self, String> {
        Ok(Self {
            memory_limit: var(env::MEMORY_LIMIT)?,
            nice: var(env::NICE)?,
            catalog: CatalogOptions {
                debug_tasks: var::<u8>(env::DEBUG_TASKS)? == 1,
                max_decompressed_bytes: var(env::MAX_DECOMPRESSED)?,
                // Unset when no exec task is declared (the parser stays cold).
                exec: match std::env::var(env::EXEC) {
                    Ok(raw) => toml::from_str::<ExecList>(&raw).map_err(|e| format!("{}: {e}", env::EXEC))?.exec,
                    Err(_) => Vec::new(),
                },
            },
            max_frame: var(env::MAX_FRAME)?,
            front_port: std::env::var(env::FRONT_PORT).ok().and_then(|p| p.parse().ok()).unwrap_or(0),
        })
    }
}

/// The exec declarations' wrapper, as TOML wants a table at the top.
#[derive(serde::Serialize, serde::Deserialize)]
struct ExecList {
    exec: Vec<ExecSpec>,
}

fn var<T: std::str::FromStr>(name: &str) -> Result<T, String> {
    let raw = std::env::var(name).map_err(|_| format!("{name} is not set; workers are started by offload-server"))?;
    raw.parse().map_err(|_| format!("{name}={raw:?} is not valid"))
}

/// Why a worker stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The front broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

impl From<framing::FrameError> for WorkerError {
    fn from(err: framing::FrameError) -> Self {
        match err {
            framing::FrameError::Io(err) => Self::Io(err),
            other => Self::Protocol(other.to_string()),
        }
    }
}

/// The entry point of a worker process serving Offload's built-in tasks
/// (the `offload-worker` binary).
pub fn main() -> ExitCode {
    main_with(&TaskSet::builtin())
}

/// The entry point of a worker process serving `tasks` (with the debug and
/// exec tasks its front's settings ask for): set up from the environment,
/// serve, and map the end to an exit status. A program that embeds Offload
/// calls it when re-executed as a worker, so its tasks run in ISOLATED.
pub fn main_with(tasks: &TaskSet) -> ExitCode {
    // A task's panic is reported to the front in its TaskDone; one line on
    // stderr (which the front logs) is enough here.
    std::panic::set_hook(Box::new(|info| eprintln!("task panicked: {}", info.to_string().replace('\n', " "))));
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(err) => return setup_failed(&err),
    };
    crate::tasks::debug::set_front_port(settings.front_port);
    let stream = match setup(&settings) {
        Ok(stream) => stream,
        Err(err) => return setup_failed(&err),
    };
    let catalog = match Catalog::new(tasks, &settings.catalog) {
        Ok(catalog) => catalog,
        Err(err) => return setup_failed(&err.to_string()),
    };
    let served = serve(stream, catalog, settings.max_frame);
    match served {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("offload-worker {}: {err}", std::process::id());
            ExitCode::from(match err {
                WorkerError::Protocol(_) => EXIT_PROTOCOL,
                WorkerError::Io(_) => EXIT_CLEAN,
            })
        }
    }
}

fn setup_failed(err: &str) -> ExitCode {
    eprintln!("offload-worker {}: cannot start: {err}", std::process::id());
    ExitCode::from(EXIT_SETUP)
}

/// Applies the limits and takes the socket, before any other thread exists
/// (threads inherit the nice level of the thread that creates them).
fn setup(settings: &Settings) -> Result<UnixStream, String> {
    use rustix::process::{Resource, Rlimit, Signal, getppid, set_parent_process_death_signal, setrlimit};

    set_parent_process_death_signal(Some(Signal::KILL)).map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    // The parent may have died before the line above took effect.
    let parent: i32 = var(env::PARENT_PID)?;
    if getppid().map(|p| p.as_raw_nonzero().get()) != Some(parent) {
        return Err("the front exited before the worker started".into());
    }
    setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) })
        .map_err(|e| format!("RLIMIT_CORE: {e}"))?;
    if settings.memory_limit > 0 {
        let limit = Some(settings.memory_limit);
        setrlimit(Resource::As, Rlimit { current: limit, maximum: limit }).map_err(|e| format!("RLIMIT_AS: {e}"))?;
    }
    if settings.nice != 0 {
        rustix::process::setpriority_process(None, settings.nice).map_err(|e| format!("setpriority: {e}"))?;
    }
    let fd: i32 = var(env::FD)?;
    if fd < 3 {
        return Err(format!("{}={fd} is a standard stream", env::FD));
    }
    close_on_exec_all()?;
    // SAFETY: the front passed this descriptor to this process alone, open,
    // for the worker socket; nothing else here owns or closes it.
    #[allow(unsafe_code)]
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    Ok(stream)
}

/// Marks every inherited descriptor but the standard streams close-on-exec.
/// A worker calls it at start, its socket included: a program an exec task
/// starts must not be able to speak the protocol to the front. The front
/// calls it at start too, so that what it inherited from its own parent (a
/// shell's stray descriptors) reaches none of its children: a worker
/// program gets 0, 1, 2 and its socket, nothing else.
pub fn close_on_exec_all() -> Result<(), String> {
    use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};
    // One call on Linux 5.11 and later; it needs no /proc, which a
    // sandboxed worker may not read.
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on
    // descriptors; it takes no pointer.
    #[allow(unsafe_code)]
    let marked = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    if marked == 0 {
        return Ok(());
    }
    let entries = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("listing /proc/self/fd: {e}"))?;
    for fd in entries.flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()) {
        if fd < 3 {
            continue;
        }
        // SAFETY: only descriptor flags change, on a descriptor the kernel
        // just listed; one that closed since (the listing's own) fails harmlessly.
        #[allow(unsafe_code)]
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if let Ok(flags) = fcntl_getfd(borrowed) {
            let _ = fcntl_setfd(borrowed, flags | FdFlags::CLOEXEC);
        }
    }
    Ok(())
}

/// The writing half, shared by the reader (pongs) and the task thread.
type Writer = Arc<Mutex<UnixStream>>;

fn send(writer: &Writer, reply: &WorkerReply, payload: &[u8]) -> io::Result<()> {
    let head = framing::frame_head(reply, payload.len());
    let mut stream = writer.lock().unwrap_or_else(|e| e.into_inner());
    stream.write_all(&head)?;
    stream.write_all(payload)
}

fn reply(body: worker_reply::Body) -> WorkerReply {
    WorkerReply { body: Some(body), payload: Bytes::new() }
}

/// Replies the reading thread collects while more requests are already
/// buffered, written in one syscall when it is about to wait for input: a
/// pipelined batch of tiny tasks costs the front one read, not one per task.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
}

/// Outputs larger than this are written from their own buffer, not copied.
const OUTBOX_COPY_LIMIT: usize = 64 << 10;

/// Outbox capacity kept between flushes.
const OUTBOX_KEEP: usize = 256 << 10;

impl Outbox {
    fn push(&mut self, writer: &Writer, reply: &WorkerReply, payload: &[u8]) -> io::Result<()> {
        if payload.len() > OUTBOX_COPY_LIMIT {
            self.flush(writer)?;
            return send(writer, reply, payload);
        }
        framing::append_head(reply, payload.len(), &mut self.buf);
        self.buf.extend_from_slice(payload);
        Ok(())
    }

    fn flush(&mut self, writer: &Writer) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let written = writer.lock().unwrap_or_else(|e| e.into_inner()).write_all(&self.buf);
        if self.buf.capacity() > OUTBOX_KEEP {
            // A batch of large answers does not pin its memory in an idle worker.
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        written
    }
}

/// Tasks received and not yet answered, oldest (running) first, with their
/// cancel flags.
type Outstanding = Arc<Mutex<VecDeque<(u64, CancelFlag)>>>;

/// Serves tasks on `stream` until it closes. Returns the exit status.
pub fn serve(stream: UnixStream, catalog: Catalog, max_frame: usize) -> Result<u8, WorkerError> {
    let writer: Writer = Arc::new(Mutex::new(stream.try_clone()?));
    let mut reader = io::BufReader::with_capacity(64 << 10, stream);
    let mut buf = BytesMut::new();

    let tasks = catalog.iter().map(|t| t.spec().name.to_string()).collect();
    send(
        &writer,
        &reply(worker_reply::Body::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            pid: std::process::id(),
            tasks,
            ..Hello::default()
        })),
        &[],
    )?;
    match next_request(&mut reader, &mut buf, max_frame)? {
        None => return Ok(EXIT_CLEAN),
        Some(worker_request::Body::Welcome(w)) if w.protocol_version == PROTOCOL_VERSION => {}
        Some(worker_request::Body::Welcome(w)) => {
            return Err(WorkerError::Protocol(format!(
                "front speaks protocol {}, this worker {PROTOCOL_VERSION}",
                w.protocol_version
            )));
        }
        Some(other) => return Err(WorkerError::Protocol(format!("expected Welcome, got {other:?}"))),
    }

    let outstanding = Outstanding::default();
    let (jobs, job_rx) = mpsc::channel::<(RunTask, Bytes, CancelFlag)>();
    let runner = Runner { catalog, writer: Arc::clone(&writer), outstanding: Arc::clone(&outstanding) };
    {
        let runner = runner.clone();
        std::thread::Builder::new().name("offload-task".into()).spawn(move || {
            let mut outbox = Outbox::default();
            for (run, input, cancel) in job_rx {
                if runner.answer(&mut outbox, run, input, cancel).and_then(|()| outbox.flush(&runner.writer)).is_err() {
                    // The front is gone.
                    std::process::exit(i32::from(EXIT_CLEAN));
                }
            }
        })?;
    }

    let mut outbox = Outbox::default();
    loop {
        if reader.buffer().is_empty() {
            // About to wait for the front: what it waits for goes out first.
            outbox.flush(&writer)?;
        }
        let (request, payload) = match framing::read_frame(&mut reader, &mut buf, max_frame)? {
            None => return Ok(EXIT_CLEAN),
            Some(frame) => framing::decode_request(frame)?,
        };
        match request {
            worker_request::Body::Run(run) => {
                let cancel = CancelFlag::new();
                let idle = {
                    let mut queue = outstanding.lock().unwrap_or_else(|e| e.into_inner());
                    if queue.len() >= framing::MAX_OUTSTANDING {
                        return Err(WorkerError::Protocol(format!(
                            "task {} sent while {} tasks are outstanding",
                            run.id,
                            queue.len()
                        )));
                    }
                    queue.push_back((run.id, cancel.clone()));
                    queue.len() == 1
                };
                if run.inline && idle {
                    // Tiny, and nothing ahead of it: running it here costs
                    // less than waking the task thread.
                    runner.answer(&mut outbox, run, payload, cancel)?;
                    continue;
                }
                // Answers keep the order of the requests: ours go out before
                // the task thread's.
                outbox.flush(&writer)?;
                if jobs.send((run, payload, cancel)).is_err() {
                    return Err(WorkerError::Io(io::Error::other("the task thread is gone")));
                }
            }
            worker_request::Body::Cancel(c) => {
                let queue = outstanding.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((_, flag)) = queue.iter().find(|(id, _)| *id == c.id) {
                    flag.cancel();
                }
            }
            worker_request::Body::Ping(p) => {
                outbox.push(&writer, &reply(worker_reply::Body::Pong(Pong { seq: p.seq })), &[])?;
            }
            worker_request::Body::Welcome(_) => return Err(WorkerError::Protocol("second Welcome".into())),
        }
    }
}

fn next_request(
    reader: &mut impl Read,
    buf: &mut BytesMut,
    max_frame: usize,
) -> Result<Option<worker_request::Body>, WorkerError> {
    match framing::read_frame(reader, buf, max_frame)? {
        None => Ok(None),
        Some(frame) => Ok(Some(framing::decode_request(frame)?.0)),
    }
}

/// What runs tasks: shared by the task thread and, for tiny tasks, the reader.
#[derive(Clone)]
struct Runner {
    catalog: Catalog,
    writer: Writer,
    outstanding: Outstanding,
}

impl Runner {
    /// Runs the oldest outstanding task and puts its answer in `outbox`.
    /// After a task ran out of memory or panicked the answer goes out at
    /// once and the process exits: whatever failed to allocate may have left
    /// the heap fragmented or a library half-initialised, and a panic may
    /// have left the task's own state (a cache, a lock) half-changed.
    fn answer(&self, outbox: &mut Outbox, run: RunTask, input: Bytes, cancel: CancelFlag) -> io::Result<()> {
        let (done, output) = self.complete(run, input, cancel);
        let exit = match FailureKind::try_from(done.failure) {
            Ok(FailureKind::OutOfMemory) => Some(EXIT_OUT_OF_MEMORY),
            Ok(FailureKind::Panicked) => Some(EXIT_PANICKED),
            _ => None,
        };
        outbox.push(&self.writer, &reply(worker_reply::Body::Done(done)), &output)?;
        if let Some(code) = exit {
            outbox.flush(&self.writer)?;
            std::process::exit(i32::from(code));
        }
        Ok(())
    }

    /// Runs the oldest outstanding task to its end (a task cancelled or past
    /// its deadline while queued ends at once) and returns its TaskDone and
    /// output.
    fn complete(&self, run: RunTask, input: Bytes, cancel: CancelFlag) -> (TaskDone, Bytes) {
        let id = run.id;
        let span = TaskSpan::start(&run.task, &run.traceparent);
        let started = Instant::now();
        let result = self.run_one(run, input, cancel);
        let run_us = started.elapsed().as_micros() as u64;
        self.outstanding.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
        let span = span.map(|span| span.end(result.as_ref().err().map(ToString::to_string)));
        match result {
            Ok(output) => (TaskDone { id, failure: 0, message: String::new(), run_us, span }, output),
            Err(err) => {
                let (kind, message) = failure(&err);
                (TaskDone { id, failure: kind as i32, message, run_us, span }, Bytes::new())
            }
        }
    }

    fn run_one(&self, run: RunTask, input: Bytes, cancel: CancelFlag) -> Result<Bytes, TaskError> {
        let task = self.catalog.get(&run.task).map_err(|e| TaskError::Failed(format!("worker: {e}")))?;
        let job = Catalog::prepare(task.as_ref(), &run.params)?;
        let deadline = (run.deadline_unix_nanos > 0).then(|| to_instant(run.deadline_unix_nanos));
        let ctx = Context::new(deadline, cancel, Some(progress_sink(run.id, Arc::clone(&self.writer))));
        run_job(job.as_ref(), &ctx, input)
    }
}

/// Converts an absolute wall-clock deadline to this process's monotonic clock.
fn to_instant(unix_nanos: u64) -> Instant {
    let deadline = UNIX_EPOCH + Duration::from_nanos(unix_nanos);
    let now = Instant::now();
    match deadline.duration_since(SystemTime::now()) {
        Ok(left) => now + left,
        Err(_) => now,
    }
}

/// Sends progress frames, at most one per 20 ms (and always the last 1.0).
fn progress_sink(id: u64, writer: Writer) -> ProgressSink {
    let last = Mutex::new(None::<Instant>);
    Arc::new(move |fraction: f64, message: &str| {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|t| t.elapsed() >= Duration::from_millis(20));
        if !(due || fraction >= 1.0) {
            return;
        }
        *last = Some(Instant::now());
        let progress = TaskProgress { id, fraction, message: message.to_string() };
        // A failed send means the front is gone; the reader thread exits.
        let _ = send(&writer, &reply(worker_reply::Body::Progress(progress)), &[]);
    })
}

fn failure(err: &TaskError) -> (FailureKind, String) {
    let kind = match err {
        TaskError::InvalidParam(_) => FailureKind::InvalidParam,
        TaskError::InvalidInput(_) => FailureKind::InvalidInput,
        TaskError::TooLarge(_) => FailureKind::TooLarge,
        TaskError::OutOfMemory(_) => FailureKind::OutOfMemory,
        TaskError::Cancelled => FailureKind::Cancelled,
        TaskError::DeadlineExceeded { .. } => FailureKind::DeadlineExceeded,
        TaskError::Panicked(_) => FailureKind::Panicked,
        TaskError::Failed(_) => FailureKind::Failed,
        TaskError::ProgramFailed(_) => FailureKind::ProgramFailed,
    };
    let message = match err {
        TaskError::Panicked(m) => m.clone(),
        other => other.to_string(),
    };
    (kind, message)
}

/// The task error a TaskDone's failure stands for, on the front's side.
pub fn task_error(kind: FailureKind, message: String, run: Duration) -> TaskError {
    match kind {
        FailureKind::InvalidParam => TaskError::InvalidParam(message),
        FailureKind::InvalidInput => TaskError::InvalidInput(message),
        FailureKind::TooLarge => TaskError::TooLarge(message),
        FailureKind::OutOfMemory => TaskError::OutOfMemory(message),
        FailureKind::Cancelled => TaskError::Cancelled,
        FailureKind::DeadlineExceeded => TaskError::DeadlineExceeded { after: run },
        FailureKind::Panicked => TaskError::Panicked(message),
        FailureKind::ProgramFailed => TaskError::ProgramFailed(message),
        FailureKind::Failed | FailureKind::Unspecified | FailureKind::UnknownTask => TaskError::Failed(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use offload_proto::offload::worker::v1::{Cancel, Welcome, WorkerRequest};
    use prost::Message as _;

    fn start() -> (UnixStream, std::thread::JoinHandle<Result<u8, WorkerError>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let catalog = Catalog::builtin(&CatalogOptions { debug_tasks: true, ..Default::default() });
        let worker = std::thread::spawn(move || serve(theirs, catalog, 1 << 20));
        (ours, worker)
    }

    fn read_reply(stream: &mut UnixStream) -> WorkerReply {
        let frame = framing::read_frame(stream, &mut BytesMut::new(), 1 << 20).unwrap().expect("a frame");
        WorkerReply::decode(frame).unwrap()
    }

    fn write_request(stream: &mut UnixStream, body: worker_request::Body, payload: &[u8]) {
        let request = WorkerRequest { body: Some(body), payload: Bytes::new() };
        stream.write_all(&framing::frame_head(&request, payload.len())).unwrap();
        stream.write_all(payload).unwrap();
    }

    fn welcome(version: u32) -> worker_request::Body {
        worker_request::Body::Welcome(Welcome { protocol_version: version })
    }

    #[test]
    fn says_hello_runs_a_task_and_exits_cleanly_at_end_of_stream() {
        let (mut front, worker) = start();
        let Some(worker_reply::Body::Hello(hello)) = read_reply(&mut front).body else { panic!("expected Hello") };
        assert_eq!((hello.protocol_version, hello.pid), (PROTOCOL_VERSION, std::process::id()));
        assert!(hello.tasks.iter().any(|t| t == "debug.echo"));
        write_request(&mut front, welcome(PROTOCOL_VERSION), &[]);
        let run = RunTask { id: 5, task: "debug.echo".into(), ..Default::default() };
        write_request(&mut front, worker_request::Body::Run(run), b"payload");
        let reply = read_reply(&mut front);
        let Some(worker_reply::Body::Done(done)) = reply.body else { panic!("expected Done") };
        assert_eq!((done.id, done.failure), (5, 0));
        assert_eq!(reply.payload.as_ref(), b"payload");
        drop(front);
        assert_eq!(worker.join().unwrap().unwrap(), EXIT_CLEAN);
    }

    fn run(id: u64, task: &str, params: &[(&str, &str)], inline: bool) -> worker_request::Body {
        let params = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        worker_request::Body::Run(RunTask { id, task: task.into(), params, inline, ..Default::default() })
    }

    fn done(reply: &WorkerReply) -> (u64, i32) {
        match &reply.body {
            Some(worker_reply::Body::Done(done)) => (done.id, done.failure),
            other => panic!("expected Done, got {other:?}"),
        }
    }

    #[test]
    fn pipelined_tasks_run_in_order_and_a_queued_one_can_be_cancelled() {
        let (mut front, worker) = start();
        read_reply(&mut front);
        write_request(&mut front, welcome(PROTOCOL_VERSION), &[]);
        // Sent together: a slow task on the task thread, then tiny ones that
        // must wait behind it, then one cancelled before it starts.
        write_request(&mut front, run(1, "debug.sleep", &[("ms", "200")], false), &[]);
        write_request(&mut front, run(2, "debug.echo", &[], true), b"two");
        write_request(&mut front, run(3, "debug.echo", &[], true), b"three");
        write_request(&mut front, run(4, "debug.sleep", &[("ms", "5000")], false), &[]);
        write_request(&mut front, worker_request::Body::Cancel(Cancel { id: 4 }), &[]);
        write_request(&mut front, run(5, "debug.echo", &[], true), b"five");
        let replies: Vec<WorkerReply> = (0..5).map(|_| read_reply(&mut front)).collect();
        let ids: Vec<(u64, i32)> = replies.iter().map(done).collect();
        let cancelled = FailureKind::Cancelled as i32;
        assert_eq!(ids, [(1, 0), (2, 0), (3, 0), (4, cancelled), (5, 0)]);
        assert_eq!(replies[2].payload.as_ref(), b"three");
        assert_eq!(replies[4].payload.as_ref(), b"five");
        drop(front);
        assert_eq!(worker.join().unwrap().unwrap(), EXIT_CLEAN);
    }

    #[test]
    fn more_outstanding_tasks_than_the_protocol_allows_is_a_protocol_error() {
        let (mut front, worker) = start();
        read_reply(&mut front);
        write_request(&mut front, welcome(PROTOCOL_VERSION), &[]);
        for id in 0..=framing::MAX_OUTSTANDING as u64 {
            write_request(&mut front, run(id, "debug.sleep", &[("ms", "5000")], false), &[]);
        }
        let err = worker.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("tasks are outstanding"), "{err}");
    }

    #[test]
    fn refuses_a_front_of_another_protocol_version() {
        let (mut front, worker) = start();
        read_reply(&mut front);
        write_request(&mut front, welcome(PROTOCOL_VERSION + 1), &[]);
        let err = worker.join().unwrap().unwrap_err();
        let expected = format!("front speaks protocol {}, this worker {PROTOCOL_VERSION}", PROTOCOL_VERSION + 1);
        assert!(err.to_string().contains(&expected), "{err}");
    }

    #[test]
    fn exits_on_a_malformed_frame_instead_of_guessing() {
        let (mut front, worker) = start();
        read_reply(&mut front);
        write_request(&mut front, welcome(PROTOCOL_VERSION), &[]);
        front.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).unwrap();
        assert!(matches!(worker.join().unwrap(), Err(WorkerError::Protocol(_))));

        let (mut front, worker) = start();
        read_reply(&mut front);
        write_request(&mut front, welcome(PROTOCOL_VERSION), &[]);
        front.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let err = worker.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }
}
