//! What a running job sees of its call: the deadline, a cancel flag that the
//! executor raises when the caller goes away, and a sink for progress.
//! Jobs poll [`Context::check`] between chunks of work; [`Context::sleep`]
//! waits and wakes at once on cancellation.

use std::{
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::TaskError;

/// A shared flag raised once to stop a job. Cloning shares the flag.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<CancelState>);

#[derive(Debug, Default)]
struct CancelState {
    raised: AtomicBool,
    // Lets sleeping jobs wake on `cancel` instead of polling.
    lock: Mutex<()>,
    wake: Condvar,
}

impl CancelFlag {
    /// A flag not raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the flag and wakes any job sleeping on it.
    pub fn cancel(&self) {
        self.0.raised.store(true, Ordering::Release);
        let _guard = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.0.wake.notify_all();
    }

    /// Whether the flag was raised.
    pub fn is_cancelled(&self) -> bool {
        self.0.raised.load(Ordering::Acquire)
    }

    /// Waits until `until` or until the flag is raised; true if raised.
    fn wait_until(&self, until: Instant) -> bool {
        let mut guard = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.is_cancelled() {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            guard = self.0.wake.wait_timeout(guard, until - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// Receives a job's progress: a fraction in [0, 1] and a short note.
pub type ProgressSink = Arc<dyn Fn(f64, &str) + Send + Sync>;

/// The view a job has of its call.
#[derive(Clone)]
pub struct Context {
    deadline: Option<Instant>,
    cancel: CancelFlag,
    progress: Option<ProgressSink>,
    started: Instant,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("deadline", &self.deadline)
            .field("cancelled", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context for a job starting now.
    pub fn new(deadline: Option<Instant>, cancel: CancelFlag, progress: Option<ProgressSink>) -> Self {
        Self { deadline, cancel, progress, started: Instant::now() }
    }

    /// Fails with `Cancelled` or `DeadlineExceeded` when the job must stop.
    pub fn check(&self) -> Result<(), TaskError> {
        if self.cancel.is_cancelled() {
            return Err(TaskError::Cancelled);
        }
        match self.deadline {
            Some(d) if Instant::now() >= d => Err(TaskError::DeadlineExceeded { after: self.started.elapsed() }),
            _ => Ok(()),
        }
    }

    /// Sleeps for `dur`, returning early with an error on cancellation or
    /// at the deadline.
    pub fn sleep(&self, dur: Duration) -> Result<(), TaskError> {
        let end = Instant::now() + dur;
        let until = self.deadline.map_or(end, |d| d.min(end));
        self.cancel.wait_until(until);
        self.check()
    }

    /// Reports progress; `fraction` is clamped to [0, 1].
    pub fn progress(&self, fraction: f64, message: &str) {
        if let Some(sink) = &self.progress {
            sink(fraction.clamp(0.0, 1.0), message);
        }
    }

    /// Whether anyone listens to progress, so jobs can skip formatting notes.
    pub fn wants_progress(&self) -> bool {
        self.progress.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_wakes_on_cancel() {
        let flag = CancelFlag::new();
        let ctx = Context::new(None, flag.clone(), None);
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let r = ctx.sleep(Duration::from_secs(30));
            (r, start.elapsed())
        });
        // The sleeper may not have started waiting yet; cancel works either way.
        flag.cancel();
        let (r, waited) = t.join().unwrap();
        assert_eq!(r, Err(TaskError::Cancelled));
        assert!(waited < Duration::from_secs(30));
    }

    #[test]
    fn sleep_stops_at_deadline() {
        let deadline = Instant::now() + Duration::from_millis(20);
        let ctx = Context::new(Some(deadline), CancelFlag::new(), None);
        assert!(matches!(ctx.sleep(Duration::from_secs(30)), Err(TaskError::DeadlineExceeded { .. })));
        assert!(Instant::now() >= deadline);
    }
}
