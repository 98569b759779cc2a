//! Worker programs in other languages, declared with `[[worker_program]]`:
//! `tests/programs/app.py` (Python SDK, tasks `py.*`) and `app.js` (Node
//! SDK, the same tasks as `js.*`), run by a real server and called over
//! gRPC. Each check runs for both: round trips, the front's checks of
//! declared params, each way a task can fail, exits mid-task, deadlines with
//! and without a task that looks at `ctx.cancelled`, heartbeats during
//! busy loops, progress, recycling, a program that fails its handshake, and
//! no program process outliving a SIGKILLed front.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use futures::future::join_all;
use nix::sys::signal::Signal;
use offload_e2e::{
    Server, is_alive, metric_value, node_sdk_modules, otlp, python_with_sdk, request, wait_for, with_deadline,
};
use offload_proto::offload::v1::{
    ExecuteRequest, ExecuteResponse, ExecutionMode, ListTasksRequest, Stage, compute_client::ComputeClient,
    execute_event::Event,
};
use sha2::Digest as _;
use tonic::{Code, transport::Channel};

/// A config file declaring `tables` (TOML), in a folder that lives as long as the value.
struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn config(tables: &str) -> ConfigFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offload.toml");
    std::fs::write(&path, tables).unwrap();
    ConfigFile { _dir: dir, path }
}

/// The language of a test program.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Lang {
    Python,
    Node,
}

use Lang::{Node, Python};

impl Lang {
    /// The program's name, its tasks' prefix.
    fn name(self) -> &'static str {
        match self {
            Python => "py",
            Node => "js",
        }
    }

    /// The full name of the program's task `task`.
    fn task(self, task: &str) -> String {
        format!("{}.{task}", self.name())
    }

    /// The `[[worker_program]]` table running `script` (in tests/programs)
    /// as program `name`, with `extra` keys.
    fn table(self, name: &str, script: &str, extra: &str) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("programs").join(script);
        let script = script.display().to_string();
        let (command, env) = match self {
            Python => (format!("[{:?}, {script:?}]", python_with_sdk().display().to_string()), String::new()),
            Node => (
                "[\"node\", ".to_string() + &format!("{script:?}]"),
                format!("env = {{ NODE_PATH = {:?} }}\n", node_sdk_modules().display().to_string()),
            ),
        };
        format!("[[worker_program]]\nname = {name:?}\ncommand = {command}\n{env}{extra}\n")
    }

    /// The table of the test program (`app.py` or `app.js`).
    fn app(self, extra: &str) -> String {
        self.table(self.name(), self.script(), extra)
    }

    fn script(self) -> &'static str {
        match self {
            Python => "app.py",
            Node => "app.js",
        }
    }

    /// What the program says of an uncaught error and of a wrong return type.
    fn broken_and_text(self) -> (&'static str, &'static str) {
        match self {
            Python => ("KeyError: 'missing'", "returned str, not bytes"),
            Node => ("TypeError: missing is not a function", "returned string, not a Buffer"),
        }
    }
}

fn start(file: &ConfigFile, args: &[&str]) -> Server {
    let mut all = vec!["--config", file.path.to_str().unwrap(), "--metrics-listen", "127.0.0.1:0", "--workers", "1"];
    all.extend_from_slice(args);
    Server::start(&all)
}

async fn call(
    client: &mut ComputeClient<Channel>,
    task: &str,
    params: &[(&str, &str)],
    input: &[u8],
) -> Result<ExecuteResponse, tonic::Status> {
    client.execute(request(task, params, input.to_vec())).await.map(tonic::Response::into_inner)
}

fn pid_of(response: &ExecuteResponse) -> u32 {
    response.stats.as_ref().unwrap().worker_pid
}

fn restarts(server: &Server, reason: &str) -> f64 {
    metric_value(&server.scrape(), &format!("offload_worker_restarts_total{{reason=\"{reason}\"}}"))
}

/// Pids of the server's children running the test program.
fn program_workers(server: &Server, lang: Lang) -> Vec<u32> {
    server.worker_pids().into_iter().filter(|pid| process_cmdline(*pid).contains(lang.script())).collect()
}

fn process_cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Two tests per check, one per SDK.
macro_rules! for_both {
    ($check:ident: $python:ident, $node:ident) => {
        #[tokio::test]
        async fn $python() {
            $check(Python).await
        }

        #[tokio::test]
        async fn $node() {
            $check(Node).await
        }
    };
}

for_both!(listed_and_called: python_tasks_are_listed_and_called_with_declared_params_checked_by_the_front,
    node_tasks_are_listed_and_called_with_declared_params_checked_by_the_front);

