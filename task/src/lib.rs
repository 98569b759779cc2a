//! Offload's task SDK: what a crate needs to define tasks that Offload runs
//! in its thread pool (POOL) or in its supervised worker processes
//! (ISOLATED), and nothing else. It depends on `bytes` and `thiserror`
//! only, so a crate of tasks builds without the server's dependencies; the
//! program that serves them adds `offload-server` (see its `main`, and
//! `examples/custom-task` in the repository).
//!
//! - [`task`]: the [`Task`] and [`Job`] traits, task specs and modes.
//! - [`params`]: typed reading of a request's text parameters.
//! - [`context`]: what a running job sees: deadline, cancel flag, progress.
//! - [`error`]: [`TaskError`], the one error type tasks return.
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
//! callers). An `Err` is the call's status: each [`TaskError`] variant says
//! which gRPC code it becomes.
//!
//! ```
//! use std::{collections::HashMap, time::Duration};
//!
//! use bytes::Bytes;
//! use offload_task::{CancelFlag, Context, Job, Mode, ParamSpec, Params, Task, TaskError, TaskSpec, prepare, run_job};
//!
//! /// `text.count`: how many times a byte occurs in the input.
//! struct CountByte;
//!
//! const SPEC: TaskSpec = TaskSpec {
//!     name: "text.count",
//!     cacheable: true,
//!     version: 1,
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
//! // Tested the way the server runs it, without a server:
//! let params = HashMap::from([("byte".to_string(), "97".to_string())]);
//! let job = prepare(&CountByte, &params)?;
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
//!
//! # Panics
//!
//! A panic in [`Job::run`] fails its call with INTERNAL and the panic's
//! message. In POOL the server serves on (the panic unwinds to
//! [`run_job`]), so a program that serves tasks must not be built with
//! `panic = "abort"`. In ISOLATED the worker process answers the call and
//! then exits, since whatever the task was doing may have left its state
//! half-changed; the server starts a fresh one.

#![warn(missing_docs)]

pub mod context;
pub mod error;
pub mod params;
pub mod task;

pub use context::{CancelFlag, Context, ProgressSink};
pub use error::TaskError;
pub use params::Params;
pub use task::{Job, Mode, ParamSpec, Task, TaskSpec, prepare, run_job};
