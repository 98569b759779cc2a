//! The in-flight bytes budget (`--max-inflight-bytes`): a bound on the
//! request and response bytes the front holds at once, so that a flood of
//! large calls is refused instead of growing the process until it is
//! OOM-killed with every call on it.
//!
//! - [`Budget`]: the process-wide count, with all-or-nothing reservations.
//! - [`Usage`]: what one HTTP/2 stream holds: its request messages' bytes
//!   (reserved from the 5-byte gRPC prefix, before the body is buffered) and
//!   its outputs (charged when a handler makes them, given back as the
//!   response body hands them to the connection).
//! - [`layer`]: the tower layer and the body wrappers that do the metering.
//! - [`default_budget`]: the default, from the memory the process may use.

pub mod layer;

use std::{
    collections::VecDeque,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

/// The process-wide budget of in-flight bytes.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    /// Calls open now (HTTP/2 streams that passed the layer), whether their
    /// request has arrived or not.
    open: AtomicUsize,
    /// Woken whenever bytes are given back, for streams waiting to reserve.
    freed: Notify,
}

/// A reservation that did not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The bytes asked for.
    pub wanted: usize,
    /// The budget.
    pub limit: usize,
    /// The bytes in use when it was refused.
    pub in_use: usize,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a request message of {} bytes does not fit the in-flight memory budget of {} bytes ({} in use); retry later",
            self.wanted, self.limit, self.in_use
        )
    }
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, used: AtomicUsize::new(0), open: AtomicUsize::new(0), freed: Notify::new() })
    }

    /// Logs the budget at start: its size, and where a default came from
    /// (`default`: the memory it was taken from and its source).
    pub fn log_start(&self, default: Option<(u64, MemorySource)>, max_message_bytes: usize) {
        let limit = self.limit;
        match default {
            Some((memory, source)) => tracing::info!(
                max_inflight_bytes = limit,
                memory,
                source = source.as_str(),
                "in-flight bytes budget: {} MiB (default, from {} MiB of {})",
                limit >> 20,
                memory >> 20,
                source.as_str()
            ),
            None => tracing::info!(max_inflight_bytes = limit, "in-flight bytes budget: {} MiB (set)", limit >> 20),
        }
        if limit < max_message_bytes {
            tracing::warn!(
                "--max-inflight-bytes is below --max-message-bytes: requests larger than the budget are always refused"
            );
        }
    }

    /// The budget in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes in use now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Calls open now: a measure of how busy the I/O threads are.
    pub fn open_calls(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if all of them fit, else none.
    fn try_take(&self, bytes: usize) -> Result<(), Refusal> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .map(drop)
            .map_err(|in_use| Refusal { wanted: bytes, limit: self.limit, in_use })
    }

    /// Takes `bytes` if they fit within `patience`, waiting for others to
    /// give bytes back meanwhile.
    async fn take_within(&self, bytes: usize, patience: Duration) -> Result<(), Refusal> {
        let waiting = async {
            loop {
                // Registered before trying, so a release between the try and
                // the wait is not missed.
                let freed = self.freed.notified();
                if self.try_take(bytes).is_ok() {
                    return;
                }
                freed.await;
            }
        };
        tokio::time::timeout(patience, waiting).await.map_err(|_| Refusal {
            wanted: bytes,
            limit: self.limit,
            in_use: self.used(),
        })
    }

    /// Takes `bytes` whether or not they fit: for outputs, which exist
    /// already when they are counted (refusing them would lose work done).
    /// Until enough is given back, new requests are refused.
    fn force_take(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }
}

/// What one HTTP/2 stream (one call) holds of the budget. Everything it
/// still holds is given back when the last handle to it is dropped, however
/// the call ended.
#[derive(Debug)]
struct Account {
    budget: Arc<Budget>,
    /// Reservations of request messages received but not yet claimed by
    /// the handler, in arrival order (tonic hands messages over in order).
    unclaimed: Mutex<VecDeque<usize>>,
    /// Output bytes charged and not yet handed to the connection.
    output: AtomicUsize,
}

