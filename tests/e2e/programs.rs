//! Worker programs in other languages, declared with `[[worker_program]]`:
//! the Python SDK's program `tests/programs/app.py`, run by a real server
//! and called over gRPC. Round trips, the front's checks of declared params,
//! each way a task can fail, exits mid-task, deadlines with and without a
//! task that looks at `ctx.cancelled`, heartbeats during pure-Python loops,
//! progress, recycling, a program that fails its handshake, and no program
//! process outliving a SIGKILLed front.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use offload_e2e::{Server, is_alive, metric_value, python_with_sdk, request, wait_for, with_deadline};
use offload_proto::offload::v1::{
    ExecuteResponse, ExecutionMode, ListTasksRequest, Stage, compute_client::ComputeClient, execute_event::Event,
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

/// The `[[worker_program]]` table of the test program, named `py`, with `extra` keys.
fn app_table(extra: &str) -> String {
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("programs/app.py");
    format!(
        "[[worker_program]]\nname = \"py\"\ncommand = [{:?}, {:?}]\n{extra}\n",
        python_with_sdk().display().to_string(),
        app.display().to_string()
    )
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
fn program_workers(server: &Server) -> Vec<u32> {
    server.worker_pids().into_iter().filter(|pid| process_cmdline(*pid).contains("app.py")).collect()
}

fn process_cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

#[tokio::test]
async fn python_tasks_are_listed_and_called_with_their_declared_params_checked_by_the_front() {
    let file = config(&app_table("workers = 2"));
    let server = start(&file, &[]);
    let mut client = server.client().await;

    let listed = client.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let reverse = listed.iter().find(|t| t.name == "py.reverse").expect("py.reverse listed");
    assert_eq!(reverse.description, "reverses the input");
    assert_eq!(
        (reverse.default_mode, reverse.allowed_modes.as_slice()),
        (ExecutionMode::Isolated as i32, &[ExecutionMode::Isolated as i32][..])
    );
    let upper = &reverse.params[0];
    assert_eq!((upper.name.as_str(), upper.default_value.as_str(), upper.required), ("upper", "false", false));
    let repeat = listed.iter().find(|t| t.name == "py.repeat").unwrap();
    assert!(repeat.params[0].required);
    assert!(listed.iter().any(|t| t.name == "hash.sha256"), "built-in tasks are still there");

    let out = call(&mut client, "py.reverse", &[], b"hello").await.unwrap();
    assert_eq!((out.output.as_ref(), out.mode), (&b"olleh"[..], ExecutionMode::Isolated as i32));
    assert!(program_workers(&server).contains(&pid_of(&out)), "run by a python worker");
    let out = call(&mut client, "py.reverse", &[("upper", "true")], b"hello").await.unwrap();
    assert_eq!(out.output.as_ref(), b"OLLEH");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = call(&mut client, "py.sha256", &[], &data).await.unwrap();
    assert_eq!(out.output.as_ref(), sha2::Sha256::digest(&data).as_slice(), "3 MB through a Python worker");

    // Refused by the front, from the declaration, before any worker sees the call.
    for (task, params, says) in [
        ("py.reverse", &[("lower", "true")][..], "unknown param \"lower\"; accepted: upper"),
        ("py.repeat", &[][..], "missing required param \"times\""),
    ] {
        let err = call(&mut client, task, params, b"x").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(says), "{err:?}");
    }
    let err = client
        .execute(offload_proto::offload::v1::ExecuteRequest {
            mode: ExecutionMode::Pool as i32,
            ..request("py.reverse", &[], vec![])
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "a program's tasks run in its workers only: {err:?}");
    let err = call(&mut client, "py.nothing", &[], b"").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("py.reverse"), "lists what the program has: {err:?}");
}

#[tokio::test]
async fn each_failure_has_its_status_and_an_exit_mid_task_replaces_the_worker() {
    let file = config(&app_table("workers = 1"));
    let server = start(&file, &[]);
    let mut client = server.client().await;
    let first = pid_of(&call(&mut client, "py.pid", &[], b"").await.unwrap());

    let err = call(&mut client, "py.repeat", &[("times", "x")], b"ab").await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "py.repeat: param times: 'x' is not an integer"));
    let err = call(&mut client, "py.repeat", &[("times", "500")], b"ab").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "ValueError: {err:?}");
    assert!(err.message().contains("500 is not in 0..=100"), "{err:?}");
    let err = call(&mut client, "py.broken", &[], b"").await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Internal, "py.broken: KeyError: 'missing'"));
    let err = call(&mut client, "py.text", &[], b"").await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Internal, "py.text: py.text returned str, not bytes"));
    let out = call(&mut client, "py.repeat", &[("times", "3")], b"ab").await.unwrap();
    assert_eq!(out.output.as_ref(), b"ababab");
    assert_eq!(pid_of(&out), first, "exceptions fail their call, not the worker");

    let err = call(&mut client, "py.exit", &[], b"").await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert_eq!(err.message(), format!("worker {first} exited with status 7 while running py.exit"));
    let replaced = pid_of(&call(&mut client, "py.pid", &[], b"").await.unwrap());
    assert_ne!(replaced, first);
    assert_eq!(restarts(&server, "crash"), 1.0);
}

