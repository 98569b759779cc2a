//! Offload embedded in a program with tasks of its own: the binary of
//! `examples/custom-task`, started as outside checks start it (address and
//! debug tasks from the environment), serving `example.wordcount` beside
//! the built-in tasks in both modes, and its test tasks (`example.panic`,
//! `example.spin`) with every guarantee the built-in ones have.

use std::time::{Duration, Instant};

use offload_e2e::{Server, custom_task_binary, metric_value, request, with_deadline};
use offload_proto::offload::v1::{
    ExecuteRequest, ExecutionMode, ListTasksRequest, Stage, compute_client::ComputeClient, execute_event::Event,
};
use tonic::{Code, transport::Channel};

/// The example's server, with the debug tasks, metrics and `args`.
fn start(args: &[&str]) -> Server {
    let mut all = vec!["--metrics-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    Server::start_program(
        custom_task_binary(),
        &all,
        &[("OFFLOAD_LISTEN", "127.0.0.1:0"), ("OFFLOAD_DEBUG_TASKS", "1")],
    )
}

fn in_mode(mode: ExecutionMode, task: &str, params: &[(&str, &str)], input: impl Into<bytes::Bytes>) -> ExecuteRequest {
    ExecuteRequest { mode: mode as i32, ..request(task, params, input) }
}

async fn words(
    client: &mut ComputeClient<Channel>,
    mode: ExecutionMode,
    params: &[(&str, &str)],
    text: &str,
) -> String {
    // Run every time (wordcount is cacheable): the mode's executor answers.
    let mut call = tonic::Request::new(in_mode(mode, "example.wordcount", params, text.to_string()));
    call.metadata_mut().insert("offload-cache", "no-cache".parse().unwrap());
    let response = client.execute(call).await;
    let response = response.unwrap_or_else(|err| panic!("{mode:?} {params:?}: {err:?}")).into_inner();
    assert_eq!(response.mode, mode as i32);
    let pid = response.stats.expect("stats").worker_pid;
    assert_eq!(pid != 0, mode == ExecutionMode::Isolated, "worker pid {pid} in {mode:?}");
    String::from_utf8(response.output.to_vec()).expect("ASCII output")
}

/// `worker_restarts_total` for `reason`.
fn restarts(server: &Server, reason: &str) -> f64 {
    metric_value(&server.scrape(), &format!("offload_worker_restarts_total{{reason=\"{reason}\"}}"))
}

#[tokio::test]
async fn wordcount_is_listed_and_counts_words_in_both_modes_with_and_without_min_len() {
    let server = start(&["--workers", "1"]);
    server.wait_for_workers(1, Duration::from_secs(10)).await;
    let mut client = server.client().await;

    let listed = client.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    for name in ["example.wordcount", "example.panic", "example.spin", "hash.sha256", "debug.echo"] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }
    let wordcount = listed.iter().find(|t| t.name == "example.wordcount").unwrap();
    assert_eq!(wordcount.default_mode, ExecutionMode::Pool as i32);
    assert_eq!(wordcount.allowed_modes, [ExecutionMode::Pool as i32, ExecutionMode::Isolated as i32]);
    let param = &wordcount.params[0];
    assert_eq!((param.name.as_str(), param.default_value.as_str(), param.required), ("min_len", "1", false));

    let text = "Offload runs  your\tcode, über\nsupervised \u{3000} and fast ";
    for mode in [ExecutionMode::Pool, ExecutionMode::Isolated] {
        assert_eq!(words(&mut client, mode, &[], text).await, "8");
        assert_eq!(words(&mut client, mode, &[("min_len", "4")], text).await, "7");
        assert_eq!(words(&mut client, mode, &[("min_len", "5")], text).await, "3");
        assert_eq!(words(&mut client, mode, &[], "").await, "0");
    }
    // Left unnamed, the mode is the task's default, POOL.
    let out = client.execute(request("example.wordcount", &[], &b"a b c"[..])).await.unwrap().into_inner();
    assert_eq!((out.output.as_ref(), out.mode), (&b"3"[..], ExecutionMode::Pool as i32));

    // A large input streams its progress, from a worker process too.
    let big = "lorem ipsum dolor ".repeat(500_000);
    let mut events = client
        .execute_stream(in_mode(ExecutionMode::Isolated, "example.wordcount", &[], big))
        .await
        .unwrap()
        .into_inner();
    let (mut running, mut output) = (Vec::new(), None);
    while let Some(event) = events.message().await.unwrap() {
        match event.event.expect("an event") {
            Event::Progress(p) if p.stage == Stage::Running as i32 => running.push(p.fraction),
            Event::Progress(_) => {}
            Event::Result(r) => output = Some(r.output),
        }
    }
    assert_eq!(output.as_deref(), Some(&b"1500000"[..]));
    // A latest-value stream: the last report may be overtaken by the result.
    assert!(!running.is_empty() && running.windows(2).all(|w| w[0] <= w[1]), "{running:?}");

    // Metrics carry the task's name.
    let metrics = server.scrape();
    for mode in ["POOL", "ISOLATED"] {
        let series = format!("offload_calls_total{{task=\"example.wordcount\",mode=\"{mode}\",code=\"OK\"}}");
        assert!(metric_value(&metrics, &series) >= 4.0, "{series} in\n{metrics}");
    }
}