impl Drop for Account {
    fn drop(&mut self) {
        let unclaimed: usize = self.unclaimed.get_mut().map(|q| q.iter().sum()).unwrap_or(0);
        self.budget.give_back(unclaimed + *self.output.get_mut());
        self.budget.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A call's share of the budget, as handlers see it (in the request's
/// extensions). The default, for requests that did not pass the layer,
/// counts nothing.
#[derive(Debug, Clone, Default)]
pub struct Usage(Option<Arc<Account>>);

impl Usage {
    fn new(budget: Arc<Budget>) -> Self {
        budget.open.fetch_add(1, Ordering::Relaxed);
        Self(Some(Arc::new(Account { budget, unclaimed: Mutex::new(VecDeque::new()), output: AtomicUsize::new(0) })))
    }

    /// The usage of the call `request` belongs to.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request.extensions().get::<Self>().cloned().unwrap_or_default()
    }

    /// Takes over the reservation of the next request message, to be held
    /// while its input is in use (the reservation is given back when the
    /// returned hold is dropped).
    pub fn claim_input(&self) -> InputHold {
        let Some(account) = &self.0 else { return InputHold::default() };
        let bytes = account.unclaimed.lock().expect("unpoisoned").pop_front().unwrap_or(0);
        InputHold { budget: Some(Arc::clone(&account.budget)), bytes }
    }

    /// Counts `bytes` of output until the response body hands them over.
    pub fn charge_output(&self, bytes: usize) {
        if let Some(account) = &self.0 {
            account.budget.force_take(bytes);
            account.output.fetch_add(bytes, Ordering::AcqRel);
        }
    }

    /// Gives back up to `bytes` of charged output, now handed over.
    fn discharge_output(&self, bytes: usize) {
        if let Some(account) = &self.0 {
            let taken = account
                .output
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| Some(held - held.min(bytes)))
                .map_or(0, |held| held.min(bytes));
            account.budget.give_back(taken);
        }
    }

    /// Records a reservation made for a request message.
    fn add_input(&self, bytes: usize) {
        if let Some(account) = &self.0 {
            account.unclaimed.lock().expect("unpoisoned").push_back(bytes);
        }
    }

    fn budget(&self) -> Option<&Arc<Budget>> {
        self.0.as_ref().map(|account| &account.budget)
    }
}

/// The reservation of one request message while a handler uses its input.
#[derive(Debug, Default)]
pub struct InputHold {
    budget: Option<Arc<Budget>>,
    bytes: usize,
}

impl Drop for InputHold {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.give_back(self.bytes);
        }
    }
}

/// Where the default budget came from, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySource {
    /// A cgroup v2 `memory.max`.
    CgroupV2,
    /// A cgroup v1 `memory.limit_in_bytes`.
    CgroupV1,
    /// The machine's physical memory.
    Physical,
    /// Nothing could be read: a fixed guess.
    Unknown,
}

impl MemorySource {
    /// A name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CgroupV2 => "cgroup v2 memory.max",
            Self::CgroupV1 => "cgroup v1 memory.limit_in_bytes",
            Self::Physical => "physical memory",
            Self::Unknown => "unknown (assumed 4 GiB)",
        }
    }
}

/// The largest default budget, however much memory there is: more bytes in
/// flight than this only queue behind the cores.
pub const DEFAULT_BUDGET_CAP: usize = 2 << 30;

/// The default budget for one of `processes` front processes sharing the
/// memory: a quarter of what they may use (the cgroup limit where one is
/// set, else physical memory), capped at [`DEFAULT_BUDGET_CAP`], split
/// between them. Returns the memory it was taken from and its source too.
pub fn default_budget(processes: usize) -> (usize, u64, MemorySource) {
    let (memory, source) = memory_limit();
    let quarter = usize::try_from(memory / 4).unwrap_or(usize::MAX);
    (quarter.min(DEFAULT_BUDGET_CAP) / processes.max(1), memory, source)
}

