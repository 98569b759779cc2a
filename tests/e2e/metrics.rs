//! The Prometheus endpoint: after a known mix of calls, the counters and
//! histogram counts add up.

use std::time::Duration;

use offload_e2e::{Server, metric_value as value, request, with_deadline};
use offload_proto::offload::v1::{ExecuteRequest, ExecutionMode};
use tonic::Code;

fn isolated(task: &str, params: &[(&str, &str)]) -> ExecuteRequest {
    ExecuteRequest { mode: ExecutionMode::Isolated as i32, ..request(task, params, &b"x"[..]) }
}

#[tokio::test]
async fn counters_and_histograms_add_up_after_a_known_mix_of_calls() {
    let server = Server::start(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--pool-threads",
        "1",
        "--max-message-bytes",
        "100000",
    ]);
    assert!(server.wait_logged("metrics on http://").await);
    server.wait_for_workers(2, Duration::from_secs(10)).await;
    let mut client = server.wire_client();

    // Identical calls of a cacheable task: the first runs, two are hits.
    for _ in 0..3 {
        client.execute(request("hash.sha256", &[], &b"abc"[..])).await.unwrap();
    }
    for _ in 0..2 {
        client.execute(isolated("debug.echo", &[])).await.unwrap();
    }
    assert_eq!(client.execute(request("no.such", &[], vec![])).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(client.execute(request("primes.count", &[], vec![])).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(client.execute(isolated("debug.abort", &[])).await.unwrap_err().code(), Code::Internal);
    // Refused by the gRPC layer before any handler sees it: counted all the same.
    let oversized = client.execute(request("hash.sha256", &[], vec![0u8; 200_000])).await.unwrap_err();
    assert_eq!(oversized.code(), Code::ResourceExhausted);
    // One pool thread busy for 700 ms: a call with a 300 ms deadline is refused up front.
    let mut other = server.client().await;
    let busy = super::start_running(&mut other, request("debug.sleep", &[("ms", "700")], vec![])).await;
    let refused = client
        .execute(with_deadline(request("debug.sleep", &[("ms", "10")], vec![]), Duration::from_millis(300)))
        .await;
    assert_eq!(refused.unwrap_err().code(), Code::ResourceExhausted);
    assert!(super::final_result(busy).await.is_some(), "the sleep finished");
    server.wait_for_workers(2, Duration::from_secs(10)).await;

    let m = server.scrape();
    let calls = |labels: &str| value(&m, &format!("offload_calls_total{{{labels}}}"));
    assert_eq!(calls(r#"task="hash.sha256",mode="POOL",code="OK""#), 3.0);
    assert_eq!(calls(r#"task="debug.echo",mode="ISOLATED",code="OK""#), 2.0);
    assert_eq!(calls(r#"task="unknown",mode="unknown",code="NOT_FOUND""#), 1.0);
    assert_eq!(calls(r#"task="primes.count",mode="POOL",code="INVALID_ARGUMENT""#), 1.0);
    assert_eq!(calls(r#"task="debug.abort",mode="ISOLATED",code="INTERNAL""#), 1.0);
    assert_eq!(calls(r#"task="debug.sleep",mode="POOL",code="RESOURCE_EXHAUSTED""#), 1.0);
    assert_eq!(calls(r#"task="debug.sleep",mode="POOL",code="OK""#), 1.0);
    assert_eq!(calls(r#"task="unknown",mode="unknown",code="RESOURCE_EXHAUSTED""#), 1.0);
    let total: f64 = m
        .lines()
        .filter(|l| l.starts_with("offload_calls_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(total, 11.0, "every call counted once:\n{m}");

    // Every call is counted; only the one that ran is timed.
    assert_eq!(value(&m, r#"offload_task_duration_seconds_count{task="hash.sha256",mode="POOL"}"#), 1.0);
    assert_eq!(value(&m, r#"offload_cache_lookups_total{task="hash.sha256",result="miss"}"#), 1.0);
    assert_eq!(value(&m, r#"offload_cache_lookups_total{task="hash.sha256",result="hit"}"#), 2.0);
    assert!(value(&m, "offload_cache_bytes") > 32.0, "a 32-byte digest and its bookkeeping");
    assert_eq!(value(&m, r#"offload_task_duration_seconds_count{task="debug.echo",mode="ISOLATED"}"#), 2.0);
    // Each call that ran observes its queue wait (0 for tiny tasks run inline).
    assert_eq!(value(&m, r#"offload_queue_wait_seconds_count{mode="ISOLATED"}"#), 2.0);
    assert_eq!(value(&m, r#"offload_rejected_calls_total{reason="deadline"}"#), 1.0);
    assert_eq!(value(&m, r#"offload_rejected_calls_total{reason="too_large"}"#), 1.0);
    assert_eq!(value(&m, r#"offload_worker_restarts_total{reason="crash"}"#), 1.0);
    assert_eq!(value(&m, "offload_live_workers"), 2.0);
    assert_eq!(value(&m, r#"offload_queue_depth{mode="POOL"}"#), 0.0);
    assert_eq!(value(&m, r#"offload_busy_executors{mode="ISOLATED"}"#), 0.0);
}
