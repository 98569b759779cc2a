//! ExecuteStream: QUEUED, then RUNNING, then progress, then one result.

use offload_e2e::{Server, request};
use offload_proto::offload::v1::{Stage, execute_event::Event};
use tonic::Code;

#[tokio::test]
async fn progress_is_ordered_bounded_and_ends_with_one_result() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let mut events = client.execute_stream(request("debug.spin", &[("ms", "300")], vec![])).await.unwrap().into_inner();
    let mut stages = Vec::new();
    let mut fractions = Vec::new();
    let mut results = 0;
    while let Some(event) = events.message().await.unwrap() {
        assert_eq!(results, 0, "nothing may follow the result");
        match event.event.expect("an event") {
            Event::Progress(p) => {
                stages.push(p.stage);
                if p.stage == Stage::Running as i32 {
                    fractions.push(p.fraction);
                }
            }
            Event::Result(r) => {
                assert!(r.error.is_none());
                results += 1;
            }
        }
    }
    assert_eq!(results, 1);
    assert_eq!(stages[0], Stage::Queued as i32);
    assert!(stages[1..].iter().all(|s| *s == Stage::Running as i32), "{stages:?}");
    assert!(fractions.len() >= 3, "a 300 ms spin reports progress: {fractions:?}");
    assert!(fractions.iter().all(|f| (0.0..=1.0).contains(f)), "{fractions:?}");
    assert!(fractions.windows(2).all(|w| w[0] <= w[1]), "non-decreasing: {fractions:?}");
}

#[tokio::test]
async fn a_quick_task_still_reports_both_stages_and_failures_are_the_rpc_status() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let mut events = client.execute_stream(request("debug.echo", &[], &b"hi"[..])).await.unwrap().into_inner();
    let mut kinds = Vec::new();
    while let Some(event) = events.message().await.unwrap() {
        kinds.push(match event.event.unwrap() {
            Event::Progress(p) => format!("progress:{}", p.stage),
            Event::Result(r) => format!("result:{}", String::from_utf8_lossy(&r.output)),
        });
    }
    assert_eq!(kinds, ["progress:1", "progress:2", "result:hi"]);

    let err = client.execute_stream(request("no.such", &[], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut events = client.execute_stream(request("debug.panic", &[], vec![])).await.unwrap().into_inner();
    let err = super::final_status(&mut events).await;
    assert_eq!(err.code(), Code::Internal);
}
