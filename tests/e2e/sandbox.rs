//! The worker sandbox: what `debug.probe` may do in a worker process
//! (nothing) and in the pool (everything: POOL runs trusted code), the
//! modes, and the start-up log of what is in force.

use offload_e2e::{Server, request};
use offload_proto::offload::v1::{ExecuteRequest, ExecutionMode};

fn probe(what: &str, mode: ExecutionMode) -> ExecuteRequest {
    ExecuteRequest { mode: mode as i32, ..request("debug.probe", &[("what", what)], vec![]) }
}

#[tokio::test]
async fn a_worker_may_not_connect_write_read_or_exec_while_the_pool_may() {
    let server = Server::start(&["--workers", "1", "--worker-sandbox", "strict"]);
    assert!(server.wait_logged("worker sandbox: Landlock, seccomp").await, "what is in force is logged");
    let mut client = server.client().await;
    for what in ["connect", "write", "read", "exec"] {
        let pool = client.execute(probe(what, ExecutionMode::Pool)).await.expect("POOL probe").into_inner();
        assert_eq!(String::from_utf8_lossy(&pool.output), "allowed", "POOL {what}");
        let isolated = client.execute(probe(what, ExecutionMode::Isolated)).await.expect("ISOLATED probe").into_inner();
        let said = String::from_utf8_lossy(&isolated.output).into_owned();
        assert!(said.starts_with("denied: "), "ISOLATED {what}: {said}");
    }
    // The tasks themselves still work in the sandbox.
    let out = client
        .execute(ExecuteRequest {
            mode: ExecutionMode::Isolated as i32,
            ..request("compress.zstd", &[], b"sandboxed".to_vec())
        })
        .await
        .expect("compress in a sandboxed worker");
    assert!(!out.into_inner().output.is_empty());
}

#[tokio::test]
async fn with_the_sandbox_off_a_worker_may_do_what_the_service_may() {
    let server = Server::start(&["--workers", "1", "--worker-sandbox", "off"]);
    assert!(server.wait_logged("worker sandbox off").await);
    let mut client = server.client().await;
    for what in ["connect", "write", "read", "exec"] {
        let out = client.execute(probe(what, ExecutionMode::Isolated)).await.expect("probe").into_inner();
        assert_eq!(String::from_utf8_lossy(&out.output), "allowed", "{what}");
    }
}
