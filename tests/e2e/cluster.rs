//! Replicas on one machine (`--replicas`): connections spread over them, a
//! dead replica is replaced, SIGTERM drains them all and leaves no process.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};
use offload_e2e::{Server, children_of, is_alive, request, wait_for};
use offload_proto::offload::v1::compute_client::ComputeClient;
use tonic::transport::Channel;

/// Every process under `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for child in children_of(p) {
            all.push(child);
            frontier.push(child);
        }
    }
    all
}

/// (replica name, pid) of every "replica NAME (pid N) serving" line logged
/// so far, oldest first.
fn serving_named(server: &Server) -> Vec<(String, u32)> {
    server
        .logs()
        .iter()
        .filter(|l| l.contains("\"message\":\"replica ") && l.contains(" serving"))
        .filter_map(|l| {
            let (name, rest) = l.split("\"message\":\"replica ").nth(1)?.split_once(" (pid ")?;
            Some((name.to_string(), rest.split(')').next()?.parse().ok()?))
        })
        .collect()
}

/// Pid of every replica that came to serve so far, oldest first.
fn serving(server: &Server) -> Vec<u32> {
    serving_named(server).into_iter().map(|(_, pid)| pid).collect()
}

async fn replica_of_fresh_connection(server: &Server) -> String {
    let channel = Channel::from_shared(server.url()).unwrap().connect().await.unwrap();
    let out = ComputeClient::new(channel).execute(request("debug.echo", &[], &b"x"[..])).await.unwrap().into_inner();
    out.stats.unwrap().replica
}

#[tokio::test]
async fn connections_spread_over_replicas_and_a_dead_one_is_replaced() {
    let server = Server::start(&["--replicas", "3", "--workers", "1", "--replica-name", "r"]);
    assert!(wait_for(Duration::from_secs(30), || serving(&server).len() == 3).await, "{:?}", server.logs());
    let mut seen = BTreeSet::new();
    for _ in 0..24 {
        seen.insert(replica_of_fresh_connection(&server).await);
    }
    assert!(seen.len() >= 2, "connections reached {seen:?}");
    assert!(seen.iter().all(|r| ["r-0", "r-1", "r-2"].contains(&r.as_str())), "{seen:?}");
    // Each replica's log lines say which replica wrote them.
    for name in ["r-0", "r-1", "r-2"] {
        assert!(server.logged(&format!("\"replica\":\"{name}\"")), "no log line of {name}");
    }

    let victim = serving(&server)[0];
    nix::sys::signal::kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    assert!(wait_for(Duration::from_secs(30), || serving(&server).len() == 4).await, "{:?}", server.logs());
    assert!(server.logged("replica exited; restarting it"));
    // Every connection is served again, by live replicas only.
    for _ in 0..12 {
        replica_of_fresh_connection(&server).await;
    }
    assert!(!is_alive(victim));
}

#[tokio::test]
async fn sigterm_drains_every_replica_then_no_process_is_left() {
    let mut server = Server::start(&["--replicas", "2", "--workers", "1", "--shutdown-grace-secs", "10"]);
    assert!(wait_for(Duration::from_secs(30), || serving(&server).len() == 2).await, "{:?}", server.logs());
    let tree = descendants(server.pid());
    assert!(tree.len() >= 4, "two replicas and their workers: {tree:?}");
    let mut client = server.client().await;
    let in_flight = super::start_running(&mut client, request("debug.sleep", &[("ms", "1000")], vec![])).await;
    server.signal(Signal::SIGTERM);
    let result = super::final_result(in_flight).await.expect("the call in flight finished");
    assert!(result.stats.unwrap().run_us() >= 1_000_000);
    let status = server.wait_exit(Duration::from_secs(20)).expect("supervisor exited");
    assert!(status.success(), "{status:?}");
    assert!(wait_for(Duration::from_secs(5), || tree.iter().all(|p| !is_alive(*p))).await, "left: {tree:?}");
}

/// Whether a failed call never reached a handler, so a retry is safe:
/// UNAVAILABLE (draining, or no connection) or a connection-level failure.
fn never_started(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        || (status.code() == tonic::Code::Unknown && status.message().contains("transport error"))
}

#[tokio::test]
async fn sighup_rolls_the_replicas_without_failing_a_call() {
    let server = Server::start(&["--replicas", "2", "--workers", "1", "--shutdown-grace-secs", "10"]);
    assert!(wait_for(Duration::from_secs(30), || serving(&server).len() == 2).await, "{:?}", server.logs());
    let before = serving(&server);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU32::new(0));
    let mut clients = Vec::new();
    for c in 0..4 {
        let url = server.url();
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        clients.push(tokio::spawn(async move {
            let channel = Channel::from_shared(url).unwrap().connect_lazy();
            let mut client = ComputeClient::new(channel);
            let (mut ok, mut retried) = (0u32, 0u32);
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let input = format!("client {c} call {i}").into_bytes();
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    match client.execute(request("debug.sleep", &[("ms", "5")], input.clone())).await {
                        Ok(_) => break,
                        Err(status) if never_started(&status) && attempts < 50 => {
                            retried += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(status) => panic!("call failed for good after {attempts} attempts: {status:?}"),
                    }
                }
                ok += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            (ok, retried)
        }));
    }
    assert!(wait_for(Duration::from_secs(10), || done.load(Ordering::Relaxed) >= 10).await, "the load runs");
    server.signal(Signal::SIGHUP);
    assert!(wait_for(Duration::from_secs(60), || server.logged("rolling restart done")).await, "{:?}", server.logs());
    // Calls go on against the new replicas, then the load stops.
    let rolled = done.load(Ordering::Relaxed);
    assert!(wait_for(Duration::from_secs(10), || done.load(Ordering::Relaxed) >= rolled + 10).await);
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let (ok, _retried) = client.await.expect("no call failed");
        total += ok;
    }
    assert!(total > 20, "the load ran: {total} calls");
    let after = serving(&server);
    assert_eq!(after.len(), 4, "two new replicas: {after:?}");
    assert!(before.iter().all(|p| !is_alive(*p)), "old replicas drained and exited");
}

