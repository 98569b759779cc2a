//! External programs declared in the config file, run inside workers.

use std::time::Duration;

use offload_e2e::{Server, children_of, request, wait_for, with_deadline};
use offload_proto::offload::v1::{ExecuteRequest, ExecutionMode, ListTasksRequest};
use tonic::Code;

const CONFIG: &str = r#"
[[exec]]
name = "exec.wc"
description = "counts the input's bytes"
program = "/usr/bin/wc"
args = ["-c"]

[[exec]]
name = "exec.head"
program = "/usr/bin/head"
params = [{ name = "bytes", pattern = "[0-9]{1,6}", flag = "-c" }]

[[exec]]
name = "exec.fail"
program = "/bin/sh"
args = ["-c", "echo something went wrong >&2; exit 3"]

[[exec]]
name = "exec.slow"
program = "/bin/sleep"
args = ["30"]
timeout_secs = 0.5

[[exec]]
name = "exec.fds"
program = "/bin/ls"
args = ["/proc/self/fd"]
sandbox = { read = ["/proc"] }

[[exec]]
name = "exec.sleep"
program = "/bin/sleep"
args = ["30"]

[[exec]]
name = "exec.upper"
description = "upper-cases its input: a pure function, so cacheable"
program = "/usr/bin/tr"
args = ["a-z", "A-Z"]
cacheable = true
version = 2
"#;

fn start() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offload.toml");
    std::fs::write(&path, CONFIG).unwrap();
    let server = Server::start(&["--workers", "1", "--config", path.to_str().unwrap()]);
    (server, dir)
}

#[tokio::test]
async fn exec_tasks_run_declared_programs_in_workers() {
    let (server, _dir) = start();
    let mut client = server.client().await;

    let out = client.execute(request("exec.wc", &[], &b"hello world"[..])).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), b"11\n");
    assert_eq!(out.mode, ExecutionMode::Isolated as i32);
    let out = client.execute(request("exec.head", &[("bytes", "4")], &b"abcdefgh"[..])).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), b"abcd");

    // The program holds its stdio and the directory it lists, not the
    // worker's socket to the front.
    let out = client.execute(request("exec.fds", &[], vec![])).await.unwrap().into_inner();
    assert_eq!(String::from_utf8_lossy(&out.output).split_whitespace().collect::<Vec<_>>(), ["0", "1", "2", "3"]);

    let err = client.execute(request("exec.head", &[("bytes", "4 /etc/passwd")], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = client.execute(request("exec.head", &[], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "required param: {err:?}");
    let pool = ExecuteRequest { mode: ExecutionMode::Pool as i32, ..request("exec.wc", &[], vec![]) };
    let err = client.execute(pool).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("allowed: ISOLATED"));

    let err = client.execute(request("exec.fail", &[], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("exited with status 3") && err.message().contains("something went wrong"),
        "{}",
        err.message()
    );

    let tasks = client.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let wc = tasks.iter().find(|t| t.name == "exec.wc").unwrap();
    assert_eq!(
        (wc.description.as_str(), wc.allowed_modes.as_slice()),
        ("counts the input's bytes", &[ExecutionMode::Isolated as i32][..])
    );
}

#[tokio::test]
async fn exec_timeouts_and_deadlines_kill_the_program() {
    let (server, _dir) = start();
    let worker = server.wait_for_workers(1, Duration::from_secs(10)).await[0];
    let mut client = server.wire_client();

    let err = client.execute(request("exec.slow", &[], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "task timeout: {err:?}");

    let body = request("exec.sleep", &[], vec![]);
    let err = client.execute(with_deadline(body, Duration::from_millis(300))).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // No program is left running under the worker.
    assert!(wait_for(Duration::from_secs(3), || children_of(worker).is_empty()).await, "{:?}", children_of(worker));
    let out = client.execute(request("exec.wc", &[], &b"x"[..])).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), b"1\n");
}

#[tokio::test]
async fn an_exec_task_is_cached_only_when_its_entry_says_so() {
    let (server, _dir) = start();
    let mut client = server.client().await;
    let header = |response: &tonic::Response<_>| response.metadata().get("offload-cache").unwrap().clone();
    for expected in ["miss", "hit"] {
        let response = client.execute(request("exec.upper", &[], &b"shout"[..])).await.unwrap();
        assert_eq!(header(&response), expected);
        assert_eq!(response.into_inner().output.as_ref(), b"SHOUT");
    }
    for _ in 0..2 {
        let response = client.execute(request("exec.wc", &[], &b"count me"[..])).await.unwrap();
        assert_eq!(header(&response), "miss", "exec tasks are not cacheable unless declared");
    }
    let tasks = client.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let upper = tasks.iter().find(|t| t.name == "exec.upper").unwrap();
    assert_eq!((upper.cacheable, upper.version), (true, 2));
}
