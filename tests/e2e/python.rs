//! Real non-Rust clients: Python's grpcio, with stubs generated from our
//! proto files, checks Execute hash.sha256 against hashlib; grpcurl works
//! from server reflection alone.

use std::process::Command;

use offload_e2e::Server;

#[tokio::test]
async fn python_grpcio_client_gets_correct_digests() {
    let server = Server::start(&[]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/run.sh");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash").arg(script).arg(server.addr.to_string()).output().map(|o| (o, server))
    })
    .await
    .unwrap()
    .expect("run the python client");
    let (out, _server) = out;
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("python grpcio client: ok"));
}

#[tokio::test]
async fn grpcurl_works_from_reflection_alone() {
    let server = Server::start(&[]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grpcurl/run.sh");
    let addr = server.addr.to_string();
    let out = tokio::task::spawn_blocking(move || Command::new("bash").arg(script).arg(addr).output())
        .await
        .unwrap()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("grpcurl: ok"));
}
