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

/// The default budget is a quarter of the memory limit of the server's
/// cgroup (v2 `memory.max` or v1 `memory.limit_in_bytes`), as in a container
/// or a Kubernetes pod. The test makes a child memory cgroup of 1 GiB (it
/// runs as root here) and starts the server inside it.
#[test]
fn the_default_budget_is_a_quarter_of_the_cgroup_memory_limit() {
    use std::io::{BufRead as _, BufReader};

    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let v1 = own.lines().find_map(|l| l.split(':').nth(2).filter(|_| l.split(':').nth(1) == Some("memory")));
    let (dir, limit_file) = match (v1, own.lines().find_map(|l| l.strip_prefix("0::"))) {
        (Some(path), _) => (format!("/sys/fs/cgroup/memory{path}"), "memory.limit_in_bytes"),
        (None, Some(path)) => (format!("/sys/fs/cgroup{path}"), "memory.max"),
        (None, None) => panic!("no memory cgroup in {own}"),
    };
    let dir = std::path::Path::new(&dir).join(format!("offload-e2e-{}", std::process::id()));
    if let Err(err) = std::fs::create_dir(&dir).and_then(|()| std::fs::write(dir.join(limit_file), "1073741824")) {
        // Not root, or no writable memory controller: nothing to measure.
        eprintln!("skipped: cannot make a memory cgroup at {}: {err}", dir.display());
        let _ = std::fs::remove_dir(&dir);
        return;
    }
    let procs = dir.join("cgroup.procs");
    let script = format!(
        "echo $$ > {} && exec {} --listen 127.0.0.1:0 --workers 1 --log-format text",
        procs.display(),
        bin_dir().join("offload-server").display()
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &script])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("in-flight bytes budget") || l.contains("error"));
    let _ = child.kill();
    let _ = child.wait();
    // Its workers leave the cgroup as they die (PR_SET_PDEATHSIG); a cgroup
    // can be removed once empty.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(&procs).is_ok_and(|p| !p.trim().is_empty()) && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::remove_dir(&dir).unwrap_or_else(|err| panic!("removing {}: {err}", dir.display()));
    let line = line.expect("the server logs its budget");
    assert!(line.contains("256 MiB (default, from 1024 MiB of cgroup"), "{line}");
}
