//! Offload's task side: everything that does the work, shared by the front's
//! thread pool and (in ISOLATED mode) the worker processes, so that a task is
//! written once and runs in either mode.
//!
//! Layout:
//! - [`task`]: the [`Task`] and [`Job`] traits, task specs and modes.
//! - [`params`]: typed reading of a request's text parameters.
//! - [`context`]: what a running job sees: deadline, cancel flag, progress.
//! - [`error`]: [`TaskError`], the one error type tasks return.
//! - [`catalog`]: the set of tasks a process serves, and request validation.
//! - [`tasks`]: the built-in tasks, one module per family.
//! - [`process`]: the worker process, serving the catalog over a Unix socket.
//! - [`trace`]: the spans of traced tasks, reported to the front in their answers.

#![warn(missing_docs)]

pub mod catalog;
pub mod context;
pub mod error;
pub mod params;
pub mod process;
pub mod task;
pub mod tasks;
pub mod trace;

pub use catalog::{Catalog, CatalogOptions};
pub use context::{CancelFlag, Context, ProgressSink};
pub use error::TaskError;
pub use params::Params;
pub use task::{Job, Mode, ParamSpec, Task, TaskSpec, run_job};
