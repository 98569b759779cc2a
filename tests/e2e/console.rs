//! The web console in a real browser: Debian's headless Chromium, driven by
//! playwright-core (`tests/console/check.js`), loads the page the server
//! embeds and calls the gRPC port through gRPC-Web: the overview updating
//! as calls run, the task list, a
//! hash.sha256 run from the form, a thumbnail that renders, a failing call
//! with its status, a worker recycled and the pool resized from the
//! workers view, a job submitted from outside listed, progressing and
//! cancelled from its page. Screenshots are written under target/console/.

use std::{path::PathBuf, process::Command};

use offload_e2e::{Server, console_test_modules, from_debian, http_get};
use offload_proto::offload::v1::{ExecutionMode, SubmitJobRequest};

/// Debian's Chromium, installed if missing.
fn chromium() -> PathBuf {
    from_debian("chromium", || {
        ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().map(PathBuf::from).find(|p| p.exists())
    })
}

/// Runs the browser check `script` (in tests/console) with `args` after
/// the console's URL, the screenshot folder and Chromium; it must print
/// `ok_line`.
async fn browser_check(script: &str, url: String, args: Vec<std::ffi::OsString>, ok_line: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shots = root.join("../target/console");
    std::fs::create_dir_all(&shots).unwrap();
    let (chromium, modules, script) = (chromium(), console_test_modules(), root.join("console").join(script));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node").arg(script).arg(url).arg(shots).arg(chromium).args(args).env("NODE_PATH", modules).output()
    })
    .await
    .unwrap()
    .expect("run node");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(ok_line),
        "the browser check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The console's address, from the server's log.
async fn console_url(server: &Server) -> String {
    assert!(server.wait_logged("console on http://").await, "{:?}", server.logs());
    let line = server.logs().into_iter().find(|l| l.contains("console on http://")).unwrap();
    let at = line.find("http://").unwrap();
    line[at..].split(|c: char| c == '"' || c.is_whitespace()).next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_runs_tasks_manages_workers_and_cancels_a_job_in_a_real_browser() {
    let server = Server::start(&["--console-listen", "127.0.0.1:0", "--workers", "2"]);
    let url = console_url(&server).await;
    server.wait_for_workers(2, std::time::Duration::from_secs(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let picture = dir.path().join("picture.png");
    image::RgbImage::from_fn(320, 200, |x, y| image::Rgb([x as u8, y as u8, 90])).save(&picture).unwrap();
    // A job submitted from outside: a minute of spinning, reporting progress.
    let spin = SubmitJobRequest {
        mode: ExecutionMode::Pool as i32,
        ..crate::jobs::submit("debug.spin", &[("ms", "60000")], b"")
    };
    let job = crate::jobs::jobs(&server).await.submit(spin).await.unwrap().into_inner().id;
    // Calls run all along, for the overview to show.
    let mut client = server.client().await;
    let load = tokio::spawn(async move {
        let mut pace = tokio::time::interval(std::time::Duration::from_millis(5));
        loop {
            pace.tick().await;
            let _ = client.execute(offload_e2e::request("debug.echo", &[], &b"load"[..])).await;
        }
    });
    browser_check("check.js", url, vec![picture.into(), job.into()], "console: ok").await;
    load.abort();
}

#[tokio::test]
async fn the_console_may_share_the_metrics_address_and_serves_only_its_files() {
    let server = Server::start(&["--metrics-listen", "127.0.0.1:0", "--console-listen", "127.0.0.1:0"]);
    // Port 0 twice: two addresses. The shared case needs one fixed port.
    let url = console_url(&server).await;
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let (status, page) = http_get(addr, "/").unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("<title>Offload console</title>"), "{page}");
    assert_eq!(http_get(addr, "/../Cargo.toml").unwrap().0, 404);
    let (status, config) = http_get(addr, "/config.json").unwrap();
    assert_eq!((status, config), (200, format!(r#"{{"grpcPort":{},"grpcScheme":"http"}}"#, server.addr.port())));
    // The environment names it as well as the flag.
    let from_env = Server::start_with_env(&["--listen", "127.0.0.1:0"], &[("OFFLOAD_CONSOLE_LISTEN", "127.0.0.1:0")]);
    let env_url = console_url(&from_env).await;
    assert_eq!(http_get(env_url.trim_start_matches("http://"), "/").unwrap().0, 200);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let both = format!("127.0.0.1:{port}");
    let shared = Server::start(&["--metrics-listen", &both, "--console-listen", &both]);
    assert_eq!(console_url(&shared).await, format!("http://{both}"));
    assert_eq!(http_get(&both, "/").unwrap().0, 200, "the page");
    assert!(http_get(&both, "/metrics").unwrap().1.contains("offload_inflight_bytes"), "and the metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_declared_clients_the_console_asks_for_a_token_and_refuses_without_one() {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let token = "console-token-0123456789";
    let config = dir.path().join("offload.toml");
    let sha = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    std::fs::write(&config, format!("[[client]]\nname = \"hashes\"\ntoken_sha256 = \"{sha}\"\ntasks = [\"hash.*\"]\n"))
        .unwrap();
    let server = Server::start(&["--console-listen", "127.0.0.1:0", "--config", config.to_str().unwrap()]);
    let url = console_url(&server).await;
    browser_check("token.js", url, vec![token.into()], "console token: ok").await;
}
