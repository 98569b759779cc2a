//! CPU time and resident memory of a process and its children, from /proc,
//! so a benchmark can report what the server (front and workers) spent.

use std::time::Duration;

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

fn ticks_per_second() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

/// (cpu ticks, rss pages) of `pid`.
fn read(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3; utime 14, stime 15, rss 24 (1-based).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss: u64 = fields.get(21)?.parse().ok()?;
    Some((utime + stime, rss))
}

/// Live children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                out.extend(list.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Reads the tree rooted at `pid`. CPU of children that already exited is
/// not counted (workers live for the whole run in these benchmarks).
pub fn tree(pid: u32) -> TreeStat {
    let page = rustix::param::page_size() as u64;
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
        cpu: Duration::from_secs_f64(ticks as f64 / ticks_per_second()),
        front_rss: front_pages * page,
        max_worker_rss: max_worker,
    }
}
