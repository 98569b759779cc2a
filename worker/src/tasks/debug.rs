//! The `debug.*` tasks, listed only when the server runs with
//! `--debug-tasks`: they let tests and benchmarks produce slow, busy,
//! panicking, memory-hungry or crashing work on demand.

use std::{
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::BOTH_MODES;
use crate::{Context, Job, Mode, ParamSpec, Params, Task, TaskError, TaskSpec};

/// Longest sleep or spin accepted, in milliseconds (one hour).
const MAX_MS: u64 = 3_600_000;
/// Largest allocation `debug.alloc` accepts (1 TiB).
const MAX_ALLOC: u64 = 1 << 40;

/// Adds the debug tasks to `out`.
pub fn register(out: &mut Vec<Arc<dyn Task>>) {
    for kind in [Kind::Echo, Kind::Sleep, Kind::Spin, Kind::Panic, Kind::Alloc, Kind::Abort, Kind::Probe] {
        out.push(Arc::new(DebugTask(kind)));
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Echo,
    Sleep,
    Spin,
    Panic,
    Alloc,
    Abort,
    Probe,
}

/// The front's gRPC port, which `debug.probe connect` tries to reach.
static FRONT_PORT: AtomicU16 = AtomicU16::new(0);

/// Tells `debug.probe` the front's gRPC port (the front once it listens;
/// a worker from its settings).
pub fn set_front_port(port: u16) {
    FRONT_PORT.store(port, Ordering::Relaxed);
}

const MS: ParamSpec = ParamSpec::required("ms", "milliseconds, 0..=3600000");

const SPECS: [TaskSpec; 7] = [
    TaskSpec {
        name: "debug.echo",
        cacheable: false,
        version: 1,
        description: "returns its input unchanged",
        default_mode: Mode::Pool,
        allowed_modes: BOTH_MODES,
        params: &[],
    },
    TaskSpec {
        name: "debug.sleep",
        cacheable: false,
        version: 1,
        description: "holds its executor slot for ms milliseconds without using CPU; wakes at once on cancellation",
        default_mode: Mode::Pool,
        allowed_modes: BOTH_MODES,
        params: &[MS],
    },
    TaskSpec {
        name: "debug.spin",
        cacheable: false,
        version: 1,
        description: "keeps one core busy for ms milliseconds, reporting progress; stops within 10 ms of cancellation",
        default_mode: Mode::Pool,
        allowed_modes: BOTH_MODES,
        params: &[MS],
    },
    TaskSpec {
        name: "debug.panic",
        cacheable: false,
        version: 1,
        description: "panics; the call fails with INTERNAL (in ISOLATED its worker then exits and is replaced)",
        default_mode: Mode::Pool,
        allowed_modes: BOTH_MODES,
        params: &[],
    },
    TaskSpec {
        name: "debug.alloc",
        cacheable: false,
        version: 1,
        description: "allocates and touches `bytes` bytes; output is the count in ASCII decimal",
        default_mode: Mode::Pool,
        allowed_modes: BOTH_MODES,
        params: &[ParamSpec::required("bytes", "bytes to allocate, 0..=1099511627776")],
    },
    TaskSpec {
        name: "debug.abort",
        cacheable: false,
        version: 1,
        description: "kills its worker process (abort or segmentation fault); ISOLATED only",
        default_mode: Mode::Isolated,
        allowed_modes: &[Mode::Isolated],
        params: &[ParamSpec::optional("kind", "how to die: abort|segv", "abort")],
    },
    TaskSpec {
        name: "debug.probe",
        cacheable: false,
        version: 1,
        description: "tries something a sandboxed worker may not do; output `allowed` or `denied: <error>`",
        default_mode: Mode::Isolated,
        allowed_modes: BOTH_MODES,
        params: &[ParamSpec::required(
            "what",
            "connect (TCP to the front's gRPC port on 127.0.0.1), write (a file in /tmp), read (/etc/passwd) or exec (/bin/true)",
        )],
    },
];

struct DebugTask(Kind);

impl Task for DebugTask {
    fn spec(&self) -> &TaskSpec {
        &SPECS[self.0 as usize]
    }

    fn prepare(&self, params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
        Ok(match self.0 {
            Kind::Echo => Box::new(Echo),
            Kind::Sleep => Box::new(Sleep(Duration::from_millis(params.int("ms", 0..=MAX_MS)?))),
            Kind::Spin => Box::new(Spin(Duration::from_millis(params.int("ms", 0..=MAX_MS)?))),
            Kind::Panic => Box::new(Panic),
            Kind::Alloc => Box::new(Alloc(params.int("bytes", 0..=MAX_ALLOC)?)),
            Kind::Abort => Box::new(Abort { segv: params.choice("kind", &["abort", "segv"])? == "segv" }),
            Kind::Probe => Box::new(Probe(params.choice("what", &["connect", "write", "read", "exec"])?)),
        })
    }
}

struct Probe(&'static str);

impl Job for Probe {
    fn estimate(&self, _input_len: usize) -> Option<Duration> {
        Some(Duration::from_millis(1))
    }

    fn run(&self, _ctx: &Context, _input: Bytes) -> Result<Bytes, TaskError> {
        let tried: std::io::Result<()> =
            match self.0 {
                "connect" => {
                    let front = std::net::SocketAddr::from(([127, 0, 0, 1], FRONT_PORT.load(Ordering::Relaxed)));
                    std::net::TcpStream::connect_timeout(&front, Duration::from_secs(2)).map(drop)
                }
                "write" => {
                    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    let path = format!("/tmp/offload-probe-{}-{}", std::process::id(), nanos.as_nanos());
                    std::fs::File::create_new(&path).and_then(|_| std::fs::remove_file(&path))
                }
                "read" => std::fs::read("/etc/passwd").map(drop),
                _ => std::process::Command::new("/bin/true").stdin(std::process::Stdio::null()).status().and_then(
                    |status| match status.success() {
                        true => Ok(()),
                        false => Err(std::io::Error::other(format!("/bin/true ended with {status}"))),
                    },
                ),
            };
        Ok(Bytes::from(match tried {
            Ok(()) => "allowed".to_string(),
            Err(err) => format!("denied: {err}"),
        }))
    }
}

struct Echo;

impl Job for Echo {
    fn estimate(&self, _input_len: usize) -> Option<Duration> {
        Some(Duration::from_nanos(100))
    }

    fn run(&self, _ctx: &Context, input: Bytes) -> Result<Bytes, TaskError> {
        Ok(input)
    }
}

struct Sleep(Duration);

impl Job for Sleep {
    fn estimate(&self, _input_len: usize) -> Option<Duration> {
        Some(self.0)
    }

    fn run(&self, ctx: &Context, _input: Bytes) -> Result<Bytes, TaskError> {
        ctx.sleep(self.0)?;
        Ok(Bytes::new())
    }
}

struct Spin(Duration);

impl Job for Spin {
    fn estimate(&self, _input_len: usize) -> Option<Duration> {
        Some(self.0)
    }

    fn run(&self, ctx: &Context, _input: Bytes) -> Result<Bytes, TaskError> {
        let start = Instant::now();
        let mut x = 0u64;
        loop {
            let elapsed = start.elapsed();
            if elapsed >= self.0 {
                break;
            }
            ctx.check()?;
            ctx.progress(elapsed.as_secs_f64() / self.0.as_secs_f64().max(1e-9), "spinning");
            // About a millisecond of arithmetic between checks.
            let slice_end = Instant::now() + Duration::from_millis(1).min(self.0 - elapsed);
            while Instant::now() < slice_end {
                for i in 0..1000u64 {
                    x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
                }
            }
        }
        ctx.progress(1.0, "done");
        Ok(Bytes::new())
    }
}

struct Panic;

impl Job for Panic {
    fn run(&self, _ctx: &Context, _input: Bytes) -> Result<Bytes, TaskError> {
        panic!("debug.panic was asked to panic");
    }
}

struct Alloc(u64);

impl Job for Alloc {
    fn estimate(&self, _input_len: usize) -> Option<Duration> {
        // Touching fresh pages costs about 0.5 ns per byte.
        Some(Duration::from_nanos(self.0 / 2 + 1_000))
    }

    fn run(&self, ctx: &Context, _input: Bytes) -> Result<Bytes, TaskError> {
        let len =
            usize::try_from(self.0).map_err(|_| TaskError::TooLarge("allocation exceeds the address space".into()))?;
        let mut block: Vec<u8> = Vec::new();
        block
            .try_reserve_exact(len)
            .map_err(|e| TaskError::OutOfMemory(format!("could not allocate {len} bytes: {e}")))?;
        // Touch every page so the memory is really resident.
        let mut touched = 0;
        while touched < len {
            ctx.check()?;
            let step = (len - touched).min(super::CHUNK);
            block.resize(touched + step, 0xA5);
            touched += step;
        }
        black_box(&block);
        Ok(Bytes::from(len.to_string()))
    }
}

struct Abort {
    segv: bool,
}

impl Job for Abort {
    fn run(&self, _ctx: &Context, _input: Bytes) -> Result<Bytes, TaskError> {
        if self.segv {
            // Raising the signal kills the process the way a wild pointer
            // would, without undefined behaviour in our own code. The Rust
            // runtime's handler (for stack overflows) swallows the first
            // one and restores the default action, so the second one kills.
            for _ in 0..2 {
                nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV)
                    .map_err(|e| TaskError::Failed(format!("could not raise SIGSEGV: {e}")))?;
            }
            Err(TaskError::Failed("SIGSEGV did not end the process".into()))
        } else {
            std::process::abort()
        }
    }
}
