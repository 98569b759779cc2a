//! The order in which calls waiting for an executor are served.
//!
//! - **Priorities.** Interactive calls go before batch calls. Batch calls
//!   never starve: while both wait, every [`BATCH_EVERY`]th call served is a
//!   batch one, so batch work keeps at least that share of the executor.
//! - **Fair share.** Within a priority, clients take turns (round robin): a
//!   client with calls waiting is served `weight` calls in its turn, then the
//!   next client's turn comes. One client's flood lengthens its own queue,
//!   not everyone's wait.
//!
//! A [`FairQueue`] holds the waiting calls of one executor; the executor's
//! threads or worker slots take the next call from it, whichever call
//! entered the executor's queue first.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

/// While interactive and batch calls both wait, one call in this many is a
/// batch call.
pub const BATCH_EVERY: u32 = 8;

/// How urgent a call is (metadata `offload-priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Priority {
    /// Someone is waiting for the answer: served first.
    #[default]
    Interactive,
    /// Throughput work: served when no interactive call waits, and at least
    /// one call in [`BATCH_EVERY`] when some do.
    Batch,
}

impl Priority {
    /// Both, in the order they are served.
    pub const ALL: [Priority; 2] = [Priority::Interactive, Priority::Batch];

    /// The metadata value and metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        }
    }

    /// Parses the metadata value (`interactive` or `batch`).
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == value)
    }

    /// Its place in per-priority arrays (interactive first).
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Where a call stands in the scheduling: its client and priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    /// The client's identity (see [`crate::clients`]).
    pub client: Arc<str>,
    /// Calls the client is served per turn (at least 1).
    pub weight: u32,
    /// The call's priority.
    pub priority: Priority,
}

impl Class {
    /// The class of calls with no identity at all (tests, internal calls).
    pub fn anonymous(priority: Priority) -> Self {
        Self { client: Arc::from(""), weight: 1, priority }
    }
}

/// Calls waiting for one executor, served by priority, then by client in
/// turn, then in arrival order.
#[derive(Debug)]
pub struct FairQueue<T> {
    levels: [Level<T>; 2],
    /// Interactive calls served in a row while batch calls waited.
    interactive_streak: u32,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self { levels: [Level::default(), Level::default()], interactive_streak: 0 }
    }
}

/// The calls of one priority.
#[derive(Debug)]
struct Level<T> {
    lanes: HashMap<Arc<str>, Lane<T>>,
    /// Clients with calls waiting, the one whose turn it is first.
    turns: VecDeque<Arc<str>>,
    len: usize,
}

impl<T> Default for Level<T> {
    fn default() -> Self {
        Self { lanes: HashMap::new(), turns: VecDeque::new(), len: 0 }
    }
}

/// One client's calls of one priority.
#[derive(Debug)]
struct Lane<T> {
    calls: VecDeque<T>,
    weight: u32,
    /// Calls served in the current turn.
    served: u32,
}

impl<T> Level<T> {
    fn lane(&mut self, class: &Class, first: bool) -> &mut Lane<T> {
        let lane = self.lanes.entry(Arc::clone(&class.client)).or_insert_with(|| Lane {
            calls: VecDeque::new(),
            weight: class.weight.max(1),
            served: 0,
        });
        if lane.calls.is_empty() {
            if first {
                self.turns.push_front(Arc::clone(&class.client));
            } else {
                self.turns.push_back(Arc::clone(&class.client));
            }
        }
        lane
    }

    fn next(&self) -> Option<&T> {
        let client = self.turns.front()?;
        self.lanes.get(client).and_then(|lane| lane.calls.front())
    }

    fn pop(&mut self) -> Option<T> {
        let client = self.turns.front()?;
        let lane = self.lanes.get_mut(client).expect("a client in turn has a lane");
        let call = lane.calls.pop_front().expect("a client in turn has calls");
        self.len -= 1;
        lane.served += 1;
        if lane.calls.is_empty() {
            // Forgotten when idle: the map holds only clients with calls waiting.
            let client = self.turns.pop_front().expect("front");
            self.lanes.remove(&client);
        } else if lane.served >= lane.weight {
            lane.served = 0;
            self.turns.rotate_left(1);
        }
        Some(call)
    }

    fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.turns.clear();
        self.len = 0;
        self.lanes.drain().flat_map(|(_, lane)| lane.calls)
    }
}

impl<T> FairQueue<T> {
    /// Calls waiting.
    pub fn len(&self) -> usize {
        self.levels.iter().map(|l| l.len).sum()
    }

    /// Whether no call waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls of `priority` waiting.
    pub fn waiting(&self, priority: Priority) -> usize {
        self.levels[priority.index()].len
    }

    /// Queues `call` last in its client's lane.
    pub fn push(&mut self, class: &Class, call: T) {
        let level = &mut self.levels[class.priority.index()];
        level.lane(class, false).calls.push_back(call);
        level.len += 1;
    }

