//! Traces: one call is one trace that continues the caller's, exported over
//! OTLP; a dead collector costs the calls nothing.

use std::time::{Duration, Instant};

use offload_e2e::{Server, otlp, request, wait_for};
use offload_proto::offload::v1::{ExecuteRequest, ExecutionMode};
use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, any_value::Value},
    trace::v1::{Span, status::StatusCode},
};
use tonic::Code;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn traced(body: ExecuteRequest, parent_span: &str) -> tonic::Request<ExecuteRequest> {
    let mut request = tonic::Request::new(body);
    let traceparent = format!("00-{TRACE_ID}-{parent_span}-01");
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    request
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn text(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// A server exporting to a fresh in-test collector named by `variable`, with one worker.
async fn traced_server_via(variable: &str) -> (Server, otlp::Received) {
    let (collector, received) = otlp::start().await;
    let endpoint = format!("http://{collector}");
    let server = Server::start_with_env(
        &["--listen", "127.0.0.1:0", "--debug-tasks", "--workers", "1"],
        &[(variable, endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    (server, received)
}

async fn traced_server() -> (Server, otlp::Received) {
    traced_server_via("OTEL_EXPORTER_OTLP_ENDPOINT").await
}

#[tokio::test]
async fn the_traces_specific_endpoint_variable_is_enough_for_front_and_workers() {
    let (server, received) = traced_server_via("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").await;
    server.wait_for_workers(1, Duration::from_secs(10)).await;
    let mut client = server.client().await;
    let isolated = ExecuteRequest { mode: ExecutionMode::Isolated as i32, ..request("hash.sha256", &[], &b"abc"[..]) };
    client.execute(traced(isolated, "00f067aa0ba902c1")).await.unwrap();
    let services = || -> Vec<String> { received.spans().into_iter().map(|(service, _)| service).collect() };
    let both = || {
        let seen = services();
        seen.iter().any(|s| s == "offload") && seen.iter().any(|s| s == "offload-worker")
    };
    assert!(wait_for(Duration::from_secs(10), both).await, "services seen: {:?}", services());
}

#[tokio::test]
async fn a_call_is_one_trace_continuing_the_callers() {
    let (server, received) = traced_server().await;
    server.wait_for_workers(1, Duration::from_secs(10)).await;
    let mut client = server.client().await;

    let pool = request("primes.count", &[("limit", "100000")], vec![]);
    client.execute(traced(pool, "00f067aa0ba902b7")).await.unwrap();
    let isolated = ExecuteRequest { mode: ExecutionMode::Isolated as i32, ..request("hash.sha256", &[], &b"abc"[..]) };
    let out = client.execute(traced(isolated, "00f067aa0ba902b8")).await.unwrap().into_inner();
    let worker_pid = out.stats.unwrap().worker_pid;
    let failing = request("primes.count", &[("limit", "ten")], vec![]);
    assert_eq!(client.execute(traced(failing, "00f067aa0ba902b9")).await.unwrap_err().code(), Code::InvalidArgument);

    let ours = || -> Vec<(String, Span)> {
        received.spans().into_iter().filter(|(_, s)| hex::encode(&s.trace_id) == TRACE_ID).collect()
    };
    // Three RPC spans, a queue and an execution span for each call that ran,
    // and the span the worker exported itself.
    // (The worker's span leaves in an export of its own service, so it is
    // waited for by name too.)
    let all_arrived = || {
        let spans = ours();
        spans.len() >= 8 && spans.iter().any(|(_, s)| s.name == "worker hash.sha256")
    };
    assert!(wait_for(Duration::from_secs(10), all_arrived).await, "spans: {:#?}", ours());
    let spans = ours();
    let named = |name: &str| spans.iter().filter(|(_, s)| s.name == name).map(|(_, s)| s.clone()).collect::<Vec<_>>();
    let rpcs = named("offload.v1.Compute/Execute");
    assert_eq!(rpcs.len(), 3, "{spans:#?}");
    for rpc in &rpcs {
        assert_eq!(text(rpc, "rpc.system"), "grpc");
        assert_eq!(text(rpc, "rpc.service"), "offload.v1.Compute");
        assert_eq!(text(rpc, "rpc.method"), "Execute");
        assert!(
            ["00f067aa0ba902b7", "00f067aa0ba902b8", "00f067aa0ba902b9"]
                .contains(&hex::encode(&rpc.parent_span_id).as_str())
        );
    }
    let rpc_for = |caller: &str| rpcs.iter().find(|s| hex::encode(&s.parent_span_id) == caller).unwrap().clone();
    let failed = rpc_for("00f067aa0ba902b9");
    let status = failed.status.clone().unwrap();
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(status.message.contains("not an integer"), "{status:?}");
    assert_eq!(attr(&failed, "rpc.grpc.status_code"), Some(&Value::IntValue(Code::InvalidArgument as i64)));

    for (caller, task, mode) in
        [("00f067aa0ba902b7", "primes.count", "POOL"), ("00f067aa0ba902b8", "hash.sha256", "ISOLATED")]
    {
        let rpc = rpc_for(caller);
        let children: Vec<&Span> = spans.iter().map(|(_, s)| s).filter(|s| s.parent_span_id == rpc.span_id).collect();
        let queue = children
            .iter()
            .find(|s| s.name == "queue")
            .unwrap_or_else(|| panic!("queue span under {caller}: {children:#?}"));
        assert_eq!(text(queue, "offload.mode"), mode);
        let exec = children.iter().find(|s| s.name == format!("execute {task}")).expect("execution span");
        assert_eq!(text(exec, "task.name"), task);
        assert_eq!(text(exec, "offload.mode"), mode);
        assert!(attr(exec, "input.bytes").is_some() && attr(exec, "output.bytes").is_some());
        if mode == "ISOLATED" {
            assert_eq!(attr(exec, "worker.pid"), Some(&Value::IntValue(i64::from(worker_pid))));
            let (service, inside) = spans
                .iter()
                .find(|(_, s)| s.parent_span_id == exec.span_id)
                .unwrap_or_else(|| panic!("no worker span under the execution span: {spans:#?}"));
            assert_eq!(inside.name, "worker hash.sha256");
            assert_eq!(service, "offload-worker", "worker span's service");
            assert_eq!(attr(inside, "worker.pid"), Some(&Value::IntValue(i64::from(worker_pid))));
        }
    }
    let front: Vec<&(String, Span)> = spans.iter().filter(|(_, s)| !s.name.starts_with("worker ")).collect();
    assert!(front.iter().all(|(service, _)| service == "offload"), "{front:#?}");
}

#[tokio::test]
async fn an_offload_workers_span_stays_in_the_callers_trace_however_the_call_ends() {
    let (collector, received) = otlp::start().await;
    let endpoint = format!("http://{collector}");
    let server = Server::start_with_env(
        &["--listen", "127.0.0.1:0", "--debug-tasks", "--workers", "1", "--metrics-listen", "127.0.0.1:0"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    server.wait_for_workers(1, Duration::from_secs(10)).await;
    let spin =
        ExecuteRequest { mode: ExecutionMode::Isolated as i32, ..request("debug.spin", &[("ms", "30000")], vec![]) };
    early_endings_keep_the_worker_span(&server, &received, spin).await;
}

/// Ends `long` (an ISOLATED call that runs until stopped) four ways, each
/// in a trace of its caller: a unary Execute by its deadline and by its
/// client cancelling, and an ExecuteStream the same two ways. In each, the
/// span the worker reports must arrive as a child of the call's execution
/// span, itself under the call's RPC span. (A unary call runs on a worker
/// its handler drives; a caller that leaves hands the job to the worker's
/// slot to stop, which must keep the span's parent.)
pub(crate) async fn early_endings_keep_the_worker_span(
    server: &Server,
    received: &otlp::Received,
    long: ExecuteRequest,
) {
    // A client that leaves the deadline to the server (tonic's Channel
    // would also enforce it locally, answering CANCELLED itself).
    let mut client = server.wire_client();
    let deadline = |caller| {
        let mut request = traced(long.clone(), caller);
        request.metadata_mut().insert("grpc-timeout", "400m".parse().unwrap());
        request
    };
    let task = long.task.clone();
    let busy = || offload_e2e::metric_value(&server.scrape(), "offload_busy_executors{mode=\"ISOLATED\"}");
    let arrived = |caller: &'static str, ending: &'static str| worker_span_arrived(received, &task, caller, ending);

    let err = client.execute(deadline("00f067aa0ba904a1")).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    arrived("00f067aa0ba904a1", "Execute ended by its deadline").await;

    let mut cancelling = client.clone();
    let cancelled = traced(long.clone(), "00f067aa0ba904a2");
    let call = tokio::spawn(async move { cancelling.execute(cancelled).await });
    assert!(wait_for(Duration::from_secs(10), || busy() == 1.0).await, "the unary call never ran");
    call.abort();
    arrived("00f067aa0ba904a2", "Execute cancelled by its client").await;

    let mut events = client.execute_stream(deadline("00f067aa0ba904a3")).await.unwrap().into_inner();
    assert_eq!(super::final_status(&mut events).await.code(), Code::DeadlineExceeded);
    arrived("00f067aa0ba904a3", "ExecuteStream ended by its deadline").await;

    let events = client.execute_stream(traced(long.clone(), "00f067aa0ba904a4")).await.unwrap().into_inner();
    assert!(wait_for(Duration::from_secs(10), || busy() == 1.0).await, "the streamed call never ran");
    drop(events);
    arrived("00f067aa0ba904a4", "ExecuteStream cancelled by its client").await;
}

/// Waits for the span a worker reported for `task` as a child of the
/// execution span under the RPC span whose parent is `caller`, in the
/// caller's trace (`ending` says which call it was).
async fn worker_span_arrived(received: &otlp::Received, task: &str, caller: &str, ending: &str) {
    let (worker_span, execution_span) = (format!("worker {task}"), format!("execute {task}"));
    let parented = || {
        let spans: Vec<Span> = received.spans().into_iter().map(|(_, s)| s).collect();
        let rpc = spans.iter().find(|s| hex::encode(&s.parent_span_id) == caller)?;
        let exec = spans.iter().find(|s| s.parent_span_id == rpc.span_id && s.name == execution_span)?;
        let inside = spans.iter().find(|s| s.parent_span_id == exec.span_id && s.name == worker_span)?;
        Some(hex::encode(&inside.trace_id))
    };
    let found = wait_for(Duration::from_secs(10), || parented().is_some()).await;
    let orphans: Vec<String> = received
        .spans()
        .into_iter()
        .filter(|(_, s)| s.name == worker_span && s.parent_span_id.is_empty())
        .map(|(service, s)| format!("{service}: {} in trace {}", s.name, hex::encode(&s.trace_id)))
        .collect();
    assert!(found, "{ending}: no {worker_span:?} under its execution span; orphans: {orphans:?}");
    assert_eq!(parented().as_deref(), Some(TRACE_ID), "{ending}: in the caller's trace");
}

#[tokio::test]
async fn a_dead_collector_does_not_slow_or_fail_calls() {
    // Nothing listens on port 1.
    let server = Server::start_with_env(
        &["--listen", "127.0.0.1:0", "--debug-tasks"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1"), ("OTEL_BSP_SCHEDULE_DELAY", "50")],
    );
    let mut client = server.client().await;
    let started = Instant::now();
    for i in 0..200 {
        let body = request("primes.count", &[("limit", "1000")], vec![]);
        let mut traced = tonic::Request::new(body);
        traced.metadata_mut().insert("traceparent", format!("00-{TRACE_ID}-{:016x}-01", i + 1).parse().unwrap());
        assert_eq!(client.execute(traced).await.unwrap().into_inner().output.as_ref(), b"168");
    }
    // 200 tiny calls take well under a second; an exporter on the call path
    // (a connect attempt per call) would take far longer.
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test]
async fn batch_items_get_their_own_spans_and_logs_carry_the_trace_id() {
    let (server, received) = traced_server().await;
    let mut client = server.client().await;
    let items: Vec<ExecuteRequest> = (0..3)
        .map(|i| {
            // Distinct items: identical ones would be answered by one run.
            let limit = (50_000 + i).to_string();
            ExecuteRequest { id: format!("item-{i}"), ..request("primes.count", &[("limit", &limit)], vec![]) }
        })
        .collect();
    let mut batch = tonic::Request::new(tokio_stream::iter(items));
    batch.metadata_mut().insert("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902c1-01").parse().unwrap());
    let mut results = client.execute_batch(batch).await.unwrap().into_inner();
    let mut answered = 0;
    while results.message().await.unwrap().is_some() {
        answered += 1;
    }
    assert_eq!(answered, 3);
    // A failing call logs inside its span: the line carries the trace id.
    assert_eq!(
        client.execute(traced(request("debug.panic", &[], vec![]), "00f067aa0ba902c2")).await.unwrap_err().code(),
        Code::Internal
    );

    let stream_span =
        || received.spans().into_iter().map(|(_, s)| s).find(|s| s.name == "offload.v1.Compute/ExecuteBatch");
    assert!(wait_for(Duration::from_secs(10), || stream_span().is_some()).await);
    let stream = stream_span().unwrap();
    assert_eq!(hex::encode(&stream.trace_id), TRACE_ID);
    let executions = || {
        received
            .spans()
            .into_iter()
            .filter(|(_, s)| s.parent_span_id == stream.span_id && s.name == "execute primes.count")
            .count()
    };
    assert!(wait_for(Duration::from_secs(10), || executions() == 3).await, "{:#?}", received.spans());
    assert!(server.wait_logged("call failed with an internal error").await);
    let line = server.logs().into_iter().find(|l| l.contains("call failed with an internal error")).unwrap();
    assert!(line.contains(TRACE_ID), "{line}");
}

/// A worker's span reaches the collector whenever the front gets to flush:
/// the server is stopped (SIGTERM as `docker stop` sends, SIGINT as Ctrl-C
/// does) right after an ISOLATED call, with the batch exporters' default
/// 5 s delay, so only the flush at shutdown can deliver the spans. (The
/// in-test collector runs on other threads while this one waits for exit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_spans_survive_a_shutdown_right_after_the_call() {
    use nix::sys::signal::Signal;
    for (round, signal) in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGTERM, Signal::SIGINT].into_iter().enumerate() {
        let (collector, received) = otlp::start().await;
        let endpoint = format!("http://{collector}");
        let mut server = Server::start_with_env(
            &["--listen", "127.0.0.1:0", "--debug-tasks", "--workers", "1"],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
        );
        let mut client = server.client().await;
        let caller = format!("00f067aa0ba903{round:02x}");
        let isolated =
            ExecuteRequest { mode: ExecutionMode::Isolated as i32, ..request("hash.sha256", &[], &b"abc"[..]) };
        client.execute(traced(isolated, &caller)).await.unwrap();
        server.signal(signal);
        let status = server.wait_exit(Duration::from_secs(20)).expect("the server stops");
        assert!(status.success(), "{signal:?}: {status:?}");
        let worker_span = || {
            received.spans().into_iter().any(|(service, span)| {
                service == "offload-worker"
                    && span.name == "worker hash.sha256"
                    && hex::encode(&span.trace_id) == TRACE_ID
            })
        };
        // Exported before the process exited; the receiver may still be
        // taking the request in.
        assert!(
            wait_for(Duration::from_secs(2), worker_span).await,
            "round {round} ({signal:?}): no worker span; got {:?}",
            received.spans().iter().map(|(service, span)| format!("{service}/{}", span.name)).collect::<Vec<_>>()
        );
    }
}

/// A job's run continues the trace of the Submit that recorded it: the
/// Submit's RPC span is a child of the caller's, the run's `job` span a
/// child of the Submit's, and the task's execution span a child of that.
#[tokio::test]
async fn a_jobs_run_continues_the_submitters_trace() {
    use offload_proto::offload::v1::{SubmitJobRequest, WaitJobRequest, jobs_client::JobsClient};
    let (server, received) = traced_server().await;
    let mut jobs = JobsClient::new(server.channel().await);
    let mut submit = tonic::Request::new(SubmitJobRequest {
        task: "hash.sha256".into(),
        input: b"abc".to_vec().into(),
        ..Default::default()
    });
    submit.metadata_mut().insert("traceparent", format!("00-{TRACE_ID}-00f067aa0ba905a1-01").parse().unwrap());
    let job = jobs.submit(submit).await.unwrap().into_inner();
    let mut waited = jobs.wait(WaitJobRequest { id: job.id }).await.unwrap().into_inner();
    while waited.message().await.unwrap().is_some() {}

    let chain = || {
        let spans: Vec<Span> = received.spans().into_iter().map(|(_, s)| s).collect();
        let submit = spans.iter().find(|s| hex::encode(&s.parent_span_id) == "00f067aa0ba905a1")?;
        let run = spans.iter().find(|s| s.parent_span_id == submit.span_id && s.name == "job hash.sha256")?;
        let exec = spans.iter().find(|s| s.parent_span_id == run.span_id && s.name == "execute hash.sha256")?;
        Some((submit.clone(), exec.trace_id.clone()))
    };
    assert!(wait_for(Duration::from_secs(10), || chain().is_some()).await, "{:#?}", received.spans());
    let (submit, trace) = chain().unwrap();
    assert_eq!(submit.name, "offload.v1.Jobs/Submit");
    assert_eq!(hex::encode(trace), TRACE_ID);
}

#[tokio::test]
async fn a_call_answered_from_the_cache_has_a_span_saying_so_and_none_of_a_run() {
    let (server, received) = traced_server().await;
    let mut client = server.client().await;
    let body = || request("hash.sha256", &[], &b"cached in a trace"[..]);
    client.execute(traced(body(), "00f067aa0ba902d1")).await.unwrap();
    let hit = client.execute(traced(body(), "00f067aa0ba902d2")).await.unwrap();
    assert_eq!(hit.metadata().get("offload-cache").unwrap(), "hit");
    let rpc_of = |caller: &str| {
        received.spans().into_iter().map(|(_, s)| s).find(|s| {
            hex::encode(&s.trace_id) == TRACE_ID
                && hex::encode(&s.parent_span_id) == caller
                && s.name == "offload.v1.Compute/Execute"
        })
    };
    let children_of = |rpc: &Span| -> Vec<Span> {
        received.spans().into_iter().map(|(_, s)| s).filter(|s| s.parent_span_id == rpc.span_id).collect()
    };
    let arrived = || rpc_of("00f067aa0ba902d2").is_some_and(|rpc| !children_of(&rpc).is_empty());
    assert!(wait_for(Duration::from_secs(10), arrived).await, "{:#?}", received.spans());
    let children = children_of(&rpc_of("00f067aa0ba902d2").unwrap());
    let names: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["cache"], "a hit neither queues nor runs");
    assert_eq!(text(&children[0], "offload.cache"), "hit");
    assert_eq!(text(&children[0], "task.name"), "hash.sha256");
}
