//! CPU time and resident memory of a process and its children, from /proc,
//! so a benchmark can report what the server (front and workers) spent.

use std::time::Duration;

use procfs::process::Process;

/// A reading of one process tree.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TreeStat {
    /// User + system CPU time of the front and its live children.
    pub cpu: Duration,
    /// Resident memory of the front, bytes.
    pub front_rss: u64,
    /// Largest resident memory among the children, bytes.
    pub max_worker_rss: u64,
}

/// (cpu ticks, rss pages) of `pid`.
fn read(pid: u32) -> Option<(u64, u64)> {
    let stat = Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok()?;
    Some((stat.utime + stat.stime, stat.rss))
}

/// Children of `pid` (of any of its threads).
pub fn children(pid: u32) -> Vec<u32> {
    let tasks = i32::try_from(pid).ok().and_then(|pid| Process::new(pid).ok()).and_then(|p| p.tasks().ok());
    let mut out: Vec<u32> =
        tasks.into_iter().flatten().flatten().filter_map(|task| task.children().ok()).flatten().collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Reads the tree rooted at `pid`. CPU of children that already exited is
/// not counted (workers live for the whole run in these benchmarks).
pub fn tree(pid: u32) -> TreeStat {
    let page = procfs::page_size();
    let (front_ticks, front_pages) = read(pid).unwrap_or_default();
    let mut ticks = front_ticks;
    let mut max_worker = 0;
    for child in children(pid) {
        if let Some((t, pages)) = read(child) {
            ticks += t;
            max_worker = max_worker.max(pages * page);
        }
    }
    TreeStat {
        cpu: Duration::from_secs_f64(ticks as f64 / procfs::ticks_per_second() as f64),
        front_rss: front_pages * page,
        max_worker_rss: max_worker,
    }
}
