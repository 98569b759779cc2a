//! The in-flight bytes budget (`--max-inflight-bytes`): a flood of large
//! requests over several connections is refused RESOURCE_EXHAUSTED where it
//! does not fit, before its bodies are buffered, and the front's peak
//! resident memory stays under the budget plus a fixed baseline.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use offload_e2e::{Server, metric_value, request, wait_for};
use tonic::Code;

const MIB: usize = 1 << 20;
/// The budget of the flood test.
const BUDGET: usize = 128 * MIB;
/// What the front may hold beyond the budget: its idle resident memory
/// (about 15 MiB for a debug build), the allocator's slack, HTTP/2 buffers
/// of the connections, and at most one message being encoded or decoded per
/// call beyond its counted bytes.
const BASELINE: usize = 96 * MIB;

/// The front's peak resident memory so far (VmHWM), in bytes.
fn peak_rss(server: &Server) -> usize {
    let status = offload_e2e::process(server.pid()).expect("server alive").status().expect("status");
    status.vmhwm.expect("VmHWM") as usize * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_requests_is_refused_beyond_the_budget_and_memory_stays_bounded() {
    let budget = BUDGET.to_string();
    let server = Server::start(&[
        "--max-inflight-bytes",
        &budget,
        "--metrics-listen",
        "127.0.0.1:0",
        "--pool-threads",
        "2",
        "--workers",
        "1",
    ]);
    assert!(server.wait_logged("metrics on http://").await);
    assert!(server.logged("in-flight bytes budget: 128 MiB (set)"), "{:?}", server.logs());

    // 8 connections x 8 callers x 2 calls of 16 MiB each: 1 GiB asked for
    // at once, 8 times the budget. Each call holds its input for 300 ms.
    let input = Bytes::from(vec![7u8; 16 * MIB]);
    let large = request("debug.sleep", &[("ms", "300")], input);
    let mut callers = Vec::new();
    for _ in 0..8 {
        let client = server.client().await;
        for _ in 0..8 {
            let (mut client, large) = (client.clone(), large.clone());
            callers.push(tokio::spawn(async move {
                let mut codes = Vec::new();
                for _ in 0..2 {
                    match client.execute(large.clone()).await {
                        Ok(_) => codes.push(Code::Ok),
                        Err(status) => {
                            if status.code() == Code::ResourceExhausted {
                                assert!(
                                    status.message().contains("in-flight memory budget of 134217728 bytes"),
                                    "{status:?}"
                                );
                            }
                            codes.push(status.code());
                        }
                    }
                }
                codes
            }));
        }
    }
    // Small calls go on succeeding meanwhile, on a connection of their own.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let small = {
        let (mut client, done) = (server.client().await, Arc::clone(&done));
        tokio::spawn(async move {
            let mut served = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = client.execute(request("hash.sha256", &[], &b"abc"[..])).await;
                assert!(reply.is_ok(), "a small call failed during the flood: {reply:?}");
                served += 1;
            }
            served
        })
    };
    let mut codes = Vec::new();
    for caller in callers {
        codes.extend(caller.await.unwrap());
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let small_served = small.await.unwrap();

    let ok = codes.iter().filter(|c| **c == Code::Ok).count();
    let refused = codes.iter().filter(|c| **c == Code::ResourceExhausted).count();
    assert_eq!(ok + refused, codes.len(), "every call ends OK or RESOURCE_EXHAUSTED: {codes:?}");
    assert!(ok > 0 && refused > 0, "{ok} OK, {refused} refused");
    assert!(small_served > 0);
    let peak = peak_rss(&server);
    assert!(peak < BUDGET + BASELINE, "peak RSS {} MiB over budget {} MiB + baseline", peak / MIB, BUDGET / MIB);
    eprintln!("flood: {ok} OK, {refused} refused, {small_served} small calls served, peak RSS {} MiB", peak / MIB);

    // Everything was given back, the refusals were counted, and a large call
    // fits again.
    let mut metrics = String::new();
    let settled = wait_for(Duration::from_secs(5), || {
        metrics = server.scrape();
        metric_value(&metrics, "offload_inflight_bytes") == 0.0
    })
    .await;
    assert!(settled, "bytes still held after the flood:\n{metrics}");
    assert_eq!(metric_value(&metrics, "offload_inflight_bytes_budget"), BUDGET as f64);
    assert_eq!(metric_value(&metrics, "offload_rejected_calls_total{reason=\"memory\"}"), refused as f64);
    server.client().await.execute(large).await.expect("a large call after the flood");
}
