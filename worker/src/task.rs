//! The task abstraction: a [`Task`] is a named, described entry of the
//! catalog; given a request's parameters it prepares a [`Job`], which runs on
//! whichever executor the request was sent to.
//!
//! # Writing a task
//!
//! A task is a [`TaskSpec`] (name, description, modes, parameters, all shown
//! by ListTasks), a [`Task::prepare`] that turns a request's parameters into
//! a [`Job`], and the job's [`Job::run`]. The server has already refused
//! unknown and missing parameters when `prepare` is called; `prepare` checks
//! their values. `run` gets the input and a [`Context`]: it calls
//! [`Context::check`] often enough to stop within 50 ms of a cancellation or
//! of its deadline, and may report progress (streamed to ExecuteStream
//! callers). An `Err` is the call's status: [`TaskError`] says which.
//!
//! ```
//! use std::{collections::HashMap, time::Duration};
//!
//! use bytes::Bytes;
//! use offload_worker::{
//!     CancelFlag, Catalog, Context, Job, Mode, ParamSpec, Params, Task, TaskError, TaskSpec, run_job,
//! };
//!
//! /// `text.count`: how many times a byte occurs in the input.
//! struct CountByte;
//!
//! const SPEC: TaskSpec = TaskSpec {
//!     name: "text.count",
//!     description: "counts the occurrences of `byte` in the input; output: ASCII decimal",
//!     default_mode: Mode::Pool,
//!     allowed_modes: &[Mode::Pool, Mode::Isolated],
//!     params: &[ParamSpec::optional("byte", "the byte to count, 0..=255", "10")],
//! };
//!
//! impl Task for CountByte {
//!     fn spec(&self) -> &TaskSpec {
//!         &SPEC
//!     }
//!
//!     fn prepare(&self, params: &Params<'_>) -> Result<Box<dyn Job>, TaskError> {
//!         // A value out of range is INVALID_ARGUMENT naming the parameter.
//!         Ok(Box::new(CountJob { byte: params.int("byte", 0..=255u8)? }))
//!     }
//! }
//!
//! struct CountJob {
//!     byte: u8,
//! }
//!
//! impl Job for CountJob {
//!     // About a nanosecond a byte on one core.
//!     fn estimate(&self, input_len: usize) -> Option<Duration> {
//!         Some(Duration::from_nanos(input_len as u64))
//!     }
//!
//!     fn run(&self, ctx: &Context, input: Bytes) -> Result<Bytes, TaskError> {
//!         let chunks = input.len().div_ceil(1 << 20).max(1);
//!         let mut count = 0;
//!         for (i, chunk) in input.chunks(1 << 20).enumerate() {
//!             // Cancelled, or past the deadline: the call ends here.
//!             ctx.check()?;
//!             count += chunk.iter().filter(|b| **b == self.byte).count();
//!             ctx.progress((i + 1) as f64 / chunks as f64, "counting");
//!         }
//!         Ok(Bytes::from(count.to_string()))
//!     }
//! }
//!
//! // As an executor runs it:
//! let params = HashMap::from([("byte".to_string(), "97".to_string())]);
//! let job = Catalog::prepare(&CountByte, &params)?;
//! let ctx = Context::new(None, CancelFlag::new(), None);
//! assert_eq!(run_job(job.as_ref(), &ctx, Bytes::from_static(b"banana"))?, "3");
//!
//! // A cancelled call does not run at all.
//! let cancel = CancelFlag::new();
//! cancel.cancel();
//! let ctx = Context::new(None, cancel, None);
//! assert!(matches!(run_job(job.as_ref(), &ctx, Bytes::new()), Err(TaskError::Cancelled)));
//! # Ok::<(), TaskError>(())
//! ```
//!
//! # What `estimate` is for
//!
//! The server costs every call before it runs: to refuse at once a call
//! that could not start before its deadline (RESOURCE_EXHAUSTED), to weigh
//! the queue, and to run tasks expected to take under
//! `--inline-threshold-us` (20 us) on the I/O thread instead of hopping to
//! the pool. [`Job::estimate`] is the task's guess from its parameters and
//! input size. The server scales it by a running average of measured time
//! over estimated time, per task, so an estimate that is off by a constant
//! factor is corrected after a few calls; one that grows in the wrong shape
//! (linear where the work is quadratic) stays off for unusual sizes. A task
//! without an estimate is costed at its average measured time (a millisecond
//! until measured). A wrong estimate never fails a call by itself: at worst
//! a call is refused that would have made its deadline, a tiny task hops to
//! the pool, or a long task runs on the I/O thread (slowing other calls for
//! as long as it runs), until the measurements correct it.

