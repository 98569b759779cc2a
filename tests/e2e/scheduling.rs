//! Scheduling: clients take turns for the pool, interactive calls go before
//! batch ones, declared clients' in-flight limits, and malformed scheduling
//! metadata.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use offload_e2e::{Server, metric_value, request, wait_for};

/// A server with one pool thread (so the order is plain to see) and metrics.
fn server(extra: &[&str]) -> Server {
    let mut args = vec!["--pool-threads", "1", "--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Server::start(&args)
}
use offload_proto::offload::v1::ExecuteRequest;
use tokio::task::JoinSet;
use tonic::Code;

/// `body` with scheduling metadata.
fn with<T>(metadata: &[(&'static str, &str)], body: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    for (key, value) in metadata {
        request.metadata_mut().insert(*key, value.parse().unwrap());
    }
    request
}

fn spin(ms: u32) -> ExecuteRequest {
    request("debug.spin", &[("ms", &ms.to_string())], vec![])
}

/// Sends `n` spins of `ms` at once with `metadata`; counts those finished.
async fn flood(
    server: &Server,
    metadata: &[(&'static str, &'static str)],
    n: usize,
    ms: u32,
) -> (Arc<AtomicUsize>, JoinSet<()>) {
    let finished = Arc::new(AtomicUsize::new(0));
    let mut calls = JoinSet::new();
    let client = server.client().await;
    for _ in 0..n {
        let (mut client, finished, metadata) = (client.clone(), Arc::clone(&finished), metadata.to_vec());
        calls.spawn(async move {
            client.execute(with(&metadata, spin(ms))).await.expect("a flood call");
            finished.fetch_add(1, Ordering::SeqCst);
        });
    }
    // Everything but the running call is queued before the probe comes.
    let queued = wait_for(Duration::from_secs(10), || {
        metric_value(&server.scrape(), r#"offload_queue_depth{mode="POOL"}"#) >= (n - 1) as f64
    })
    .await;
    assert!(queued, "the flood never filled the queue");
    (finished, calls)
}

/// A probe call with `metadata` while the flood waits: how many flood calls
/// had finished when it was answered.
async fn probe(server: &Server, metadata: &[(&'static str, &str)], finished: &AtomicUsize) -> usize {
    let mut client = server.client().await;
    client.execute(with(metadata, spin(40))).await.expect("the probe");
    finished.load(Ordering::SeqCst)
}

#[tokio::test]
async fn a_client_is_served_in_its_turn_not_after_another_clients_flood() {
    let server = server(&[]);
    let (finished, mut calls) = flood(&server, &[("offload-client", "flood")], 30, 40).await;
    // Its turn comes after the running call and at most one more of the flood's.
    let before = probe(&server, &[("offload-client", "probe")], &finished).await;
    assert!(before <= 3, "the probe waited for {before} of the flood's 30 calls");
    // A call of the flood's own client waits behind it: a client's calls
    // keep their arrival order (the counter may lag the last answer or two).
    let behind = probe(&server, &[("offload-client", "flood")], &finished).await;
    assert!(behind >= 28, "the flood's own call overtook {} of its calls", 30 - behind);
    while calls.join_next().await.is_some() {}
}

#[tokio::test]
async fn interactive_calls_go_before_a_batch_flood_of_the_same_client() {
    let server = server(&[]);
    let batch = [("offload-client", "one"), ("offload-priority", "batch")];
    let (finished, mut calls) = flood(&server, &batch, 30, 40).await;
    let interactive = [("offload-client", "one"), ("offload-priority", "interactive")];
    let before = probe(&server, &interactive, &finished).await;
    assert!(before <= 2, "the interactive call waited for {before} of the 30 batch calls");
    while calls.join_next().await.is_some() {}
    // Each class's wait is in the metrics (an undeclared client is "other").
    let metrics = server.scrape();
    let waits = |priority: &str| {
        metric_value(
            &metrics,
            &format!(r#"offload_class_queue_wait_seconds_count{{priority="{priority}",client="other"}}"#),
        )
    };
    assert!(waits("batch") >= 29.0 && waits("interactive") >= 1.0, "{metrics}");

    // ExecuteBatch items are batch calls unless the stream's metadata says
    // otherwise; Execute calls are interactive.
    let mut client = server.client().await;
    let items = tokio_stream::iter(vec![spin(1), spin(1)]);
    let mut answers = client.execute_batch(with(&[], items)).await.unwrap().into_inner();
    while let Some(answer) = answers.message().await.unwrap() {
        assert!(answer.error.is_none(), "{answer:?}");
    }
    client.execute(with(&[], spin(1))).await.unwrap();
    let metrics = server.scrape();
    let (batch, interactive) = (waits("batch"), waits("interactive"));
    let now = |priority: &str| {
        metric_value(
            &metrics,
            &format!(r#"offload_class_queue_wait_seconds_count{{priority="{priority}",client="other"}}"#),
        )
    };
    assert_eq!((now("batch"), now("interactive")), (batch + 2.0, interactive + 1.0), "{metrics}");
}

#[tokio::test]
async fn a_declared_clients_limit_refuses_its_call_over_it_and_no_one_elses() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("offload.toml");
    std::fs::write(&config, "[[client]]\nname = \"capped\"\nmax_in_flight = 2\nweight = 2\n").unwrap();
    let server = server(&["--config", config.to_str().unwrap()]);
    let capped = [("offload-client", "capped")];
    let mut calls = JoinSet::new();
    for _ in 0..2 {
        let mut client = server.client().await;
        calls.spawn(async move { client.execute(with(&capped, spin(1000))).await.map(|_| ()) });
    }
    let full = wait_for(Duration::from_secs(5), || {
        metric_value(&server.scrape(), r#"offload_client_in_flight{client="capped"}"#) == 2.0
    })
    .await;
    assert!(full, "the two calls were never in flight together");
    let mut client = server.client().await;
    let err = client.execute(with(&capped, spin(1))).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        err.message(),
        "client \"capped\" already has 2 calls in flight, its max_in_flight; retry when one ends"
    );
    client.execute(with(&[("offload-client", "other-team")], spin(1))).await.expect("another client is not limited");
    while let Some(done) = calls.join_next().await {
        done.unwrap().expect("the capped client's calls");
    }
    client.execute(with(&capped, spin(1))).await.expect("room again once they ended");
    let metrics = server.scrape();
    assert_eq!(metric_value(&metrics, r#"offload_rejected_calls_total{reason="client_limit"}"#), 1.0);
}

#[tokio::test]
async fn malformed_scheduling_metadata_is_an_invalid_argument_that_says_so() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let err = client.execute(with(&[("offload-priority", "urgent")], spin(1))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(err.message(), "metadata offload-priority: \"urgent\" is not interactive or batch");
    let err = client.execute(with(&[("offload-client", "a b")], spin(1))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("metadata offload-client: \"a b\" may hold only"), "{err:?}");
}

#[test]
fn a_bad_client_table_stops_the_server_at_start_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("offload.toml");
    std::fs::write(&config, "[[client]]\nname = \"a\"\nweight = 0\n").unwrap();
    let out = std::process::Command::new(offload_e2e::bin_dir().join("offload-server"))
        .args(["--listen", "127.0.0.1:0", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("client \"a\": weight 0 is not in 1..=1000"), "{stderr}");
}
