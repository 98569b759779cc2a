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

#[derive(Debug, Clone, Copy)]
struct Running {
    started: Instant,
    cost: Duration,
    deadline: Option<Instant>,
}

impl Running {
    fn remaining(&self, now: Instant) -> Duration {
        let left = self.cost.saturating_sub(now.saturating_duration_since(self.started));
        match self.deadline {
            Some(deadline) => left.min(deadline.saturating_duration_since(now) + STOP_GRACE),
            None => left,
        }
    }
}

#[derive(Debug, Default)]
struct Load {
    queued: usize,
    /// Expected cost of the queued calls, by priority.
    queued_cost: [Duration; 2],
    /// Each running call, by slab key.
    running: Vec<Option<Running>>,
    running_count: usize,
}

impl Load {
    /// Moves a queued call to the running ones; returns its slab key.
    fn start(&mut self, priority: Priority, cost: Duration, deadline: Option<Instant>) -> usize {
        self.unqueue(priority, cost);
        self.running_count += 1;
        let entry = Some(Running { started: Instant::now(), cost, deadline });
        match self.running.iter().position(Option::is_none) {
            Some(free) => {
                self.running[free] = entry;
                free
            }
            None => {
                self.running.push(entry);
                self.running.len() - 1
            }
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
        if self.running_count + self.queued < slots {
            return Duration::ZERO;
        }
        let remaining: Duration = self.running.iter().flatten().map(|r| r.remaining(now)).sum();
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
        load.queued += 1;
        load.queued_cost[priority.index()] += cost;
        Ok(Ticket { admission: Arc::clone(self), cost, priority, deadline, admitted: now, running: None })
    }

    /// Starts `ticket`'s call now if a slot is free and no other admitted
    /// call waits (it would be overtaken); returns how long it waited.
    pub fn start_if_idle(&self, ticket: &mut Ticket) -> Option<Duration> {
        let mut load = self.lock();
        // The ticket's own call is one of the queued.
        if ticket.running.is_some() || load.running_count >= self.slots.load(Ordering::Relaxed) || load.queued > 1 {
            return None;
        }
        ticket.running = Some(load.start(ticket.priority, ticket.cost, ticket.deadline));
        Some(Instant::now().saturating_duration_since(ticket.admitted))
    }

    /// Calls admitted and not started yet.
    pub fn queued(&self) -> usize {
        self.lock().queued
    }

    /// Calls running now.
    pub fn running(&self) -> usize {
        self.lock().running_count
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
    priority: Priority,
    deadline: Option<Instant>,
    admitted: Instant,
    /// Slab key once started.
    running: Option<usize>,
}

impl Ticket {
    /// The call's expected run time, as admission charged it.
    pub fn cost(&self) -> Duration {
        self.cost
    }

    /// Marks the call as running; returns how long it waited.
    pub fn start(&mut self) -> Duration {
        let mut load = self.admission.lock();
        self.running = Some(load.start(self.priority, self.cost, self.deadline));
        Instant::now().saturating_duration_since(self.admitted)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut load = self.admission.lock();
        match self.running {
            Some(key) => {
                load.running[key] = None;
                load.running_count -= 1;
            }
            None => load.unqueue(self.priority, self.cost),
        }
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
