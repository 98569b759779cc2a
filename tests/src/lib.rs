//! The end-to-end harness: builds and starts the real `offload-server`
//! binary on an ephemeral port, waits until it listens, hands out clients,
//! and stops it (SIGKILL on drop, so a failed test leaves no process).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use offload_proto::offload::v1::{ExecuteRequest, compute_client::ComputeClient};
use tonic::transport::Channel;

/// How long a server may take to start listening.
const START_BOUND: Duration = Duration::from_secs(30);

/// The workspace's root folder.
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

/// Runs cargo (the one running the tests) in the workspace with `args`.
fn cargo(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo).current_dir(workspace()).args(args).status().expect("run cargo");
    assert!(status.success(), "cargo {} failed", args.join(" "));
}

/// The directory holding the workspace's binaries, built once per test run
/// (same profile as the tests) so the tests always run the current code.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        cargo(&["build", "--quiet", "-p", "offload-server", "-p", "offload-cli"]);
        // Test executables live in target/<profile>/deps; binaries one level up.
        let exe = std::env::current_exe().expect("test executable path");
        exe.parent().and_then(Path::parent).expect("target profile dir").to_path_buf()
    })
}

/// The binary of `examples/custom-task` (Offload embedded in a crate of its
/// own, outside this workspace), built once per test run in the same
/// profile and target directory as the tests, so that the dependencies it
/// shares with the workspace are not built twice.
pub fn custom_task_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let profile_dir = bin_dir();
        let target = profile_dir.parent().expect("target dir").to_str().expect("UTF-8 target path");
        let mut args = vec!["build", "--quiet", "--locked", "--manifest-path", "examples/custom-task/Cargo.toml"];
        args.extend(["--target-dir", target]);
        if profile_dir.ends_with("release") {
            args.push("--release");
        }
        cargo(&args);
        profile_dir.join("custom-task")
    })
}

/// A Python with the SDK of `sdk/python` installed from source (a venv
/// made once per requirements file under target/, the SDK reinstalled once
/// per test run), for worker programs written with it.
pub fn python_with_sdk() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let root = workspace();
        let venv = root.join("target/py-sdk-venv");
        let made = Command::new("bash")
            .arg(root.join("scripts/venv.sh"))
            .arg(&venv)
            .arg(root.join("tests/programs/requirements.txt"))
            .output()
            .unwrap_or_else(|err| panic!("cannot run bash for scripts/venv.sh: {err}"));
        assert!(
            made.status.success(),
            "making the Python venv failed (python3 with venv and pip, and PyPI, are needed):\n{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let python = venv.join("bin/python");
        let installed = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--force-reinstall"])
            .args(["--disable-pip-version-check"])
            .arg(root.join("sdk/python"))
            .output()
            .expect("run pip");
        assert!(
            installed.status.success(),
            "pip install sdk/python failed:\n{}",
            String::from_utf8_lossy(&installed.stderr)
        );
        python
    })
}

/// Runs `npm install` with `args` in `target/<dir>` (after `prepare` has
/// put what it needs there) and returns its `node_modules`.
fn npm_install(dir: &str, prepare: impl FnOnce(&Path), args: &[&std::ffi::OsStr]) -> PathBuf {
    let dir = workspace().join("target").join(dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("create {}: {err}", dir.display()));
    prepare(&dir);
    let installed = Command::new("npm")
        .current_dir(&dir)
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run npm (Node 18+ with npm is needed for the Node tests): {err}"));
    assert!(
        installed.status.success(),
        "npm install in {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&installed.stderr)
    );
    dir.join("node_modules")
}

/// The `node_modules` folder holding the Node SDK of `sdk/node`, installed
/// from source once per test run under target/ (npm reaches its registry
/// for the SDK's one dependency), for worker programs written with it.
pub fn node_sdk_modules() -> &'static Path {
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    MODULES.get_or_init(|| {
        let sdk = workspace().join("sdk/node");
        npm_install(
            "node-sdk",
            // npm keeps an installed package of the same version, so the SDK
            // goes first: the tests run the current source.
            |dir| drop(std::fs::remove_dir_all(dir.join("node_modules/offload-worker"))),
            &["--install-links".as_ref(), "--no-save".as_ref(), sdk.as_os_str()],
        )
    })
}

