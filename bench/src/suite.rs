//! The benchmark suite: every scenario of the performance targets, each
//! against its baseline in the same run, written to `BENCHMARKS.md`.
//! Ratios, not absolute numbers, are the point: the machine is noisy, so
//! each scenario runs several times and reports the median.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use offload_proto::offload::v1::{ExecuteRequest, ExecutionMode, Stage, execute_event::Event};

use crate::{
    baseline::{self, Style},
    charts::{self, Series},
    corpus::{self, Corpus},
    jobs,
    load::{self, Api, LoadSpec, Report, Shape},
    procstat, programs,
};

/// Settings of a suite run.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Seconds per measurement.
    pub seconds: f64,
    /// Runs per scenario (median reported).
    pub runs: usize,
    /// Soak length for the memory scenario, seconds.
    pub soak_seconds: f64,
    /// Where to write the report.
    pub out: PathBuf,
    /// Whether this is the quick mode (for the report's header).
    pub quick: bool,
    /// The scenarios to run, by number; empty: all.
    pub only: Vec<u8>,
}

/// Where charts go, next to the report.
const CHART_DIR: &str = "bench/charts";

/// A process started for the suite; killed on drop.
struct Proc {
    child: Child,
    url: String,
    /// One message per worker the server logged as started (Offload only).
    workers_started: Option<mpsc::Receiver<()>>,
    /// The in-flight bytes budget the server logged at start (Offload only).
    budget: Option<mpsc::Receiver<u64>>,
    /// Whether it leads a process group to kill with it (baselines with
    /// process pools of their own).
    group: bool,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `n` workers have started (past their handshake).
    fn wait_for_workers(&self, n: usize) -> anyhow::Result<()> {
        let started = self.workers_started.as_ref().context("not an Offload server")?;
        for i in 0..n {
            started.recv_timeout(Duration::from_secs(30)).with_context(|| format!("{i} of {n} workers started"))?;
        }
        Ok(())
    }
}

impl Proc {
    /// A baseline server listening on `port` of loopback.
    fn listening(child: Child, port: u16) -> Self {
        Self { child, url: format!("http://127.0.0.1:{port}"), workers_started: None, budget: None, group: true }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.group
            && let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32)
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn release_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/release"))
}

/// Starts the release offload-server with `args` and waits until it listens.
fn offload(args: &[&str]) -> anyhow::Result<Proc> {
    offload_at("127.0.0.1:0", args, &[])
}

/// [`offload`] listening on `listen`, with `env` added to its environment.
fn offload_at(listen: &str, args: &[&str], env: &[(&str, &Path)]) -> anyhow::Result<Proc> {
    let binary = release_dir().join("offload-server");
    if !binary.is_file() {
        bail!("{} is missing: build with `cargo build --release --workspace`", binary.display());
    }
    let mut child = Command::new(&binary)
        .args(["--listen", listen, "--debug-tasks", "--log-format", "json"])
        .args(args)
        // Every call runs: the result cache is off, unless a scenario turns
        // it on with the flag (which wins over the environment).
        .env("OFFLOAD_CACHE_MAX_BYTES", "0")
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn,offload_server=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let (worker_tx, workers_started) = mpsc::channel();
    let (budget_tx, budget) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("\"max_inflight_bytes\":").nth(1) {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                let _ = budget_tx.send(digits.parse().unwrap_or(0));
            } else if let Some(rest) = line.split("listening on ").nth(1) {
                let addr: String = rest.chars().take_while(|c| !matches!(c, '"' | ' ')).collect();
                let _ = tx.send(addr);
            } else if line.contains("\"worker started\"") {
                let _ = worker_tx.send(());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).context("the server did not start listening")?;
    Ok(Proc {
        child,
        url: format!("http://{addr}"),
        workers_started: Some(workers_started),
        budget: Some(budget),
        group: false,
    })
}