/// The memory this process may use, and where that figure came from.
fn memory_limit() -> (u64, MemorySource) {
    let physical = nix::sys::sysinfo::sysinfo().ok().map(|info| info.ram_total());
    let cgroup = cgroup_limit();
    match (cgroup, physical) {
        (Some((limit, source)), Some(physical)) if limit < physical => (limit, source),
        (Some((limit, source)), None) => (limit, source),
        (_, Some(physical)) => (physical, MemorySource::Physical),
        (None, None) => (4 << 30, MemorySource::Unknown),
    }
}

/// The memory limit of this process's cgroup, v2 or v1, where one is set.
fn cgroup_limit() -> Option<(u64, MemorySource)> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    // v2: "0::/path"; the file sits under the unified mount. Inside a
    // container with its own cgroup namespace the path is "/".
    if let Some(path) = membership.lines().find_map(|l| l.strip_prefix("0::")) {
        let dir = format!("/sys/fs/cgroup{}", path.trim_end_matches('/'));
        for file in [format!("{dir}/memory.max"), "/sys/fs/cgroup/memory.max".to_string()] {
            if let Some(limit) = read_limit(&file) {
                return Some((limit, MemorySource::CgroupV2));
            }
        }
    }
    let v1 = membership.lines().find_map(|l| {
        let mut fields = l.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        controllers.split(',').any(|c| c == "memory").then(|| path.trim_end_matches('/').to_string())
    });
    if let Some(path) = v1 {
        for file in [
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"),
            "/sys/fs/cgroup/memory/memory.limit_in_bytes".to_string(),
        ] {
            if let Some(limit) = read_limit(&file) {
                return Some((limit, MemorySource::CgroupV1));
            }
        }
    }
    None
}

/// A limit file's value; None for "max", v1's "no limit" (a huge number
/// near 2^63) and unreadable files.
fn read_limit(file: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.trim().parse::<u64>().ok().filter(|limit| *limit < (1 << 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_all_or_nothing_and_given_back_when_dropped() {
        let budget = Budget::new(100);
        let usage = Usage::new(Arc::clone(&budget));
        budget.try_take(60).unwrap();
        usage.add_input(60);
        let refused = budget.try_take(50).unwrap_err();
        assert_eq!(refused, Refusal { wanted: 50, limit: 100, in_use: 60 });
        assert_eq!(budget.used(), 60, "a refused reservation takes nothing");
        let hold = usage.claim_input();
        usage.charge_output(70);
        assert_eq!(budget.used(), 130, "outputs are counted even over the budget");
        drop(hold);
        assert_eq!(budget.used(), 70);
        usage.discharge_output(50);
        assert_eq!(budget.used(), 20);
        usage.discharge_output(500);
        assert_eq!(budget.used(), 0, "never gives back more than was charged");
        usage.charge_output(30);
        budget.try_take(10).unwrap();
        usage.add_input(10);
        drop(usage);
        assert_eq!(budget.used(), 0, "a finished call gives back all it held");
    }

    #[tokio::test]
    async fn a_waiting_reservation_goes_through_when_bytes_are_given_back() {
        let budget = Budget::new(100);
        budget.try_take(80).unwrap();
        let waiter = {
            let budget = Arc::clone(&budget);
            tokio::spawn(async move { budget.take_within(50, Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        budget.give_back(80);
        waiter.await.unwrap().unwrap();
        assert_eq!(budget.used(), 50);
        let refused = budget.take_within(60, Duration::from_millis(10)).await.unwrap_err();
        assert_eq!(refused.in_use, 50);
    }

    #[test]
    fn the_default_is_a_capped_share_of_the_memory() {
        let (one, memory, _) = default_budget(1);
        assert!(one > 0 && one <= DEFAULT_BUDGET_CAP && one as u64 <= memory / 4);
        let (four, _, _) = default_budget(4);
        assert_eq!(four, one / 4);
    }
}
