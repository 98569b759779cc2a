//! The operators' view against the real thing: Prometheus (Debian's
//! package; `.ci/run` installs it) scrapes a running server under a load
//! made to trigger every alert of `deploy/prometheus/alerts.yml`: successes
//! and INTERNAL failures, slow calls, crashing workers, refused calls, and
//! a replica that is down. Every alert must fire, and every expression of
//! the Grafana dashboard (`deploy/grafana/dashboards/offload.json`) and of
//! the alerts must return series.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use offload_e2e::{Server, http_get, request};
use offload_proto::offload::v1::{ExecuteRequest, ExecutionMode, SubmitJobRequest};
use serde_json::Value;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

fn find_prometheus() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join("prometheus")).find(|p| p.is_file()))
}

/// The prometheus binary, from Debian's package.
fn prometheus_binary() -> PathBuf {
    offload_e2e::from_debian("prometheus", find_prometheus)
}

/// A Prometheus process, killed when dropped.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts Prometheus in `dir` scraping `targets` every second with the
/// deployed alert rules, their durations cut so that a test need not wait
/// minutes: each `for` to 2 s, and the queued jobs' age to 3 s.
fn start_prometheus(dir: &Path, targets: &[String]) -> Prometheus {
    let rules: String = std::fs::read_to_string(deploy("prometheus/alerts.yml"))
        .unwrap()
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for:") {
            Some(_) => format!("{}for: 2s\n", &line[..line.len() - line.trim_start().len()]),
            None if line.contains("offload_oldest_queued_job_age_seconds) > 300") => {
                format!("{}\n", line.replace("> 300", "> 3"))
            }
            None => format!("{line}\n"),
        })
        .collect();
    std::fs::write(dir.join("alerts.yml"), rules).unwrap();
    let targets: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n\
         scrape_configs:\n  - job_name: offload\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(prometheus_binary())
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    Prometheus { child, addr }
}

/// GET `path` of Prometheus's API, parsed (blocking; run off the runtime).
async fn api(addr: &str, path: String) -> Option<Value> {
    let addr = addr.to_string();
    let (status, body) = tokio::task::spawn_blocking(move || http_get(&addr, &path)).await.unwrap().ok()?;
    (status == 200).then(|| serde_json::from_str(&body).ok()).flatten()
}

/// `text` for a URL's query string.
fn encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The series `expr` returns now.
async fn query(addr: &str, expr: &str) -> Vec<Value> {
    let answer = api(addr, format!("/api/v1/query?query={}", encoded(expr))).await;
    answer
        .and_then(|a| a["data"]["result"].as_array().cloned())
        .unwrap_or_else(|| panic!("Prometheus refused the query {expr}"))
}

/// Names of the alerts firing now.
async fn firing(addr: &str) -> Vec<String> {
    let Some(answer) = api(addr, "/api/v1/alerts".into()).await else { return Vec::new() };
    let alerts = answer["data"]["alerts"].as_array().cloned().unwrap_or_default();
    alerts
        .iter()
        .filter(|a| a["state"] == "firing")
        .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
        .collect()
}

/// The load: successes, INTERNAL failures, calls slower than 2 s, crashing
/// workers and refused calls, round after round until `stop`.
async fn load(server: &Server, stop: Arc<AtomicBool>) {
    let client = server.client().await;
    let isolated = |r: ExecuteRequest| ExecuteRequest { mode: ExecutionMode::Isolated as i32, ..r };
    let mut round = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let mut calls = Vec::new();
        // Repeated work (cache hits), and new work that evicts the oldest
        // results from a small cache.
        for n in 0..6 {
            let input = if n < 3 { b"ok".to_vec() } else { (round * 3 + n).to_be_bytes().to_vec() };
            calls.push(request("hash.sha256", &[], input));
        }
        round += 1;
        calls.push(request("debug.panic", &[], vec![]));
        calls.push(isolated(request("debug.abort", &[], vec![])));
        calls.push(isolated(request("debug.sleep", &[("ms", "2500")], vec![])));
        // One pool thread and two queue places: most of these are refused.
        for _ in 0..6 {
            calls.push(request("debug.sleep", &[("ms", "300")], vec![]));
        }
        let sent = calls.into_iter().map(|call| {
            let mut client = client.clone();
            async move { client.execute(call).await.map(drop).map_err(|s| s.code()) }
        });
        futures::future::join_all(sent).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_fires_and_every_dashboard_query_returns_series_in_a_real_prometheus() {
    let server = Server::start(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--pool-threads",
        "1",
        "--queue-capacity",
        "2",
        "--workers",
        "1",
        "--cache-max-bytes",
        "2000",
    ]);
    // A front running jobs, with more queued than it has room for: one
    // sleeps in its pool, one waits for the pool, the rest wait for it.
    let jobs_front = Server::start(&["--metrics-listen", "127.0.0.1:0", "--pool-threads", "1", "--workers", "1"]);
    let mut jobs = crate::jobs::jobs(&jobs_front).await;
    let done = jobs.submit(crate::jobs::submit("hash.sha256", &[], b"")).await.unwrap().into_inner();
    crate::jobs::wait(&mut jobs, &done.id).await;
    for _ in 0..3 {
        let sleep = crate::jobs::submit("debug.sleep", &[("ms", "600000")], b"");
        jobs.submit(SubmitJobRequest { mode: ExecutionMode::Pool as i32, ..sleep }).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    // A second replica that is down.
    let down = format!("127.0.0.1:{}", free_port());
    let prometheus = start_prometheus(dir.path(), &[server.metrics_addr(), jobs_front.metrics_addr(), down]);
    let ready = Instant::now() + Duration::from_secs(30);
    while api(&prometheus.addr, "/api/v1/status/buildinfo".into()).await.is_none() {
        assert!(Instant::now() < ready, "Prometheus did not start within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let loaded = {
        let stop = Arc::clone(&stop);
        let server = &server;
        async move { load(server, stop).await }
    };
    let expected = [
        "OffloadErrorRatioHigh",
        "OffloadTaskP99High",
        "OffloadWorkersRestarting",
        "OffloadRefusingCalls",
        "OffloadReplicaDown",
        "OffloadJobsWaiting",
    ];
    let watched = async {
        let bound = Instant::now() + Duration::from_secs(120);
        loop {
            let now = firing(&prometheus.addr).await;
            if expected.iter().all(|name| now.iter().any(|f| f == name)) {
                stop.store(true, Ordering::Relaxed);
                return now;
            }
            if Instant::now() > bound {
                stop.store(true, Ordering::Relaxed);
                return now;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let ((), fired) = tokio::join!(loaded, watched);
    for name in expected {
        assert!(fired.iter().any(|f| f == name), "{name} did not fire within 2 minutes (firing: {fired:?})");
    }

    // Every alert's expression returns series now (they are firing)...
    let rules = api(&prometheus.addr, "/api/v1/rules".into()).await.expect("rules");
    let mut alert_queries = Vec::new();
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            alert_queries.push(rule["query"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(alert_queries.len(), expected.len(), "every deployed rule was loaded");
    for expr in &alert_queries {
        assert!(!query(&prometheus.addr, expr).await.is_empty(), "the alert expression returned nothing: {expr}");
    }
    // ...and so does every panel of the dashboard.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/dashboards/offload.json")).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10, "the dashboard has its panels");
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$__rate_interval", "1m");
            assert!(
                !query(&prometheus.addr, &expr).await.is_empty(),
                "panel {:?} returned no series: {expr}",
                panel["title"]
            );
        }
    }
}
