//! Offload's task side: everything that does the work, shared by the front's
//! thread pool and (in ISOLATED mode) the worker processes, so that a task is
//! written once and runs in either mode. The task interface itself is the
//! `offload-task` crate (the SDK), re-exported here.
//!
//! Layout:
//! - [`allowances`]: what the sandbox lets a worker use (config of `[[exec]]` and programs).
//! - [`catalog`]: the set of tasks a process serves ([`TaskSet`]: Offload's
//!   own and a program's), and request validation.
//! - [`tasks`]: the built-in tasks, one module per family.
//! - [`process`]: the worker process, serving the catalog over a Unix socket.
//! - [`trace`]: the spans of traced tasks, reported to the front in their answers.

#![warn(missing_docs)]

pub mod allowances;
pub mod catalog;
pub mod process;
pub mod tasks;
pub mod trace;

pub use allowances::Allowances;
pub use catalog::{Catalog, CatalogOptions, TaskSet};
pub use offload_task::{
    CancelFlag, Context, Job, Mode, ParamSpec, Params, ProgressSink, Task, TaskError, TaskSpec, prepare, run_job,
};