    /// Queues `call` first: it goes next (a call a dead worker never started).
    pub fn push_front(&mut self, class: &Class, call: T) {
        let level = &mut self.levels[class.priority.index()];
        let lane = level.lane(class, true);
        lane.calls.push_front(call);
        level.len += 1;
        if level.turns.front() != Some(&class.client) {
            // Its client's turn comes now.
            let at = level.turns.iter().position(|c| *c == class.client).expect("a client with calls is in turn");
            let client = level.turns.remove(at).expect("present");
            level.turns.push_front(client);
        }
    }

    /// The level the next call comes from.
    fn level(&self) -> Option<usize> {
        let (interactive, batch) = (self.levels[0].len, self.levels[1].len);
        match (interactive, batch) {
            (0, 0) => None,
            (0, _) => Some(1),
            (_, 0) => Some(0),
            _ if self.interactive_streak + 1 >= BATCH_EVERY => Some(1),
            _ => Some(0),
        }
    }

    /// The call that goes next, if any.
    pub fn next(&self) -> Option<&T> {
        self.levels[self.level()?].next()
    }

    /// Takes the call that goes next.
    pub fn pop(&mut self) -> Option<T> {
        let level = self.level()?;
        let batch_waits = self.levels[1].len > 0;
        let call = self.levels[level].pop();
        self.interactive_streak = match level {
            0 if batch_waits => self.interactive_streak + 1,
            _ => 0,
        };
        call
    }

    /// Takes the call that goes next if `accept` takes it.
    pub fn pop_if(&mut self, accept: impl FnOnce(&T) -> bool) -> Option<T> {
        if self.next().is_some_and(accept) { self.pop() } else { None }
    }

    /// Takes every waiting call.
    pub fn drain(&mut self) -> Vec<T> {
        self.interactive_streak = 0;
        self.levels.iter_mut().flat_map(Level::drain).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(client: &str, weight: u32, priority: Priority) -> Class {
        Class { client: Arc::from(client), weight, priority }
    }

    fn drain_order<T: Clone>(queue: &mut FairQueue<T>) -> Vec<T> {
        std::iter::from_fn(|| queue.pop()).collect()
    }

    #[test]
    fn clients_take_turns_so_a_flood_does_not_delay_a_late_client() {
        let mut q = FairQueue::default();
        let a = class("a", 1, Priority::Interactive);
        let b = class("b", 1, Priority::Interactive);
        for i in 0..100 {
            q.push(&a, format!("a{i}"));
        }
        q.push(&b, "b0".to_string());
        q.push(&b, "b1".to_string());
        let order = drain_order(&mut q);
        assert_eq!(&order[..5], ["a0", "b0", "a1", "b1", "a2"]);
        assert_eq!(order.len(), 102);
        assert!(q.is_empty() && q.lanes_are_forgotten());
    }

    #[test]
    fn a_client_is_served_its_weight_per_turn() {
        let mut q = FairQueue::default();
        let heavy = class("heavy", 3, Priority::Batch);
        let light = class("light", 1, Priority::Batch);
        for i in 0..6 {
            q.push(&heavy, format!("h{i}"));
            q.push(&light, format!("l{i}"));
        }
        let order = drain_order(&mut q);
        assert_eq!(&order[..8], ["h0", "h1", "h2", "l0", "h3", "h4", "h5", "l1"]);
    }

    #[test]
    fn interactive_goes_first_and_batch_keeps_one_call_in_eight() {
        let mut q = FairQueue::default();
        let batch = class("x", 1, Priority::Batch);
        let interactive = class("x", 1, Priority::Interactive);
        for i in 0..20 {
            q.push(&batch, format!("b{i}"));
        }
        for i in 0..20 {
            q.push(&interactive, format!("i{i}"));
        }
        let order = drain_order(&mut q);
        let firsts: Vec<&str> = order[..16].iter().map(String::as_str).collect();
        assert_eq!(
            firsts,
            ["i0", "i1", "i2", "i3", "i4", "i5", "i6", "b0", "i7", "i8", "i9", "i10", "i11", "i12", "i13", "b1"]
        );
        // Once no interactive call waits, batch calls go one after another.
        assert!(order[order.len() - 10..].iter().all(|c| c.starts_with('b')), "{order:?}");
        assert_eq!((q.waiting(Priority::Interactive), q.waiting(Priority::Batch)), (0, 0));
    }

    #[test]
    fn a_call_put_back_goes_next_and_pop_if_leaves_a_refused_call() {
        let mut q = FairQueue::default();
        let a = class("a", 1, Priority::Interactive);
        let b = class("b", 1, Priority::Interactive);
        q.push(&a, 1);
        q.push(&b, 2);
        q.push_front(&b, 0);
        assert_eq!(q.pop_if(|&c| c == 5), None);
        assert_eq!(q.next(), Some(&0));
        assert_eq!(drain_order(&mut q), [0, 1, 2]);
        q.push(&a, 7);
        q.push(&b, 8);
        let mut drained = q.drain();
        drained.sort();
        assert_eq!((drained, q.len()), (vec![7, 8], 0));
    }

    impl<T> FairQueue<T> {
        fn lanes_are_forgotten(&self) -> bool {
            self.levels.iter().all(|l| l.lanes.is_empty() && l.turns.is_empty())
        }
    }
}
