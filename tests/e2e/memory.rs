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

/// A server with a budget of `budget` bytes and its metrics endpoint.
async fn metered_server(budget: usize) -> Server {
    let budget = budget.to_string();
    let server = Server::start(&["--max-inflight-bytes", &budget, "--metrics-listen", "127.0.0.1:0"]);
    assert!(server.wait_logged("metrics on http://").await);
    server
}

/// gRPC's 5-byte message prefix: not compressed, then the length.
fn grpc_prefix(len: usize) -> Vec<u8> {
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
    prefix
}

/// An HTTP/2 connection to `server` on which the test writes a call's body
/// by hand, frame by frame.
async fn raw_connection(server: &Server) -> hyper::client::conn::http2::SendRequest<RawBody> {
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Headers and data go out at once, without waiting for an ACK.
    stream.set_nodelay(true).unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

type RawFrame = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>;
type RawBody = http_body_util::StreamBody<tokio_stream::wrappers::ReceiverStream<RawFrame>>;

/// Starts an Execute call whose body the test sends through the returned
/// channel; `timeout` is its grpc-timeout.
fn raw_execute(
    sender: &mut hyper::client::conn::http2::SendRequest<RawBody>,
    timeout: Option<&str>,
) -> (
    tokio::sync::mpsc::Sender<RawFrame>,
    impl std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>> + use<>,
) {
    let (body_tx, body_rx) = tokio::sync::mpsc::channel(4);
    let mut builder = http::Request::post("http://offload/offload.v1.Compute/Execute")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(timeout) = timeout {
        builder = builder.header("grpc-timeout", timeout);
    }
    let request =
        builder.body(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body_rx))).unwrap();
    (body_tx, sender.send_request(request))
}

/// The grpc-status of a finished response (trailers-only or in trailers).
async fn grpc_status(response: http::Response<hyper::body::Incoming>) -> (String, String) {
    use http_body_util::BodyExt as _;
    let (parts, body) = response.into_parts();
    let header = |h: &http::HeaderMap, name: &str| h.get(name).map(|v| v.to_str().unwrap().to_string());
    if let Some(code) = header(&parts.headers, "grpc-status") {
        return (code, header(&parts.headers, "grpc-message").unwrap_or_default());
    }
    let trailers = body.collect().await.unwrap().trailers().cloned().unwrap_or_default();
    (header(&trailers, "grpc-status").unwrap_or_default(), header(&trailers, "grpc-message").unwrap_or_default())
}

/// A client that announces a 32 MiB message and then stops sending holds
/// 32 MiB of the budget (so a second large call that does not fit is
/// refused), blocks no other call, and is cut off by its deadline with
/// DEADLINE_EXCEEDED, after which its bytes are given back.
#[tokio::test]
async fn a_stalled_request_body_holds_its_reservation_until_its_deadline_and_blocks_nothing() {
    let server = metered_server(64 * MIB).await;
    let mut sender = raw_connection(&server).await;
    let (body, response) = raw_execute(&mut sender, Some("2S"));
    let response = tokio::spawn(response);
    let mut prefix = grpc_prefix(32 * MIB);
    prefix.extend_from_slice(&[0u8; 1024]);
    body.send(Ok(hyper::body::Frame::data(Bytes::from(prefix)))).await.unwrap();

    let reserved = wait_for(Duration::from_secs(5), || {
        metric_value(&server.scrape(), "offload_inflight_bytes") == (32 * MIB) as f64
    })
    .await;
    assert!(reserved, "the stalled call's message is not reserved:\n{}", server.scrape());
    let mut client = server.client().await;
    client.execute(request("hash.sha256", &[], &b"abc"[..])).await.expect("a small call beside the stalled one");
    let refused = client.execute(request("debug.echo", &[], vec![0u8; 40 * MIB])).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    let answered = tokio::time::timeout(Duration::from_secs(10), response).await.expect("answered by the deadline");
    let (code, message) = grpc_status(answered.unwrap().unwrap()).await;
    assert_eq!(code, (Code::DeadlineExceeded as i32).to_string(), "{message}");
    let released =
        wait_for(Duration::from_secs(5), || metric_value(&server.scrape(), "offload_inflight_bytes") == 0.0).await;
    assert!(released, "the stalled call's bytes were not given back");
    drop(body);
}

