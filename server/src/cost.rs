//! What each task is expected to cost, for admission and for the choice to
//! run tiny tasks inline. A task's own estimate (from its parameters and
//! input size) is scaled by a running average of how it measured against
//! its estimates; a task with no estimate uses its running average time.
//!
//! It also learns which tasks compute on the thread that runs them, so that
//! running them in place on an I/O thread pays (see [`crate::pool`]): a task
//! that spreads its work over the pool (`par_iter` from outside the pool
//! waits for the pool's threads) or sleeps would block the I/O thread
//! without using it.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use offload_worker::Catalog;

/// Weight of a new measurement in the running averages.
const ALPHA: f64 = 0.2;

/// Running averages per task. Updates race benignly: a lost update only
/// delays calibration, so plain atomics do without a lock on the hot path.
#[derive(Debug)]
pub struct CostModel {
    tasks: HashMap<&'static str, TaskCost>,
}

#[derive(Debug, Default)]
struct TaskCost {
    /// f64 bits: average of measured / estimated time; 0 = no sample yet.
    ratio: AtomicU64,
    /// f64 bits: average measured time in microseconds; 0 = no sample yet.
    average_us: AtomicU64,
    /// f64 bits: average share of a run in place that its thread spent on
    /// the CPU; 0 = no sample yet.
    cpu_share: AtomicU64,
}

/// A task whose runs in place average less CPU time than this share of
/// their wall time runs on the pool's threads only. The average starts at
/// 1, so it takes a few such runs: one run preempted by the OS does not
/// decide.
const MIN_CPU_SHARE: f64 = 0.5;

/// CPU time of the calling thread so far.
pub fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn load(cell: &AtomicU64) -> f64 {
    f64::from_bits(cell.load(Ordering::Relaxed))
}

fn update(cell: &AtomicU64, sample: f64) {
    let old = load(cell);
    let new = if old == 0.0 { sample } else { old + ALPHA * (sample - old) };
    cell.store(new.to_bits(), Ordering::Relaxed);
}

impl CostModel {
    /// A model with no history for every task of `catalog`.
    pub fn new(catalog: &Catalog) -> Self {
        Self::for_tasks(catalog.iter().map(|t| t.spec().name))
    }

    /// A model with no history for each of `tasks`.
    pub fn for_tasks(tasks: impl IntoIterator<Item = &'static str>) -> Self {
        Self { tasks: tasks.into_iter().map(|name| (name, TaskCost::default())).collect() }
    }

    /// The expected cost of a run of `task`, if anything is known of it.
    pub fn expected(&self, task: &str, estimate: Option<Duration>) -> Option<Duration> {
        let cost = self.tasks.get(task)?;
        match estimate {
            Some(estimate) => {
                let ratio = load(&cost.ratio);
                Some(if ratio > 0.0 { estimate.mul_f64(ratio) } else { estimate })
            }
            None => {
                let us = load(&cost.average_us);
                (us > 0.0).then(|| Duration::from_secs_f64(us / 1e6))
            }
        }
    }

    /// Whether `task` may run in place: it has not been seen waiting there.
    pub fn computes_in_place(&self, task: &str) -> bool {
        self.tasks.get(task).is_some_and(|cost| {
            let share = load(&cost.cpu_share);
            share == 0.0 || share >= MIN_CPU_SHARE
        })
    }

    /// Records that a run of `task` in place took `wall`, `cpu` of it on
    /// its thread's CPU.
    pub fn record_in_place(&self, task: &str, cpu: Duration, wall: Duration) {
        let Some(cost) = self.tasks.get(task) else { return };
        let share = (cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9)).clamp(0.0, 1.0);
        // Innocent until seen waiting a few times: the average starts at 1.
        let old = match load(&cost.cpu_share) {
            0.0 => 1.0,
            old => old,
        };
        // Floored: 0 stands for "no sample".
        cost.cpu_share.store((old + ALPHA * (share - old)).max(1e-3).to_bits(), Ordering::Relaxed);
    }

    /// Records that a run of `task` estimated at `estimate` took `actual`.
    pub fn record(&self, task: &str, estimate: Option<Duration>, actual: Duration) {
        let Some(cost) = self.tasks.get(task) else { return };
        // A floor keeps near-zero times from making wild ratios.
        let actual_us = actual.as_secs_f64().max(1e-7) * 1e6;
        update(&cost.average_us, actual_us);
        if let Some(estimate) = estimate.filter(|e| !e.is_zero()) {
            update(&cost.ratio, (actual_us / (estimate.as_secs_f64() * 1e6)).clamp(1e-3, 1e3));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use offload_worker::CatalogOptions;

    #[test]
    fn estimates_are_calibrated_by_measurements() {
        let model = CostModel::new(&Catalog::builtin(&CatalogOptions::default()));
        let est = Duration::from_millis(10);
        assert_eq!(model.expected("hash.sha256", Some(est)), Some(est));
        assert_eq!(model.expected("hash.sha256", None), None);
        assert_eq!(model.expected("no.such", Some(est)), None);
        for _ in 0..50 {
            model.record("hash.sha256", Some(est), Duration::from_millis(20));
        }
        let expected = model.expected("hash.sha256", Some(est)).unwrap();
        assert!((expected.as_secs_f64() - 0.020).abs() < 0.001, "{expected:?}");
        let average = model.expected("hash.sha256", None).unwrap();
        assert!((average.as_secs_f64() - 0.020).abs() < 0.001, "{average:?}");
    }

    #[test]
    fn a_task_seen_waiting_in_place_runs_on_the_pool() {
        let model = CostModel::new(&Catalog::builtin(&CatalogOptions::default()));
        let ms = Duration::from_millis(1);
        assert!(model.computes_in_place("hash.sha256"), "unknown tasks may try");
        assert!(!model.computes_in_place("no.such"));
        // One run that mostly waited (preempted, say) does not decide.
        model.record_in_place("hash.sha256", ms, 10 * ms);
        model.record_in_place("hash.sha256", 10 * ms, 10 * ms);
        assert!(model.computes_in_place("hash.sha256"));
        // A task that keeps waiting (parallel work, sleeps) does.
        for _ in 0..5 {
            model.record_in_place("primes.count", Duration::ZERO, 10 * ms);
        }
        assert!(!model.computes_in_place("primes.count"));
    }

    #[test]
    fn a_thread_s_cpu_time_grows_with_its_work_not_with_waiting() {
        let before = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(20));
        let slept = thread_cpu_time() - before;
        assert!(slept < Duration::from_millis(10), "{slept:?}");
        let before = thread_cpu_time();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(thread_cpu_time() - before > Duration::from_millis(5));
    }
}
