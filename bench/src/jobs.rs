//! Scenario 14's measuring tools: jobs submitted and awaited through
//! Offload's `offload.v1.Jobs` (Submit, then Wait to the end), counted the
//! way `bench/programs/bullmq_jobs.js` and `celery_jobs.py` count theirs,
//! and the Redis server those baselines run on.

use std::{
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use offload_proto::offload::v1::{JobState, SubmitJobRequest, WaitJobRequest, jobs_client::JobsClient};
use tonic::transport::Channel;

/// The work of one job, the same in every system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SHA-256 of 1 KiB: the queue's own cost dominates.
    Sha256,
    /// 50 ms of CPU.
    Spin,
}

impl Kind {
    /// Its name in the baselines' programs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sha256 => "sha256",
            Kind::Spin => "spin",
        }
    }

    fn request(self, input: &[u8]) -> SubmitJobRequest {
        let (task, params) = match self {
            Kind::Sha256 => ("hash.sha256", vec![]),
            Kind::Spin => ("debug.spin", vec![("ms".to_string(), "50".to_string())]),
        };
        SubmitJobRequest {
            task: task.into(),
            input: input.to_vec().into(),
            params: params.into_iter().collect(),
            ..Default::default()
        }
    }
}

/// How a batch of jobs went, in every system's terms.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct JobsResult {
    /// Jobs that ended successfully.
    pub done: usize,
    /// Jobs that failed or were never answered.
    pub failed: usize,
    /// From the first submit to the last end.
    pub seconds: f64,
    /// Submit-to-done latency, median, microseconds.
    pub p50_us: f64,
    /// Submit-to-done latency, 99th percentile, microseconds.
    pub p99_us: f64,
}

impl JobsResult {
    /// The report a baseline's bench printed last in `out`.
    pub fn parse(out: &str, what: &str) -> anyhow::Result<Self> {
        let last = out.lines().last().unwrap_or_default();
        serde_json::from_str(last).with_context(|| format!("the {what} bench's report: {out}"))
    }

    /// Jobs done per second.
    pub fn per_sec(&self) -> f64 {
        self.done as f64 / self.seconds.max(1e-9)
    }
}

/// Submits `count` jobs of `kind` to the Offload server at `url`, `in_flight`
/// at a time over 4 connections, each awaited (Wait) to its end.
pub async fn offload(url: &str, kind: Kind, count: usize, in_flight: usize) -> anyhow::Result<JobsResult> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        let channel = Channel::from_shared(url.to_string())?.connect().await.context("connecting")?;
        clients.push(JobsClient::new(channel));
    }
    let input: Vec<u8> = (0..1024).map(|i| (i * 131 + 7) as u8).collect();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let submitters = (0..in_flight).map(|i| {
        let (mut client, next, request) = (clients[i % clients.len()].clone(), Arc::clone(&next), kind.request(&input));
        tokio::spawn(async move {
            let mut latencies = Histogram::<u64>::new(3).expect("a histogram");
            let mut failed = 0;
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let t0 = Instant::now();
                match submit_and_wait(&mut client, request.clone()).await {
                    Ok(true) => latencies.record(t0.elapsed().as_micros() as u64).expect("in range"),
                    _ => failed += 1,
                }
            }
            (latencies, failed)
        })
    });
    let mut latencies = Histogram::<u64>::new(3)?;
    let mut failed = 0;
    for submitter in futures::future::join_all(submitters).await {
        let (theirs, their_failed) = submitter?;
        latencies.add(theirs)?;
        failed += their_failed;
    }
    Ok(JobsResult {
        done: latencies.len() as usize,
        failed,
        seconds: started.elapsed().as_secs_f64(),
        p50_us: latencies.value_at_quantile(0.5) as f64,
        p99_us: latencies.value_at_quantile(0.99) as f64,
    })
}

/// Scenario 14's kill run, Offload's side: `count` `py.logged_spin` jobs
/// (keyed by number; the front's Python worker program runs them),
/// `in_flight` at a time, each submitted under its key as idempotency key
/// until acknowledged and awaited to its end across restarts of the front
/// (waiting again after a broken stream), until `end`. What did not end
/// SUCCEEDED by then counts as failed.
pub async fn offload_through_kills(
    url: &str,
    count: usize,
    in_flight: usize,
    end: Instant,
) -> anyhow::Result<JobsResult> {
    // Lazy: it connects again after the front comes back.
    let client = JobsClient::new(Channel::from_shared(url.to_string())?.connect_lazy());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let submitters = (0..in_flight).map(|_| {
        let (mut client, next) = (client.clone(), Arc::clone(&next));
        tokio::spawn(async move {
            let (mut done, mut failed) = (0, 0);
            loop {
                let key = next.fetch_add(1, Ordering::Relaxed);
                if key >= count {
                    return (done, failed);
                }
                let request = SubmitJobRequest {
                    task: "py.logged_spin".into(),
                    input: key.to_string().into_bytes().into(),
                    idempotency_key: key.to_string(),
                    ..Default::default()
                };
                match through_restarts(&mut client, request, end).await {
                    true => done += 1,
                    false => failed += 1,
                }
            }
        })
    });
    let (mut done, mut failed) = (0, 0);
    for submitter in futures::future::join_all(submitters).await {
        let (theirs, their_failed) = submitter?;
        (done, failed) = (done + theirs, failed + their_failed);
    }
    Ok(JobsResult { done, failed, seconds: started.elapsed().as_secs_f64(), p50_us: 0.0, p99_us: 0.0 })
}

