//! What each call is expected to cost, for admission and for the choice to
//! run tiny tasks inline. A call is costed from its own params and input,
//! never from what other calls of its task happened to cost:
//! - a task that estimates its jobs ([`Sizing::Estimate`]) has each estimate
//!   scaled by a running average of how its runs measured against their
//!   estimates, so an estimate ten times off is corrected and a cheap call
//!   stays cheap after expensive ones;
//! - a task that cannot (worker programs, tasks without `Job::estimate`) is
//!   sized by a number its time grows with: a declared cost param's value
//!   ([`Sizing::Units`]), else its input's size ([`Sizing::Input`]). Its time
//!   is learned as a line (a fixed part and a part per unit) fitted to its
//!   measured runs. While one size is all it has seen, a cost param is taken
//!   at its word (time proportional to it), an input size is not (the time
//!   seen is used whatever the size: most of a small call may be overhead).
//!
//! Only runs that finished teach it: a run stopped by its deadline or its
//! caller says nothing of what the whole run would have cost.
//!
//! It also learns which tasks compute on the thread that runs them, so that
//! running them in place on an I/O thread pays (see [`crate::pool`]): a task
//! that spreads its work over the pool (`par_iter` from outside the pool
//! waits for the pool's threads) or sleeps would block the I/O thread
//! without using it.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use offload_worker::{Catalog, Job};

/// Weight of a new measurement in the running averages.
const ALPHA: f64 = 0.2;

/// How a call's cost is sized before it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sizing {
    /// The job's own estimate of its time.
    Estimate(Duration),
    /// A number the job's time grows in proportion to, in no particular
    /// unit (a declared cost param's value).
    Units(f64),
    /// The size of its input, in bytes.
    Input(usize),
}

/// A task's lines: time against cost units, and against input bytes.
const UNITS: usize = 0;
const INPUT: usize = 1;

impl Sizing {
    /// How `job` with `input_len` bytes of input is sized: its estimate if
    /// it gives one, else its cost units, else its input's size.
    pub fn of(job: &dyn Job, input_len: usize) -> Self {
        match job.estimate(input_len) {
            Some(estimate) => Sizing::Estimate(estimate),
            None => match job.cost_units() {
                Some(units) => Sizing::Units(units.max(0.0)),
                None => Sizing::Input(input_len),
            },
        }
    }
}

/// What is known of each task's costs. The estimate path updates plain
/// atomics (races are benign: a lost update only delays calibration); the
/// fitted line takes a short lock, once per finished call.
#[derive(Debug)]
pub struct CostModel {
    tasks: HashMap<&'static str, TaskCost>,
}

#[derive(Debug, Default)]
struct TaskCost {
    /// f64 bits: average of measured / estimated time; 0 = no sample yet.
    ratio: AtomicU64,
    /// Time against cost units, and against input bytes.
    lines: Mutex<[Line; 2]>,
    /// f64 bits: average share of a run in place that its thread spent on
    /// the CPU; 0 = no sample yet.
    cpu_share: AtomicU64,
}

impl TaskCost {
    fn line(&self, which: usize) -> Line {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())[which]
    }

    fn add_to_line(&self, which: usize, x: f64, us: f64) {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())[which].add(x, us);
    }
}

fn from_us(us: f64) -> Duration {
    Duration::from_secs_f64(us / 1e6)
}