use std::time::Duration;

use bytes::Bytes;

use crate::{Context, Params, TaskError};

/// Where a task may run. Mirrors `offload.v1.ExecutionMode` without the
/// wire's UNSPECIFIED, which the server resolves to a task's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The front's in-process rayon pool.
    Pool,
    /// A supervised worker process.
    Isolated,
}

impl Mode {
    /// The name used in messages and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Pool => "POOL",
            Mode::Isolated => "ISOLATED",
        }
    }
}

/// One parameter a task accepts.
#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    /// Key in the request's params map.
    pub name: &'static str,
    /// Meaning and accepted values, shown by ListTasks and in errors.
    pub description: &'static str,
    /// Value used when the request leaves it out; `None` when required.
    pub default: Option<&'static str>,
}

impl ParamSpec {
    /// A parameter every request must give.
    pub const fn required(name: &'static str, description: &'static str) -> Self {
        Self { name, description, default: None }
    }

    /// A parameter with a default value.
    pub const fn optional(name: &'static str, description: &'static str, default: &'static str) -> Self {
        Self { name, description, default: Some(default) }
    }
}

/// What a task is: its name, documentation, modes and parameters.
#[derive(Debug, Clone, Copy)]
pub struct TaskSpec {
    /// Name used in requests, `family.verb`.
    pub name: &'static str,
    /// One-line description of input, output and behaviour.
    pub description: &'static str,
    /// Mode used when a request does not name one.
    pub default_mode: Mode,
    /// Modes a request may ask for; contains `default_mode`.
    pub allowed_modes: &'static [Mode],
    /// Accepted parameters; any other key is refused.
    pub params: &'static [ParamSpec],
}

/// A kind of work the service offers.
pub trait Task: Send + Sync + 'static {
    /// The task's static description.
    fn spec(&self) -> &TaskSpec;

    /// Parses and checks `params` (already checked against the spec for
    /// unknown and missing keys) and returns the job to run. Must be cheap:
    /// it runs on the async runtime, before admission.
    fn prepare(&self, params: &Params<'_>) -> Result<Box<dyn Job>, TaskError>;
}

/// One prepared unit of work.
pub trait Job: Send + 'static {
    /// What the job expects to cost on one thread, when it can tell from its
    /// parameters and input size; the server calibrates it with measurements.
    fn estimate(&self, _input_len: usize) -> Option<Duration> {
        None
    }

    /// Does the work. Long jobs call `ctx.check()` often enough to stop
    /// within 50 ms of a cancellation or their deadline.
    fn run(&self, ctx: &Context, input: Bytes) -> Result<Bytes, TaskError>;
}

/// Runs `job` the way every executor must: not at all if the call was
/// already cancelled or past its deadline, and with a panic turned into
/// [`TaskError::Panicked`] so that it fails one call, not the process.
pub fn run_job(job: &dyn Job, ctx: &Context, input: Bytes) -> Result<Bytes, TaskError> {
    ctx.check()?;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(ctx, input))) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic payload".to_string());
            Err(TaskError::Panicked(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        time::Instant,
    };

    use super::*;
    use crate::CancelFlag;

    static RAN: AtomicBool = AtomicBool::new(false);

    struct Marks;

    impl Job for Marks {
        fn run(&self, _ctx: &Context, input: Bytes) -> Result<Bytes, TaskError> {
            RAN.store(true, Ordering::SeqCst);
            Ok(input)
        }
    }

    struct Panics;

    impl Job for Panics {
        fn run(&self, _ctx: &Context, _input: Bytes) -> Result<Bytes, TaskError> {
            panic!("boom {}", 7)
        }
    }

    #[test]
    fn a_job_whose_deadline_passed_in_the_queue_never_runs() {
        let ctx = Context::new(Some(Instant::now() - Duration::from_millis(1)), CancelFlag::new(), None);
        assert!(matches!(run_job(&Marks, &ctx, Bytes::new()), Err(TaskError::DeadlineExceeded { .. })));
        let cancelled = CancelFlag::new();
        cancelled.cancel();
        let ctx = Context::new(None, cancelled, None);
        assert_eq!(run_job(&Marks, &ctx, Bytes::new()), Err(TaskError::Cancelled));
        assert!(!RAN.load(Ordering::SeqCst));
    }

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        let ctx = Context::new(None, CancelFlag::new(), None);
        assert_eq!(run_job(&Panics, &ctx, Bytes::new()), Err(TaskError::Panicked("boom 7".into())));
    }
}
