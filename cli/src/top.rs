//! `offload top` and `offload workers`: a replica's live state from its
//! admin service (`offload.admin.v1`): per task calls/s, failures and mean
//! times over the last interval, the executors' queues, and every worker
//! process (pid, state, task, RSS, tasks done, age).

use std::{collections::HashMap, fmt::Write as _, io::IsTerminal as _, time::Duration};

use anyhow::Context as _;
use offload_proto::offload::admin::v1::{SnapshotRequest, SnapshotResponse, TaskTotals, admin_client::AdminClient};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

use crate::{Credentials, status_error};

/// The admin client, with the CLI's credentials.
pub type Admin = AdminClient<InterceptedService<Channel, Credentials>>;

async fn snapshot(admin: &mut Admin) -> anyhow::Result<SnapshotResponse> {
    Ok(admin.snapshot(SnapshotRequest {}).await.map_err(status_error)?.into_inner())
}

/// Prints the workers once.
pub async fn workers(admin: &mut Admin) -> anyhow::Result<()> {
    let now = snapshot(admin).await?;
    print!("{}", workers_table(&now));
    Ok(())
}

/// Redraws the view every `interval`, `iterations` times (None: until
/// interrupted).
pub async fn top(admin: &mut Admin, interval: Duration, iterations: Option<u64>) -> anyhow::Result<()> {
    let terminal = std::io::stdout().is_terminal();
    let mut before = snapshot(admin).await?;
    let mut shown = 0;
    while iterations.is_none_or(|n| shown < n) {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let now = snapshot(admin).await?;
        let frame = render(&before, &now);
        if terminal {
            // Clear the screen and go home, then draw.
            print!("\x1b[2J\x1b[H{frame}");
        } else {
            println!("{frame}");
        }
        std::io::Write::flush(&mut std::io::stdout()).context("writing to stdout")?;
        before = now;
        shown += 1;
    }
    Ok(())
}

/// One frame: the changes from `before` to `now`.
fn render(before: &SnapshotResponse, now: &SnapshotResponse) -> String {
    let seconds = (now.uptime_seconds - before.uptime_seconds).max(1e-3);
    let mut out = String::new();
    let _ = writeln!(out, "offload top: replica {}, up {}", now.replica, age(now.uptime_seconds));
    let queues: Vec<String> = now
        .executors
        .iter()
        .map(|e| format!("{} {}/{} busy, {} queued", e.executor, e.busy, e.size, e.queued))
        .collect();
    let _ = writeln!(out, "{}\n", queues.join(" | "));
    let _ = writeln!(
        out,
        "{:<28} {:<9} {:>10} {:>9} {:>10} {:>10} {:>10}",
        "TASK", "MODE", "CALLS/S", "FAILED/S", "MEAN RUN", "MEAN WAIT", "CALLS"
    );
    let previous: HashMap<(&str, &str), &TaskTotals> =
        before.tasks.iter().map(|t| ((t.task.as_str(), t.mode.as_str()), t)).collect();
    let zero = TaskTotals::default();
    for task in &now.tasks {
        let was = previous.get(&(task.task.as_str(), task.mode.as_str())).copied().unwrap_or(&zero);
        let ran = task.ran.saturating_sub(was.ran);
        let mean = |now: f64, was: f64| if ran == 0 { "-".to_string() } else { ms((now - was) / ran as f64) };
        let _ = writeln!(
            out,
            "{:<28} {:<9} {:>10.1} {:>9.1} {:>10} {:>10} {:>10}",
            task.task,
            task.mode,
            task.calls.saturating_sub(was.calls) as f64 / seconds,
            task.failed.saturating_sub(was.failed) as f64 / seconds,
            mean(task.run_seconds, was.run_seconds),
            mean(task.queued_seconds, was.queued_seconds),
            task.calls,
        );
    }
    out.push('\n');
    out.push_str(&workers_table(now));
    out
}

fn workers_table(now: &SnapshotResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:>4} {:>8} {:<9} {:<24} {:>10} {:>8} {:>9}",
        "POOL", "SLOT", "PID", "STATE", "TASK", "RSS", "TASKS", "AGE"
    );
    for w in &now.workers {
        let pid = if w.pid == 0 { "-".to_string() } else { w.pid.to_string() };
        let task = if w.task.is_empty() { "-" } else { &w.task };
        let rss = if w.rss_bytes == 0 { "-".to_string() } else { format!("{:.1} MiB", w.rss_bytes as f64 / 1048576.0) };
        let _ = writeln!(
            out,
            "{:<12} {:>4} {:>8} {:<9} {:<24} {:>10} {:>8} {:>9}",
            w.pool,
            w.slot,
            pid,
            w.state,
            task,
            rss,
            w.tasks_done,
            age(w.age_seconds)
        );
    }
    out
}

fn ms(seconds: f64) -> String {
    format!("{:.2} ms", seconds * 1e3)
}

fn age(seconds: f64) -> String {
    let s = seconds as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use offload_proto::offload::admin::v1::Worker;

    use super::*;

    #[test]
    fn a_frame_shows_rates_over_the_interval_and_every_worker() {
        let task = |calls, failed, ran, run_seconds| TaskTotals {
            task: "hash.sha256".into(),
            mode: "POOL".into(),
            calls,
            failed,
            ran,
            run_seconds,
            queued_seconds: 0.0,
            ..Default::default()
        };
        let before =
            SnapshotResponse { uptime_seconds: 10.0, tasks: vec![task(100, 0, 100, 0.1)], ..Default::default() };
        let now = SnapshotResponse {
            replica: "r1".into(),
            uptime_seconds: 12.0,
            tasks: vec![task(300, 4, 300, 0.5)],
            workers: vec![Worker {
                pool: "ISOLATED".into(),
                pid: 42,
                state: "busy".into(),
                task: "image.thumbnail".into(),
                rss_bytes: 3 << 20,
                tasks_done: 7,
                age_seconds: 75.0,
                ..Default::default()
            }],
            ..Default::default()
        };
        let frame = render(&before, &now);
        // 200 calls and 4 failures in 2 s; 0.4 s of run time over 200 calls.
        assert!(frame.contains("100.0") && frame.contains("2.0") && frame.contains("2.00 ms"), "{frame}");
        assert!(frame.contains("image.thumbnail") && frame.contains("3.0 MiB") && frame.contains("1m15s"), "{frame}");
    }
}