async fn listed_and_called(lang: Lang) {
    let file = config(&lang.app("workers = 2"));
    let server = start(&file, &[]);
    let mut client = server.client().await;
    let t = |task: &str| lang.task(task);

    let listed = client.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let reverse = listed.iter().find(|task| task.name == t("reverse")).expect("reverse listed");
    assert_eq!(reverse.description, "reverses the input");
    let modes = (reverse.default_mode, reverse.allowed_modes.as_slice());
    assert_eq!(modes, (ExecutionMode::Isolated as i32, &[ExecutionMode::Isolated as i32][..]));
    let upper = &reverse.params[0];
    assert_eq!((upper.name.as_str(), upper.default_value.as_str(), upper.required), ("upper", "false", false));
    let repeat = listed.iter().find(|task| task.name == t("repeat")).unwrap();
    assert!(repeat.params[0].required);
    assert!(listed.iter().any(|task| task.name == "hash.sha256"), "built-in tasks are still there");

    let out = call(&mut client, &t("reverse"), &[], b"hello").await.unwrap();
    assert_eq!((out.output.as_ref(), out.mode), (&b"olleh"[..], ExecutionMode::Isolated as i32));
    assert!(program_workers(&server, lang).contains(&pid_of(&out)), "run by a worker of the program");
    let out = call(&mut client, &t("reverse"), &[("upper", "true")], b"hello").await.unwrap();
    assert_eq!(out.output.as_ref(), b"OLLEH");
    if lang == Node {
        // The Node SDK's example task, written in app.js as the issue writes it.
        let out = call(&mut client, "js.upper", &[], "h\u{e9}llo".as_bytes()).await.unwrap();
        assert_eq!(out.output.as_ref(), "H\u{c9}LLO".as_bytes());
    }
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = call(&mut client, &t("sha256"), &[], &data).await.unwrap();
    assert_eq!(out.output.as_ref(), sha2::Sha256::digest(&data).as_slice(), "3 MB through the program");

    // Refused by the front, from the declaration, before any worker sees the call.
    for (task, params, says) in [
        (t("reverse"), &[("lower", "true")][..], "unknown param \"lower\"; accepted: upper"),
        (t("repeat"), &[][..], "missing required param \"times\""),
    ] {
        let err = call(&mut client, &task, params, b"x").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(says), "{err:?}");
    }
    let pool = ExecuteRequest { mode: ExecutionMode::Pool as i32, ..request(&t("reverse"), &[], vec![]) };
    let err = client.execute(pool).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "a program's tasks run in its workers only: {err:?}");
    let err = call(&mut client, &t("nothing"), &[], b"").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains(&t("reverse")), "lists what the program has: {err:?}");
}

for_both!(tiny: python_tiny_tasks_run_on_the_reading_thread_and_pipelined_calls_keep_their_answers,
    node_tiny_tasks_run_on_the_reading_thread_and_pipelined_calls_keep_their_answers);

/// Tasks the front measured as tiny carry the `inline` hint: the SDKs run them
/// on the thread that reads the socket. Under concurrency the front pipelines
/// them, and every call must still get its own answer and status.
async fn tiny(lang: Lang) {
    let file = config(&lang.app("workers = 1"));
    let server = start(&file, &[]);
    let mut client = server.client().await;
    let t = |task: &str| lang.task(task);

    // Unmeasured, a task is charged a millisecond: it goes to the task thread.
    let first = call(&mut client, &t("thread"), &[], b"").await.unwrap();
    assert_eq!(first.output.as_ref(), b"task");
    let pid = pid_of(&first);
    // Measured tiny, it runs where it is read (once the average has come down).
    let mut threads = Vec::new();
    for _ in 0..20 {
        threads.push(call(&mut client, &t("thread"), &[], b"").await.unwrap().output);
    }
    assert_eq!(threads.last().map(|b| b.as_ref()), Some(&b"main"[..]), "{threads:?}");

    // Many at once, valid and invalid mixed, with a longer task ahead of some.
    let (mut spinner, spin_task) = (client.clone(), t("spin"));
    let spin = call(&mut spinner, &spin_task, &[("ms", "200")], b"");
    let calls = (0..300).map(|i| {
        let mut client = client.clone();
        async move {
            let input = format!("call {i}");
            if i % 7 == 0 {
                let err = call(&mut client, &t("repeat"), &[("times", "x")], input.as_bytes()).await.unwrap_err();
                assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            } else if i % 11 == 0 {
                let err = call(&mut client, &t("broken"), &[], input.as_bytes()).await.unwrap_err();
                assert_eq!(err.code(), Code::Internal, "{err:?}");
            } else {
                let out = call(&mut client, &t("reverse"), &[], input.as_bytes()).await.unwrap();
                let expected: Vec<u8> = input.bytes().rev().collect();
                assert_eq!(out.output.as_ref(), expected.as_slice(), "call {i}");
                assert_eq!(pid_of(&out), pid);
            }
        }
    });
    let (spun, _) = tokio::join!(spin, join_all(calls));
    assert!(spun.is_ok(), "{spun:?}");
    assert_eq!(restarts(&server, "crash") + restarts(&server, "unresponsive") + restarts(&server, "protocol"), 0.0);
}

