//! Admission control for one executor: a bounded queue, and a deadline-aware
//! check that refuses a call which could not even start before its deadline.
//! The expected wait is the work that goes before the call (what remains of
//! running calls, which never outlive their own deadline by more than
//! [`STOP_GRACE`], and the queued calls ahead of it in the
//! [`schedule`](crate::schedule) order) spread over the executor's slots.
//!
//! A [`Ticket`] follows each admitted call; dropping it, wherever the call
//! ends, gives its place back, so no path can strand the counters.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::schedule::{BATCH_EVERY, Priority};

/// How long a task past its deadline is expected to take to stop.
pub const STOP_GRACE: Duration = Duration::from_millis(100);

/// Why a call was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `capacity` calls are already waiting.
    QueueFull {
        /// The queue's bound.
        capacity: usize,
    },
    /// The call would wait `wait` but has only `remaining` before its deadline.
    WouldMissDeadline {
        /// The expected wait.
        wait: Duration,
        /// Time left before the deadline.
        remaining: Duration,
    },
}

/// The load of one executor.
#[derive(Debug)]
pub struct Admission {
    slots: AtomicUsize,
    capacity: usize,
    state: Mutex<Load>,
}

/// One admitted call's entry, from admission to the end of its run.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Tells this call from a later one given the same slab key.
    id: u64,
    cost: Duration,
    priority: Priority,
    deadline: Option<Instant>,
    /// When it started running, and its index in [`Load::running`].
    started: Option<(Instant, usize)>,
    /// Its caller went away: queued, it no longer counts; running, it is
    /// stopping.
    abandoned: bool,
}

impl Entry {
    /// What remains of its run, once it runs.
    fn remaining(&self, now: Instant) -> Duration {
        let Some((started, _)) = self.started else { return Duration::ZERO };
        let left = self.cost.saturating_sub(now.saturating_duration_since(started));
        let stops_by = match (self.abandoned, self.deadline) {
            (true, _) => Some(STOP_GRACE),
            (false, Some(deadline)) => Some(deadline.saturating_duration_since(now) + STOP_GRACE),
            (false, None) => None,
        };
        stops_by.map_or(left, |bound| left.min(bound))
    }
}

#[derive(Debug, Default)]
struct Load {
    /// Calls queued and not abandoned.
    queued: usize,
    /// Expected cost of those calls, by priority.
    queued_cost: [Duration; 2],
    /// Every admitted call, by slab key.
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    /// Keys of the running calls.
    running: Vec<usize>,
    /// The next entry's id.
    next_id: u64,
}

impl Load {
    fn insert(&mut self, cost: Duration, priority: Priority, deadline: Option<Instant>) -> (usize, u64) {
        self.queued += 1;
        self.queued_cost[priority.index()] += cost;
        self.next_id += 1;
        let entry = Some(Entry { id: self.next_id, cost, priority, deadline, started: None, abandoned: false });
        let key = match self.free.pop() {
            Some(key) => {
                self.entries[key] = entry;
                key
            }
            None => {
                self.entries.push(entry);
                self.entries.len() - 1
            }
        };
        (key, self.next_id)
    }

    /// Moves a queued call to the running ones.
    fn start(&mut self, key: usize) {
        let at = self.running.len();
        let entry = self.entries[key].as_mut().expect("a live entry");
        entry.started = Some((Instant::now(), at));
        let (abandoned, priority, cost) = (entry.abandoned, entry.priority, entry.cost);
        if !abandoned {
            self.unqueue(priority, cost);
        }
        self.running.push(key);
    }

    /// The call's caller went away.
    fn abandon(&mut self, key: usize, id: u64) {
        let Some(entry) = self.entries.get_mut(key).and_then(Option::as_mut).filter(|e| e.id == id) else {
            return;
        };
        if std::mem::replace(&mut entry.abandoned, true) {
            return;
        }
        let (started, priority, cost) = (entry.started.is_some(), entry.priority, entry.cost);
        if !started {
            self.unqueue(priority, cost);
        }
    }

    fn remove(&mut self, key: usize) {
        let entry = self.entries[key].take().expect("a live entry");
        self.free.push(key);
        match entry.started {
            Some((_, at)) => {
                self.running.swap_remove(at);
                if let Some(&moved) = self.running.get(at) {
                    let moved = self.entries[moved].as_mut().expect("a running entry");
                    moved.started = moved.started.map(|(since, _)| (since, at));
                }
            }
            None if !entry.abandoned => self.unqueue(entry.priority, entry.cost),
            None => {}
        }
    }

    fn unqueue(&mut self, priority: Priority, cost: Duration) {
        self.queued -= 1;
        let queued = &mut self.queued_cost[priority.index()];
        *queued = queued.saturating_sub(cost);
    }

