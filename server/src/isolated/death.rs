//! Why a worker process ended, classified so that the reason reaches the
//! caller's status, the log and a counter: "exit 9" with no cause is a bug.

use std::{
    fmt,
    os::unix::process::ExitStatusExt,
    process::ExitStatus,
    sync::atomic::{AtomicU64, Ordering},
};

use nix::sys::signal::Signal;

/// Which rung of the stop ladder ended a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rung {
    /// The task saw its cancel flag and returned.
    CancelFrame,
    /// SIGTERM to the worker's process group.
    Terminate,
    /// SIGKILL to the worker's process group.
    Kill,
}

impl fmt::Display for Rung {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rung::CancelFrame => "the cancel frame",
            Rung::Terminate => "SIGTERM",
            Rung::Kill => "SIGKILL",
        })
    }
}

/// Why the front stopped a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Its deadline passed.
    Deadline,
    /// Its caller went away.
    Cancelled,
}

/// Why a worker process is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeathCause {
    /// It exited by itself with this status.
    Exited(i32),
    /// A signal nobody here sent killed it.
    Signaled(Signal),
    /// It ran out of its memory limit.
    MemoryLimit,
    /// Its task panicked; it answered the call and exited, not to be reused.
    Panicked,
    /// The front killed it to stop a task that did not stop.
    StopKilled(StopReason, Rung),
    /// It stopped answering heartbeats and was killed.
    Unresponsive,
    /// It broke the protocol and was killed.
    Protocol(String),
    /// It was retired after enough tasks or memory growth.
    Recycled,
}

impl DeathCause {
    /// Classifies an exit the front did not cause, using the worker's last
    /// stderr lines to recognise an allocation failure (Rust's allocator
    /// says so before it aborts).
    ///
    /// An exit status is the program's own: a task may call `exit(3)` for
    /// reasons of its own. The statuses the protocol gives a meaning (3 out
    /// of memory, 5 panicked) are read that way only after a TaskDone said
    /// so (see `WorkerProcess::finished`), never from the status alone.
    pub fn from_status(status: ExitStatus, stderr_tail: &str) -> Self {
        if let Some(sig) = status.signal() {
            let signal = Signal::try_from(sig).unwrap_or(Signal::SIGKILL);
            if signal == Signal::SIGABRT && stderr_tail.contains("memory allocation of") {
                return DeathCause::MemoryLimit;
            }
            return DeathCause::Signaled(signal);
        }
        DeathCause::Exited(status.code().unwrap_or(-1))
    }

    /// The counter label: crash, memory, panic, deadline_kill, cancel_kill,
    /// unresponsive, protocol or recycle.
    pub fn label(&self) -> &'static str {
        match self {
            DeathCause::Exited(_) | DeathCause::Signaled(_) => "crash",
            DeathCause::MemoryLimit => "memory",
            DeathCause::Panicked => "panic",
            DeathCause::StopKilled(StopReason::Deadline, _) => "deadline_kill",
            DeathCause::StopKilled(StopReason::Cancelled, _) => "cancel_kill",
            DeathCause::Unresponsive => "unresponsive",
            DeathCause::Protocol(_) => "protocol",
            DeathCause::Recycled => "recycle",
        }
    }
}

impl fmt::Display for DeathCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeathCause::Exited(code) => write!(f, "exited with status {code}"),
            DeathCause::Signaled(signal) => write!(f, "died with {}", signal.as_str()),
            DeathCause::MemoryLimit => f.write_str("exceeded its memory limit"),
            DeathCause::Panicked => f.write_str("exited after its task panicked"),
            DeathCause::StopKilled(StopReason::Deadline, rung) => {
                write!(f, "was killed with {rung} after its task ignored the deadline")
            }
            DeathCause::StopKilled(StopReason::Cancelled, rung) => {
                write!(f, "was killed with {rung} after its task ignored the cancellation")
            }
            DeathCause::Unresponsive => f.write_str("stopped answering heartbeats and was killed"),
            DeathCause::Protocol(detail) => write!(f, "broke the worker protocol ({detail}) and was killed"),
            DeathCause::Recycled => f.write_str("was recycled"),
        }
    }
}

/// Worker deaths by counter label, since start.
#[derive(Debug, Default)]
pub struct DeathCounters {
    counts: [AtomicU64; LABELS.len()],
}

const LABELS: [&str; 8] =
    ["crash", "memory", "panic", "deadline_kill", "cancel_kill", "unresponsive", "protocol", "recycle"];

impl DeathCounters {
    /// Counts one death.
    pub fn record(&self, cause: &DeathCause) {
        let i = LABELS.iter().position(|l| *l == cause.label()).expect("every label is listed");
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// (label, count) for every label.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        LABELS.iter().zip(&self.counts).map(|(l, c)| (*l, c.load(Ordering::Relaxed))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exit_gets_a_cause() {
        let signaled = ExitStatus::from_raw(Signal::SIGSEGV as i32);
        assert_eq!(DeathCause::from_status(signaled, ""), DeathCause::Signaled(Signal::SIGSEGV));
        assert_eq!(DeathCause::from_status(signaled, "").to_string(), "died with SIGSEGV");
        let abort = ExitStatus::from_raw(Signal::SIGABRT as i32);
        assert_eq!(
            DeathCause::from_status(abort, "memory allocation of 1073741824 bytes failed"),
            DeathCause::MemoryLimit
        );
        // The statuses the protocol names mean nothing by themselves.
        for code in [2, 3, 4, 5, 9] {
            let status = ExitStatus::from_raw(code << 8);
            assert_eq!(DeathCause::from_status(status, "").to_string(), format!("exited with status {code}"));
            assert_eq!(DeathCause::from_status(status, "").label(), "crash");
        }
        let counters = DeathCounters::default();
        counters.record(&DeathCause::Recycled);
        assert!(counters.snapshot().contains(&("recycle", 1)));
    }
}