for_both!(failures: python_failures_have_their_status_and_an_exit_mid_task_replaces_the_worker,
    node_failures_have_their_status_and_an_exit_mid_task_replaces_the_worker);

async fn failures(lang: Lang) {
    let file = config(&lang.app("workers = 1"));
    let server = start(&file, &[]);
    let mut client = server.client().await;
    let t = |task: &str| lang.task(task);
    let first = pid_of(&call(&mut client, &t("pid"), &[], b"").await.unwrap());

    let err = call(&mut client, &t("repeat"), &[("times", "x")], b"ab").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(err.message(), format!("{}: param times: 'x' is not an integer", t("repeat")));
    let err = call(&mut client, &t("repeat"), &[("times", "500")], b"ab").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("500 is not in 0..=100"), "{err:?}");
    let (broken, text) = lang.broken_and_text();
    let err = call(&mut client, &t("broken"), &[], b"").await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Internal, format!("{}: {broken}", t("broken")).as_str()));
    let err = call(&mut client, &t("text"), &[], b"").await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Internal, format!("{0}: {0} {text}", t("text")).as_str()));
    let out = call(&mut client, &t("repeat"), &[("times", "3")], b"ab").await.unwrap();
    assert_eq!(out.output.as_ref(), b"ababab");
    assert_eq!(pid_of(&out), first, "errors fail their call, not the worker");

    // A program's exit status is its own, even those the protocol names
    // (3 out of memory, 5 panicked: only after a TaskDone that says so).
    let mut pid = first;
    for code in ["2", "3", "4", "5", "7"] {
        let err = call(&mut client, &t("exit"), &[("code", code)], b"").await.unwrap_err();
        assert_eq!(err.code(), Code::Internal, "exit {code}: {err:?}");
        assert_eq!(err.message(), format!("worker {pid} exited with status {code} while running {}", t("exit")));
        let replaced = pid_of(&call(&mut client, &t("pid"), &[], b"").await.unwrap());
        assert_ne!(replaced, pid, "exit {code}");
        pid = replaced;
    }
    assert_eq!((restarts(&server, "crash"), restarts(&server, "memory"), restarts(&server, "panic")), (5.0, 0.0, 0.0));
    // The program's own series, beside the totals.
    let metrics = server.scrape();
    let program = lang.name();
    let series = |name: &str, extra: &str| metric_value(&metrics, &format!("{name}{{program=\"{program}\"{extra}}}"));
    assert_eq!(series("offload_program_worker_restarts_total", ",reason=\"crash\""), 5.0);
    assert_eq!(series("offload_program_live_workers", ""), 1.0);
    assert_eq!(series("offload_program_busy_workers", ""), 0.0);
    assert_eq!(series("offload_program_queue_depth", ""), 0.0);
}

for_both!(deadlines: python_deadlines_stop_a_task_that_looks_at_cancelled_and_kill_one_that_does_not,
    node_deadlines_stop_a_task_that_looks_at_cancelled_and_kill_one_that_does_not);

async fn deadlines(lang: Lang) {
    // Heartbeats every 100 ms, a worker silent for 600 ms is hung: a long
    // busy loop must still be answered for.
    let file = config(&lang.app("workers = 1\nheartbeat_ms = 100\nheartbeat_timeout_ms = 600"));
    let server = start(&file, &[]);
    let mut client = server.client().await;
    let mut wire = server.wire_client();
    let t = |task: &str| lang.task(task);
    let first = pid_of(&call(&mut client, &t("pid"), &[], b"").await.unwrap());

    let out = call(&mut client, &t("spin"), &[("ms", "1500"), ("obey", "false")], b"").await;
    assert!(out.is_ok(), "a busy loop answers heartbeats: {out:?}");
    assert_eq!(restarts(&server, "unresponsive"), 0.0);

    let started = Instant::now();
    let spin = request(&t("spin"), &[("ms", "30000")], vec![]);
    let err = wire.execute(with_deadline(spin, Duration::from_millis(300))).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(pid_of(&call(&mut client, &t("pid"), &[], b"").await.unwrap()), first, "it stopped when told");

    let stubborn = request(&t("spin"), &[("ms", "30000"), ("obey", "false")], vec![]);
    let err = wire.execute(with_deadline(stubborn, Duration::from_millis(300))).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let killed = format!("after its task ignored the deadline while running {}", t("spin"));
    assert!(server.wait_logged(&killed).await, "{:?}", server.logs());
    assert_eq!(restarts(&server, "deadline_kill"), 1.0);
    assert_ne!(pid_of(&call(&mut client, &t("pid"), &[], b"").await.unwrap()), first, "the ladder killed it");
}