/// Connections that send nothing, or only HTTP/2's preface, are closed by
/// the server (first-byte and idle timeouts) while a connection with a call
/// in flight longer than the idle timeout keeps it; memory returns to where
/// it was.
#[tokio::test]
async fn idle_connections_are_closed_and_a_busy_one_is_kept() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let server = Server::start(&["--connection-idle-timeout-secs", "1", "--workers", "1"]);
    let mut client = server.client().await;
    client.execute(request("hash.sha256", &[], &b"warm"[..])).await.unwrap();
    let rss = || offload_e2e::process(server.pid()).unwrap().status().unwrap().vmrss.unwrap() as usize * 1024;
    let before = rss();

    let busy =
        tokio::spawn(async move { client.execute(request("debug.sleep", &[("ms", "2500")], Bytes::new())).await });
    let mut idle = Vec::new();
    for i in 0..600 {
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        if i % 2 == 0 {
            // HTTP/2's client preface and an empty SETTINGS frame.
            stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
        }
        idle.push(stream);
    }
    let opened = rss();
    // The server closes every one of them: reads end (EOF or reset) after
    // at most the server's SETTINGS and GOAWAY frames.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        for mut stream in idle {
            let mut buf = [0u8; 256];
            while let Ok(n) = stream.read(&mut buf).await
                && n > 0
            {}
        }
    })
    .await;
    assert!(closed.is_ok(), "idle connections were left open");
    busy.await.unwrap().expect("the call on a busy connection outlives the idle timeout");
    eprintln!("600 idle connections: {} -> {} KiB resident", before / 1024, opened / 1024);
    server.client().await.execute(request("hash.sha256", &[], &b"abc"[..])).await.expect("serves new connections");
}

/// A batch whose items add up to far more than the budget goes through:
/// each item's bytes are given back when it is done, and an item that does
/// not fit waits for room (backpressure) instead of failing the stream.
#[tokio::test]
async fn a_batch_larger_than_the_budget_flows_through_it() {
    use offload_proto::offload::v1::ExecuteRequest;

    let server = metered_server(16 * MIB).await;
    let mut client = server.client().await;
    // 24 items of 3 MiB: 72 MiB through a 16 MiB budget.
    let items: Vec<ExecuteRequest> = (0..24)
        .map(|i| ExecuteRequest { id: i.to_string(), ..request("hash.sha256", &[], vec![i as u8; 3 * MIB]) })
        .collect();
    let mut results = client.execute_batch(tokio_stream::iter(items)).await.unwrap().into_inner();
    let mut answered = 0;
    while let Some(item) = results.message().await.expect("the stream goes on") {
        assert!(item.error.is_none(), "item {}: {:?}", item.id, item.error);
        answered += 1;
    }
    assert_eq!(answered, 24);
    let released =
        wait_for(Duration::from_secs(5), || metric_value(&server.scrape(), "offload_inflight_bytes") == 0.0).await;
    assert!(released, "bytes still held after the batch:\n{}", server.scrape());
}

/// An output counts until it is written to the connection: a client that
/// does not read its 24 MiB answer holds those bytes of the budget (so a
/// call that does not fit beside them is refused), and they are given back
/// once it reads.
#[tokio::test]
async fn a_stalled_reader_holds_its_output_until_it_reads() {
    use http_body_util::BodyExt as _;
    use prost::Message as _;

    let server = metered_server(40 * MIB).await;
    let mut sender = raw_connection(&server).await;
    let (body, response) = raw_execute(&mut sender, None);
    let echo = request("debug.echo", &[], vec![1u8; 24 * MIB]);
    let mut message = grpc_prefix(echo.encoded_len());
    echo.encode(&mut message).unwrap();
    body.send(Ok(hyper::body::Frame::data(Bytes::from(message)))).await.unwrap();
    drop(body);
    // The answer's headers arrive; its body is not read.
    let response = response.await.unwrap();
    let held = || metric_value(&server.scrape(), "offload_inflight_bytes");
    assert!(wait_for(Duration::from_secs(5), || held() >= (20 * MIB) as f64).await, "held {}", held());
    let refused = server.client().await.execute(request("debug.echo", &[], vec![0u8; 20 * MIB])).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    let output = response.into_body().collect().await.unwrap().to_bytes();
    assert!(output.len() > 24 * MIB, "read {} bytes", output.len());
    assert!(wait_for(Duration::from_secs(5), || held() == 0.0).await, "held {} after reading", held());
}