#[tokio::test]
async fn without_debug_tasks_only_wordcount_is_added() {
    let server = Server::start_program(custom_task_binary(), &[], &[("OFFLOAD_LISTEN", "127.0.0.1:0")]);
    let mut client = server.client().await;
    let listed = client.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&"example.wordcount") && names.contains(&"hash.sha256"), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("debug.") || *n == "example.panic"), "{names:?}");
    let err = client.execute(request("example.spin", &[], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn bad_input_and_bad_params_are_invalid_arguments_that_say_what_is_wrong() {
    let server = start(&["--workers", "1"]);
    let mut client = server.client().await;
    for mode in [ExecutionMode::Pool, ExecutionMode::Isolated] {
        let err =
            client.execute(in_mode(mode, "example.wordcount", &[], &b"two words \xff\xfe"[..])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{mode:?}: {err:?}");
        assert!(err.message().contains("not valid UTF-8") && err.message().contains("byte offset 10"), "{err:?}");
        let truncated = &"caf\u{e9}".as_bytes()[..4];
        let err = client.execute(in_mode(mode, "example.wordcount", &[], truncated.to_vec())).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{mode:?}: {err:?}");
        assert!(err.message().contains("byte offset 3"), "{err:?}");
        for (params, says) in [
            (&[("min_len", "many")][..], "\"min_len\": \"many\" is not an integer"),
            (&[("min_len", "-2")][..], "\"min_len\""),
            (&[("max_len", "2")][..], "unknown param \"max_len\""),
        ] {
            let err = client.execute(in_mode(mode, "example.wordcount", params, &b"a"[..])).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{params:?}: {err:?}");
            assert!(err.message().contains(says), "{params:?}: {err:?}");
        }
    }
}

#[tokio::test]
async fn a_panicking_task_fails_its_call_and_isolated_its_worker_is_replaced() {
    let server = start(&["--workers", "1"]);
    let before = server.wait_for_workers(1, Duration::from_secs(10)).await;
    let mut client = server.client().await;

    // POOL: the call fails, the server serves on.
    let err = client.execute(request("example.panic", &[], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(err.message().contains("panicked: example.panic was asked to panic"), "{err:?}");
    assert_eq!(words(&mut client, ExecutionMode::Pool, &[], "still serving").await, "2");

    // ISOLATED: the worker answers, exits, and the death is classified and counted.
    let err = client.execute(in_mode(ExecutionMode::Isolated, "example.panic", &[], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(err.message().contains("panicked: example.panic was asked to panic"), "{err:?}");
    let line = format!("worker {} exited after its task panicked while running example.panic; replacing it", before[0]);
    assert!(server.wait_logged(&line).await, "{:?}", server.logs());
    assert_eq!(restarts(&server, "panic"), 1.0);
    let after = server.wait_for_workers(1, Duration::from_secs(10)).await;
    assert_ne!(after, before);
    assert_eq!(words(&mut client, ExecutionMode::Isolated, &[], "served by the replacement").await, "4");
}

#[tokio::test]
async fn a_task_that_checks_for_cancellation_is_stopped_by_its_deadline_in_both_modes() {
    let server = start(&["--workers", "1"]);
    let workers = server.wait_for_workers(1, Duration::from_secs(10)).await;
    let mut client = server.client().await;
    // The server's own answer to the deadline (a Channel answers CANCELLED itself).
    let mut wire = server.wire_client();
    for round in 0..3 {
        for mode in [ExecutionMode::Pool, ExecutionMode::Isolated] {
            let started = Instant::now();
            let call = in_mode(mode, "example.spin", &[("ms", "60000")], vec![]);
            let err = wire.execute(with_deadline(call, Duration::from_millis(300))).await.unwrap_err();
            assert_eq!(err.code(), Code::DeadlineExceeded, "{mode:?} round {round}: {err:?}");
            assert!(started.elapsed() < Duration::from_secs(5), "{mode:?} took {:?}", started.elapsed());
        }
    }
    // The worker stopped its task when told: nobody killed it.
    let waited = Instant::now();
    let out = client.execute(in_mode(ExecutionMode::Isolated, "example.spin", &[("ms", "5")], vec![])).await;
    assert!(waited.elapsed() < Duration::from_secs(5));
    assert_eq!(out.unwrap().into_inner().stats.unwrap().worker_pid, workers[0]);
    let metrics = server.scrape();
    let killed = ["deadline_kill", "cancel_kill", "crash"].map(|r| restarts(&server, r));
    assert_eq!(killed, [0.0; 3], "{metrics}");
}