/// The fractions a stream reported while its task ran, and its result.
async fn running_fractions(
    mut events: tonic::Streaming<offload_proto::offload::v1::ExecuteEvent>,
) -> (Vec<f64>, Option<ExecuteResponse>) {
    let (mut fractions, mut result) = (Vec::new(), None);
    while let Some(event) = events.message().await.unwrap() {
        match event.event.unwrap() {
            Event::Progress(p) if p.stage == Stage::Running as i32 => fractions.push(p.fraction),
            Event::Progress(_) => {}
            Event::Result(r) => result = Some(r),
        }
    }
    (fractions, result)
}

for_both!(progress_and_recycling: python_progress_is_streamed_and_workers_are_recycled_by_task_count,
    node_progress_is_streamed_and_workers_are_recycled_by_task_count);

async fn progress_and_recycling(lang: Lang) {
    let file = config(&lang.app("workers = 1\nmax_tasks = 3"));
    let server = start(&file, &[]);
    let mut client = server.client().await;
    let t = |task: &str| lang.task(task);

    let events = client.execute_stream(request(&t("spin"), &[("ms", "400")], vec![])).await.unwrap().into_inner();
    let (fractions, result) = running_fractions(events).await;
    assert!(result.is_some_and(|r| r.error.is_none()));
    assert!(fractions.len() >= 3, "{fractions:?}");
    // Progress is a latest-value stream: a report just before the result
    // may be overtaken by it, so the last one seen need not be 1.0.
    assert!(
        fractions.windows(2).all(|w| w[0] <= w[1]) && fractions.iter().all(|f| (0.0..=1.0).contains(f)),
        "{fractions:?}"
    );

    // That was task 1 of the first worker; two more, then a new worker.
    let mut pids = Vec::new();
    for _ in 0..4 {
        pids.push(pid_of(&call(&mut client, &t("pid"), &[], b"").await.unwrap()));
    }
    assert_eq!(pids[0], pids[1]);
    assert!(pids[2] != pids[1] && pids[2] == pids[3], "recycled after 3 tasks: {pids:?}");
    assert!(server.wait_logged("ran 3 tasks").await, "{:?}", server.logs());
}

for_both!(refused_handshake: a_python_program_that_fails_its_handshake_is_retried_and_affects_nothing_else,
    a_node_program_that_fails_its_handshake_is_retried_and_affects_nothing_else);

async fn refused_handshake(lang: Lang) {
    let bad = lang.table("bad", if lang == Python { "bad.py" } else { "bad.js" }, "");
    let file = config(&format!("{}{bad}", lang.app("workers = 1")));
    let server = start(&file, &[]);
    let mut client = server.client().await;
    assert!(
        server.wait_logged("task \\\"other.x\\\" is outside its namespace").await,
        "the refusal says why: {:?}",
        server.logs()
    );
    assert!(server.wait_logged("worker failed to start; backing off").await);
    let err = call(&mut client, "bad.x", &[], b"").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("worker program \"bad\""), "{err:?}");
    // The other program and the built-in tasks are unaffected.
    assert_eq!(call(&mut client, &lang.task("reverse"), &[], b"ab").await.unwrap().output.as_ref(), b"ba");
    assert!(call(&mut client, "hash.sha256", &[], b"ab").await.is_ok());
    let isolated = ExecuteRequest { mode: ExecutionMode::Isolated as i32, ..request("debug.echo", &[], &b"ok"[..]) };
    assert_eq!(client.execute(isolated).await.unwrap().into_inner().output.as_ref(), b"ok");
    // Retried with backoff: several failed starts are logged over time.
    let refusals = || server.logs().iter().filter(|l| l.contains("outside its namespace")).count();
    assert!(wait_for(Duration::from_secs(10), || refusals() >= 3).await, "{:?}", server.logs());
}

for_both!(killed_front: no_python_process_outlives_a_killed_front, no_node_process_outlives_a_killed_front);

async fn killed_front(lang: Lang) {
    let file = config(&lang.app("workers = 2"));
    let mut server = start(&file, &[]);
    assert!(wait_for(Duration::from_secs(10), || program_workers(&server, lang).len() == 2).await);
    let workers = program_workers(&server, lang);
    let mut client = server.client().await;
    // One of them busy with a task that ignores cancellation.
    let stubborn = request(&lang.task("spin"), &[("ms", "30000"), ("obey", "false")], vec![]);
    let _running = super::start_running(&mut client, stubborn).await;
    server.signal(Signal::SIGKILL);
    assert!(server.wait_exit(Duration::from_secs(5)).is_some());
    let gone = wait_for(Duration::from_secs(5), || workers.iter().all(|pid| !is_alive(*pid))).await;
    assert!(gone, "program workers left behind: {:?}", workers.iter().filter(|p| is_alive(**p)).collect::<Vec<_>>());
}

for_both!(traced: a_python_programs_span_joins_the_callers_trace_however_the_call_ends,
    a_node_programs_span_joins_the_callers_trace_however_the_call_ends);

