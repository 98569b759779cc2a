//! The POOL executor: a rayon thread pool bridged to async callers through
//! oneshot channels, with an [`Admission`] that bounds its queue, and a way
//! for a call to run in place on the thread that took it when the pool is
//! idle.
//!
//! Calls wait in a [`FairQueue`], not in rayon's own queue: each submitted
//! call adds one rayon job that runs whichever call the queue says goes
//! next, so the order is the scheduler's (priorities, clients in turn)
//! whatever order rayon runs its jobs in.
//!
//! Running in place ([`Pool::try_in_place`]) is what makes a lightly loaded
//! pool as fast as a plain handler: a call that hops to a pool thread pays
//! two thread wake-ups (the pool thread's, then the handler's) and reads its
//! input from another core's cache, about 0.2 ms on a 1 MiB hash
//! (`bench/PROFILING.md`, item 11). It counts as running, so it happens only
//! while fewer calls run than the pool has threads.

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
    shared: Arc<Shared>,
    admission: Arc<Admission>,
}

struct Shared {
    threads: Threads,
    waiting: Mutex<FairQueue<Work>>,
}

/// The rayon threads. The process's global pool when this pool could
/// become it: a task's own parallelism (`par_iter`) then uses the same
/// threads whether the task runs on one of them or in place.
enum Threads {
    Global,
    Own(rayon::ThreadPool),
}

impl Threads {
    fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        match self {
            Threads::Global => rayon::spawn(job),
            Threads::Own(pool) => pool.spawn(job),
        }
    }

    fn count(&self) -> usize {
        match self {
            Threads::Global => rayon::current_num_threads(),
            Threads::Own(pool) => pool.current_num_threads(),
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("threads", &self.threads()).finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool of `threads` threads that lets `queue_capacity` calls wait.
    pub fn new(threads: usize, queue_capacity: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        let builder =
            || rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("offload-pool-{i}"));
        // Only one pool can be the global one (tests may build several).
        let threads = match builder().build_global() {
            Ok(()) => Threads::Global,
            Err(_) => Threads::Own(builder().build()?),
        };
        let admission = Admission::new(threads.count(), queue_capacity);
        Ok(Self { shared: Arc::new(Shared { threads, waiting: Mutex::default() }), admission })
    }

    /// The pool's admission control; tickets from it go to [`Pool::submit`].
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.shared.threads.count()
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
        lock(&self.shared.waiting).push(class, call);
        let shared = Arc::clone(&self.shared);
        // One rayon job per call: it runs the call that goes next.
        self.shared.threads.spawn(move || {
            let next = lock(&shared.waiting).pop();
            if let Some(call) = next {
                call();
            }
        });
        rx
    }

    /// Starts `ticket`'s call to run in place, on the calling thread, if
    /// fewer calls run than the pool has threads and no other admitted call
    /// waits (in place, it would overtake them); returns how long it
    /// waited. The call counts as running until the ticket drops. Only for
    /// global pools: elsewhere a task's own parallelism would go to another
    /// set of threads.
    pub fn try_in_place(&self, ticket: &mut Ticket) -> Option<Duration> {
        match self.shared.threads {
            Threads::Global => self.admission.start_if_idle(ticket),
            Threads::Own(_) => None,
        }
    }
}

fn lock<T>(queue: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The queue stays consistent even if a holder panicked.
    queue.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::schedule::Priority;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn calls_run_in_place_only_while_the_pool_has_room_and_no_call_waits() {
        let pool = Pool::new(2, 10).expect("pool");
        // The only pool of this test binary, so the global one.
        assert!(matches!(pool.shared.threads, Threads::Global));
        let class = Class::anonymous(Priority::Interactive);
        let admit = || pool.admission().admit(MS, None, Priority::Interactive).expect("admitted");
        let mut first = admit();
        assert!(pool.try_in_place(&mut first).is_some());
        // A call on a pool thread that waits until told to finish.
        let (release, hold) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel();
        let done = pool.submit(admit(), &class, move |_| {
            started_tx.send(()).expect("receiver");
            hold.recv_timeout(10_000 * MS).expect("released");
        });
        started.recv_timeout(10_000 * MS).expect("the pool runs it");
        // One in place and one on the pool: as many as the pool has threads.
        let mut second = admit();
        assert!(pool.try_in_place(&mut second).is_none());
        drop(first);
        // Room again, but a call admitted meanwhile waits: it is not overtaken.
        let waiting = admit();
        assert!(pool.try_in_place(&mut second).is_none());
        drop(waiting);
        assert!(pool.try_in_place(&mut second).is_some());
        drop(second);
        release.send(()).expect("the call waits");
        done.blocking_recv().expect("answer");
        // Nothing runs once the pool's call has given its ticket back.
        let deadline = std::time::Instant::now() + 10_000 * MS;
        while pool.admission().running() > 0 {
            assert!(std::time::Instant::now() < deadline, "the pool's call never counted as finished");
            std::thread::yield_now();
        }
        let (mut a, mut b) = (admit(), admit());
        // Two admitted: each sees the other waiting.
        assert!(pool.try_in_place(&mut a).is_none());
        drop(b);
        assert!(pool.try_in_place(&mut a).is_some());
        b = admit();
        assert!(pool.try_in_place(&mut b).is_some(), "the second thread's worth of room");
    }
}