/// Waits until `done` holds, checking every 20 ms, for at most `bound`.
async fn wait_for(done: impl Fn() -> bool, bound: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + bound;
    while !done() {
        if Instant::now() > end {
            bail!("not done within {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts this program's baseline server.
fn baseline_server(style: Style) -> anyhow::Result<Proc> {
    use clap::ValueEnum as _;
    let port = free_port()?;
    let style = style.to_possible_value().expect("every style has a name");
    let child = Command::new(std::env::current_exe()?)
        .args(["baseline", "--listen", &format!("127.0.0.1:{port}"), "--style", style.get_name()])
        .stdout(Stdio::null())
        .spawn()?;
    Ok(Proc { child, url: format!("http://127.0.0.1:{port}"), workers_started: None, budget: None, group: false })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// One connection with one call in flight: latency without queueing.
fn one_by_one(spec: &mut LoadSpec) {
    (spec.connections, spec.in_flight) = (1, 1);
}

/// One side of a comparison: its name, and the load put on it (its URL included).
struct Contender<'a> {
    name: &'a str,
    spec: LoadSpec,
    server: &'a Proc,
}

/// The same load against each of `servers`.
fn contenders<'a>(spec: &LoadSpec, servers: &[(&'a str, &'a Proc)]) -> Vec<Contender<'a>> {
    servers
        .iter()
        .map(|&(name, server)| Contender { name, spec: LoadSpec { url: server.url.clone(), ..spec.clone() }, server })
        .collect()
}

/// The reports of each contender, one per run.
struct Measured {
    runs: Vec<Vec<Report>>,
}

fn calls_per_sec(r: &Report) -> f64 {
    r.calls_per_sec
}

fn p50_us(r: &Report) -> f64 {
    r.p50_us as f64
}

fn p99_us(r: &Report) -> f64 {
    r.p99_us as f64
}

impl Measured {
    /// Median over the runs of `figure` for contender `i`.
    fn median(&self, i: usize, figure: fn(&Report) -> f64) -> f64 {
        median(self.runs[i].iter().map(figure).collect())
    }

    /// Median over the runs of `combine(i's figure, j's figure)`, both
    /// measured in the same run: the machine's speed drifts between runs
    /// more than within one.
    fn per_run(&self, i: usize, j: usize, figure: fn(&Report) -> f64, combine: fn(f64, f64) -> f64) -> f64 {
        median(self.runs[i].iter().zip(&self.runs[j]).map(|(a, b)| combine(figure(a), figure(b))).collect())
    }

    /// Median over the runs of contender 0's `figure` over the best (by
    /// `pick`: min or max) of the others' in the same run.
    fn versus_best(&self, figure: fn(&Report) -> f64, pick: fn(f64, f64) -> f64) -> f64 {
        let runs = self.runs[0].len();
        median(
            (0..runs)
                .map(|r| {
                    let others = self.runs[1..].iter().map(|reports| figure(&reports[r]));
                    figure(&self.runs[0][r]) / others.reduce(pick).expect("a baseline")
                })
                .collect(),
        )
    }

    /// Median over the runs of contender `i`'s calls/s over contender `j`'s.
    fn ratio(&self, i: usize, j: usize) -> f64 {
        self.per_run(i, j, calls_per_sec, |a, b| a / b)
    }

    /// The last run's latency distribution of each contender, by name.
    fn latency(&self, contenders: &[Contender<'_>]) -> Vec<Series> {
        contenders
            .iter()
            .zip(&self.runs)
            .filter_map(|(c, runs)| Some((c.name.to_string(), runs.last()?.distribution.clone())))
            .collect()
    }
}

/// One row of the report.
struct Row {
    scenario: String,
    offload: String,
    baseline: String,
    ratio: f64,
    target: String,
    met: bool,
}

struct Suite {
    options: SuiteOptions,
    rows: Vec<Row>,
    details: String,
    /// (file name, title) of each chart written, for the report.
    charts: Vec<(String, String)>,
}

impl Suite {
    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.options.seconds)
    }

    /// Runs one load; any failed call fails the suite (no scenario expects errors).
    async fn measure(&mut self, label: &str, spec: &LoadSpec, pid: Option<u32>) -> anyhow::Result<Report> {
        let report = load::run(spec, pid).await?;
        let line = format!("{label}: {}", report.summary());
        println!("{line}");
        writeln!(self.details, "- {line}").expect("string");
        if !report.errors.is_empty() || report.ok == 0 {
            bail!("{label}: {} ok, errors {:?}", report.ok, report.errors);
        }
        Ok(report)
    }

    fn row(&mut self, scenario: &str, offload: String, baseline: String, ratio: f64, target: &str, met: bool) {
        println!("=> {scenario}: ratio {ratio:.2} (target {target}) {}", if met { "met" } else { "NOT MET" });
        self.rows.push(Row { scenario: scenario.into(), offload, baseline, ratio, target: target.into(), met });
    }

    fn spec(&self, url: &str, task: &str, params: &[(&str, &str)], mode: ExecutionMode, size: usize) -> LoadSpec {
        LoadSpec { duration: self.duration(), ..LoadSpec::closed(url, task, params, mode, size) }
    }

    /// Measures `runs` times each contender (a report per run), all of them in
    /// each run (each run starting with another one, so that none is always
    /// measured first or right after the same neighbour).
    async fn compare(&mut self, label: &str, contenders: &[Contender<'_>]) -> anyhow::Result<Measured> {
        let mut runs = vec![Vec::new(); contenders.len()];
        for run in 0..self.options.runs {
            for i in (0..contenders.len()).map(|k| (k + run) % contenders.len()) {
                let Contender { name, spec, server } = &contenders[i];
                let report = self.measure(&format!("{label} [{name}, run {run}]"), spec, Some(server.pid())).await?;
                runs[i].push(report);
            }
        }
        Ok(Measured { runs })
    }

    /// POOL and ISOLATED contenders of the same load on `offload`.
    fn modes<'a>(
        &self,
        offload: &'a Proc,
        adjust: impl Fn(&mut LoadSpec),
        task: &str,
        size: usize,
    ) -> [Contender<'a>; 2] {
        [("POOL", ExecutionMode::Pool), ("ISOLATED", ExecutionMode::Isolated)].map(|(name, mode)| {
            let mut spec = self.spec(&offload.url, task, &[], mode, size);
            adjust(&mut spec);
            Contender { name, spec, server: offload }
        })
    }

    /// Each server at 1 call in flight on one connection, then 4
    /// connections with 1, 4, 16 and 64 in flight each (every shape measured
    /// `runs` times, as [`Suite::compare`] does); throughput charted.
    /// Returns each shape's total calls in flight and measurements.
    async fn sweep(
        &mut self,
        file: &str,
        title: &str,
        spec: &LoadSpec,
        servers: &[(&str, &Proc)],
    ) -> anyhow::Result<Vec<(usize, Measured)>> {
        let mut series: Vec<Series> = servers.iter().map(|(n, _)| (n.to_string(), Vec::new())).collect();
        let mut shapes = Vec::new();
        for (connections, in_flight) in [(1, 1), (4, 1), (4, 4), (4, 16), (4, 64)] {
            let total = connections * in_flight;
            let shape = LoadSpec { connections, in_flight, ..spec.clone() };
            let contenders = contenders(&shape, servers);
            let m = self.compare(&format!("{title} [{total} in flight]"), &contenders).await?;
            for (i, line) in series.iter_mut().enumerate() {
                line.1.push((total as f64, m.median(i, calls_per_sec)));
            }
            shapes.push((total, m));
        }
        self.chart(file, title, |path| charts::throughput(path, title, &series))?;
        Ok(shapes)
    }

    /// A row per load shape: Offload's p99 against the better baseline's
    /// (each run's ratio, the median of them), its throughput likewise.
    fn tail_rows(&mut self, what: &str, shapes: &[(String, &Measured)]) {
        for (shape, m) in shapes {
            let p99 = m.versus_best(p99_us, f64::min);
            let throughput = m.versus_best(calls_per_sec, f64::max);
            let best = |figure: fn(&Report) -> f64, pick: fn(f64, f64) -> f64| {
                (1..m.runs.len()).map(|i| m.median(i, figure)).reduce(pick).expect("a baseline")
            };
            self.row(
                &format!("2. tail: {what}, {shape}, p99 and calls/s vs the better baseline"),
                format!("p99 {:.1} ms, {:.0} calls/s", m.median(0, p99_us) / 1e3, m.median(0, calls_per_sec)),
                format!(
                    "p99 {:.1} ms, {:.0} calls/s (best of inline and spawn_blocking)",
                    best(p99_us, f64::min) / 1e3,
                    best(calls_per_sec, f64::max)
                ),
                p99,
                &format!("p99 <= 1.1x, calls/s >= 1.0x (measured {throughput:.2}x)"),
                p99 <= 1.1 && throughput >= 1.0,
            );
        }
    }

    /// Draws a chart next to the report and lists it there.
    fn chart(&mut self, file: &str, title: &str, draw: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let base = self.options.out.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        std::fs::create_dir_all(base.join(CHART_DIR))?;
        draw(&base.join(CHART_DIR).join(file))?;
        self.charts.push((format!("{CHART_DIR}/{file}"), title.to_string()));
        Ok(())
    }

    async fn dispatch_overhead(&mut self, offload: &Proc, inline: &Proc) -> anyhow::Result<()> {
        let spec = self.spec("", "debug.echo", &[], ExecutionMode::Pool, 64);
        let servers = [("offload", offload), ("inline", inline)];
        let contenders = contenders(&spec, &servers);
        let m = self.compare("1. debug.echo 64 B POOL, 4x64", &contenders).await?;
        let title = "1. Latency of debug.echo 64 B POOL at 4 conns x 64: Offload vs plain tonic (inline)";
        self.chart("1-latency.svg", title, |path| charts::latency(path, title, &m.latency(&contenders)))?;
        let title = "1. Throughput of debug.echo 64 B POOL by calls in flight: Offload vs plain tonic (inline)";
        let _ = self.sweep("1-throughput.svg", title, &spec, &servers).await?;
        let ratio = m.ratio(0, 1);
        self.row(
            "1. dispatch overhead: debug.echo 64 B POOL, 4 conns x 64",
            format!("{:.0} calls/s", m.median(0, calls_per_sec)),
            format!("{:.0} calls/s inline", m.median(1, calls_per_sec)),
            ratio,
            ">= 0.85x inline",
            ratio >= 0.85,
        );
        Ok(())
    }

    async fn cpu_bound(&mut self, offload: &Proc, inline: &Proc, blocking: &Proc) -> anyhow::Result<()> {
        for (task, params, size) in [("hash.sha256", vec![], 1 << 20), ("primes.count", vec![("limit", "2000000")], 0)]
        {
            let mut spec = self.spec("", task, &params, ExecutionMode::Pool, size);
            spec.in_flight = 8;
            let label = format!("2. {task} POOL, 4x8");
            let servers = [("offload", offload), ("inline", inline), ("spawn_blocking", blocking)];
            let contenders = contenders(&spec, &servers);
            let m = self.compare(&label, &contenders).await?;
            let title = format!("2. Latency of {task} POOL at 4 conns x 8: Offload vs tonic inline vs spawn_blocking");
            let latency = m.latency(&contenders);
            self.chart(&format!("2-{task}-latency.svg"), &title, |path| charts::latency(path, &title, &latency))?;
            if size > 0 {
                let title = format!(
                    "2. Throughput of {task} 1 MiB POOL by calls in flight: Offload vs tonic inline vs spawn_blocking"
                );
                let sweep = self.sweep(&format!("2-{task}-throughput.svg"), &title, &spec, &servers).await?;
                let mut shapes = vec![("4 conns x 8".to_string(), &m)];
                shapes.extend(sweep.iter().map(|(total, m)| (format!("{total} in flight"), m)));
                self.tail_rows(&format!("{task} 1 MiB POOL"), &shapes);
            }
            let what = if size > 0 { format!("{task} 1 MiB") } else { format!("{task} limit=2000000") };
            for (i, floor) in [(1, 0.9), (2, 1.0)] {
                let (baseline, ratio) = (servers[i].0, m.ratio(0, i));
                self.row(
                    &format!("2. CPU-bound: {what} vs {baseline}"),
                    format!("{:.0} calls/s", m.median(0, calls_per_sec)),
                    format!("{:.0} calls/s {baseline}", m.median(i, calls_per_sec)),
                    ratio,
                    &format!(">= {floor:.1}x {baseline}"),
                    ratio >= floor,
                );
            }
        }
        Ok(())
    }

    async fn isolation_overhead(&mut self, offload: &Proc) -> anyhow::Result<()> {
        let rtt = baseline::pingpong(64, self.duration())?.as_secs_f64() * 1e6;
        writeln!(self.details, "- 3. bare Unix-socket ping-pong, 64 B: median round trip {rtt:.1} us").expect("string");

        let m = self.compare("3. debug.echo 64 B, 1x1", &self.modes(offload, one_by_one, "debug.echo", 64)).await?;
        let added = m.per_run(1, 0, p50_us, |isolated, pool| isolated - pool);
        let ratio = added / rtt;
        self.row(
            "3. isolation overhead: debug.echo 64 B, concurrency 1, added median latency",
            format!("+{added:.0} us"),
            format!("{rtt:.0} us socket round trip"),
            ratio,
            "<= 1.5x round trip",
            ratio <= 1.5,
        );

        let contenders = self.modes(offload, |_| {}, "debug.echo", 64);
        let m = self.compare("3. debug.echo 64 B, 4x64", &contenders).await?;
        let title = "3. Latency of debug.echo 64 B at 4 conns x 64: ISOLATED (worker processes) vs POOL";
        self.chart("3-latency.svg", title, |path| charts::latency(path, title, &m.latency(&contenders)))?;
        let (pool, isolated, ratio) = (m.median(0, calls_per_sec), m.median(1, calls_per_sec), m.ratio(1, 0));
        self.row(
            "3. isolation overhead: debug.echo 64 B, 4 conns x 64, throughput",
            format!("{isolated:.0} calls/s ISOLATED"),
            format!("{pool:.0} calls/s POOL"),
            ratio,
            ">= 0.6x POOL",
            ratio >= 0.6,
        );
        Ok(())
    }

    async fn large_payloads(&mut self, offload: &Proc) -> anyhow::Result<()> {
        let contenders = self.modes(offload, one_by_one, "hash.sha256", 16 << 20);
        let m = self.compare("4. hash.sha256 16 MiB, 1x1", &contenders).await?;
        let ratio = m.per_run(1, 0, p50_us, |isolated, pool| isolated / pool);
        self.row(
            "4. large payloads: hash.sha256 16 MiB, concurrency 1, median latency",
            format!("{:.1} ms ISOLATED", m.median(1, p50_us) / 1e3),
            format!("{:.1} ms POOL", m.median(0, p50_us) / 1e3),
            ratio,
            "<= 1.5x POOL",
            ratio <= 1.5,
        );
        Ok(())
    }

    /// Scenario 15, the result cache: a thumbnail workload that repeats
    /// itself (Zipf, s = 1.1, over 1,000 distinct JPEGs of 256 KiB, 4
    /// connections x 16)
    /// with the cache (default size) against `--cache-max-bytes 0`; then a
    /// hit against a run, one call at a time.
    async fn result_cache(&mut self) -> anyhow::Result<()> {
        let side = corpus::side_for(256 << 10)?;
        let images = (0..1000).map(|n| corpus::jpeg(side, n)).collect::<anyhow::Result<Vec<_>>>()?;
        let images = Corpus::zipf(images, 1.1);
        let cached = offload(&["--cache-max-bytes", "134217728"])?;
        let uncached = offload(&[])?;
        let thumbnail = [("width", "128"), ("height", "128")];
        let servers = [("cache", &cached), ("no cache", &uncached)];
        let mut spec = self.spec("", "image.thumbnail", &thumbnail, ExecutionMode::Pool, 0);
        (spec.connections, spec.in_flight, spec.corpus) = (4, 16, Some(Arc::clone(&images)));
        let label = format!(
            "15. image.thumbnail 128x128, Zipf 1.1 over {} photo-like JPEGs of {} KiB ({side}x{side}), 4x16",
            images.len(),
            images.mean_size() >> 10
        );
        let m = self.compare(&label, &contenders(&spec, &servers)).await?;
        let hit_ratios: Vec<f64> = m.runs[0].iter().map(|r| r.cache_hits as f64 / r.ok.max(1) as f64).collect();
        let cold = hit_ratios[0];
        let warm = if hit_ratios.len() > 1 { median(hit_ratios[1..].to_vec()) } else { cold };
        let rss =
            |i: usize| median(m.runs[i].iter().map(|r| r.front_peak_rss.unwrap_or(0) as f64).collect()) / 1048576.0;
        let throughput = m.ratio(0, 1);
        self.row(
            "15. result cache: image.thumbnail, Zipf 1.1 over 1,000 photo-like JPEGs of 256 KiB, 4x16, calls/s (first run cold)",
            format!(
                "{:.0} calls/s, hit ratio {cold:.3} cold, {warm:.3} warm, front peak RSS {:.0} MiB",
                m.median(0, calls_per_sec),
                rss(0)
            ),
            format!("{:.0} calls/s with --cache-max-bytes 0, RSS {:.0} MiB", m.median(1, calls_per_sec), rss(1)),
            throughput,
            ">= 1.0x no cache",
            throughput >= 1.0,
        );
        let p99 = m.per_run(0, 1, p99_us, |a, b| a / b);
        self.row(
            "15. result cache: the same workload, p99",
            format!("p99 {:.1} ms", m.median(0, p99_us) / 1e3),
            format!("p99 {:.1} ms with --cache-max-bytes 0", m.median(1, p99_us) / 1e3),
            p99,
            "<= 1.0x no cache",
            p99 <= 1.0,
        );
        // One call at a time: a hit (the cache holds it after the first)
        // against the same call run every time.
        let side = corpus::side_for(1 << 20)?;
        let photo = Corpus::zipf(vec![corpus::jpeg(side, 7)?], 1.0);
        let what =
            format!("image.thumbnail 128x128 of a photo-like JPEG of {} KiB ({side}x{side})", photo.mean_size() >> 10);
        let mut one = self.spec("", "image.thumbnail", &thumbnail, ExecutionMode::Pool, 0);
        (one.corpus, one.duration) = (Some(photo), self.duration().min(Duration::from_secs(2)));
        one_by_one(&mut one);
        self.hit_vs_run(&what, &one, &servers, ">= 20x faster", 20.0).await?;
        let mut hash = self.spec("", "hash.sha256", &[], ExecutionMode::Pool, 1 << 20);
        hash.duration = one.duration;
        one_by_one(&mut hash);
        self.hit_vs_run("hash.sha256 of 1 MiB", &hash, &servers, "> 1.0x (a hit costs less than the hash)", 1.0).await
    }

    /// A row of scenario 15: the median latency of `what` (`spec`, one call
    /// at a time) run every time (the second server) over a hit (the
    /// first), at least `least` (exclusive).
    async fn hit_vs_run(
        &mut self,
        what: &str,
        spec: &LoadSpec,
        servers: &[(&str, &Proc)],
        target: &str,
        least: f64,
    ) -> anyhow::Result<()> {
        let m = self.compare(&format!("15. {what}, 1x1"), &contenders(spec, servers)).await?;
        let faster = m.per_run(1, 0, p50_us, |run, hit| run / hit);
        self.row(
            &format!("15. a hit vs a run: {what}, one at a time, median latency"),
            format!("{:.2} ms a hit", m.median(0, p50_us) / 1e3),
            format!("{:.2} ms run", m.median(1, p50_us) / 1e3),
            faster,
            target,
            faster >= least && faster > 1.0,
        );
        Ok(())
    }

    async fn latency_isolation(&mut self, workers: usize) -> anyhow::Result<()> {
        let offload = offload(&["--workers", &workers.to_string()])?;
        let open = LoadSpec {
            shape: Shape::Open { rate: 200.0 },
            connections: 2,
            duration: self.duration().max(Duration::from_secs(1)),
            ..LoadSpec::closed(&offload.url, "hash.sha256", &[], ExecutionMode::Pool, 1024)
        };
        let mut idle = Vec::new();
        let mut busy = Vec::new();
        let mut distributions: Vec<Series> = Vec::new();
        for run in 0..self.options.runs {
            let label = format!("5. hash.sha256 1 KiB POOL at 200/s, idle [run {run}]");
            let report = self.measure(&label, &open, Some(offload.pid())).await?;
            idle.push(report.p99_us as f64);
            distributions = vec![("idle".into(), report.distribution)];
            // Every worker spins for the whole measurement.
            let spin_ms = (open.duration.as_millis() + 3000).to_string();
            let mut clients = load::connect(&offload.url, 1).await?;
            let client = &mut clients[0];
            let mut spinning = Vec::new();
            for _ in 0..workers {
                let request = ExecuteRequest {
                    task: "debug.spin".into(),
                    params: [("ms".to_string(), spin_ms.clone())].into(),
                    mode: ExecutionMode::Isolated as i32,
                    ..Default::default()
                };
                let mut events = client.execute_stream(request).await?.into_inner();
                loop {
                    match events.message().await?.and_then(|e| e.event) {
                        Some(Event::Progress(p)) if p.stage == Stage::Running as i32 => break,
                        Some(_) => continue,
                        None => bail!("spin ended before running"),
                    }
                }
                spinning.push(events);
            }
            let label = format!("5. hash.sha256 1 KiB POOL at 200/s, all workers spinning [run {run}]");
            let report = self.measure(&label, &open, Some(offload.pid())).await?;
            busy.push(report.p99_us as f64);
            distributions.push(("every worker spinning".into(), report.distribution));
            drop(spinning);
        }
        let title = "5. Latency of POOL hash.sha256 1 KiB at 200 calls/s: idle vs every worker spinning";
        self.chart("5-latency.svg", title, |path| charts::latency(path, title, &distributions))?;
        let (idle, busy) = (median(idle), median(busy));
        let ratio = busy / idle;
        self.row(
            "5. latency isolation: POOL hash.sha256 1 KiB at 200/s, p99 with every worker spinning vs idle",
            format!("p99 {busy:.0} us busy"),
            format!("p99 {idle:.0} us idle"),
            ratio,
            "<= 3x idle",
            ratio <= 3.0,
        );
        Ok(())
    }

    /// Scenarios 10 and 11: a probe at 50 calls/s of ~5 ms POOL calls while
    /// a flood (4 x 64 in flight of the same calls) saturates the pool, the
    /// probe's p99 against its p99 alone. `separate` marks the probe as the
    /// scheduler should tell it apart (its own client, or interactive);
    /// `together` as it would be without that (the flood's client, or
    /// batch): one FIFO queue shared with the flood, as before scheduling.
    async fn scheduled_probe(
        &mut self,
        scenario: &str,
        flood_metadata: &[(&str, &str)],
        separate: &[(&str, &str)],
        together: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let offload = offload(&[])?;
        let metadata = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let work = LoadSpec::closed(&offload.url, "debug.spin", &[("ms", "5")], ExecutionMode::Pool, 0);
        let duration = self.duration().max(Duration::from_secs(2));
        let probe = |pairs: &[(&str, &str)]| LoadSpec {
            shape: Shape::Open { rate: 50.0 },
            connections: 1,
            duration,
            metadata: metadata(pairs),
            ..work.clone()
        };
        let flood = LoadSpec {
            duration: duration + Duration::from_secs(2),
            metadata: metadata(flood_metadata),
            ..work.clone()
        };
        let (mut idle, mut apart, mut shared) = (Vec::new(), Vec::new(), Vec::new());
        // The last run's distributions, for the chart.
        let mut last: Vec<Series> = Vec::new();
        for run in 0..self.options.runs {
            let report = self.measure(&format!("{scenario} probe alone [run {run}]"), &probe(separate), None).await?;
            idle.push(report.p99_us as f64);
            last = vec![("probe alone".to_string(), report.distribution.clone())];
            for (pairs, into, what) in
                [(separate, &mut apart, "told apart"), (together, &mut shared, "in the flood's queue")]
            {
                let flooding = tokio::spawn({
                    let flood = flood.clone();
                    async move { load::run(&flood, None).await }
                });
                // Let the flood fill the queue before the probe starts.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let label = format!("{scenario} probe {what}, under the flood [run {run}]");
                let report = self.measure(&label, &probe(pairs), None).await?;
                into.push(report.p99_us as f64);
                last.push((format!("probe {what}"), report.distribution.clone()));
                let flooded = flooding.await.context("the flood's task")??;
                writeln!(self.details, "- {scenario} the flood [run {run}]: {}", flooded.summary()).expect("string");
            }
        }
        let (idle, apart, shared) = (median(idle), median(apart), median(shared));
        let title = format!(
            "{scenario}: latency of a probe at 50 calls/s of debug.spin 5 ms: alone vs under a 4x64 flood (told apart, or sharing its queue)"
        );
        let file = format!("{}-latency.svg", scenario.split('.').next().unwrap_or("probe"));
        self.chart(&file, &title, |path| charts::latency(path, &title, &last))?;
        let ratio = apart / idle;
        self.row(
            &format!("{scenario}: probe 50/s of debug.spin 5 ms POOL under a 4x64 flood, p99 vs alone"),
            format!("p99 {:.1} ms (in the flood's queue: {:.1} ms)", apart / 1e3, shared / 1e3),
            format!("p99 {:.1} ms alone", idle / 1e3),
            ratio,
            "<= 2x alone",
            ratio <= 2.0,
        );
        Ok(())
    }

    async fn batching(&mut self, offload: &Proc) -> anyhow::Result<()> {
        let unary = self.spec(&offload.url, "debug.echo", &[], ExecutionMode::Pool, 64);
        let batch = LoadSpec { api: Api::Batch, ..unary.clone() };
        let contenders = [("unary 4x64", unary), ("batch 4 streams x 64", batch)].map(|(name, spec)| Contender {
            name,
            spec,
            server: offload,
        });
        let m = self.compare("6. debug.echo 64 B", &contenders).await?;
        let (u, b, ratio) = (m.median(0, calls_per_sec), m.median(1, calls_per_sec), m.ratio(1, 0));
        self.row(
            "6. batching: debug.echo 64 B, ExecuteBatch vs Execute, same concurrency",
            format!("{b:.0} tasks/s batch"),
            format!("{u:.0} tasks/s unary"),
            ratio,
            // The issue asks for 3x; met by a wide margin, so the bar is raised.
            ">= 6x unary (issue: 3x)",
            ratio >= 6.0,
        );
        Ok(())
    }

    async fn memory(&mut self, workers: usize) -> anyhow::Result<()> {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        // Workers re-executing the (large) server binary map more of it than
        // the dedicated offload-worker binary, which deployments use.
        let reexec = offload(&[])?;
        reexec.wait_for_workers(workers)?;
        let reexec_stat = procstat::tree(reexec.pid());
        drop(reexec);
        writeln!(
            self.details,
            "- 7. idle worker RSS when the server re-executes itself as the worker (no --worker-program): {:.1} MiB",
            mib(reexec_stat.max_worker_rss)
        )
        .expect("string");

        let worker = release_dir().join("offload-worker");
        let offload = offload(&["--worker-program", worker.to_str().expect("utf-8 path")])?;
        offload.wait_for_workers(workers)?;
        let idle = procstat::tree(offload.pid());
        // The issue allows 16 MiB; met by a wide margin, so the bar is raised.
        let front_ok = idle.front_rss <= 12 << 20;
        let worker_ok = idle.max_worker_rss <= 4 << 20;
        self.row(
            "7. memory: idle front RSS",
            format!("{:.1} MiB", mib(idle.front_rss)),
            "12 MiB".into(),
            idle.front_rss as f64 / (12 << 20) as f64,
            "<= 12 MiB (issue: 16)",
            front_ok,
        );
        self.row(
            "7. memory: idle worker RSS (offload-worker binary)",
            format!("{:.1} MiB", mib(idle.max_worker_rss)),
            "4 MiB".into(),
            idle.max_worker_rss as f64 / (4 << 20) as f64,
            "<= 4 MiB",
            worker_ok,
        );

        // Warm up at full load, then soak; growth is the soak's peak resident
        // memory over the warm-up's (a single reading swings by a few
        // percent with the allocator's state from one moment to the next).
        let soak = Duration::from_secs_f64(self.options.soak_seconds);
        let mut pool = self.spec(&offload.url, "hash.sha256", &[], ExecutionMode::Pool, 4096);
        let mut isolated = self.spec(&offload.url, "hash.sha256", &[], ExecutionMode::Isolated, 4096);
        (pool.duration, isolated.duration) = (soak / 2, soak / 2);
        (pool.connections, isolated.connections) = (2, 2);
        let warm = tokio::join!(load::run(&pool, Some(offload.pid())), load::run(&isolated, None));
        let (warm, _) = (warm.0?, warm.1?);
        (pool.duration, isolated.duration) = (soak, soak);
        let soaked = tokio::join!(load::run(&pool, Some(offload.pid())), load::run(&isolated, None));
        let (pool_report, isolated_report) = (soaked.0?, soaked.1?);
        writeln!(
            self.details,
            "- 7. soak {:.0} s: POOL {}; ISOLATED {}",
            soak.as_secs_f64(),
            pool_report.summary(),
            isolated_report.summary()
        )
        .expect("string");
        let peaks = |r: &Report| (r.front_peak_rss.unwrap_or(0), r.worker_peak_rss.unwrap_or(0));
        let ((warm_front, warm_worker), (soak_front, soak_worker)) = (peaks(&warm), peaks(&pool_report));
        for (what, warmed, soaked) in [("front", warm_front, soak_front), ("worker", warm_worker, soak_worker)] {
            let growth = if warmed == 0 { 0.0 } else { soaked as f64 / warmed as f64 };
            self.row(
                &format!("7. memory: {what} peak RSS growth over a {:.0} s soak at full load", soak.as_secs_f64()),
                format!("{:.1} MiB", mib(soaked)),
                format!("{:.1} MiB in the warm-up", mib(warmed)),
                growth,
                "<= 1.10x",
                growth <= 1.10,
            );
        }
        Ok(())
    }

    /// 400 concurrent 50 MiB `hash.sha256` calls (20 connections x 20
    /// streams) against a server with the default in-flight budget: calls
    /// end OK or RESOURCE_EXHAUSTED, and the front's peak RSS stays near the
    /// budget (without one it grew to 16 GiB). Reproduce one run with
    /// `offload-bench flood --pid PID` against a running server.
    async fn flood(&mut self) -> anyhow::Result<()> {
        const BASELINE: u64 = 128 << 20;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let server = offload(&[])?;
        let budget = server.budget.as_ref().context("an Offload server")?.recv_timeout(Duration::from_secs(10))?;
        let addr = server.url.trim_start_matches("http://").to_string();
        let request = crate::flood::request(50 << 20);
        // As long as the soak: past keepalive's 30 s interval + 20 s timeout,
        // so a connection that stops answering pings under the flood shows.
        let length = Duration::from_secs_f64(self.options.soak_seconds);
        let report = crate::flood::run(&addr, server.pid(), &request, 20, 20, length).await?;
        let (ok, refused) = (report.count(0), report.count(8));
        let other: u64 = report.codes.iter().filter(|(c, _)| **c != 0 && **c != 8).map(|(_, n)| n).sum();
        let line = format!(
            "8. flood of 400 concurrent 50 MiB hash.sha256 calls (20 connections x 20 streams, {:.0} s) at the default budget of {:.0} MiB: {ok} OK, {refused} RESOURCE_EXHAUSTED, {other} other {:?}; front peak RSS {:.0} MiB",
            report.seconds,
            mib(budget),
            report.codes,
            mib(report.server_peak_rss)
        );
        println!("{line}");
        writeln!(self.details, "- {line}").expect("string");
        let bound = budget + BASELINE;
        self.row(
            "8. flood: front peak RSS under 400 x 50 MiB calls",
            format!("{:.0} MiB ({ok} OK, {refused} refused)", mib(report.server_peak_rss)),
            format!("budget {:.0} MiB + 128 MiB", mib(budget)),
            report.server_peak_rss as f64 / bound as f64,
            "<= 1.00x, every call OK or RESOURCE_EXHAUSTED",
            report.server_peak_rss <= bound && other == 0 && ok > 0,
        );
        Ok(())
    }

    /// Scenario 9, worker programs in Python and Node against what their
    /// teams would otherwise run: throughput and p99 on a 1 KiB hash and on
    /// about 5 ms of CPU work at 4 connections x 64, the latency a program
    /// adds at concurrency 1 against a bare round trip in its language, and
    /// idle RSS.
    async fn worker_programs(&mut self, workers: usize) -> anyhow::Result<()> {
        let tools = programs::prepare()?;
        let config = tools.config(workers, None)?;
        let offload = offload(&["--config", config.to_str().context("UTF-8 path")?, "--workers", "1"])?;
        let (py_port, js_port) = (free_port()?, free_port()?);
        let python = Proc::listening(tools.grpcio_pool(py_port, workers)?, py_port);
        let node = Proc::listening(tools.piscina(js_port, workers)?, js_port);
        for (language, baseline, server) in
            [("py", "grpcio + ProcessPoolExecutor", &python), ("js", "grpc-js + piscina", &node)]
        {
            wait_until_up(&server.url).await?;
            let idle: Vec<String> = programs::program_rss(offload.pid(), &format!("offload_{language}."))
                .iter()
                .map(|rss| format!("{:.1} MiB", *rss as f64 / (1 << 20) as f64))
                .collect();
            writeln!(self.details, "- 9. idle RSS of each `{language}` worker program process: {}", idle.join(", "))
                .expect("string");
            for (work, size, floor) in [("sha256", 1 << 10, 2.0), ("burn", 0, 1.0)] {
                let task = format!("{language}.{work}");
                let what = if size > 0 { format!("{task} 1 KiB") } else { format!("{task} (~5 ms CPU)") };
                let spec = self.spec("", &task, &[], ExecutionMode::Isolated, size);
                let contenders = contenders(&spec, &[("offload", &offload), (baseline, server)]);
                let m = self.compare(&format!("9. {what}, 4x64"), &contenders).await?;
                let title = format!("9. Latency of {what} at 4 conns x 64: Offload's {language} workers vs {baseline}");
                self.chart(&format!("9-{task}-latency.svg"), &title, |path| {
                    charts::latency(path, &title, &m.latency(&contenders))
                })?;
                let ratio = m.ratio(0, 1);
                self.row(
                    &format!("9. worker programs: {what}, 4 conns x 64, throughput vs {baseline}"),
                    format!("{:.0} calls/s", m.median(0, calls_per_sec)),
                    format!("{:.0} calls/s", m.median(1, calls_per_sec)),
                    ratio,
                    &format!(">= {floor:.1}x"),
                    ratio >= floor,
                );
                let lower = m.per_run(1, 0, p99_us, |theirs, ours| theirs / ours);
                self.row(
                    &format!("9. worker programs: {what}, 4 conns x 64, p99 vs {baseline} (theirs / ours)"),
                    format!("{:.1} ms", m.median(0, p99_us) / 1e3),
                    format!("{:.1} ms", m.median(1, p99_us) / 1e3),
                    lower,
                    "> 1.0 (lower p99)",
                    lower > 1.0,
                );
            }
            // The hop to the program: its task against a built-in one, both 1 KiB hashes.
            let rtt = tools.pingpong(language, self.options.seconds)?.as_secs_f64() * 1e6;
            let mut program =
                self.spec(&offload.url, &format!("{language}.sha256"), &[], ExecutionMode::Isolated, 1 << 10);
            one_by_one(&mut program);
            let builtin = LoadSpec { task: "hash.sha256".into(), mode: ExecutionMode::Pool as i32, ..program.clone() };
            let contenders = [
                Contender { name: "program", spec: program, server: &offload },
                Contender { name: "POOL", spec: builtin, server: &offload },
            ];
            let m = self.compare(&format!("9. {language}.sha256 vs hash.sha256 1 KiB, 1x1"), &contenders).await?;
            let added = m.per_run(0, 1, p50_us, |program, pool| program - pool);
            let ratio = added / rtt;
            self.row(
                &format!("9. worker programs: {language}.sha256 1 KiB, concurrency 1, added median latency"),
                format!("+{added:.0} us"),
                format!("{rtt:.0} us round trip between two {language} processes"),
                ratio,
                "<= 1.5x round trip",
                ratio <= 1.5,
            );
        }
        Ok(())
    }

    /// Scenario 12: the cost of TLS. The same server with and without
    /// `--tls-cert` (a certificate made here, ECDSA P-256 like most issued
    /// today), hash.sha256 of 1 KiB at 4 connections x 64 in flight.
    async fn tls(&mut self) -> anyhow::Result<()> {
        let dir = PathBuf::from("target/bench-tls");
        std::fs::create_dir_all(&dir)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?.signed_by(&key, &ca)?;
        let (ca_file, cert_file, key_file) = (dir.join("ca.pem"), dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&ca_file, ca.pem())?;
        std::fs::write(&cert_file, cert.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;
        let path = |p: &Path| p.to_str().map(str::to_string).context("UTF-8 path");
        let plain = offload(&[])?;
        let mut tls = offload(&["--tls-cert", &path(&cert_file)?, "--tls-key", &path(&key_file)?])?;
        tls.url = tls.url.replacen("http://", "https://", 1);
        let plain_spec = self.spec(&plain.url, "hash.sha256", &[], ExecutionMode::Pool, 1 << 10);
        let tls_spec = LoadSpec { url: tls.url.clone(), tls_ca: Some(ca_file), ..plain_spec.clone() };
        let contenders = [
            Contender { name: "TLS", spec: tls_spec, server: &tls },
            Contender { name: "plaintext", spec: plain_spec, server: &plain },
        ];
        let m = self.compare("12. hash.sha256 1 KiB, 4x64, TLS vs plaintext", &contenders).await?;
        let title = "12. Latency of hash.sha256 1 KiB POOL at 4 conns x 64: TLS vs plaintext";
        self.chart("12-latency.svg", title, |path| charts::latency(path, title, &m.latency(&contenders)))?;
        self.throughput_row("12. TLS: hash.sha256 1 KiB, 4 conns x 64, throughput vs plaintext", &m, "plaintext", 0.8);
        Ok(())
    }

    /// Scenario 13: the cost of the worker sandbox. ISOLATED debug.echo of
    /// 64 B against the same server with `--worker-sandbox off`: the added
    /// latency at concurrency 1 and the throughput at 4 x 64.
    async fn sandbox_cost(&mut self) -> anyhow::Result<()> {
        let on = offload(&["--worker-sandbox", "auto", "--workers", "2"])?;
        let off = offload(&["--worker-sandbox", "off", "--workers", "2"])?;
        let base = self.spec("", "debug.echo", &[], ExecutionMode::Isolated, 64);
        let pair = |adjust: fn(&mut LoadSpec)| {
            let mut spec = base.clone();
            adjust(&mut spec);
            contenders(&spec, &[("sandboxed", &on), ("unsandboxed", &off)])
        };
        let m = self.compare("13. ISOLATED debug.echo 64 B, 1x1, sandbox on vs off", &pair(one_by_one)).await?;
        let slower = m.per_run(0, 1, p50_us, |on, off| on / off);
        self.row(
            "13. worker sandbox: ISOLATED debug.echo 64 B, concurrency 1, median latency vs no sandbox",
            format!("{:.0} us", m.median(0, p50_us)),
            format!("{:.0} us unsandboxed", m.median(1, p50_us)),
            slower,
            "<= 1.05x",
            slower <= 1.05,
        );
        let contenders = pair(|_| {});
        let m = self.compare("13. ISOLATED debug.echo 64 B, 4x64, sandbox on vs off", &contenders).await?;
        let title = "13. Latency of ISOLATED debug.echo 64 B at 4 conns x 64: sandboxed workers vs unsandboxed";
        self.chart("13-latency.svg", title, |path| charts::latency(path, title, &m.latency(&contenders)))?;
        let scenario = "13. worker sandbox: ISOLATED debug.echo 64 B, 4 conns x 64, throughput vs no sandbox";
        self.throughput_row(scenario, &m, "unsandboxed", 0.95);
        Ok(())
    }

    /// Scenario 14: jobs, against what Node and Python teams run for
    /// background work: BullMQ and Celery, each on Redis, with as many
    /// processes as Offload has workers (Offload's jobs run on its pool, as
    /// many threads), all doing the same work. Offload runs once on its
    /// embedded store and once on PostgreSQL. Each system gets a short
    /// warm-up, then: `tiny` SHA-256 of 1 KiB and `spins` jobs of 50 ms of
    /// CPU, 64 in flight, and `lone` SHA-256 jobs one at a time for the
    /// submit-to-done latency.
    async fn jobs(&mut self, workers: usize) -> anyhow::Result<()> {
        use crate::jobs::{self, JobsResult, Kind};
        let (tiny, spins, lone) = if self.options.quick { (400, 40, 50) } else { (20_000, 1_000, 1_000) };
        let tools = programs::prepare()?;
        let db = offload_e2e::postgres::Postgres::start();
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("jobs.sqlite3").display().to_string();
        let n = workers.to_string();
        // [throughput of tiny jobs, throughput of spins, latency one at a time]
        let mut measured: Vec<(&str, [JobsResult; 3])> = Vec::new();
        for (system, store) in [("Offload, SQLite", file), ("Offload, PostgreSQL", db.url())] {
            let server = offload(&["--job-store", &store, "--workers", &n, "--pool-threads", &n])?;
            jobs::offload(&server.url, Kind::Sha256, 20, 4).await?;
            let figures = [
                jobs::offload(&server.url, Kind::Sha256, tiny, 64).await?,
                jobs::offload(&server.url, Kind::Spin, spins, 64).await?,
                jobs::offload(&server.url, Kind::Sha256, lone, 1).await?,
            ];
            measured.push((system, figures));
        }
        let redis = jobs::Redis::start()?;
        for (system, queue) in [("BullMQ", "bullmq"), ("Celery", "celery")] {
            let _workers: Vec<Proc> = match queue {
                "bullmq" => (0..workers)
                    .map(|_| Ok(Proc::listening(tools.bullmq_worker(redis.port, None)?, redis.port)))
                    .collect::<anyhow::Result<_>>()?,
                _ => vec![Proc::listening(tools.celery_worker(redis.port, workers, None)?, redis.port)],
            };
            let bench = |kind: Kind, count, in_flight| {
                programs::queue_bench(
                    tools.queue_bench_command(queue, redis.port, kind.name(), count, in_flight)?,
                    queue,
                )
            };
            bench(Kind::Sha256, 20, 4)?;
            let figures =
                [bench(Kind::Sha256, tiny, 64)?, bench(Kind::Spin, spins, 64)?, bench(Kind::Sha256, lone, 1)?];
            measured.push((system, figures));
        }
        for (system, figures) in &measured {
            for (what, r) in
                ["SHA-256 1 KiB, 64 in flight", "50 ms spins, 64 in flight", "SHA-256 1 KiB, one at a time"]
                    .iter()
                    .zip(figures)
            {
                writeln!(
                    self.details,
                    "- 14. {system}, {what}: {} done, {} failed in {:.2} s ({:.0} jobs/s); submit-to-done p50 {:.2} ms, p99 {:.2} ms",
                    r.done,
                    r.failed,
                    r.seconds,
                    r.per_sec(),
                    r.p50_us / 1e3,
                    r.p99_us / 1e3
                )
                .expect("string");
            }
        }
        writeln!(
            self.details,
            "- 14. durability: Offload SQLite WAL, each commit synced (fdatasync of the log) before its calls are answered; Offload PostgreSQL fsync and \
             synchronous_commit on (its defaults); BullMQ and Celery: {}; Celery's defaults otherwise (tasks \
             acknowledged when taken, prefetch 4).",
            jobs::REDIS_DURABILITY
        )
        .expect("string");
        let baselines = &measured[2..];
        let theirs = |i: usize| {
            baselines.iter().map(|(name, f)| format!("{name} {:.0}/s", f[i].per_sec())).collect::<Vec<_>>().join(", ")
        };
        let best = |i: usize| baselines.iter().map(|(_, f)| f[i].per_sec()).fold(0.0, f64::max);
        for (system, figures) in &measured[..2] {
            for (i, what) in [(0, format!("{tiny} SHA-256 1 KiB jobs")), (1, format!("{spins} jobs of 50 ms CPU"))] {
                let ratio = figures[i].per_sec() / best(i);
                self.row(
                    &format!(
                        "14. jobs ({system}): {what}, 64 in flight, throughput vs the better of BullMQ and Celery"
                    ),
                    format!("{:.0} jobs/s", figures[i].per_sec()),
                    theirs(i),
                    ratio,
                    ">= 1.0x",
                    ratio >= 1.0 && figures[i].failed == 0,
                );
            }
            let lowest = baselines.iter().map(|(_, f)| f[2].p99_us).fold(f64::INFINITY, f64::min);
            let lower = lowest / figures[2].p99_us;
            self.row(
                &format!(
                    "14. jobs ({system}): SHA-256 1 KiB one at a time, submit-to-done p99 (the lower of theirs / ours)"
                ),
                format!("{:.2} ms", figures[2].p99_us / 1e3),
                baselines
                    .iter()
                    .map(|(name, f)| format!("{name} {:.2} ms", f[2].p99_us / 1e3))
                    .collect::<Vec<_>>()
                    .join(", "),
                lower,
                "> 1.0 (lower p99)",
                lower > 1.0,
            );
        }
        self.kill_runs(workers, &tools, &redis, &db.url()).await
    }

    /// Scenario 14's kill run: each system (Offload on its embedded store,
    /// then on the PostgreSQL database `pg`) runs `count` jobs of 20 ms of CPU that log their starts and ends, 64
    /// in flight; once a third have ended, its workers (Offload: the front)
    /// are killed with SIGKILL and started again. Counted: jobs acknowledged
    /// and never done (lost), jobs whose work started twice, and jobs two
    /// of whose runs overlapped, with each system's defaults (Offload's
    /// 30 s lease, BullMQ's 30 s stall check; Celery acknowledges a task
    /// when a worker takes it).
    async fn kill_runs(
        &mut self,
        workers: usize,
        tools: &programs::Toolchains,
        redis: &jobs::Redis,
        pg: &str,
    ) -> anyhow::Result<()> {
        use crate::jobs::{JobsResult, Reruns};
        let count = if self.options.quick { 150 } else { 600 };
        // Past this, a job not done counts as lost: a lease or a stall
        // check (30 s each) has long come and gone.
        let bound = Duration::from_secs(90);
        let dir = tempfile::tempdir()?;
        let n = workers.to_string();
        let mut counted: Vec<(&str, JobsResult, Reruns)> = Vec::new();
        for system in ["Offload, SQLite", "Offload, PostgreSQL", "BullMQ", "Celery"] {
            let log = dir.path().join(format!("{}.log", system.replace(", ", "-")));
            std::fs::write(&log, "")?;
            let third = |log: &Path| {
                let ended =
                    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.starts_with('E')).count();
                ended >= count / 3
            };
            let result = match system {
                "Offload, SQLite" | "Offload, PostgreSQL" => {
                    let config = tools.config(workers, Some(&log))?.display().to_string();
                    let store = match system {
                        "Offload, SQLite" => dir.path().join("jobs.sqlite3").display().to_string(),
                        _ => pg.to_string(),
                    };
                    let listen = format!("127.0.0.1:{}", free_port()?);
                    let args = ["--config", &config, "--job-store", &store, "--workers", &n, "--pool-threads", &n];
                    let env = [("OFFLOAD_BENCH_LOG", log.as_path())];
                    let front = offload_at(&listen, &args, &env)?;
                    let client = tokio::spawn({
                        let url = front.url.clone();
                        async move { jobs::offload_through_kills(&url, count, 64, Instant::now() + bound).await }
                    });
                    wait_for(|| third(&log), Duration::from_secs(60)).await?;
                    drop(front);
                    let _again = offload_at(&listen, &args, &env)?;
                    client.await??
                }
                queue => {
                    let start = || -> anyhow::Result<Vec<Proc>> {
                        match queue {
                            "BullMQ" => (0..workers)
                                .map(|_| Ok(Proc::listening(tools.bullmq_worker(redis.port, Some(&log))?, redis.port)))
                                .collect(),
                            _ => Ok(vec![Proc::listening(
                                tools.celery_worker(redis.port, workers, Some(&log))?,
                                redis.port,
                            )]),
                        }
                    };
                    let first = start()?;
                    let name = if queue == "BullMQ" { "bullmq" } else { "celery" };
                    let mut command = tools.queue_bench_command(name, redis.port, "logged", count, 64)?;
                    let client = command.arg(bound.as_secs().to_string()).stdout(Stdio::piped()).spawn()?;
                    wait_for(|| third(&log), Duration::from_secs(60)).await?;
                    drop(first);
                    let _again = start()?;
                    let out = tokio::task::spawn_blocking(move || client.wait_with_output()).await??;
                    JobsResult::parse(&String::from_utf8_lossy(&out.stdout), name)?
                }
            };
            let reruns = Reruns::of(&std::fs::read_to_string(&log)?);
            writeln!(
                self.details,
                "- 14. kill run, {system}: {count} jobs of 20 ms, 64 in flight, every worker SIGKILLed once a third had \
                 ended and started again: {} done, {} lost (not done within {} s), {} started twice, {} with two runs at once",
                result.done,
                result.failed,
                bound.as_secs(),
                reruns.twice,
                reruns.at_once
            )
            .expect("string");
            counted.push((system, result, reruns));
        }
        let say = |(system, result, reruns): &(&str, JobsResult, Reruns)| {
            format!("{system}: {} lost, {} run twice, {} at once", result.failed, reruns.twice, reruns.at_once)
        };
        let (ours, theirs) = counted.split_at(2);
        let bad = ours.iter().map(|(_, result, reruns)| result.failed + reruns.at_once).sum::<usize>() as f64;
        self.row(
            &format!("14. jobs killed mid-load (SIGKILL of every worker, restarted): {count} jobs of 20 ms"),
            ours.iter().map(say).collect::<Vec<_>>().join("; "),
            theirs.iter().map(say).collect::<Vec<_>>().join("; "),
            bad,
            "0 lost, 0 at once",
            bad == 0.0,
        );
        Ok(())
    }

    /// A row comparing the first contender's throughput with the second's
    /// (`baseline`), met at `floor` times it or more.
    fn throughput_row(&mut self, scenario: &str, m: &Measured, baseline: &str, floor: f64) {
        let ratio = m.ratio(0, 1);
        self.row(
            scenario,
            format!("{:.0} calls/s", m.median(0, calls_per_sec)),
            format!("{:.0} calls/s {baseline}", m.median(1, calls_per_sec)),
            ratio,
            &format!(">= {floor}x {baseline}"),
            ratio >= floor,
        );
    }

    fn write(&self) -> anyhow::Result<()> {
        let cpu = {
            use procfs::Current as _;
            procfs::CpuInfo::current().ok().and_then(|info| info.model_name(0).map(str::to_string))
        }
        .unwrap_or_else(|| "unknown".into());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut md = String::new();
        writeln!(md, "# Offload benchmarks\n")?;
        writeln!(
            md,
            "Written by `bench/run{}{}`; every ratio is measured against its baseline in the same run, the median of {} run(s) of {:.1} s each.\n",
            if self.options.quick { " --quick" } else { "" },
            if self.options.only.is_empty() {
                String::new()
            } else {
                format!(" --only {}", self.options.only.iter().map(u8::to_string).collect::<Vec<_>>().join(","))
            },
            self.options.runs,
            self.options.seconds
        )?;
        if self.options.quick {
            writeln!(
                md,
                "**Quick mode**: one short run per scenario, to check that the suite works; the figures are not meaningful.\n"
            )?;
        }
        writeln!(md, "Machine: {cores} cores, {cpu}; load generator and server share it.\n")?;
        writeln!(md, "Offload runs with its result cache off (`--cache-max-bytes 0`), so that every call runs.\n")?;
        writeln!(md, "| scenario | Offload | baseline | ratio | target | met? |")?;
        writeln!(md, "|---|---|---|---|---|---|")?;
        for r in &self.rows {
            writeln!(
                md,
                "| {} | {} | {} | {:.2} | {} | {} |",
                r.scenario,
                r.offload,
                r.baseline,
                r.ratio,
                r.target,
                if r.met { "yes" } else { "**no**" }
            )?;
        }
        writeln!(md, "\n## Commands\n")?;
        writeln!(
            md,
            "```sh\nbench/run            # full suite (release build), writes this file\nbench/run --quick    # one short run per scenario (what CI runs)\ntarget/release/offload-bench load --help   # the load generator on its own\n```\n\nHow the dispatch path was profiled, and what that found: [bench/PROFILING.md](bench/PROFILING.md).\n"
        )?;
        if !self.charts.is_empty() {
            writeln!(md, "## Charts\n")?;
            for (file, title) in &self.charts {
                writeln!(md, "![{title}]({file})\n")?;
            }
        }
        writeln!(md, "## Measurements\n\n{}", self.details)?;
        // A run of some scenarios updates theirs in a full report, keeping
        // the others' figures (each row is still measured against its
        // baseline in one run).
        if !self.options.only.is_empty()
            && !self.options.quick
            && let Ok(report) = std::fs::read_to_string(&self.options.out)
            && report.contains("## Measurements")
        {
            md = merge(&report, &self.options.only, &md);
        }
        if let Some(dir) = self.options.out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&self.options.out, md).with_context(|| format!("writing {}", self.options.out.display()))?;
        println!("wrote {}", self.options.out.display());
        Ok(())
    }
}

/// `report` with the table rows and measurements of scenarios `only`
/// replaced by those of `partial` (a report of those scenarios alone), and
/// a line saying so under its header.
fn merge(report: &str, only: &[u8], partial: &str) -> String {
    let ours = |line: &str| {
        let numbered = line.strip_prefix("| ").or_else(|| line.strip_prefix("- "));
        numbered
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(number, _)| number.parse::<u8>().ok())
            .is_some_and(|number| only.contains(&number))
    };
    let new_rows: Vec<&str> = partial.lines().filter(|l| l.starts_with("| ") && ours(l)).collect();
    let new_details: Vec<&str> = partial.lines().filter(|l| l.starts_with("- ") && ours(l)).collect();
    // Scenarios an earlier partial run merged stay listed beside these.
    let mut later: Vec<u8> = report
        .lines()
        .filter_map(|l| l.strip_prefix("Scenario(s) ")?.split_once(':').map(|(numbers, _)| numbers.to_string()))
        .flat_map(|numbers| numbers.split(',').filter_map(|n| n.trim().parse().ok()).collect::<Vec<u8>>())
        .chain(only.iter().copied())
        .collect();
    later.sort_unstable();
    later.dedup();
    let scenarios = later.iter().map(u8::to_string).collect::<Vec<_>>().join(", ");
    let mut out = Vec::new();
    let mut lines = report.lines().filter(|l| !ours(l) && !l.starts_with("Scenario(s) ")).peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() && out.last().is_some_and(String::is_empty) {
            continue;
        }
        out.push(line.to_string());
        if line.starts_with("Written by `bench/run") {
            out.push(String::new());
            out.push(format!("Scenario(s) {scenarios}: figures of later partial runs (`bench/run --only N`)."));
        }
        // The table ends where the next line is no longer a row.
        if line.starts_with('|') && !lines.peek().is_some_and(|next| next.starts_with('|')) {
            out.extend(new_rows.iter().map(|row| row.to_string()));
        }
    }
    while out.last().is_some_and(|l| l.is_empty()) {
        out.pop();
    }
    out.extend(new_details.iter().map(|line| line.to_string()));
    out.join("\n") + "\n"
}

