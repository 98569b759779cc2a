//! The POOL executor: a rayon thread pool bridged to async callers through
//! oneshot channels, with an [`Admission`] that bounds its queue.

use std::{sync::Arc, time::Duration};

use tokio::sync::oneshot;

use crate::admission::{Admission, Ticket};

/// The in-process thread pool.
#[derive(Debug)]
pub struct Pool {
    threads: rayon::ThreadPool,
    admission: Arc<Admission>,
}

impl Pool {
    /// A pool of `threads` threads that lets `queue_capacity` calls wait.
    pub fn new(threads: usize, queue_capacity: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("offload-pool-{i}"))
            .build()?;
        let admission = Admission::new(threads.current_num_threads(), queue_capacity);
        Ok(Self { threads, admission })
    }

    /// The pool's admission control; tickets from it go to [`Pool::submit`].
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.threads.current_num_threads()
    }

    /// Runs `work` on a pool thread; it receives the time the call waited.
    /// The ticket is released when `work` returns, before the answer is sent.
    pub fn submit<T, F>(&self, mut ticket: Ticket, work: F) -> oneshot::Receiver<T>
    where
        T: Send + 'static,
        F: FnOnce(Duration) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.threads.spawn(move || {
            let queued = ticket.start();
            let out = work(queued);
            drop(ticket);
            // The caller may have gone away; its task already saw the cancel flag.
            let _ = tx.send(out);
        });
        rx
    }
}