/// A line fitted to (units, microseconds) samples by exponentially weighted
/// least squares: recent runs count most, as in the running averages.
#[derive(Debug, Default, Clone, Copy)]
struct Line {
    /// Weighted sums of 1, x, y, x² and xy.
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl Line {
    fn add(&mut self, x: f64, y: f64) {
        let keep = 1.0 - ALPHA;
        self.w = keep * self.w + ALPHA;
        self.x = keep * self.x + ALPHA * x;
        self.y = keep * self.y + ALPHA * y;
        self.xx = keep * self.xx + ALPHA * x * x;
        self.xy = keep * self.xy + ALPHA * x * y;
    }

    /// The expected microseconds at `x` units; None before any sample.
    /// While the sizes seen hardly vary, the time is taken as proportional
    /// to the size if `proportional`, else as what was seen.
    fn at(&self, x: f64, proportional: bool) -> Option<f64> {
        if self.w == 0.0 {
            return None;
        }
        let (mean_x, mean_y) = (self.x / self.w, self.y / self.w);
        let variance = self.xx / self.w - mean_x * mean_x;
        let us = if variance > 1e-6 * mean_x.abs().max(1.0).powi(2) {
            let slope = ((self.xy / self.w - mean_x * mean_y) / variance).max(0.0);
            mean_y + slope * (x - mean_x)
        } else if proportional && mean_x > 0.0 {
            mean_y * x / mean_x
        } else {
            mean_y
        };
        // Below the sizes seen the line may cross zero: floored, as samples are.
        Some(us.max(FLOOR_US))
    }
}

/// Near-zero times are floored, so that ratios stay sane.
const FLOOR_US: f64 = 0.1;

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

