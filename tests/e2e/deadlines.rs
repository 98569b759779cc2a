//! Deadlines and cancellation: expired or abandoned work stops, its thread
//! is free again at once, and calls that could not start in time are
//! refused up front.

use std::time::{Duration, Instant};

use futures::future::join_all;
use offload_e2e::{Server, request, with_deadline};
use tonic::Code;

const THREADS: usize = 2;

/// Runs 3 x THREADS spins of 100 ms at once; with every thread free they
/// finish in about 150 ms, so 2 s shows the pool has all its threads. The
/// server may still be processing the cancellations when this starts (they
/// travel as HTTP/2 resets), so a refusal is retried for up to 500 ms.
async fn pool_has_full_capacity(server: &Server) {
    let started = Instant::now();
    let calls = (0..3 * THREADS).map(|_| async {
        let mut client = server.client().await;
        loop {
            let body = request("debug.spin", &[("ms", "100")], vec![]);
            match client.execute(with_deadline(body, Duration::from_secs(2))).await {
                Err(err) if err.code() == Code::ResourceExhausted && started.elapsed() < Duration::from_millis(500) => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                other => return other,
            }
        }
    });
    for result in join_all(calls).await {
        result.expect("spin finished within its deadline");
    }
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_task_past_its_deadline_stops_and_frees_its_thread() {
    let server = Server::start(&["--pool-threads", "2"]);
    for task in ["debug.spin", "debug.sleep"] {
        let calls = (0..THREADS).map(|_| async {
            let mut client = server.wire_client();
            let started = Instant::now();
            let body = request(task, &[("ms", "60000")], vec![]);
            let err = client.execute(with_deadline(body, Duration::from_millis(200))).await.unwrap_err();
            (err, started.elapsed())
        });
        for (err, took) in join_all(calls).await {
            assert_eq!(err.code(), Code::DeadlineExceeded, "{task}: {err:?}");
            assert!(err.message().contains("deadline exceeded"), "{}", err.message());
            assert!(took < Duration::from_secs(2), "{task} answered after {took:?}");
        }
        pool_has_full_capacity(&server).await;
    }
}

#[tokio::test]
async fn a_client_that_goes_away_stops_its_task() {
    let server = Server::start(&["--pool-threads", "2"]);
    let mut client = server.client().await;
    let mut streams = Vec::new();
    for _ in 0..THREADS {
        streams.push(super::start_running(&mut client, request("debug.spin", &[("ms", "60000")], vec![])).await);
    }
    // Both threads spin for a minute unless cancellation reaches them.
    drop(streams);
    pool_has_full_capacity(&server).await;
}

#[tokio::test]
async fn a_call_that_could_not_start_before_its_deadline_is_refused_up_front() {
    let server = Server::start(&["--pool-threads", "2"]);
    let mut client = server.client().await;
    let mut busy = Vec::new();
    for _ in 0..THREADS {
        busy.push(super::start_running(&mut client, request("debug.sleep", &[("ms", "3000")], vec![])).await);
    }
    let started = Instant::now();
    let body = request("debug.sleep", &[("ms", "10")], vec![]);
    let err = client.execute(with_deadline(body, Duration::from_millis(500))).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("deadline"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_millis(400), "refused at once, took {:?}", started.elapsed());
    // With a deadline it can meet, the same call is admitted and runs.
    let body = request("debug.sleep", &[("ms", "10")], vec![]);
    client.execute(with_deadline(body, Duration::from_secs(20))).await.expect("admitted and run");
}

#[tokio::test]
async fn under_a_flood_calls_succeed_or_are_refused_quickly() {
    let server = Server::start(&["--pool-threads", "2", "--queue-capacity", "64"]);
    // 200 calls of 200 ms each with a 5 s deadline: far more than fits.
    // A stall of the whole machine after admission delays every queued call
    // alike. With 20 ms tasks and a 500 ms deadline a CI run saw 16 late
    // calls, as a stall of about 150 ms would make (busy CPUs alone did not).
    // At this scale a stall of 300 ms moves the edge by at most 3 calls
    // (SIGSTOP of the server for 0.6 s in the flood: 10 late, not 4).
    let calls = (0..200).map(|_| async {
        let mut client = server.wire_client();
        let started = Instant::now();
        let body = request("debug.sleep", &[("ms", "200")], vec![]);
        let result = client.execute(with_deadline(body, Duration::from_secs(5))).await;
        (result.map(|_| ()).map_err(|e| e.code()), started.elapsed())
    });
    let results = join_all(calls).await;
    let ok = results.iter().filter(|(r, _)| r.is_ok()).count();
    let refused = results.iter().filter(|(r, _)| *r == Err(Code::ResourceExhausted)).count();
    let late = results.iter().filter(|(r, _)| *r == Err(Code::DeadlineExceeded)).count();
    assert_eq!(ok + refused + late, 200, "only these outcomes: {results:?}");
    assert!(ok >= 20, "a good share succeeds: {ok}");
    assert!(late <= 10, "only calls admitted at the edge may expire: {late}");
    for (result, took) in &results {
        if *result == Err(Code::ResourceExhausted) {
            assert!(*took < Duration::from_millis(400), "refusals are quick: {took:?}");
        }
    }
}

/// The outside finding: expensive calls of a task, some finished, some
/// ended by their deadline (running or still queued), some cancelled by
/// their callers (likewise), then four cheap calls of the same task at once
/// with a 10 s deadline on two threads or workers. Each cheap call is
/// costed by its own params, so none is refused, in either mode.
#[tokio::test]
async fn cheap_calls_are_admitted_after_expensive_ones_of_the_same_task_in_both_modes() {
    use offload_proto::offload::v1::{ExecuteRequest, ExecutionMode};
    let server = Server::start(&["--pool-threads", "2", "--workers", "2", "--metrics-listen", "127.0.0.1:0"]);
    server.wait_for_workers(2, Duration::from_secs(10)).await;
    let wire = server.wire_client();
    for (mode, label) in [(ExecutionMode::Pool, "POOL"), (ExecutionMode::Isolated, "ISOLATED")] {
        let spin = |ms: &str| ExecuteRequest { mode: mode as i32, ..request("debug.spin", &[("ms", ms)], vec![]) };
        let busy =
            || offload_e2e::metric_value(&server.scrape(), &format!("offload_busy_executors{{mode=\"{label}\"}}"));
        let at_once = |n: usize, ms: &'static str, deadline: Duration| {
            join_all((0..n).map(|_| {
                let mut wire = wire.clone();
                async move { wire.execute(with_deadline(spin(ms), deadline)).await }
            }))
        };

        // Two expensive calls that finish (measured), then four that expire
        // (two running, two queued behind them).
        for done in at_once(2, "1500", Duration::from_secs(10)).await {
            done.expect("an expensive call within its deadline");
        }
        for expired in at_once(4, "5000", Duration::from_millis(700)).await {
            let code = expired.expect_err("past its deadline").code();
            assert!(matches!(code, Code::DeadlineExceeded | Code::ResourceExhausted), "{label}: {code:?}");
        }
        // Four more without a deadline, cancelled by their callers once two run.
        let cancelled: Vec<_> = (0..4)
            .map(|_| {
                let mut wire = wire.clone();
                let body = spin("5000");
                tokio::spawn(async move { wire.execute(body).await })
            })
            .collect();
        assert!(offload_e2e::wait_for(Duration::from_secs(10), || busy() == 2.0).await, "{label}: never busy");
        cancelled.iter().for_each(tokio::task::JoinHandle::abort);

        let started = Instant::now();
        for (i, cheap) in at_once(4, "100", Duration::from_secs(10)).await.into_iter().enumerate() {
            assert!(cheap.is_ok(), "{label}: cheap call {i}: {cheap:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{label}: {:?}", started.elapsed());
    }
}
