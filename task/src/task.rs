//! The task abstraction: a [`Task`] is a named, described entry of the
//! catalog; given a request's parameters it prepares a [`Job`], which runs on
//! whichever executor the request was sent to.

use std::{collections::HashMap, time::Duration};

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
    /// Whether its output is a pure function of its name, version, params
    /// and input (nothing else: no clock, no randomness, no outside state),
    /// so that the front may answer a repeated call from its result cache
    /// instead of running it again.
    pub cacheable: bool,
    /// Bumped whenever the task's output for the same params and input
    /// changes, so that no cached result of an earlier version is returned.
    pub version: u32,
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

    /// For a job that cannot tell its time: a number its time grows in
    /// proportion to (rows, pixels, iterations), when its params say. The
    /// server learns the time of a unit from measured runs; without either,
    /// the input's size stands in. Either way a call is costed from its own
    /// params and input, not from what earlier calls of the task cost.
    fn cost_units(&self) -> Option<f64> {
        None
    }

    /// Does the work. Long jobs call `ctx.check()` often enough to stop
    /// within 50 ms of a cancellation or their deadline.
    fn run(&self, ctx: &Context, input: Bytes) -> Result<Bytes, TaskError>;
}

/// Checks a request's `params` against `task`'s spec (unknown and missing
/// keys) and prepares its job: what the server does before admission, and
/// what a task's own tests call to run it without a server.
pub fn prepare(task: &dyn Task, params: &HashMap<String, String>) -> Result<Box<dyn Job>, TaskError> {
    let params = Params::new(params, task.spec().params)?;
    task.prepare(&params)
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