/// Runs every scenario and writes the report.
pub async fn run(options: SuiteOptions) -> anyhow::Result<()> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut suite = Suite { options, rows: Vec::new(), details: String::new(), charts: Vec::new() };
    let only = suite.options.only.clone();
    let runs = |number| only.is_empty() || only.contains(&number);
    if (1..=6).any(runs) {
        let offload = offload(&[])?;
        let inline = baseline_server(Style::Inline)?;
        let blocking = baseline_server(Style::Blocking)?;
        // The baselines need a moment to bind; a failed connect is retried by `connect`.
        wait_until_up(&inline.url).await?;
        wait_until_up(&blocking.url).await?;
        if runs(1) {
            suite.dispatch_overhead(&offload, &inline).await?;
        }
        if runs(2) {
            suite.cpu_bound(&offload, &inline, &blocking).await?;
        }
        if runs(3) {
            suite.isolation_overhead(&offload).await?;
        }
        if runs(4) {
            suite.large_payloads(&offload).await?;
        }
        if runs(6) {
            suite.batching(&offload).await?;
        }
    }
    if runs(5) {
        suite.latency_isolation(workers).await?;
    }
    if runs(7) {
        suite.memory(workers).await?;
    }
    if runs(8) {
        suite.flood().await?;
    }
    if runs(9) {
        suite.worker_programs(workers).await?;
    }
    if runs(10) {
        let client = |name| [("offload-client", name)];
        suite.scheduled_probe("10. fair share", &client("flood"), &client("probe"), &client("flood")).await?;
    }
    if runs(11) {
        let batch = [("offload-client", "one"), ("offload-priority", "batch")];
        let interactive = [("offload-client", "one"), ("offload-priority", "interactive")];
        suite.scheduled_probe("11. priorities", &batch, &interactive, &batch).await?;
    }
    if runs(12) {
        suite.tls().await?;
    }
    if runs(13) {
        suite.sandbox_cost().await?;
    }
    if runs(14) {
        suite.jobs(workers).await?;
    }
    if runs(15) {
        suite.result_cache().await?;
    }
    suite.write()?;
    let missed: Vec<&str> = suite.rows.iter().filter(|r| !r.met).map(|r| r.scenario.as_str()).collect();
    if !missed.is_empty() {
        println!("targets not met: {missed:?}");
    }
    Ok(())
}