    /// The expected cost of a run of `task` sized `sizing`, if anything is
    /// known of it: an estimate always, units once a run was measured.
    pub fn expected(&self, task: &str, sizing: Sizing) -> Option<Duration> {
        let cost = self.tasks.get(task)?;
        match sizing {
            Sizing::Estimate(estimate) => {
                let ratio = load(&cost.ratio);
                Some(if ratio > 0.0 { estimate.mul_f64(ratio) } else { estimate })
            }
            Sizing::Units(units) => cost.line(UNITS).at(units, true).map(from_us),
            Sizing::Input(bytes) => cost.line(INPUT).at(bytes as f64, false).map(from_us),
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

    /// Records that a finished run of `task` sized `sizing` took `actual`.
    pub fn record(&self, task: &str, sizing: Sizing, actual: Duration) {
        let Some(cost) = self.tasks.get(task) else { return };
        let actual_us = (actual.as_secs_f64() * 1e6).max(FLOOR_US);
        match sizing {
            Sizing::Estimate(estimate) if !estimate.is_zero() => {
                update(&cost.ratio, (actual_us / (estimate.as_secs_f64() * 1e6)).clamp(1e-3, 1e3));
            }
            Sizing::Estimate(_) => {}
            Sizing::Units(units) => cost.add_to_line(UNITS, units, actual_us),
            Sizing::Input(bytes) => cost.add_to_line(INPUT, bytes as f64, actual_us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use offload_worker::CatalogOptions;

    const MS: Duration = Duration::from_millis(1);

    fn model() -> CostModel {
        CostModel::for_tasks(["hash.sha256", "debug.spin", "debug.echo", "debug.sleep"])
    }

    fn close(actual: Option<Duration>, expected: Duration) -> bool {
        actual.is_some_and(|a| (a.as_secs_f64() - expected.as_secs_f64()).abs() < expected.as_secs_f64() * 0.05)
    }

    #[test]
    fn estimates_are_calibrated_by_measurements() {
        let model = model();
        let est = Sizing::Estimate(10 * MS);
        assert_eq!(model.expected("hash.sha256", est), Some(10 * MS), "an estimate is used as it is at first");
        assert_eq!(model.expected("hash.sha256", Sizing::Units(100.0)), None, "units mean nothing until measured");
        assert_eq!(model.expected("hash.sha256", Sizing::Input(100)), None, "nor do sizes");
        assert_eq!(model.expected("no.such", est), None);
        for _ in 0..50 {
            model.record("hash.sha256", est, 20 * MS);
        }
        assert!(close(model.expected("hash.sha256", est), 20 * MS));
        assert!(close(model.expected("hash.sha256", Sizing::Estimate(MS)), 2 * MS), "the factor, not the time");
    }

    /// The sequence: expensive calls of a task, then cheap ones of
    /// the same task. Each is costed from its own size, so the cheap ones
    /// stay cheap whichever way the task is sized.
    #[test]
    fn a_cheap_call_is_not_costed_by_the_expensive_ones_before_it() {
        let model = model();
        for _ in 0..5 {
            model.record("debug.spin", Sizing::Estimate(5000 * MS), 5000 * MS);
        }
        assert!(close(model.expected("debug.spin", Sizing::Estimate(100 * MS)), 100 * MS));

        // Sized by units (a cost param, or the input): the line through
        // what was measured, not its average.
        for (units, ms) in [(5000.0, 5010), (5000.0, 5003), (2000.0, 2006), (5000.0, 4990)] {
            model.record("debug.echo", Sizing::Units(units), ms * MS);
        }
        assert!(close(model.expected("debug.echo", Sizing::Units(100.0)), 106 * MS), "{:?}", {
            model.expected("debug.echo", Sizing::Units(100.0))
        });
        assert!(close(model.expected("debug.echo", Sizing::Units(10_000.0)), 10_000 * MS));
        // One size seen: proportional to it (a worker program's spin whose
        // declared cost param is its milliseconds, say).
        for _ in 0..2 {
            model.record("debug.sleep", Sizing::Units(1500.0), 1500 * MS);
        }
        assert!(close(model.expected("debug.sleep", Sizing::Units(100.0)), 100 * MS));
        // Input sizes: a line once sizes vary, like units; while one size
        // is all there is, what it took, whatever the size (a tiny call's
        // time is mostly overhead: a thousand times the input is not a
        // thousand times the time).
        for _ in 0..3 {
            model.record("hash.sha256", Sizing::Input(1000), 40 * MS);
        }
        assert!(close(model.expected("hash.sha256", Sizing::Input(1_000_000)), 40 * MS));
        assert!(close(model.expected("hash.sha256", Sizing::Input(0)), 40 * MS));
        model.record("hash.sha256", Sizing::Input(1_000_000), 1000 * MS);
        let big = model.expected("hash.sha256", Sizing::Input(2_000_000)).unwrap();
        assert!(big > 1500 * MS, "{big:?}");
        assert_eq!(model.expected("hash.sha256", Sizing::Units(1000.0)), None, "units and bytes are apart");
    }

    /// A task whose estimates are ten times too low is admitted on them at
    /// first; once measured, a call that cannot start before its deadline
    /// is refused, and one that can is admitted.
    #[test]
    fn an_estimate_ten_times_too_low_is_refused_correctly_once_measured() {
        use crate::{
            admission::{Admission, Refusal},
            schedule::Priority::Interactive,
        };
        let model = model();
        let claims = Sizing::Estimate(100 * MS);
        let admission = Admission::new(1, 10);
        let cost = model.expected("debug.spin", claims).unwrap();
        let mut running = admission.admit(cost, None, Interactive).unwrap();
        running.start();
        let soon = || Some(std::time::Instant::now() + 500 * MS);
        assert!(admission.admit(MS, soon(), Interactive).is_ok(), "on its own word, it ends in 100 ms");
        drop(running);

        for _ in 0..10 {
            model.record("debug.spin", claims, 1000 * MS);
        }
        let cost = model.expected("debug.spin", claims).unwrap();
        assert!(close(Some(cost), 1000 * MS), "{cost:?}");
        let mut running = admission.admit(cost, None, Interactive).unwrap();
        running.start();
        match admission.admit(MS, soon(), Interactive) {
            Err(Refusal::WouldMissDeadline { wait, .. }) => assert!(wait > 900 * MS, "{wait:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(admission.admit(MS, Some(std::time::Instant::now() + 2000 * MS), Interactive).is_ok());
    }

    #[test]
    fn a_job_is_sized_by_its_estimate_else_its_units_else_its_input() {
        struct Sized(Option<Duration>, Option<f64>);
        impl Job for Sized {
            fn estimate(&self, _input_len: usize) -> Option<Duration> {
                self.0
            }
            fn cost_units(&self) -> Option<f64> {
                self.1
            }
            fn run(
                &self,
                _: &offload_worker::Context,
                input: bytes::Bytes,
            ) -> Result<bytes::Bytes, offload_worker::TaskError> {
                Ok(input)
            }
        }
        assert_eq!(Sizing::of(&Sized(Some(MS), Some(7.0)), 10), Sizing::Estimate(MS));
        assert_eq!(Sizing::of(&Sized(None, Some(7.0)), 10), Sizing::Units(7.0));
        assert_eq!(Sizing::of(&Sized(None, None), 10), Sizing::Input(10));
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
