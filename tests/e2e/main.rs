//! End-to-end tests against the real binaries, one module per area. Each
//! test starts its own server on an ephemeral port.

mod admin;
mod auth;
mod batch;
mod cache;
mod cli;
mod cluster;
mod config;
mod console;
mod custom;
mod deadlines;
mod discovery;
mod exec;
mod grpcweb;
mod isolated;
mod jobs;
mod memory;
mod metrics;
mod observability;
mod programs;
mod python;
mod sandbox;
mod scheduling;
mod shared_jobs;
mod shutdown;
mod statuses;
mod stream;
mod tasks;
mod tls;
mod traces;

use std::time::Duration;

use offload_proto::offload::v1::{ExecuteRequest, Stage, compute_client::ComputeClient, execute_event::Event};
use tonic::{Streaming, transport::Channel};

/// Starts `request` through ExecuteStream and returns the stream once the
/// task is running (its STAGE_RUNNING event has arrived).
pub async fn start_running(
    client: &mut ComputeClient<Channel>,
    request: ExecuteRequest,
) -> Streaming<offload_proto::offload::v1::ExecuteEvent> {
    let mut events = client.execute_stream(request).await.expect("stream accepted").into_inner();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.message().await.expect("event") {
            if let Some(Event::Progress(p)) = event.event
                && p.stage == Stage::Running as i32
            {
                return;
            }
        }
        panic!("stream ended before the task ran");
    })
    .await
    .expect("task started within 10 s");
    events
}

/// Starts `request` through ExecuteStream and returns the stream once it is
/// admitted (its STAGE_QUEUED event has arrived).
pub async fn start_queued(
    client: &mut ComputeClient<Channel>,
    request: ExecuteRequest,
) -> Streaming<offload_proto::offload::v1::ExecuteEvent> {
    let mut events = client.execute_stream(request).await.expect("stream accepted").into_inner();
    let first = events.message().await.expect("event").expect("an event");
    assert!(matches!(first.event, Some(Event::Progress(p)) if p.stage == Stage::Queued as i32));
    events
}

/// Reads `events` to the end and returns the status it failed with.
pub async fn final_status(events: &mut Streaming<offload_proto::offload::v1::ExecuteEvent>) -> tonic::Status {
    loop {
        match events.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a failure status"),
            Err(status) => return status,
        }
    }
}

/// Reads `events` to the end and returns its result, if it had one.
pub async fn final_result(
    mut events: Streaming<offload_proto::offload::v1::ExecuteEvent>,
) -> Option<offload_proto::offload::v1::ExecuteResponse> {
    let mut result = None;
    while let Some(event) = events.message().await.expect("stream events") {
        if let Some(Event::Result(r)) = event.event {
            result = Some(r);
        }
    }
    result
}
