//! The POOL executor: a rayon thread pool bridged to async callers through
//! oneshot channels, with an [`Admission`] that bounds its queue.
//!
//! Calls wait in a [`FairQueue`], not in rayon's own queue: each submitted
//! call adds one rayon job that runs whichever call the queue says goes
//! next, so the order is the scheduler's (priorities, clients in turn)
//! whatever order rayon runs its jobs in.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::oneshot;

use crate::{
    admission::{Admission, Ticket},
    schedule::{Class, FairQueue},
};

/// A call waiting for a thread.
type Work = Box<dyn FnOnce() + Send>;

/// The in-process thread pool.
pub struct Pool {
    threads: rayon::ThreadPool,
    admission: Arc<Admission>,
    waiting: Arc<Mutex<FairQueue<Work>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("threads", &self.threads()).finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool of `threads` threads that lets `queue_capacity` calls wait.
    pub fn new(threads: usize, queue_capacity: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("offload-pool-{i}"))
            .build()?;
        let admission = Admission::new(threads.current_num_threads(), queue_capacity);
        Ok(Self { threads, admission, waiting: Arc::default() })
    }

    /// The pool's admission control; tickets from it go to [`Pool::submit`].
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.threads.current_num_threads()
    }

    /// Runs `work` on a pool thread when its turn comes in `class`; it
    /// receives the time the call waited. The ticket is released when
    /// `work` returns, before the answer is sent.
    pub fn submit<T, F>(&self, mut ticket: Ticket, class: &Class, work: F) -> oneshot::Receiver<T>
    where
        T: Send + 'static,
        F: FnOnce(Duration) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let call: Work = Box::new(move || {
            let queued = ticket.start();
            let out = work(queued);
            drop(ticket);
            // The caller may have gone away; its task already saw the cancel flag.
            let _ = tx.send(out);
        });
        lock(&self.waiting).push(class, call);
        let waiting = Arc::clone(&self.waiting);
        // One rayon job per call: it runs the call that goes next.
        self.threads.spawn(move || {
            let next = lock(&waiting).pop();
            if let Some(call) = next {
                call();
            }
        });
        rx
    }
}

fn lock<T>(queue: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The queue stays consistent even if a holder panicked.
    queue.lock().unwrap_or_else(|e| e.into_inner())
}