/// The `node_modules` of the gRPC-Web test client (`tests/grpcweb`: the
/// grpc-web client library, xhr2, protobufjs), installed once under target/.
pub fn grpc_web_modules() -> &'static Path {
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    MODULES.get_or_init(|| modules_of("grpcweb-node", "tests/grpcweb/package.json"))
}

/// The `node_modules` of the console's browser test (`tests/console`:
/// playwright-core, which drives Debian's Chromium), installed once under
/// target/.
pub fn console_test_modules() -> &'static Path {
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    MODULES.get_or_init(|| modules_of("console-check", "tests/console/package.json"))
}

/// The packages of `manifest` (a package.json of the workspace), installed
/// in target/`dir`.
fn modules_of(dir: &str, manifest: &str) -> PathBuf {
    let manifest = workspace().join(manifest);
    npm_install(
        dir,
        |dir| {
            std::fs::copy(&manifest, dir.join("package.json"))
                .unwrap_or_else(|err| panic!("copy {}: {err}", manifest.display()));
        },
        &[],
    )
}

/// A running server process.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    /// Its own job store, unless the test named one.
    _job_store: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server with the debug tasks and `args`.
    pub fn start(args: &[&str]) -> Self {
        let mut all = vec!["--listen", "127.0.0.1:0", "--debug-tasks"];
        all.extend_from_slice(args);
        Self::start_exact(&all)
    }

    /// Starts a server with exactly `args` (plus JSON logs on stderr).
    pub fn start_exact(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// Starts a server with exactly `args` and the extra environment `env`.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_program(&bin_dir().join("offload-server"), args, env)
    }

    /// Starts the server inside `host` (its own network namespace), with
    /// exactly `args` and the extra environment `env`.
    pub fn start_in(host: &netns::Host, args: &[&str], env: &[(&str, &str)]) -> Self {
        let server = bin_dir().join("offload-server");
        let all = [&host.exec_prefix()[..], &[server.to_str().expect("a UTF-8 path")], args].concat();
        // `ip netns exec` enters the namespace and execs the server: the
        // child is the server itself, for signals and exit statuses.
        Self::start_program(Path::new("ip"), &all, env)
    }

    /// Starts `program`, a build of Offload, with exactly `args` and the
    /// extra environment `env`.
    pub fn start_program(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        // A job store of its own (in a folder removed with it), so that
        // servers of parallel tests share no jobs.
        let job_store = (!env.iter().any(|(key, _)| *key == "OFFLOAD_JOB_STORE"))
            .then(|| tempfile::tempdir().expect("a temporary folder for the job store"));
        let mut command = Command::new(program);
        if let Some(dir) = &job_store {
            command.env("OFFLOAD_JOB_STORE", dir.path().join("jobs.sqlite3"));
        }
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .env("OFFLOAD_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {}: {err}", program.display()));
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (found, addr_rx) = mpsc::channel();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let addr: String = addr.chars().take_while(|c| !matches!(c, '"' | ' ')).collect();
                    let _ = found.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match addr_rx.recv_timeout(START_BOUND) {
            Ok(addr) => addr.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                panic!("server did not listen within {START_BOUND:?}; logs:\n{}", logs.lock().unwrap().join("\n"));
            }
        };
        Self { child, addr, logs, _job_store: job_store }
    }

    /// The server's URL for tonic channels.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.expect("connect to server")
    }

    /// A Compute client with no message size limit of its own.
    pub async fn client(&self) -> ComputeClient<Channel> {
        ComputeClient::new(self.channel().await)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// A Compute client over a bare HTTP/2 connection. It sends grpc-timeout
    /// like any client but, unlike tonic's `Channel`, does not also enforce it
    /// locally (which answers CANCELLED), so a test sees the server's own
    /// answer to an expired call.
    pub fn wire_client(&self) -> ComputeClient<WireTransport> {
        let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http::<tonic::body::Body>();
        let origin = format!("http://{}", self.addr);
        let transport = tower::ServiceBuilder::new()
            .map_request(move |mut request: http::Request<tonic::body::Body>| {
                let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
                *request.uri_mut() = format!("{origin}{path}").parse().expect("valid uri");
                request
            })
            .service(http);
        ComputeClient::new(tower::util::BoxCloneService::new(transport))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// The address of its Prometheus endpoint (started with `--metrics-listen`).
    pub fn metrics_addr(&self) -> String {
        // The endpoint logs its address from its own task, which may come
        // after the server said it was serving: wait for it, bounded.
        let started = Instant::now();
        let line = loop {
            if let Some(line) = self.logs().into_iter().find(|l| l.contains("metrics on http://")) {
                break line;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "metrics address logged (start with --metrics-listen)"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        line.split("metrics on http://").nth(1).unwrap().chars().take_while(|c| *c != '/').collect()
    }

    /// The text of its Prometheus endpoint (started with `--metrics-listen`).
    pub fn scrape(&self) -> String {
        let (status, body) = http_get(&self.metrics_addr(), "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal server");
    }

    /// Waits up to `bound` for the process to exit.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Whether any log line so far contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Waits up to 5 s for a log line containing `needle` (log lines reach
    /// the test through a pipe, after the event they tell of).
    pub async fn wait_logged(&self, needle: &str) -> bool {
        wait_for(Duration::from_secs(5), || self.logged(needle)).await
    }

    /// The server's live child processes (its workers), sorted.
    pub fn worker_pids(&self) -> Vec<u32> {
        children_of(self.child.id())
    }

    /// Waits up to `bound` until the server has `n` live workers, each past
    /// its handshake (logged as started); returns their pids.
    pub async fn wait_for_workers(&self, n: usize, bound: Duration) -> Vec<u32> {
        let mut pids = Vec::new();
        let found = wait_for(bound, || {
            pids = self.worker_pids();
            let logs = self.logs.lock().unwrap();
            let started = |pid: &u32| {
                let field = format!("\"worker.pid\":{pid},");
                logs.iter().any(|l| l.contains("worker started") && l.contains(&field))
            };
            pids.len() == n && pids.iter().all(started)
        })
        .await;
        assert!(found, "expected {n} started workers, have {pids:?}");
        pids
    }
}

/// Live (not zombie) children of `pid`, sorted.
pub fn children_of(pid: u32) -> Vec<u32> {
    let tasks = process(pid).and_then(|p| p.tasks().ok());
    let mut out: Vec<u32> =
        tasks.into_iter().flatten().flatten().filter_map(|task| task.children().ok()).flatten().collect();
    out.retain(|p| is_alive(*p));
    out.sort_unstable();
    out.dedup();
    out
}

/// `pid` in /proc, if it exists.
pub fn process(pid: u32) -> Option<procfs::process::Process> {
    procfs::process::Process::new(i32::try_from(pid).ok()?).ok()
}

/// Whether `pid` is a running (not zombie) process.
pub fn is_alive(pid: u32) -> bool {
    process(pid).and_then(|p| p.stat().ok()).is_some_and(|stat| stat.state != 'Z')
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The transport of [`Server::wire_client`].
pub type WireTransport = tower::util::BoxCloneService<
    http::Request<tonic::body::Body>,
    http::Response<hyper::body::Incoming>,
    hyper_util::client::legacy::Error,
>;

/// The value of the sample whose name and labels are exactly `series` in
/// the Prometheus text `metrics`.
pub fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{series} not found in:\n{metrics}"))
        .parse()
        .unwrap()
}

/// A plain HTTP/1.1 GET of `path` from `addr` (host:port): the status code
/// and the body. Blocking; for the metrics endpoint and Prometheus's API.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    // Chunked bodies (Prometheus's API) are joined back together.
    let chunked = response
        .split_once("\r\n\r\n")
        .is_some_and(|(head, _)| head.to_ascii_lowercase().contains("transfer-encoding: chunked"));
    if !chunked {
        return Ok((status, body.to_string()));
    }
    let mut joined = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        joined.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    Ok((status, joined))
}

/// A request for `task` with `params`.
pub fn request(task: &str, params: &[(&str, &str)], input: impl Into<bytes::Bytes>) -> ExecuteRequest {
    ExecuteRequest {
        task: task.to_string(),
        input: input.into(),
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

/// Wraps `body` with a gRPC deadline (the grpc-timeout header).
pub fn with_deadline<T>(body: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    let value = format!("{}m", timeout.as_millis());
    request.metadata_mut().insert("grpc-timeout", value.parse().unwrap());
    request
}

/// Polls `check` every 10 ms until it holds or `bound` passes.
pub async fn wait_for(bound: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + bound;
    while Instant::now() < end {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

/// An OTLP/gRPC trace receiver (the collector side of the protocol Jaeger
/// speaks), keeping every span it is sent.
/// What `find` finds, after installing Debian's `package` with apt if it
/// finds nothing (the first time, as the tests' venvs are made). Where it
/// cannot be had the test fails, saying so, rather than passing without
/// checking anything.
pub fn from_debian(package: &str, find: impl Fn() -> Option<PathBuf>) -> PathBuf {
    if let Some(found) = find() {
        return found;
    }
    let script = format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}");
    let installed = Command::new("sh").args(["-c", &script]).status();
    find().unwrap_or_else(|| {
        panic!("{package} is not installed and `apt-get install {package}` did not work ({installed:?})")
    })
}

pub mod netns;
pub mod postgres;

pub mod otlp {
    use std::{
        net::SocketAddr,
        sync::{Arc, Mutex},
    };

    use opentelemetry_proto::tonic::{
        collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
        trace::v1::ResourceSpans,
    };

    /// What the receiver got so far.
    #[derive(Debug, Clone, Default)]
    pub struct Received(Arc<Mutex<Vec<ResourceSpans>>>);

    impl Received {
        /// Every (service name, span) received.
        pub fn spans(&self) -> Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)> {
            let mut out = Vec::new();
            for resource_spans in self.0.lock().unwrap().iter() {
                use opentelemetry_proto::tonic::common::v1::any_value::Value;
                let service = resource_spans
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                    .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(name) => Some(name.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        out.push((service.clone(), span.clone()));
                    }
                }
            }
            out
        }
    }

    struct Collector(Received);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            self.0.0.lock().unwrap().extend(request.into_inner().resource_spans);
            Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
        }
    }

    /// Starts a receiver on an ephemeral port; it runs until the test ends.
    pub async fn start() -> (SocketAddr, Received) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Received::default();
        let service = TraceServiceServer::new(Collector(received.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr, received)
    }
}

/// Certificates made at test time (rcgen): a CA and the leaves it signs.
pub mod pki {
    use std::path::{Path, PathBuf};

    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

    /// A certificate authority.
    pub struct Ca {
        issuer: CertifiedIssuer<'static, KeyPair>,
    }

    /// A certificate and its key, PEM.
    #[derive(Debug, Clone)]
    pub struct Leaf {
        /// The certificate.
        pub cert: String,
        /// Its private key.
        pub key: String,
    }

    impl Ca {
        /// A new CA named `name`.
        pub fn new(name: &str) -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().expect("CA key");
            Self { issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate") }
        }

        /// The CA's certificate, PEM.
        pub fn pem(&self) -> String {
            self.issuer.pem()
        }

        /// A certificate for `names` (DNS names or IP addresses), usable by
        /// a server and a client.
        pub fn leaf(&self, names: &[&str]) -> Leaf {
            let mut params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &self.issuer).expect("leaf certificate");
            Leaf { cert: cert.pem(), key: key.serialize_pem() }
        }

        /// Writes the CA's certificate to `dir/name` and returns its path.
        pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
            let path = dir.join(name);
            std::fs::write(&path, self.pem()).expect("write CA");
            path
        }
    }

    impl Leaf {
        /// Writes the pair to `dir/<name>.crt` and `dir/<name>.key`, each
        /// replaced at once (written aside, then renamed), as rotation
        /// tools do; returns the two paths.
        pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
            let put = |file: String, text: &str| {
                let path = dir.join(file);
                let aside = path.with_extension("tmp");
                std::fs::write(&aside, text).expect("write PEM");
                std::fs::rename(&aside, &path).expect("rename PEM");
                path
            };
            (put(format!("{name}.crt"), &self.cert), put(format!("{name}.key"), &self.key))
        }
    }
}