#[tokio::test]
async fn a_replica_that_dies_during_a_rolling_restart_is_restarted() {
    let server =
        Server::start(&["--replicas", "2", "--workers", "1", "--shutdown-grace-secs", "20", "--replica-name", "r"]);
    assert!(wait_for(Duration::from_secs(30), || serving(&server).len() == 2).await, "{:?}", server.logs());
    // A long call on replica r-1 keeps its drain going while r-0 is already
    // replaced.
    let mut long_call = None;
    for _ in 0..100 {
        let channel = Channel::from_shared(server.url()).unwrap().connect().await.unwrap();
        let mut client = ComputeClient::new(channel);
        let out = client.execute(request("debug.echo", &[], &b"x"[..])).await.unwrap().into_inner();
        if out.stats.unwrap().replica == "r-1" {
            long_call =
                Some(super::start_running(&mut client, request("debug.sleep", &[("ms", "6000")], vec![])).await);
            break;
        }
    }
    let long_call = long_call.expect("a connection reached r-1");

    server.signal(Signal::SIGHUP);
    // The fourth "serving" line is the new r-1: the old one is draining now.
    assert!(wait_for(Duration::from_secs(30), || serving(&server).len() == 4).await, "{:?}", server.logs());
    assert!(!server.logged("rolling restart done"), "the long call did not hold the old r-1's drain open");
    let fresh_r0 = serving_named(&server)[2].clone();
    assert_eq!(fresh_r0.0, "r-0", "{:?}", serving_named(&server));
    nix::sys::signal::kill(Pid::from_raw(fresh_r0.1 as i32), Signal::SIGKILL).unwrap();

    // The rolling restart finishes (the long call completes on the old r-1)
    // and the killed r-0 is started again.
    let result = super::final_result(long_call).await.expect("the long call finished while draining");
    assert!(result.stats.unwrap().run_us() >= 6_000_000);
    assert!(wait_for(Duration::from_secs(30), || server.logged("rolling restart done")).await, "{:?}", server.logs());
    assert!(
        wait_for(Duration::from_secs(30), || serving_named(&server).len() == 5).await,
        "the killed replica was not restarted: {:?}",
        server.logs()
    );
    assert_eq!(serving_named(&server)[4].0, "r-0");
    assert!(!is_alive(fresh_r0.1));
    for _ in 0..6 {
        replica_of_fresh_connection(&server).await;
    }
}

#[tokio::test]
async fn a_replica_killed_under_load_fails_only_its_calls_in_flight() {
    let server = Server::start(&["--replicas", "3", "--workers", "1"]);
    assert!(wait_for(Duration::from_secs(30), || serving(&server).len() == 3).await, "{:?}", server.logs());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU32::new(0));
    let mut clients = Vec::new();
    for _ in 0..6 {
        let url = server.url();
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        clients.push(tokio::spawn(async move {
            let mut client = ComputeClient::new(Channel::from_shared(url).unwrap().connect_lazy());
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match client.execute(request("debug.sleep", &[("ms", "10")], vec![])).await {
                    Ok(_) => ok += 1,
                    Err(status) => failed.push(status),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            // After the replacement every call succeeds again.
            for _ in 0..5 {
                client
                    .execute(request("debug.echo", &[], &b"after"[..]))
                    .await
                    .expect("calls succeed after the replacement");
            }
            (ok, failed)
        }));
    }
    assert!(wait_for(Duration::from_secs(10), || done.load(Ordering::Relaxed) >= 30).await, "the load runs");
    let victim = serving(&server)[1];
    nix::sys::signal::kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    assert!(wait_for(Duration::from_secs(30), || serving(&server).len() == 4).await, "{:?}", server.logs());
    // Calls go on after the replacement, then the load stops.
    let replaced = done.load(Ordering::Relaxed);
    assert!(wait_for(Duration::from_secs(10), || done.load(Ordering::Relaxed) >= replaced + 30).await);
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    let mut total = 0;
    for client in clients {
        let (ok, failed) = client.await.unwrap();
        total += ok;
        failures.extend(failed);
    }
    assert!(total > 50, "the load ran: {total}");
    // Only the calls in flight on the killed replica's connections fail: at
    // most one per connection, and only as a lost connection.
    assert!(failures.len() <= 6, "{failures:?}");
    for status in &failures {
        let lost_connection = matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Internal)
            || (status.code() == tonic::Code::Unknown && status.message().contains("transport error"));
        assert!(lost_connection, "{status:?}");
    }
}
