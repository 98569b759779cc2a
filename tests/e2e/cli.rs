//! The `offload` command-line client against a real server.

use std::process::Command;

use offload_e2e::{Server, bin_dir};
use sha2::Digest as _;

fn offload(server: &Server, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(bin_dir().join("offload"))
        .arg("--server")
        .arg(server.url())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn offload");
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn the_cli_lists_runs_and_reports_errors() {
    let server = Server::start(&[]);

    let out = offload(&server, &["tasks"], None);
    assert!(out.status.success());
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(listing.contains("primes.count") && listing.contains("limit"), "{listing}");

    let out = offload(&server, &["run", "hash.sha256", "--input", "-", "--hex"], Some(b"abc"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    let out = offload(&server, &["run", "primes.count", "-p", "limit=100"], None);
    assert_eq!(out.stdout, b"25");

    let dir = tempfile::tempdir().unwrap();
    let packed = dir.path().join("packed.zst");
    let out =
        offload(&server, &["run", "compress.zstd", "-d", "hello hello hello", "-o", packed.to_str().unwrap()], None);
    assert!(out.status.success());
    assert_eq!(zstd::decode_all(std::fs::read(&packed).unwrap().as_slice()).unwrap(), b"hello hello hello");

    let out = offload(&server, &["run", "debug.sleep", "-p", "ms=5000", "--timeout", "0.2"], None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("DeadlineExceeded"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = offload(&server, &["run", "no.such"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));

    let out = offload(&server, &["health"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
    let out = offload(&server, &["health", "--service", "offload.v1.Compute"], None);
    assert!(out.status.success());
    let out = offload(&server, &["health", "--service", "no.such.Service"], None);
    assert!(!out.status.success(), "an unknown service is not healthy");
}

#[tokio::test]
async fn the_cli_submits_waits_for_lists_and_cancels_jobs() {
    let server = Server::start(&[]);
    let text = |out: &std::process::Output| String::from_utf8_lossy(&out.stdout).trim().to_string();

    let out = offload(&server, &["submit", "hash.sha256", "--input", "-", "--wait", "--hex"], Some(b"abc"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text(&out), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");

    let out = offload(&server, &["submit", "debug.spin", "-p", "ms=30000", "--key", "long-one"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = text(&out);
    assert_eq!(id.len(), 32, "{id}");
    let again = offload(&server, &["submit", "debug.spin", "-p", "ms=30000", "--key", "long-one"], None);
    assert_eq!(text(&again), id, "the same key: the same job");

    let listed = text(&offload(&server, &["jobs"], None));
    assert!(listed.lines().any(|l| l.starts_with(&id) && l.ends_with("debug.spin")), "{listed}");
    assert!(listed.lines().any(|l| l.contains("SUCCEEDED") && l.ends_with("hash.sha256")), "{listed}");
    let succeeded = text(&offload(&server, &["jobs", "--state", "succeeded"], None));
    assert_eq!(succeeded.lines().count(), 1, "{succeeded}");

    let out = offload(&server, &["cancel", &id], None);
    assert!(out.status.success() && text(&out).starts_with(&id), "{}", String::from_utf8_lossy(&out.stderr));
    let out = offload(&server, &["wait", &id], None);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&format!("job {id} cancelled: Cancelled")), "{said}");

    // `offload wait ID -o FILE` writes the output of a job submitted without --wait.
    let out = offload(&server, &["submit", "compress.zstd", "-d", "hello hello hello"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("packed.zst");
    let waited = offload(&server, &["wait", &text(&out), "-o", file.to_str().unwrap()], None);
    assert!(waited.status.success(), "{}", String::from_utf8_lossy(&waited.stderr));
    assert_eq!(zstd::decode_all(&std::fs::read(&file).unwrap()[..]).unwrap(), b"hello hello hello");
}

#[tokio::test]
async fn the_cli_says_when_the_cache_answered_and_passes_directives() {
    let server = Server::start(&[]);
    let run = |extra: &[&str]| {
        let out = offload(&server, &[&["run", "hash.sha256", "-d", "cli cache", "--hex", "-v"], extra].concat(), None);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stderr).unwrap()
    };
    assert!(!run(&[]).contains("from the result cache"), "the first run runs");
    assert!(run(&[]).contains("from the result cache"), "the second is a hit");
    assert!(!run(&["--cache", "no-cache"]).contains("from the result cache"), "no-cache runs it");
    let out = offload(&server, &["run", "hash.sha256", "-d", "x", "--cache", "max-age=1"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max-age=1"), "{}", String::from_utf8_lossy(&out.stderr));
    // Submit takes them too.
    let bad = offload(&server, &["submit", "hash.sha256", "-d", "cli cache", "--cache", "max-age=1"], None);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("max-age=1"));
    let job = ["submit", "hash.sha256", "-d", "cli cache", "--cache", "no-cache", "--wait", "--hex", "--no-progress"];
    let out = offload(&server, &job, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let digest = hex::encode(sha2::Sha256::digest(b"cli cache"));
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), digest);
}
