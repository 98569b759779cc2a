//! The set-up of the scenarios that compare Offload with what Python and
//! Node teams run (`bench/programs/`). Scenario 9: worker programs under
//! Offload against a grpcio server with a `ProcessPoolExecutor` and a
//! grpc-js server with piscina, running the same functions. Scenario 14:
//! jobs against BullMQ and Celery on Redis. This module makes their
//! toolchains (a venv, node_modules, the grpcio stubs: all under target/,
//! from the registries), writes Offload's config and starts the baselines.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

/// The repository root (the suite runs from it).
fn root() -> anyhow::Result<PathBuf> {
    let root = std::env::current_dir()?;
    ensure!(root.join("bench/programs").is_dir(), "run the suite from the repository root (bench/run does)");
    Ok(root)
}

/// What the worker programs and their baselines need.
#[derive(Debug)]
pub struct Toolchains {
    root: PathBuf,
    /// A venv's python with grpcio and the Offload SDK.
    python: PathBuf,
    /// The grpcio stubs of offload.v1.
    stubs: PathBuf,
    /// node_modules with grpc-js, piscina and the Offload SDK.
    node_modules: PathBuf,
}

fn run(command: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = command.output().with_context(|| format!("{what}: cannot start {:?}", command.get_program()))?;
    ensure!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes (or reuses) the toolchains. Needs python3 with venv and node with
/// npm, and the package registries the first time.
pub fn prepare() -> anyhow::Result<Toolchains> {
    let root = root()?;
    let venv = run(
        Command::new("bash")
            .arg(root.join("scripts/venv.sh"))
            .arg(root.join("target/bench-py-venv"))
            .arg(root.join("bench/programs/requirements.txt")),
        "making the Python venv (python3 with venv and pip are needed)",
    )?;
    let python = PathBuf::from(venv.trim()).join("bin/python");
    run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--force-reinstall"])
            .arg("--disable-pip-version-check")
            .arg(root.join("sdk/python")),
        "installing sdk/python",
    )?;
    let stubs = root.join("target/bench-py-stubs");
    std::fs::create_dir_all(&stubs)?;
    run(
        Command::new(&python)
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(root.join("proto"))
            .arg(format!("--python_out={}", stubs.display()))
            .arg(format!("--grpc_python_out={}", stubs.display()))
            .args(["offload/v1/compute.proto", "google/rpc/status.proto"]),
        "generating the grpcio stubs",
    )?;
    let node = root.join("target/bench-node");
    std::fs::create_dir_all(&node)?;
    std::fs::copy(root.join("bench/programs/package.json"), node.join("package.json"))?;
    // npm keeps an installed package of the same version: the SDK goes first,
    // so the bench runs the current source.
    let _ = std::fs::remove_dir_all(node.join("node_modules/offload-worker"));
    run(
        Command::new("npm")
            .current_dir(&node)
            .args(["install", "--install-links", "--no-audit", "--no-fund", "--no-save", "--loglevel=error"])
            .arg(root.join("sdk/node")),
        "installing grpc-js, piscina, BullMQ and sdk/node (node with npm is needed)",
    )?;
    Ok(Toolchains { python, stubs, node_modules: node.join("node_modules"), root })
}

impl Toolchains {
    fn program(&self, file: &str) -> String {
        self.root.join("bench/programs").join(file).display().to_string()
    }