/// Refusals do not cost a client its connection: two thousand calls refused
/// for memory on one HTTP/2 connection (each answered while its body is
/// still being sent, so the server resets the rest of the stream) are each
/// answered RESOURCE_EXHAUSTED, and the connection then serves a call.
#[tokio::test]
async fn many_refusals_on_one_connection_keep_it_open() {
    let server = metered_server(16 * MIB).await;
    let mut sender = raw_connection(&server).await;
    for i in 0..2000 {
        let (body, response) = raw_execute(&mut sender, None);
        let mut start = grpc_prefix(40 * MIB);
        start.extend_from_slice(&[0u8; 16 << 10]);
        body.send(Ok(hyper::body::Frame::data(Bytes::from(start)))).await.unwrap();
        let response = response.await.unwrap_or_else(|e| panic!("call {i}: {e}"));
        let (code, message) = grpc_status(response).await;
        assert_eq!(code, (Code::ResourceExhausted as i32).to_string(), "call {i}: {message}");
    }
    let (body, response) = raw_execute(&mut sender, None);
    let encoded = prost::Message::encode_to_vec(&request("hash.sha256", &[], &b"abc"[..]));
    let mut message = grpc_prefix(encoded.len());
    message.extend_from_slice(&encoded);
    body.send(Ok(hyper::body::Frame::data(Bytes::from(message)))).await.unwrap();
    drop(body);
    let (code, message) = grpc_status(response.await.expect("the connection still serves")).await;
    assert_eq!(code, "0", "{message}");
}

/// Without a deadline, a body that stops in the middle of a message is cut
/// off after 30 s without data (DEADLINE_EXCEEDED saying it stalled), and
/// its reservation is given back.
#[tokio::test]
async fn a_body_stalled_without_a_deadline_is_cut_off_after_30_s() {
    let server = metered_server(64 * MIB).await;
    let mut sender = raw_connection(&server).await;
    let (body, response) = raw_execute(&mut sender, None);
    let response = tokio::spawn(response);
    let mut start = grpc_prefix(8 * MIB);
    start.extend_from_slice(&[0u8; 1024]);
    body.send(Ok(hyper::body::Frame::data(Bytes::from(start)))).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(45), response).await.expect("cut off within 45 s");
    let (code, message) = grpc_status(answered.unwrap().unwrap()).await;
    assert_eq!(code, (Code::DeadlineExceeded as i32).to_string(), "{message}");
    assert!(message.contains("stalled"), "{message}");
    let released =
        wait_for(Duration::from_secs(5), || metric_value(&server.scrape(), "offload_inflight_bytes") == 0.0).await;
    assert!(released, "the stalled call's bytes were not given back");
    drop(body);
}

/// Refusing a large call before its body is read resets its stream while
/// the client is still sending it. Past h2's memory of reset streams (50
/// within a second), the body's late frames made the server reset the
/// stream again, and h2 allows a connection 1024 such resets in its whole
/// life: a sustained flood of refused calls then had its connection closed
/// with ENHANCE_YOUR_CALM, and every call on it failed without a status
/// (bench scenario 8 saw it after about 50 s). Here 3000 refusals go over
/// one connection in a few seconds, 60 at a time with their bodies still
/// being sent (unlike `many_refusals_on_one_connection_keep_it_open`, one
/// call at a time with nothing sent after its refusal); each must come back
/// RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_survives_thousands_of_refusals_with_their_bodies_in_flight() {
    let server = Server::start(&["--max-inflight-bytes", &(4 * MIB).to_string()]);
    // Over the whole budget: refused from its first frame, whatever else runs.
    let input = Bytes::from(vec![7u8; 8 * MIB]);
    let refused = request("hash.sha256", &[], input);
    let client = server.client().await;
    let mut callers = Vec::new();
    for _ in 0..60 {
        let (mut client, refused) = (client.clone(), refused.clone());
        callers.push(tokio::spawn(async move {
            let mut other = Vec::new();
            for _ in 0..50 {
                match client.execute(refused.clone()).await {
                    Err(status) if status.code() == Code::ResourceExhausted => {}
                    Err(status) => other.push(format!("{:?}: {}", status.code(), status.message())),
                    Ok(_) => other.push("OK".to_string()),
                }
            }
            other
        }));
    }
    let mut other = Vec::new();
    for caller in callers {
        other.extend(caller.await.unwrap());
    }
    assert!(
        other.is_empty(),
        "{} of 3000 calls did not end RESOURCE_EXHAUSTED, the first: {:?}",
        other.len(),
        other.first()
    );
}