async fn traced(lang: Lang) {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let (collector, received) = otlp::start().await;
    let endpoint = format!("http://{collector}");
    let file = config(&lang.app("workers = 1"));
    let server = Server::start_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            file.path.to_str().unwrap(),
            "--workers",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let mut client = server.client().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut call = tonic::Request::new(request(&lang.task("reverse"), &[], &b"abc"[..]));
    let traceparent = format!("00-{trace_id}-00f067aa0ba902d1-01");
    call.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    let pid = pid_of(&client.execute(call).await.unwrap().into_inner());

    let name = format!("worker {}", lang.task("reverse"));
    // The program's span and the front's execution span leave in separate
    // exports (each service has its own batch), so wait for both.
    let both_arrived = || {
        let spans = received.spans();
        spans
            .iter()
            .filter(|(_, s)| s.name == name)
            .any(|(_, inside)| spans.iter().any(|(_, s)| s.span_id == inside.parent_span_id))
    };
    assert!(
        wait_for(Duration::from_secs(10), both_arrived).await,
        "no span {name:?} with its parent: {:#?}",
        received.spans()
    );
    let spans = received.spans();
    let (service, inside) = spans.iter().find(|(_, s)| s.name == name).unwrap();
    assert_eq!(service, &format!("offload-{}", lang.name()), "the program's span has its own service");
    assert_eq!(hex::encode(&inside.trace_id), trace_id, "in the caller's trace");
    let execute = format!("execute {}", lang.task("reverse"));
    let parent = spans.iter().find(|(_, s)| s.span_id == inside.parent_span_id).expect("a parent span");
    assert_eq!(parent.1.name, execute, "under the call's execution span");
    let attribute = |key: &str| inside.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.clone()?.value);
    assert_eq!(attribute("worker.pid"), Some(Value::IntValue(i64::from(pid))));
    assert_eq!(attribute("task.name"), Some(Value::StringValue(lang.task("reverse"))));
    assert!(inside.end_time_unix_nano >= inside.start_time_unix_nano && inside.start_time_unix_nano > 0);

    // Calls that end early, by their deadline or their client, keep the
    // program's span in their trace too.
    let spin = request(&lang.task("spin"), &[("ms", "30000")], vec![]);
    crate::traces::early_endings_keep_the_worker_span(&server, &received, spin).await;
}

for_both!(memory: python_memory_is_watched_and_a_worker_over_its_limit_is_replaced,
    node_memory_is_watched_and_a_worker_over_its_limit_is_replaced);

async fn memory(lang: Lang) {
    // An RSS watch: V8 reserves gigabytes of address space at start, which
    // an RLIMIT_AS of 300 MiB would not let Node survive.
    let file = config(&lang.app("workers = 1\nmemory_limit_bytes = 314572800"));
    let server = start(&file, &[]);
    let mut client = server.client().await;
    let t = |task: &str| lang.task(task);
    let out = call(&mut client, &t("alloc"), &[("mb", "50")], b"").await.unwrap();
    assert_eq!(out.output.as_ref(), (50u64 << 20).to_string().as_bytes());
    let first = pid_of(&out);

    let err = call(&mut client, &t("alloc"), &[("mb", "600")], b"").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with(&format!("worker {first} exceeded its memory limit while running {}", t("alloc"))),
        "{err:?}"
    );
    assert_eq!(restarts(&server, "memory"), 1.0);
    let next = call(&mut client, &t("alloc"), &[("mb", "10")], b"").await.unwrap();
    assert_ne!(pid_of(&next), first, "replaced");
}

