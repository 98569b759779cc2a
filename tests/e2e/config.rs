//! Configuration errors: the server refuses to start, says why, exits 64.

use std::process::Command;

use offload_e2e::bin_dir;

fn start(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(bin_dir().join("offload-server")).args(args).envs(env.iter().copied()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_bad_setting_exits_64_with_a_message() {
    let (code, err) = start(&["--listen", "nope"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--listen"), "{err}");

    let (code, err) = start(&[], &[("OFFLOAD_WORKER_NICE", "40")]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("worker-nice") && err.contains("0..=19"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("offload.toml");
    std::fs::write(&file, "pool_thread = 4\n").unwrap();
    let (code, err) = start(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("unknown field `pool_thread`"), "{err}");

    let (code, out) = start(&["--help"], &[]);
    assert_eq!(code, 0, "{out}");
}

/// OFFLOAD_DEBUG_TASKS takes the boolean words operators write (1/0,
/// true/false, yes/no, on/off, any case), as the README and the core
/// contract say; anything else exits 64 naming the variable.
#[tokio::test]
async fn boolean_environment_values_are_accepted_in_every_usual_spelling() {
    use offload_e2e::Server;
    use offload_proto::offload::v1::ListTasksRequest;

    for (word, listed) in [("1", true), ("yes", true), ("ON", true), ("True", true), ("0", false), ("off", false)] {
        let server =
            Server::start_with_env(&["--listen", "127.0.0.1:0", "--workers", "1"], &[("OFFLOAD_DEBUG_TASKS", word)]);
        let tasks = server.client().await.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
        let debug = tasks.iter().any(|t| t.name.starts_with("debug."));
        assert_eq!(debug, listed, "OFFLOAD_DEBUG_TASKS={word}");
    }
    for word in ["maybe", "2", "y"] {
        let (code, err) = start(&["--listen", "127.0.0.1:0"], &[("OFFLOAD_DEBUG_TASKS", word)]);
        assert_eq!(code, 64, "OFFLOAD_DEBUG_TASKS={word}: {err}");
        assert!(err.contains("OFFLOAD_DEBUG_TASKS") && err.contains("1/0, true/false, yes/no, on/off"), "{err}");
    }
}

/// The budget's environment variable, as deployments set it, and its
/// default, logged with where it came from.
#[tokio::test]
async fn the_inflight_budget_comes_from_the_environment_or_the_memory_limit() {
    use offload_e2e::Server;

    let set = Server::start_with_env(
        &["--listen", "127.0.0.1:0", "--workers", "1"],
        &[("OFFLOAD_MAX_INFLIGHT_BYTES", "536870912")],
    );
    assert!(set.wait_logged("in-flight bytes budget: 512 MiB (set)").await, "{:?}", set.logs());
    let default = Server::start_exact(&["--listen", "127.0.0.1:0", "--workers", "1"]);
    assert!(default.wait_logged("in-flight bytes budget").await);
    let line = default.logs().into_iter().find(|l| l.contains("in-flight bytes budget")).expect("budget logged");
    assert!(line.contains("(default, from") && line.contains("memory"), "{line}");
    let (code, err) = start(&["--listen", "127.0.0.1:0"], &[("OFFLOAD_MAX_INFLIGHT_BYTES", "0")]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("max-inflight-bytes"), "{err}");
}
