//! What each task is expected to cost, for admission and for the choice to
//! run tiny tasks inline. A task's own estimate (from its parameters and
//! input size) is scaled by a running average of how it measured against
//! its estimates; a task with no estimate uses its running average time.

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
}