    /// What a call of `priority` joining now waits for: running work, the
    /// queued calls of its priority, and its share of the other's. An
    /// interactive call lets through one batch call per [`BATCH_EVERY`]; a
    /// batch call waits for every interactive call queued (at worst).
    fn expected_wait(&self, slots: usize, priority: Priority, now: Instant) -> Duration {
        if self.running.len() + self.queued < slots {
            return Duration::ZERO;
        }
        let remaining: Duration =
            self.running.iter().filter_map(|key| self.entries[*key].as_ref()).map(|e| e.remaining(now)).sum();
        let [interactive, batch] = self.queued_cost;
        let ahead = match priority {
            Priority::Interactive => interactive + batch.min(interactive / (BATCH_EVERY - 1)),
            Priority::Batch => interactive + batch,
        };
        (remaining + ahead) / slots as u32
    }
}

impl Admission {
    /// The executor now has `slots` parallel slots (its pool was resized).
    pub fn set_slots(&self, slots: usize) {
        self.slots.store(slots.max(1), Ordering::Relaxed);
    }

    /// An executor with `slots` parallel slots and room for `capacity` waiting calls.
    pub fn new(slots: usize, capacity: usize) -> Arc<Self> {
        Arc::new(Self { slots: slots.max(1).into(), capacity, state: Mutex::new(Load::default()) })
    }

    /// Admits a call of expected `cost` and `priority` that must start before `deadline`.
    pub fn admit(
        self: &Arc<Self>,
        cost: Duration,
        deadline: Option<Instant>,
        priority: Priority,
    ) -> Result<Ticket, Refusal> {
        let now = Instant::now();
        let remaining = deadline.map(|d| d.saturating_duration_since(now));
        let mut load = self.lock();
        if load.queued >= self.capacity {
            return Err(Refusal::QueueFull { capacity: self.capacity });
        }
        if let Some(remaining) = remaining {
            let wait = load.expected_wait(self.slots.load(Ordering::Relaxed), priority, now);
            if wait >= remaining {
                return Err(Refusal::WouldMissDeadline { wait, remaining });
            }
        }
        let (key, id) = load.insert(cost, priority, deadline);
        Ok(Ticket { admission: Arc::clone(self), cost, key, id, admitted: now, running: false })
    }

    /// Starts `ticket`'s call now if a slot is free and no other admitted
    /// call waits (it would be overtaken); returns how long it waited.
    pub fn start_if_idle(&self, ticket: &mut Ticket) -> Option<Duration> {
        let mut load = self.lock();
        // The ticket's own call is one of the queued.
        if ticket.running || load.running.len() >= self.slots.load(Ordering::Relaxed) || load.queued > 1 {
            return None;
        }
        load.start(ticket.key);
        ticket.running = true;
        Some(Instant::now().saturating_duration_since(ticket.admitted))
    }

    /// Calls admitted and not started yet (whose callers still wait).
    pub fn queued(&self) -> usize {
        self.lock().queued
    }

