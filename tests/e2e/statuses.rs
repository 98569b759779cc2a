//! Every failure class gets its documented status code and a message that
//! says what was wrong; none of them stops the server.

use offload_e2e::{Server, request};
use offload_proto::offload::v1::{ExecuteRequest, ExecutionMode};
use tonic::Code;

async fn code_of(
    client: &mut offload_proto::offload::v1::compute_client::ComputeClient<tonic::transport::Channel>,
    body: ExecuteRequest,
) -> (Code, String) {
    let err = client.execute(body).await.expect_err("call should fail");
    (err.code(), err.message().to_string())
}

#[tokio::test]
async fn bad_requests_get_clear_statuses() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let cases: Vec<(ExecuteRequest, Code, &str)> = vec![
        (request("no.such.task", &[], vec![]), Code::NotFound, "unknown task \"no.such.task\""),
        (request("", &[], vec![]), Code::InvalidArgument, "task name is empty"),
        (request("primes.count", &[], vec![]), Code::InvalidArgument, "missing required param \"limit\""),
        (request("primes.count", &[("limit", "ten")], vec![]), Code::InvalidArgument, "not an integer"),
        (request("primes.count", &[("limit", "10000000001")], vec![]), Code::InvalidArgument, "out of range"),
        (request("hash.sha256", &[("salt", "x")], vec![]), Code::InvalidArgument, "unknown param \"salt\""),
        (request("compress.zstd", &[("level", "22")], vec![]), Code::InvalidArgument, "1..=19"),
        (
            request("image.thumbnail", &[("width", "1"), ("height", "1"), ("format", "bmp")], vec![]),
            Code::InvalidArgument,
            "png|jpeg|webp",
        ),
        (
            ExecuteRequest { mode: 7, ..request("hash.sha256", &[], vec![]) },
            Code::InvalidArgument,
            "mode 7 is not a defined",
        ),
        (
            ExecuteRequest { mode: ExecutionMode::Pool as i32, ..request("debug.abort", &[], vec![]) },
            Code::InvalidArgument,
            "allowed: ISOLATED",
        ),
        (request("decompress.zstd", &[], &b"garbage"[..]), Code::InvalidArgument, "not valid zstd"),
        (request("debug.panic", &[], vec![]), Code::Internal, "panicked"),
    ];
    for (body, code, needle) in cases {
        let what = format!("{} {:?} mode {}", body.task, body.params, body.mode);
        let (got, message) = code_of(&mut client, body).await;
        assert_eq!(got, code, "{what}: {message}");
        assert!(message.contains(needle), "{what}: {message:?} lacks {needle:?}");
    }
    // Still serving after all of that, the panic included.
    let out = client.execute(request("debug.echo", &[], &b"alive"[..])).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), b"alive");
}

#[tokio::test]
async fn an_oversized_request_is_resource_exhausted_and_the_server_serves_on() {
    let server = Server::start(&["--max-message-bytes", "1048576"]);
    let mut client = server.client().await;
    let (code, message) = code_of(&mut client, request("hash.sha256", &[], vec![0u8; 2 << 20])).await;
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(message.contains("1048576"), "{message}");
    let out = client.execute(request("debug.echo", &[], vec![1u8; 1000])).await.unwrap().into_inner();
    assert_eq!(out.output.len(), 1000);
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_recovers() {
    let server = Server::start(&["--pool-threads", "1", "--queue-capacity", "2"]);
    let mut client = server.client().await;
    let sleep = || request("debug.sleep", &[("ms", "800")], vec![]);
    let running = super::start_running(&mut client, sleep()).await;
    let queued = [super::start_queued(&mut client, sleep()).await, super::start_queued(&mut client, sleep()).await];
    let started = std::time::Instant::now();
    let (code, message) = code_of(&mut client, sleep()).await;
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(message.contains("queue is full"), "{message}");
    assert!(started.elapsed() < std::time::Duration::from_millis(500), "refused at once, not after waiting");
    drop((running, queued));
    // Dropping the streams cancels the sleeps: the pool is free again long
    // before they would have finished.
    let freed = std::time::Instant::now();
    loop {
        match client.execute(request("debug.spin", &[("ms", "1")], vec![])).await {
            Ok(_) => break,
            Err(err)
                if err.code() == Code::ResourceExhausted && freed.elapsed() < std::time::Duration::from_millis(700) =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await
            }
            Err(err) => panic!("pool did not recover: {err:?}"),
        }
    }
}
