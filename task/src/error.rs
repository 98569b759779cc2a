//! The error a task (or the server, while validating a request) returns.
//! Each variant names its class of failure, so that both executors map it to
//! the same gRPC status in one place on the server; each says which.

use std::time::Duration;

/// Why a task did not produce an output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// A parameter is missing, unknown, or has a bad value: INVALID_ARGUMENT.
    #[error("{0}")]
    InvalidParam(String),
    /// The input bytes are not what the task accepts: INVALID_ARGUMENT.
    #[error("{0}")]
    InvalidInput(String),
    /// The task would need more than a configured limit allows:
    /// RESOURCE_EXHAUSTED.
    #[error("{0}")]
    TooLarge(String),
    /// The task could not allocate the memory it needed: RESOURCE_EXHAUSTED
    /// (in ISOLATED the worker then exits and is replaced).
    #[error("{0}")]
    OutOfMemory(String),
    /// The call was cancelled (client went away, or the server stopped it):
    /// CANCELLED. Returned by [`Context::check`](crate::Context::check).
    #[error("cancelled")]
    Cancelled,
    /// The call's deadline passed; `after` is how long the job had run:
    /// DEADLINE_EXCEEDED. Returned by [`Context::check`](crate::Context::check).
    #[error("deadline exceeded after running {after:?}")]
    DeadlineExceeded {
        /// Time spent running before the task noticed the deadline.
        after: Duration,
    },
    /// The task panicked; the message is the panic's payload: INTERNAL.
    /// Made by [`run_job`](crate::run_job), not by tasks.
    #[error("task panicked: {0}")]
    Panicked(String),
    /// An external program exited non-zero or was killed:
    /// FAILED_PRECONDITION.
    #[error("{0}")]
    ProgramFailed(String),
    /// Any other failure inside the task: INTERNAL.
    #[error("{0}")]
    Failed(String),
}