    /// Calls running now.
    pub fn running(&self) -> usize {
        self.lock().running.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Load> {
        // The counters stay consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An admitted call's place in its executor's load.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    cost: Duration,
    /// Its entry's slab key and id.
    key: usize,
    id: u64,
    admitted: Instant,
    running: bool,
}

impl Ticket {
    /// The call's expected run time, as admission charged it.
    pub fn cost(&self) -> Duration {
        self.cost
    }

    /// Marks the call as running; returns how long it waited.
    pub fn start(&mut self) -> Duration {
        self.admission.lock().start(self.key);
        self.running = true;
        Instant::now().saturating_duration_since(self.admitted)
    }

    /// A guard that, dropped while the call has not ended, tells admission
    /// its caller went away: the handler holds it, the ticket goes with the
    /// work. A queued call then stops counting at once (it is dropped
    /// unrun at its turn) and a running one counts only as stopping,
    /// so calls that come right after a cancellation are not refused for
    /// work nobody waits for.
    pub fn abandon_on_drop(&self) -> Abandon {
        Abandon { admission: Arc::clone(&self.admission), key: self.key, id: self.id }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.lock().remove(self.key);
    }
}

/// See [`Ticket::abandon_on_drop`]; harmless once the call has ended.
#[derive(Debug)]
pub struct Abandon {
    admission: Arc<Admission>,
    key: usize,
    id: u64,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        self.admission.lock().abandon(self.key, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const I: Priority = Priority::Interactive;

    #[test]
    fn the_queue_is_bounded_and_tickets_give_their_place_back() {
        let a = Admission::new(1, 2);
        let t1 = a.admit(MS, None, I).unwrap();
        let _t2 = a.admit(MS, None, I).unwrap();
        assert_eq!(a.admit(MS, None, I).unwrap_err(), Refusal::QueueFull { capacity: 2 });
        drop(t1);
        let mut t3 = a.admit(MS, None, I).unwrap();
        t3.start();
        assert_eq!((a.queued(), a.running()), (1, 1));
        drop(t3);
        assert_eq!((a.queued(), a.running()), (1, 0));
    }

    #[test]
    fn a_call_that_cannot_start_before_its_deadline_is_refused() {
        let a = Admission::new(2, 100);
        // Two free slots: no wait whatever the deadline (far enough ahead
        // that a loaded machine still admits both before it).
        let soon = Instant::now() + 50 * MS;
        let mut busy1 = a.admit(1000 * MS, Some(soon), I).unwrap();
        let mut busy2 = a.admit(1000 * MS, Some(soon), I).unwrap();
        busy1.start();
        busy2.start();
        // The condition waited for is the clock itself.
        std::thread::sleep(soon.saturating_duration_since(Instant::now()));
        // Both slots busy, but both tasks are past their deadline: they stop
        // within the grace, so a call with a little time left gets in.
        assert!(a.admit(MS, Some(Instant::now() + 300 * MS), I).is_ok());
        drop((busy1, busy2));

        let mut long1 = a.admit(1000 * MS, None, I).unwrap();
        let mut long2 = a.admit(1000 * MS, None, I).unwrap();
        long1.start();
        long2.start();
        // Both slots busy for about a second.
        match a.admit(MS, Some(Instant::now() + 100 * MS), I) {
            Err(Refusal::WouldMissDeadline { wait, remaining }) => {
                assert!(wait > 900 * MS && wait <= 1001 * MS, "{wait:?}");
                assert!(remaining <= 100 * MS, "{remaining:?}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(a.admit(MS, Some(Instant::now() + 5000 * MS), I).is_ok());
        assert!(a.admit(MS, None, I).is_ok());
    }

    #[test]
    fn work_whose_caller_left_stops_counting_at_once() {
        let a = Admission::new(2, 100);
        let mut running: Vec<Ticket> = (0..2).map(|_| a.admit(5000 * MS, None, I).unwrap()).collect();
        for ticket in &mut running {
            ticket.start();
        }
        let queued: Vec<Ticket> = (0..2).map(|_| a.admit(5000 * MS, None, I).unwrap()).collect();
        let within = |ms| Some(Instant::now() + ms * MS);
        assert!(a.admit(MS, within(5000), I).is_err(), "two threads busy for 5 s, 10 s queued");
        // The callers go away; the tickets live on with the work until it
        // stops (running) or its turn comes (queued).
        let guards: Vec<Abandon> = running.iter().chain(&queued).map(Ticket::abandon_on_drop).collect();
        drop(guards);
        assert_eq!((a.queued(), a.running()), (0, 2));
        match a.admit(MS, within(50), I) {
            // Both running ones are stopping: a grace each, over two slots.
            Err(Refusal::WouldMissDeadline { wait, .. }) => assert!(wait <= STOP_GRACE, "{wait:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let cheap: Vec<Ticket> = (0..4).map(|_| a.admit(100 * MS, within(1000), I).unwrap()).collect();
        drop((running, queued));
        assert_eq!((a.queued(), a.running()), (4, 0), "nothing counted twice");
        // A guard dropped after its call ended touches no later call's entry.
        let mut done = a.admit(MS, None, I).unwrap();
        let late = done.abandon_on_drop();
        done.start();
        drop(done);
        let next = a.admit(MS, None, I).unwrap();
        drop(late);
        assert_eq!(a.queued(), 5, "the later call still counts");
        drop((cheap, next));
        assert_eq!((a.queued(), a.running()), (0, 0));
    }

    #[test]
    fn an_interactive_call_waits_for_running_work_and_interactive_calls_not_the_batch_queue() {
        let a = Admission::new(1, 1000);
        let mut running = a.admit(10 * MS, None, I).unwrap();
        running.start();
        let _batch: Vec<_> = (0..100).map(|_| a.admit(10 * MS, None, Priority::Batch).unwrap()).collect();
        let _interactive: Vec<_> = (0..7).map(|_| a.admit(10 * MS, None, I).unwrap()).collect();
        // Interactive: the running 10 ms, 7 x 10 ms, and one batch call let through.
        match a.admit(MS, Some(Instant::now() + 50 * MS), I) {
            Err(Refusal::WouldMissDeadline { wait, .. }) => assert!(wait > 85 * MS && wait <= 90 * MS, "{wait:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(a.admit(MS, Some(Instant::now() + 100 * MS), I).is_ok());
        // Batch: all of it, about a second.
        assert!(a.admit(MS, Some(Instant::now() + 500 * MS), Priority::Batch).is_err());
    }
}