/// Submits `request` until acknowledged, then waits for its end, again and
/// again while the front is away, until `end`: whether it succeeded.
async fn through_restarts(client: &mut JobsClient<Channel>, request: SubmitJobRequest, end: Instant) -> bool {
    const AGAIN: Duration = Duration::from_millis(50);
    let id = loop {
        match client.submit(request.clone()).await {
            Ok(job) => break job.into_inner().id,
            Err(_) if Instant::now() < end => tokio::time::sleep(AGAIN).await,
            Err(_) => return false,
        }
    };
    while Instant::now() < end {
        if let Ok(changes) = client.wait(WaitJobRequest { id: id.clone() }).await {
            let mut changes = changes.into_inner();
            while let Ok(Some(job)) = changes.message().await {
                match JobState::try_from(job.state) {
                    Ok(JobState::Succeeded) => return true,
                    Ok(JobState::Failed | JobState::Cancelled) => return false,
                    _ => {}
                }
            }
        }
        tokio::time::sleep(AGAIN).await;
    }
    false
}

/// What a kill run's log (lines "S|E KEY UNIX_NS PID") says of the runs of
/// each job: how many jobs started more than once, and how many of those
/// had two runs at the same time (a run with no end, its process killed,
/// counts as ending when it started).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reruns {
    /// Jobs whose work started more than once.
    pub twice: usize,
    /// Jobs two of whose runs overlapped.
    pub at_once: usize,
}

impl Reruns {
    /// Reads `log`.
    pub fn of(log: &str) -> Self {
        use std::collections::HashMap;
        // (key, pid) -> (start, end)
        let mut runs: HashMap<(&str, &str), (u128, Option<u128>)> = HashMap::new();
        let mut order: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
        for line in log.lines() {
            let mut parts = line.split(' ');
            let (Some(what), Some(key), Some(at), Some(pid)) = (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(at) = at.parse::<u128>() else { continue };
            match what {
                "S" => {
                    runs.insert((key, pid), (at, None));
                    order.entry(key).or_default().push((key, pid));
                }
                "E" => {
                    if let Some(run) = runs.get_mut(&(key, pid)) {
                        run.1 = Some(at);
                    }
                }
                _ => {}
            }
        }
        let mut reruns = Reruns { twice: 0, at_once: 0 };
        for starts in order.values().filter(|starts| starts.len() > 1) {
            reruns.twice += 1;
            let mut spans: Vec<(u128, u128)> =
                starts.iter().filter_map(|run| runs.get(run)).map(|&(s, e)| (s, e.unwrap_or(s))).collect();
            spans.sort();
            if spans.windows(2).any(|pair| pair[1].0 < pair[0].1) {
                reruns.at_once += 1;
            }
        }
        reruns
    }
}

/// Submits `request` and waits for its end: whether it succeeded.
async fn submit_and_wait(client: &mut JobsClient<Channel>, request: SubmitJobRequest) -> anyhow::Result<bool> {
    let job = client.submit(request).await?.into_inner();
    let mut changes = client.wait(WaitJobRequest { id: job.id }).await?.into_inner();
    let mut last = None;
    while let Some(job) = changes.message().await? {
        last = Some(job.state);
    }
    Ok(last == Some(JobState::Succeeded as i32))
}

/// A Redis server for the baselines (Debian's `redis-server`, installed the
/// first time if need be), killed on drop. Its durability is the usual
/// production setting for a queue: an append-only file synced every second
/// (snapshots alone would lose minutes of jobs).
pub struct Redis {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// The durability setting the report states beside the baselines' figures.
pub const REDIS_DURABILITY: &str = "Redis appendonly yes, appendfsync everysec (a power loss may lose the last second)";

impl Redis {
    /// Starts one on a free port; returns once it answers.
    pub fn start() -> anyhow::Result<Self> {
        if Command::new("redis-server").arg("--version").output().is_err() {
            let installed = Command::new("sh")
                .args([
                    "-c",
                    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server",
                ])
                .status();
            if Command::new("redis-server").arg("--version").output().is_err() {
                bail!("redis-server is missing and `apt-get install redis-server` did not work ({installed:?})");
            }
        }
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        let redis = Self { child, port, _dir: dir };
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > end {
                bail!("redis-server did not listen on {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::Reruns;

    #[test]
    fn runs_are_counted_per_job_and_overlaps_found() {
        let log =
            "S 1 100 7\nE 1 120 7\nS 2 100 7\nS 2 5000 8\nE 2 5020 8\nS 3 100 7\nS 3 110 8\nE 3 130 8\nE 3 125 7\n";
        assert_eq!(Reruns::of(log), Reruns { twice: 2, at_once: 1 });
    }
}
