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