async fn wait_until_up(url: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match load::connect(url, 1).await {
            Ok(_) => return Ok(()),
            Err(_) if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::merge;

    #[test]
    fn a_partial_run_replaces_its_scenarios_rows_and_keeps_the_others() {
        let report = "# Offload benchmarks\n\nWritten by `bench/run`; x\n\n| scenario | a |\n|---|---|\n| 1. one | old |\n| 14. jobs | old |\n\n## Measurements\n\n- 1. one: kept\n- 14. jobs: old\n";
        let partial = "Written by `bench/run --only 14`\n\n| 14. jobs | new |\n| 14. jobs, more | new |\n\n## Measurements\n\n- 14. jobs: new\n";
        let merged = merge(report, &[14], partial);
        assert_eq!(
            merged,
            "# Offload benchmarks\n\nWritten by `bench/run`; x\n\nScenario(s) 14: figures of later partial runs (`bench/run --only N`).\n\n| scenario | a |\n|---|---|\n| 1. one | old |\n| 14. jobs | new |\n| 14. jobs, more | new |\n\n## Measurements\n\n- 1. one: kept\n- 14. jobs: new\n"
        );
        assert_eq!(merge(&merged, &[14], partial), merged, "merging again changes nothing");
        let partial = "| 15. cache | new |\n";
        let again = merge(&merged, &[15], partial);
        assert!(again.contains("Scenario(s) 14, 15: figures of later"), "{again}");
        assert!(again.contains("| 14. jobs | new |\n| 14. jobs, more | new |\n| 15. cache | new |\n"), "{again}");
    }
}