#[tokio::test]
async fn deadlines_stop_a_task_that_looks_at_cancelled_and_kill_one_that_does_not() {
    // Heartbeats every 100 ms, a worker silent for 600 ms is hung: a long
    // pure-Python loop must still be answered for.
    let file = config(&app_table("workers = 1\nheartbeat_ms = 100\nheartbeat_timeout_ms = 600"));
    let server = start(&file, &[]);
    let mut client = server.client().await;
    let mut wire = server.wire_client();
    let first = pid_of(&call(&mut client, "py.pid", &[], b"").await.unwrap());

    let out = call(&mut client, "py.spin", &[("ms", "1500"), ("obey", "false")], b"").await;
    assert!(out.is_ok(), "a busy pure-Python loop answers heartbeats: {out:?}");
    assert_eq!(restarts(&server, "unresponsive"), 0.0);

    let started = Instant::now();
    let spin = request("py.spin", &[("ms", "30000")], vec![]);
    let err = wire.execute(with_deadline(spin, Duration::from_millis(300))).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(pid_of(&call(&mut client, "py.pid", &[], b"").await.unwrap()), first, "it stopped when told");

    let stubborn = request("py.spin", &[("ms", "30000"), ("obey", "false")], vec![]);
    let err = wire.execute(with_deadline(stubborn, Duration::from_millis(300))).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        server.wait_logged("after its task ignored the deadline while running py.spin").await,
        "{:?}",
        server.logs()
    );
    assert_eq!(restarts(&server, "deadline_kill"), 1.0);
    assert_ne!(pid_of(&call(&mut client, "py.pid", &[], b"").await.unwrap()), first, "the ladder killed it");
}

#[tokio::test]
async fn progress_is_streamed_and_workers_are_recycled_by_task_count() {
    let file = config(&app_table("workers = 1\nmax_tasks = 3"));
    let server = start(&file, &[]);
    let mut client = server.client().await;

    let mut events = client.execute_stream(request("py.spin", &[("ms", "400")], vec![])).await.unwrap().into_inner();
    let (mut fractions, mut result) = (Vec::new(), None);
    while let Some(event) = events.message().await.unwrap() {
        match event.event.unwrap() {
            Event::Progress(p) if p.stage == Stage::Running as i32 => fractions.push(p.fraction),
            Event::Progress(_) => {}
            Event::Result(r) => result = Some(r),
        }
    }
    assert!(result.is_some_and(|r| r.error.is_none()));
    assert!(fractions.len() >= 3, "{fractions:?}");
    assert!(fractions.windows(2).all(|w| w[0] <= w[1]) && fractions.last() == Some(&1.0), "{fractions:?}");

    // That was task 1 of the first worker; two more, then a new worker.
    let pids: Vec<u32> = {
        let mut pids = Vec::new();
        for _ in 0..4 {
            pids.push(pid_of(&call(&mut client, "py.pid", &[], b"").await.unwrap()));
        }
        pids
    };
    assert_eq!(pids[0], pids[1]);
    assert!(pids[2] != pids[1] && pids[2] == pids[3], "recycled after 3 tasks: {pids:?}");
    assert!(server.wait_logged("ran 3 tasks").await, "{:?}", server.logs());
}

#[tokio::test]
async fn a_program_that_fails_its_handshake_is_retried_and_affects_nothing_else() {
    let python = python_with_sdk().display().to_string();
    let bad = format!(
        "[[worker_program]]\nname = \"bad\"\ncommand = [{python:?}, \"-c\", '''\nfrom offload_worker import task, serve\n@task(\"other.x\")\ndef x(ctx, data, params):\n    return data\nserve()\n''']\n"
    );
    let file = config(&format!("{}{bad}", app_table("workers = 1")));
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
    assert_eq!(call(&mut client, "py.reverse", &[], b"ab").await.unwrap().output.as_ref(), b"ba");
    assert!(call(&mut client, "hash.sha256", &[], b"ab").await.is_ok());
    let isolated = offload_proto::offload::v1::ExecuteRequest {
        mode: ExecutionMode::Isolated as i32,
        ..request("debug.echo", &[], &b"ok"[..])
    };
    assert_eq!(client.execute(isolated).await.unwrap().into_inner().output.as_ref(), b"ok");
    // Retried with backoff: several failed starts are logged over time.
    assert!(
        wait_for(Duration::from_secs(10), || server
            .logs()
            .iter()
            .filter(|l| l.contains("outside its namespace"))
            .count()
            >= 3)
        .await,
        "{:?}",
        server.logs()
    );
}

#[tokio::test]
async fn no_program_process_outlives_a_killed_front() {
    let file = config(&app_table("workers = 2"));
    let mut server = start(&file, &[]);
    assert!(wait_for(Duration::from_secs(10), || program_workers(&server).len() == 2).await);
    let workers = program_workers(&server);
    let mut client = server.client().await;
    // One of them busy with a task that ignores cancellation.
    let _running =
        super::start_running(&mut client, request("py.spin", &[("ms", "30000"), ("obey", "false")], vec![])).await;
    server.signal(Signal::SIGKILL);
    assert!(server.wait_exit(Duration::from_secs(5)).is_some());
    let gone = wait_for(Duration::from_secs(5), || workers.iter().all(|pid| !is_alive(*pid))).await;
    assert!(gone, "program workers left behind: {:?}", workers.iter().filter(|p| is_alive(**p)).collect::<Vec<_>>());
}
