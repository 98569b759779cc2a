//! gRPC-Web: the official grpc-web client library (from npm, run by Node)
//! calls Execute, ListTasks and ExecuteStream over HTTP/1.1, gets an error
//! status, and sees the CORS answers of `--cors-allowed-origins`.

use std::{path::Path, process::Command};

use offload_e2e::{Server, grpc_web_modules};

#[tokio::test]
async fn a_grpc_web_client_calls_over_http1_with_cors_for_the_allowed_origin() {
    let server = Server::start(&["--cors-allowed-origins", "https://app.example"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (script, proto) = (root.join("grpcweb/check.js"), root.join("../proto"));
    let url = server.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .arg(url)
            .arg(proto)
            .arg("https://app.example")
            .env("NODE_PATH", grpc_web_modules())
            .output()
    })
    .await
    .unwrap()
    .expect("run node (Node 18+ is needed for the gRPC-Web test)");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("grpc-web client: ok"),
        "grpc-web client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_malformed_origin_is_refused_at_start() {
    let out = Command::new(offload_e2e::bin_dir().join("offload-server"))
        .args(["--cors-allowed-origins", "app.example/path"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cors-allowed-origins"));
}