    /// Offload's config: programs `py` and `js`, `workers` processes each.
    /// With `log`, the Python program's logged jobs append to it (it is
    /// given the file's name and leave to write in its folder).
    pub fn config(&self, workers: usize, log: Option<&Path>) -> anyhow::Result<PathBuf> {
        let (path, py_extra) = match log {
            None => (self.root.join("target/bench-programs.toml"), String::new()),
            Some(log) => {
                let dir = log.parent().unwrap_or(Path::new("/")).display().to_string();
                let log = log.display().to_string();
                let extra = format!("env = {{ OFFLOAD_BENCH_LOG = {log:?} }}\nsandbox = {{ write = [{dir:?}] }}\n");
                (self.root.join("target/bench-programs-logged.toml"), extra)
            }
        };
        let text = format!(
            "[[worker_program]]\nname = \"py\"\ncommand = [{python:?}, {py:?}]\nworkers = {workers}\n{py_extra}\n\
             [[worker_program]]\nname = \"js\"\ncommand = [\"node\", {js:?}]\nworkers = {workers}\n\
             env = {{ NODE_PATH = {modules:?} }}\n",
            python = self.python.display().to_string(),
            py = self.program("offload_py.py"),
            js = self.program("offload_js.js"),
            modules = self.node_modules.display().to_string(),
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// The grpcio + ProcessPoolExecutor server, `processes` strong, on `port`.
    pub fn grpcio_pool(&self, port: u16, processes: usize) -> anyhow::Result<Child> {
        let mut command = Command::new(&self.python);
        command.arg(self.program("grpcio_pool.py")).arg(port.to_string()).arg(processes.to_string()).arg(&self.stubs);
        listening(command, "grpcio_pool.py")
    }

    /// The grpc-js + piscina server, `threads` strong, on `port`.
    pub fn piscina(&self, port: u16, threads: usize) -> anyhow::Result<Child> {
        let mut command = Command::new("node");
        command
            .arg(self.program("piscina_server.js"))
            .arg(port.to_string())
            .arg(threads.to_string())
            .arg(self.root.join("proto"))
            .env("NODE_PATH", &self.node_modules);
        listening(command, "piscina_server.js")
    }

    /// A BullMQ worker process taking one job at a time from the Redis
    /// server on `port`.
    /// Its logged jobs append to `log`, if given.
    pub fn bullmq_worker(&self, port: u16, log: Option<&Path>) -> anyhow::Result<Child> {
        let mut command = Command::new("node");
        command.arg(self.program("bullmq_jobs.js")).args(["worker", &port.to_string()]);
        command.env("NODE_PATH", &self.node_modules);
        if let Some(log) = log {
            command.env("OFFLOAD_BENCH_LOG", log);
        }
        listening(command, "a BullMQ worker")
    }

    /// A Celery prefork worker of `processes` on the Redis server on `port`.
    /// Its logged jobs append to `log`, if given.
    pub fn celery_worker(&self, port: u16, processes: usize, log: Option<&Path>) -> anyhow::Result<Child> {
        let mut command = Command::new(&self.python);
        command.arg(self.program("celery_jobs.py")).args(["worker", &port.to_string(), &processes.to_string()]);
        if let Some(log) = log {
            command.env("OFFLOAD_BENCH_LOG", log);
        }
        listening(command, "a Celery worker")
    }

    /// The bench of `queue` ("bullmq" or "celery"): `count` jobs of `kind`
    /// on the Redis server on `port`, `in_flight` at a time, each awaited.
    /// Run by [`queue_bench`], or started (with more arguments) and waited
    /// for later.
    pub fn queue_bench_command(
        &self,
        queue: &str,
        port: u16,
        kind: &str,
        count: usize,
        in_flight: usize,
    ) -> anyhow::Result<Command> {
        let mut command = match queue {
            "bullmq" => {
                let mut command = Command::new("node");
                command.arg(self.program("bullmq_jobs.js")).env("NODE_PATH", &self.node_modules);
                command
            }
            "celery" => {
                let mut command = Command::new(&self.python);
                command.arg(self.program("celery_jobs.py"));
                command
            }
            other => bail!("no bench for {other}"),
        };
        command.args(["bench", &port.to_string(), kind, &count.to_string(), &in_flight.to_string()]);
        Ok(command)
    }

    /// The median round trip of 1 KiB between two processes of `language`
    /// ("py" or "js") over a Unix socket, for `seconds`.
    pub fn pingpong(&self, language: &str, seconds: f64) -> anyhow::Result<Duration> {
        let mut command = match language {
            "py" => Command::new(&self.python),
            "js" => Command::new("node"),
            other => bail!("no ping-pong in {other}"),
        };
        command.arg(self.program(&format!("pingpong.{language}"))).arg(seconds.to_string());
        let us: f64 = run(&mut command, "the bare ping-pong")?.trim().parse().context("ping-pong's median")?;
        Ok(Duration::from_secs_f64(us / 1e6))
    }
}

/// Starts `command` and waits until it prints "listening".
fn listening(mut command: Command, name: &str) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt as _;
    // A group of its own: its pool's processes die with it.
    let mut child =
        command.stdout(Stdio::piped()).process_group(0).spawn().with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("listening") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = child.kill();
        bail!("{name} did not start listening within 60 s");
    }
    Ok(child)
}

/// Runs `command`, the bench of `queue` (see
/// [`Toolchains::queue_bench_command`]), and reads its report.
pub fn queue_bench(mut command: Command, queue: &str) -> anyhow::Result<crate::jobs::JobsResult> {
    let out = run(&mut command, &format!("the {queue} bench"))?;
    crate::jobs::JobsResult::parse(&out, queue)
}

/// Resident memory of each of `pid`'s children whose command line holds
/// `script`, in bytes.
pub fn program_rss(pid: u32, script: &str) -> Vec<u64> {
    crate::procstat::children(pid)
        .into_iter()
        .filter_map(|child| {
            let process = procfs::process::Process::new(i32::try_from(child).ok()?).ok()?;
            let cmdline = process.cmdline().ok()?;
            cmdline.iter().any(|arg| arg.contains(script)).then(|| process.stat().ok().map(|s| s.rss))?
        })
        .map(|pages| pages * procfs::page_size())
        .collect()
}
