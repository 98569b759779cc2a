//! Why a call failed, and the one place where that becomes a gRPC status.
//! Messages say what was wrong and what is accepted; internal failures are
//! logged in full but reach the client only as a short INTERNAL.

use std::time::Duration;

use offload_proto::google::rpc;
use offload_worker::{TaskError, catalog::LookupError};
use tonic::{Code, Status};

/// A call that did not produce an output.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The request names no task of the catalog.
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// The request's mode is not a value of ExecutionMode.
    #[error("mode {0} is not a defined ExecutionMode; use 0 (the task's default), 1 (POOL) or 2 (ISOLATED)")]
    UndefinedMode(i32),
    /// The task does not run in the requested mode.
    #[error("task {task} does not run in mode {mode}; allowed: {allowed}")]
    ModeNotAllowed {
        /// The task asked for.
        task: &'static str,
        /// The mode asked for.
        mode: &'static str,
        /// The modes the task allows.
        allowed: String,
    },
    /// The executor cannot take calls (no worker process can be started).
    #[error("{0}")]
    Unavailable(String),
    /// The worker process running the task died.
    #[error("worker {pid} {cause} while running {task}")]
    WorkerDied {
        /// The worker's pid.
        pid: u32,
        /// The task.
        task: &'static str,
        /// Why it died, classified.
        cause: String,
    },
    /// The worker process running the task ran out of its memory limit.
    #[error(
        "worker {pid} exceeded its memory limit while running {task} (--worker-memory-limit-bytes, or a worker \
         program's memory_limit_bytes); it was replaced"
    )]
    WorkerOutOfMemory {
        /// The worker's pid.
        pid: u32,
        /// The task.
        task: &'static str,
    },
    /// The task refused or failed.
    #[error("{task}: {source}")]
    Task {
        /// The task's name.
        task: &'static str,
        /// What the task reported.
        source: TaskError,
    },
    /// The executor's queue is full.
    #[error("{mode} queue is full ({capacity} calls waiting); retry later")]
    QueueFull {
        /// Which executor, by mode name.
        mode: &'static str,
        /// Its queue's capacity.
        capacity: usize,
    },
    /// The call could not start before its deadline.
    #[error(
        "{task} would wait about {} ms for a free {executor} but its deadline is in {} ms",
        wait.as_millis(),
        remaining.as_millis()
    )]
    WouldMissDeadline {
        /// The task's name.
        task: &'static str,
        /// Which executor.
        executor: &'static str,
        /// The expected wait.
        wait: Duration,
        /// Time left before the call's deadline.
        remaining: Duration,
    },
    /// The deadline passed while the call was queued or running.
    #[error("{task}: deadline exceeded while {stage}")]
    DeadlineExceeded {
        /// The task's name.
        task: &'static str,
        /// "queued" or "running".
        stage: &'static str,
    },
    /// The output is larger than a response may be.
    #[error("{task}: output of {size} bytes exceeds the max message size of {limit} bytes")]
    OutputTooLarge {
        /// The task's name.
        task: &'static str,
        /// The output's size.
        size: usize,
        /// The configured max message size.
        limit: usize,
    },
    /// The server is shutting down.
    #[error("server is draining and takes no new calls; retry on another replica")]
    Draining,
    /// The client already has its `max_in_flight` calls in flight.
    #[error("client {client:?} already has {limit} calls in flight, its max_in_flight; retry when one ends")]
    ClientLimit {
        /// The client's name.
        client: String,
        /// Its configured limit.
        limit: usize,
    },
    /// The call presented no credential, or one that names no client.
    #[error("{0}")]
    Unauthenticated(String),
    /// The authenticated client may not run this task.
    #[error("client {client:?} may not run task {task:?} (its tasks: {allowed})")]
    PermissionDenied {
        /// The client's name.
        client: String,
        /// The task asked for.
        task: String,
        /// Its `tasks` patterns.
        allowed: String,
    },
    /// A scheduling metadata value is malformed.
    #[error("metadata {key}: {detail}")]
    BadMetadata {
        /// The metadata key.
        key: &'static str,
        /// What is wrong with its value.
        detail: String,
    },
    /// A bug or lost executor; details are in the log.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CallError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            CallError::Lookup(LookupError::EmptyName) => Code::InvalidArgument,
            CallError::Lookup(LookupError::Unknown { .. }) => Code::NotFound,
            CallError::UndefinedMode(_) | CallError::ModeNotAllowed { .. } | CallError::BadMetadata { .. } => {
                Code::InvalidArgument
            }
            CallError::Unavailable(_) => Code::Unavailable,
            CallError::WorkerDied { .. } => Code::Internal,
            CallError::WorkerOutOfMemory { .. } => Code::ResourceExhausted,
            CallError::Task { source, .. } => match source {
                TaskError::InvalidParam(_) | TaskError::InvalidInput(_) => Code::InvalidArgument,
                TaskError::TooLarge(_) | TaskError::OutOfMemory(_) => Code::ResourceExhausted,
                TaskError::Cancelled => Code::Cancelled,
                TaskError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
                TaskError::ProgramFailed(_) => Code::FailedPrecondition,
                TaskError::Panicked(_) | TaskError::Failed(_) => Code::Internal,
            },
            CallError::QueueFull { .. }
            | CallError::WouldMissDeadline { .. }
            | CallError::OutputTooLarge { .. }
            | CallError::ClientLimit { .. } => Code::ResourceExhausted,
            CallError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            CallError::Draining => Code::Unavailable,
            CallError::Unauthenticated(_) => Code::Unauthenticated,
            CallError::PermissionDenied { .. } => Code::PermissionDenied,
            CallError::Internal(_) => Code::Internal,
        }
    }

    /// The reason label of a call refused before running, if it was one.
    pub fn rejection(&self) -> Option<&'static str> {
        match self {
            CallError::QueueFull { .. } => Some("queue_full"),
            CallError::ClientLimit { .. } => Some("client_limit"),
            CallError::WouldMissDeadline { .. } => Some("deadline"),
            CallError::Draining => Some("draining"),
            CallError::Unavailable(_) => Some("no_worker"),
            CallError::Unauthenticated(_) => Some("unauthenticated"),
            CallError::PermissionDenied { .. } => Some("permission_denied"),
            _ => None,
        }
    }
}

impl From<CallError> for Status {
    fn from(err: CallError) -> Self {
        let code = err.code();
        if code == Code::Internal {
            tracing::error!(error = %err, "call failed with an internal error");
        }
        Status::new(code, err.to_string())
    }
}

impl From<CallError> for rpc::Status {
    fn from(err: CallError) -> Self {
        let status = Status::from(err);
        rpc::Status { code: status.code() as i32, message: status.message().to_string(), details: Vec::new() }
    }
}

impl From<crate::jobs::store::StoreError> for Status {
    fn from(err: crate::jobs::store::StoreError) -> Self {
        tracing::warn!(error = %err, "job store failed");
        Status::unavailable(err.to_string())
    }
}

/// A status tonic produced while decoding a request, as the API promises
/// it: tonic answers an oversized message with OUT_OF_RANGE, the API with
/// RESOURCE_EXHAUSTED (the server itself never uses OUT_OF_RANGE).
pub fn request_status(status: Status, max_message_bytes: usize) -> Status {
    if status.code() == Code::OutOfRange {
        Status::resource_exhausted(format!(
            "request exceeds the max message size of {max_message_bytes} bytes ({})",
            status.message()
        ))
    } else {
        status
    }
}