/// Why worker programs get an RSS watch and not RLIMIT_AS: Node maps far
/// more address space than it holds resident (the README quotes this), and
/// does not even start under a limit Python starts under.
#[test]
fn node_maps_far_more_than_it_holds_so_an_address_space_limit_cannot_bound_it() {
    let script = "const { Worker } = require('worker_threads');\
                  new Worker('setTimeout(() => {}, 100)', { eval: true });\
                  setTimeout(() => { const s = require('fs').readFileSync('/proc/self/status', 'utf8');\
                  const kb = (k) => Number(s.match(new RegExp(k + ':\\\\s+(\\\\d+)'))[1]);\
                  console.log(kb('VmSize'), kb('VmRSS')); }, 300);";
    let out = std::process::Command::new("node").args(["-e", script]).output().expect("node (Node 18+) is needed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let [size_kb, rss_kb]: [u64; 2] =
        text.split_whitespace().map(|n| n.parse().unwrap()).collect::<Vec<_>>().try_into().expect("two numbers");
    assert!(size_kb > 8 * rss_kb && size_kb > 500 << 10, "VmSize {size_kb} kB, VmRSS {rss_kb} kB");

    // Each runs an empty program, with and without the limit.
    let starts = |limit: &str, program: &str, flag: &str| {
        let command = format!("ulimit -v {limit}; exec {program} {flag} 0");
        std::process::Command::new("bash")
            .args(["-c", &command])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let python = python_with_sdk().to_str().unwrap();
    assert!(starts("unlimited", "node", "-e") && starts("unlimited", python, "-c"));
    assert!(!starts("307200", "node", "-e"), "Node started under RLIMIT_AS = 300 MiB");
    assert!(starts("307200", python, "-c"), "Python did not start under RLIMIT_AS = 300 MiB");
}

for_both!(sandboxed: python_programs_run_in_the_worker_sandbox_with_their_scratch_folder,
          node_programs_run_in_the_worker_sandbox_with_their_scratch_folder);
async fn sandboxed(lang: Lang) {
    let file = config(&lang.app(""));
    // Node reads the extra CA file named here at every start: it must be
    // readable in the sandbox (Node warns on stderr otherwise).
    // (In a folder of its own: the program's working directory is readable.)
    let elsewhere = tempfile::tempdir().unwrap();
    let ca = offload_e2e::pki::Ca::new("extra roots").write(elsewhere.path(), "extra-ca.pem");
    let ca = ca.to_str().unwrap();
    let config_path = file.path.to_str().unwrap();
    let args = ["--listen", "127.0.0.1:0", "--debug-tasks", "--config", config_path, "--workers", "1"];
    let server = Server::start_with_env(&args, &[("NODE_EXTRA_CA_CERTS", ca)]);
    let mut client = server.client().await;
    let port = server.addr.port().to_string();
    let probe = |what: &'static str| request(&lang.task("probe"), &[("what", what), ("port", &port)], vec![]);
    for what in ["read", "write", "connect"] {
        let out = client.execute(probe(what)).await.expect("probe").into_inner().output;
        let out = String::from_utf8_lossy(&out).into_owned();
        assert!(out.starts_with("denied: "), "{lang:?} {what}: {out}");
    }
    let out = client.execute(probe("scratch")).await.expect("probe").into_inner().output;
    assert_eq!(String::from_utf8_lossy(&out), "allowed", "{lang:?} cannot write its scratch folder");
    assert!(!server.logged("extra certs"), "{:#?}", server.logs());

    // Without the sandbox the same program may do all of it.
    let open = start(&file, &["--worker-sandbox", "off"]);
    let mut client = open.client().await;
    let port = open.addr.port().to_string();
    for what in ["read", "write", "connect"] {
        let body = request(&lang.task("probe"), &[("what", what), ("port", &port)], vec![]);
        let out = client.execute(body).await.expect("probe").into_inner().output;
        assert_eq!(String::from_utf8_lossy(&out), "allowed", "{lang:?} {what} without the sandbox");
    }
}

for_both!(installed: the_python_sdk_installs_with_pip_install_dot_sdk_python,
          the_node_sdk_installs_with_npm_install_dot_sdk_node);

/// The SDKs install with the words the README gives, `pip install
/// ./sdk/python` and `npm install ./sdk/node`, run in a folder laid out as
/// the repository is (a copy of the SDK, so that pip's in-tree build and
/// npm's link leave alone the checkout the other tests install from): pip
/// builds the package in isolation and fetches `protobuf`, npm links the
/// folder and fetches `protobufjs`. The documented imports then work.
async fn installed(lang: Lang) {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path();
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository").join("sdk");
    std::fs::create_dir(at.join("sdk")).unwrap();
    let folder = match lang {
        Python => "python",
        Node => "node",
    };
    succeeds(Command::new("cp").arg("-r").arg(sdk.join(folder)).arg(at.join("sdk")));
    let imported = match lang {
        Python => {
            succeeds(Command::new("python3").args(["-m", "venv", "venv"]).current_dir(at));
            let pip = at.join("venv/bin/pip");
            succeeds(Command::new(pip).args(["install", "--quiet", "./sdk/python"]).current_dir(at));
            let script = "from offload_worker import InvalidArgument, task, serve; import offload_worker; \
                          print(offload_worker.__file__)";
            succeeds(Command::new(at.join("venv/bin/python")).args(["-c", script]).current_dir(at))
        }
        Node => {
            let npm = ["install", "--no-audit", "--no-fund", "--loglevel=error", "./sdk/node"];
            succeeds(Command::new("npm").args(npm).current_dir(at));
            let script = "const { task, serve, InvalidArgument } = require('offload-worker'); \
                          console.log(require.resolve('offload-worker'), typeof task, typeof serve, typeof InvalidArgument)";
            succeeds(Command::new("node").args(["-e", script]).current_dir(at))
        }
    };
    match lang {
        Python => assert!(imported.contains("/venv/lib/"), "imported from the venv: {imported}"),
        Node => assert!(imported.ends_with("index.js function function function\n"), "{imported}"),
    }
}

/// Runs `command` and returns its output, failing the test with what it
/// printed unless it succeeds.
fn succeeds(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    assert!(out.status.success(), "{command:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

for_both!(clamped_progress: python_progress_out_of_range_reaches_callers_clamped,
          node_progress_out_of_range_reaches_callers_clamped);

/// A program may report any number as progress; callers see it in [0, 1],
/// never going down, and NaN changes nothing.
async fn clamped_progress(lang: Lang) {
    let file = config(&lang.app("workers = 1"));
    let server = start(&file, &[]);
    let mut client = server.client().await;
    let reports = request(&lang.task("progress"), &[("fractions", "0.5,0.2,1.5,-1,NaN,0.7")], vec![]);
    let events = client.execute_stream(reports).await.unwrap().into_inner();
    let (fractions, result) = running_fractions(events).await;
    assert_eq!(result.map(|r| r.output), Some(b"reported".to_vec().into()));
    assert!(fractions.iter().all(|f| (0.0..=1.0).contains(f)), "{fractions:?}");
    assert!(fractions.windows(2).all(|w| w[0] <= w[1]), "{fractions:?}");
}

for_both!(descriptors: a_python_program_inherits_no_descriptor_from_the_fronts_parent,
          a_node_program_inherits_no_descriptor_from_the_fronts_parent);

/// A shell that starts the front with stray descriptors open (10 and 251,
/// as one was seen to) passes them to the front, but no further: a
/// program's workers get 0, 1, 2 and their socket.
async fn descriptors(lang: Lang) {
    let file = config(&lang.app("workers = 1"));
    let stray = tempfile::NamedTempFile::new().unwrap();
    let script = format!("exec 10<{0:?} 251<{0:?}; exec \"$0\" \"$@\"", stray.path().display().to_string());
    let front = offload_e2e::bin_dir().join("offload-server");
    let config = file.path.to_str().unwrap();
    let args =
        ["-c", &script, front.to_str().unwrap(), "--listen", "127.0.0.1:0", "--config", config, "--workers", "1"];
    let server = Server::start_program(Path::new("/bin/bash"), &args, &[]);
    for fd in [10, 251] {
        let held = std::fs::read_link(format!("/proc/{}/fd/{fd}", server.pid()));
        assert_eq!(held.ok().as_deref(), Some(stray.path()), "the front inherited descriptor {fd}");
    }
    let mut client = server.client().await;
    let out = call(&mut client, &lang.task("fds"), &[], b"").await.unwrap();
    let pid = pid_of(&out);
    // (fd, device, inode) of each; Node holds a score of descriptors of its own.
    let open: Vec<(u32, u64, u64)> = String::from_utf8(out.output.to_vec())
        .unwrap()
        .split(',')
        .map(|entry| {
            let mut parts = entry.split(':').map(|n| n.parse::<u64>().unwrap());
            let mut next = || parts.next().expect("fd:device:inode");
            (next() as u32, next(), next())
        })
        .collect();
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::metadata(stray.path()).unwrap();
    let leaked: Vec<u32> =
        open.iter().filter(|(_, dev, ino)| (*dev, *ino) == (file.dev(), file.ino())).map(|(fd, ..)| *fd).collect();
    assert!(leaked.is_empty(), "worker {pid} holds the front's stray file as {leaked:?}: {open:?}");
    let socket: u32 = std::fs::read_to_string(format!("/proc/{pid}/environ"))
        .unwrap()
        .split('\0')
        .find_map(|v| v.strip_prefix("OFFLOAD_WORKER_FD="))
        .expect("the socket's number in the environment")
        .parse()
        .unwrap();
    let open: Vec<u32> = open.iter().map(|(fd, ..)| *fd).collect();
    assert!(open.contains(&socket), "its socket {socket} is open: {open:?}");
}

for_both!(costed: python_calls_are_costed_by_their_declared_cost_param,
          node_calls_are_costed_by_their_declared_cost_param);

/// `spin` declares `ms` as its cost param: after two calls of 1500 ms, four
/// of 100 ms at once on two workers are costed 100 ms each and all admitted
/// with a 2 s deadline (costed as the calls before them, the fourth would
/// wait about 2.25 s and be refused).
async fn costed(lang: Lang) {
    let file = config(&lang.app("workers = 2"));
    let server = start(&file, &[]);
    let wire = server.wire_client();
    let at_once = |n: usize, ms: &'static str, deadline: Duration| {
        join_all((0..n).map(|_| {
            let mut wire = wire.clone();
            let body = request(&lang.task("spin"), &[("ms", ms)], vec![]);
            async move { wire.execute(with_deadline(body, deadline)).await }
        }))
    };
    for expensive in at_once(2, "1500", Duration::from_secs(20)).await {
        expensive.expect("an expensive call within its deadline");
    }
    for (i, cheap) in at_once(4, "100", Duration::from_secs(2)).await.into_iter().enumerate() {
        assert!(cheap.is_ok(), "cheap call {i}: {cheap:?}");
    }
}

for_both!(failed_start: a_python_program_that_cannot_start_says_why_in_its_status_and_logs_it_once,
          a_node_program_that_cannot_start_says_why_in_its_status_and_logs_it_once);

/// A program whose SDK refuses its declaration at start (a param given as a
/// number): its callers' UNAVAILABLE carries the line naming the error,
/// the SDK's message says how to declare a required param, each retry logs
/// one line, and its stderr is logged in full once, not per retry.
async fn failed_start(lang: Lang) {
    let script = if lang == Python { "broken.py" } else { "broken.js" };
    let file = config(&lang.table("broken", script, ""));
    let server = start(&file, &[]);
    let mut client = server.client().await;
    let retries = || server.logs().iter().filter(|l| l.contains("worker failed to start; backing off")).count();
    assert!(wait_for(Duration::from_secs(15), || retries() >= 3).await, "{:?}", server.logs());
    let err = call(&mut client, "broken.sum", &[], b"").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let null = if lang == Python { "None" } else { "null" };
    let says = format!(
        "its stderr ended with: TypeError: param {}column{} of broken.sum: give {} with {null} as the default of a required param",
        if lang == Python { "'" } else { "" },
        if lang == Python { "'" } else { "" },
        if lang == Python { "(description, default)," } else { "[description, default]," },
    );
    assert!(err.message().contains(&says), "{err:?}\nexpected: {says}");
    let logs = server.logs();
    let full = logs.iter().filter(|l| l.contains("failed to start; its stderr")).count();
    assert_eq!(full, 1, "the full stderr once: {logs:#?}");
    let line_by_line = logs.iter().filter(|l| l.contains("worker stderr:") && l.contains("TypeError")).count();
    assert_eq!(line_by_line, 0, "no stderr line by line while starting: {logs:#?}");
}

/// A program named through a wrapper script (a version manager's shim, as
/// `python3` was for one user) cannot be run in the worker sandbox; the
/// refusal says why and what to name instead.
#[tokio::test]
async fn a_program_behind_a_shim_script_is_refused_with_the_sandbox_named() {
    let dir = tempfile::tempdir().unwrap();
    let shim = dir.path().join("python3");
    std::fs::write(&shim, "#!/usr/bin/env bash\nexec python3 \"$@\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("programs/app.py");
    let file = config(&format!("[[worker_program]]\nname = \"py\"\ncommand = [{shim:?}, {app:?}]\n"));
    let server = start(&file, &[]);
    let mut client = server.client().await;
    assert!(server.wait_logged("worker failed to start; backing off").await, "{:?}", server.logs());
    let err = call(&mut client, "py.reverse", &[], b"ab").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let script = format!("{} is a script run by `/usr/bin/env bash`", shim.display());
    for says in ["Permission denied", "the worker sandbox lets a worker execute only its program's own file", &script] {
        assert!(err.message().contains(says), "{err:?} lacks {says:?}");
    }
}

for_both!(too_large: a_python_output_over_the_frame_is_answered_too_large_and_the_worker_serves_on,
          a_node_output_over_the_frame_is_answered_too_large_and_the_worker_serves_on);

/// With 1 MiB messages the frame holds 1 MiB and 64 KiB: a 2 MB output is
/// answered TOO_LARGE by the SDK (RESOURCE_EXHAUSTED), not sent as a frame
/// the front would have to refuse, and the worker serves on.
async fn too_large(lang: Lang) {
    let file = config(&lang.app("workers = 1"));
    let server = start(&file, &["--max-message-bytes", "1048576"]);
    let mut client = server.client().await;
    let first = pid_of(&call(&mut client, &lang.task("pid"), &[], b"").await.unwrap());
    let err = call(&mut client, &lang.task("repeat"), &[("times", "100")], &[7u8; 20_000]).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("its output of 2000000 bytes does not fit a frame of"), "{err:?}");
    assert_eq!(pid_of(&call(&mut client, &lang.task("pid"), &[], b"").await.unwrap()), first, "the worker served on");
}

/// `--check-config` starts one worker of each kind through its handshake
/// and says how each went: 0 when all started, 1 (with the failing
/// program's stderr) when one did not.
#[test]
fn check_config_starts_each_program_once_and_reports() {
    let check = |file: &ConfigFile| {
        let out = Command::new(offload_e2e::bin_dir().join("offload-server"))
            .args(["--check-config", "--config", file.path.to_str().unwrap()])
            .output()
            .expect("run offload-server --check-config");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let good = config(&format!("{}{}", Python.app("workers = 2"), Node.app("")));
    let (code, out) = check(&good);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Offload's worker process: ok"), "{out}");
    assert!(out.contains("worker program \"py\": ok") && out.contains("py.reverse"), "{out}");
    assert!(out.contains("worker program \"js\": ok") && out.contains("js.reverse"), "{out}");

    let bad = config(&format!("{}{}", Python.app(""), Python.table("broken", "broken.py", "")));
    let (code, out) = check(&bad);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("worker program \"py\": ok"), "{out}");
    assert!(out.contains("worker program \"broken\": FAILED: handshake with worker"), "{out}");
    assert!(out.contains("  | TypeError: param 'column' of broken.sum"), "its stderr: {out}");
}
