//! SIGTERM: health goes NOT_SERVING, new calls are refused, the call in
//! flight finishes, and the process exits 0.

use std::time::Duration;

use nix::sys::signal::Signal;
use offload_e2e::{Server, request};
use offload_proto::offload::v1::compute_client::ComputeClient;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

#[tokio::test]
async fn sigterm_drains_in_flight_calls_then_exits_zero() {
    let mut server = Server::start(&["--shutdown-grace-secs", "20"]);
    let mut client = server.client().await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch =
        health.watch(HealthCheckRequest { service: "offload.v1.Compute".into() }).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, ServingStatus::Serving as i32);

    let in_flight = super::start_running(&mut client, request("debug.sleep", &[("ms", "1500")], vec![])).await;
    server.signal(Signal::SIGTERM);

    let update = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.expect("health update");
    assert_eq!(update.unwrap().unwrap().status, ServingStatus::NotServing as i32);

    // A new connection finds nobody listening.
    let fresh = Channel::from_shared(server.url()).unwrap().connect_lazy();
    let err = ComputeClient::new(fresh).execute(request("debug.echo", &[], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}; server logs: {:?}", server.logs());

    // The call in flight still completes.
    let result = super::final_result(in_flight).await;
    assert!(result.expect("a result").stats.unwrap().run_us() >= 1_500_000);

    drop((client, health, watch));
    let status = server.wait_exit(Duration::from_secs(10)).expect("exited after draining");
    assert!(status.success(), "{status:?}");
    assert!(server.wait_logged("drained").await, "{:?}", server.logs());
}

#[tokio::test]
async fn a_call_that_outlives_the_grace_does_not_hold_the_exit() {
    let mut server = Server::start(&["--shutdown-grace-secs", "0.3"]);
    let mut client = server.client().await;
    let _in_flight = super::start_running(&mut client, request("debug.sleep", &[("ms", "60000")], vec![])).await;
    server.signal(Signal::SIGINT);
    let status = server.wait_exit(Duration::from_secs(10)).expect("exited after the grace");
    assert!(status.success(), "{status:?}");
    assert!(server.wait_logged("grace ran out").await, "{:?}", server.logs());
}
