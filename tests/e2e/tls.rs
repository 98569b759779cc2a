//! TLS and mutual TLS on the gRPC port, with certificates made at test
//! time: tonic and Python grpcio clients over both, plaintext and a wrong
//! CA refused, a certificate rotated while a connection stays open, and the
//! CLI's TLS flags.

use std::{path::Path, process::Command, time::Duration};

use offload_e2e::{
    Server, bin_dir,
    pki::{Ca, Leaf},
    request, wait_for,
};
use offload_proto::offload::v1::compute_client::ComputeClient;
use sha2::Digest as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A TLS channel to `server` trusting `ca`, presenting `identity` if given.
pub async fn tls_channel(server: &Server, ca: &str, identity: Option<&Leaf>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| format!("{e:?}"))?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// One hash.sha256 call on `channel`: Ok when it returned the right digest.
async fn hash_call(channel: Channel) -> Result<(), String> {
    let input = b"over tls".to_vec();
    let reply = ComputeClient::new(channel)
        .execute(request("hash.sha256", &[], input.clone()))
        .await
        .map_err(|status| format!("{status:?}"))?
        .into_inner();
    assert_eq!(reply.output, sha2::Sha256::digest(&input).to_vec());
    Ok(())
}

/// A fresh connection trusting `ca` (with `identity`), then one call.
async fn call(server: &Server, ca: &str, identity: Option<&Leaf>) -> Result<(), String> {
    hash_call(tls_channel(server, ca, identity).await?).await
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs the Python grpcio check against `server` with TLS `args`.
async fn python_client(server: &Server, args: Vec<String>) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/run.sh");
    let addr = server.addr.to_string();
    tokio::task::spawn_blocking(move || Command::new("bash").arg(script).arg(addr).args(args).output())
        .await
        .unwrap()
        .expect("run the python client")
}

fn assert_python_ok(out: &std::process::Output) {
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("python grpcio client: ok"),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn tls_serves_grpc_clients_and_refuses_plaintext_and_an_unknown_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("offload test CA");
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"]).write(dir.path(), "server");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let server = Server::start(&["--tls-cert", path(&cert), "--tls-key", path(&key)]);
    assert!(server.wait_logged("serving TLS").await);

    call(&server, &ca.pem(), None).await.expect("a TLS call with the right CA");
    // A client that does not speak TLS gets no answer from the port.
    let plaintext = server.client().await.execute(request("hash.sha256", &[], b"x".to_vec())).await;
    assert!(plaintext.is_err(), "a plaintext call was answered: {plaintext:?}");
    // A client that trusts another CA refuses the server's certificate.
    let stranger = Ca::new("another CA");
    let refused = call(&server, &stranger.pem(), None).await;
    assert!(refused.is_err(), "a client trusting another CA connected");
    // The failed handshakes did not hurt the server.
    call(&server, &ca.pem(), None).await.expect("a TLS call after refused ones");

    // Python's grpcio with ssl_channel_credentials.
    assert_python_ok(&python_client(&server, vec![path(&ca_file).into()]).await);

    // The CLI: `offload health` over TLS (the probe's command), and refused
    // when it trusts the wrong CA.
    let health = |ca: &Path| {
        Command::new(bin_dir().join("offload"))
            .args(["--server", &format!("https://{}", server.addr), "--tls-ca", path(ca), "health"])
            .output()
            .unwrap()
    };
    let ok = health(&ca_file);
    assert!(ok.status.success(), "offload health over TLS: {}", String::from_utf8_lossy(&ok.stderr));
    let wrong = stranger.write(dir.path(), "stranger.pem");
    assert!(!health(&wrong).status.success(), "offload health trusted an unknown CA");
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let (cert, key) = server_ca.leaf(&["localhost", "127.0.0.1"]).write(dir.path(), "server");
    let client_ca_file = client_ca.write(dir.path(), "client-ca.pem");
    // Set through the environment, as containers do (the flags are used above).
    let server = Server::start_with_env(
        &["--listen", "127.0.0.1:0", "--debug-tasks"],
        &[
            ("OFFLOAD_TLS_CERT", path(&cert)),
            ("OFFLOAD_TLS_KEY", path(&key)),
            ("OFFLOAD_TLS_CLIENT_CA", path(&client_ca_file)),
        ],
    );

    let billing = client_ca.leaf(&["billing.internal"]);
    call(&server, &server_ca.pem(), Some(&billing)).await.expect("a call with a client certificate from the CA");
    let anonymous = call(&server, &server_ca.pem(), None).await;
    assert!(anonymous.is_err(), "a call without a client certificate was served");
    let forged = Ca::new("client CA").leaf(&["billing.internal"]);
    let forged = call(&server, &server_ca.pem(), Some(&forged)).await;
    assert!(forged.is_err(), "a client certificate from another CA of the same name was accepted");
    assert!(server.logged("TLS handshake failed"), "the refusals are logged");

    // grpcio with a client certificate; and without one it fails.
    let (client_cert, client_key) = billing.write(dir.path(), "billing");
    let server_ca_file = server_ca.write(dir.path(), "server-ca.pem");
    let with_cert = vec![path(&server_ca_file).into(), path(&client_cert).into(), path(&client_key).into()];
    assert_python_ok(&python_client(&server, with_cert).await);
    let without = python_client(&server, vec![path(&server_ca_file).into()]).await;
    assert!(!without.status.success(), "grpcio without a client certificate was served");

    // The CLI with --tls-cert/--tls-key.
    let health = Command::new(bin_dir().join("offload"))
        .args(["--server", &format!("https://{}", server.addr), "--tls-ca", path(&server_ca_file)])
        .args(["--tls-cert", path(&client_cert), "--tls-key", path(&client_key), "health"])
        .output()
        .unwrap();
    assert!(health.status.success(), "offload health with mTLS: {}", String::from_utf8_lossy(&health.stderr));
}

#[tokio::test]
async fn a_rotated_certificate_reaches_new_connections_while_open_ones_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("old CA");
    let (cert, key) = old_ca.leaf(&["127.0.0.1"]).write(dir.path(), "server");
    let server = Server::start(&["--tls-cert", path(&cert), "--tls-key", path(&key)]);
    let open = tls_channel(&server, &old_ca.pem(), None).await.expect("connect with the old CA");
    hash_call(open.clone()).await.expect("a call on the open connection");

    // Rotated in place, as cert-manager does: a new pair from a new CA.
    let new_ca = Ca::new("new CA");
    new_ca.leaf(&["127.0.0.1"]).write(dir.path(), "server");
    let mut rotated = false;
    for _ in 0..100 {
        if call(&server, &new_ca.pem(), None).await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated, "new connections did not get the new certificate within 10 s");
    assert!(call(&server, &old_ca.pem(), None).await.is_err(), "the old certificate is still served");
    // The connection opened before the rotation is untouched.
    hash_call(open.clone()).await.expect("a call on the connection opened before the rotation");

    // A broken key keeps the certificate that works, and says why.
    std::fs::write(&key, "not a key").unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || server.logged("keeping the previous certificate")).await,
        "the broken rotation was not logged"
    );
    call(&server, &new_ca.pem(), None).await.expect("the previous certificate still serves");
    hash_call(open).await.expect("the open connection still serves");
}

#[test]
fn tls_settings_that_cannot_work_stop_the_start_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let (cert, key) = ca.leaf(&["localhost"]).write(dir.path(), "server");
    let (_, other_key) = ca.leaf(&["localhost"]).write(dir.path(), "other");
    let start = |args: &[&str]| {
        let out = Command::new(bin_dir().join("offload-server")).args(args).output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = start(&["--tls-cert", path(&cert)]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("tls-cert") && err.contains("--tls-key"), "{err}");
    let (code, err) = start(&["--tls-cert", path(&cert), "--tls-key", path(&other_key)]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("cannot be used together"), "{err}");
    let (code, err) = start(&["--tls-cert", path(&cert), "--tls-key", "/no/such/key.pem"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("cannot read key /no/such/key.pem"), "{err}");
    let (code, err) = start(&["--tls-client-ca", path(&cert)]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("tls-client-ca") && err.contains("needs --tls-cert"), "{err}");
    // Relative paths in the config file are relative to its folder.
    let config = dir.path().join("offload.toml");
    std::fs::write(&config, "tls_cert = \"server.crt\"\ntls_key = \"nope.key\"\n").unwrap();
    let (code, err) = start(&["--config", path(&config)]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains(&format!("cannot read key {}", dir.path().join("nope.key").display())), "{err}");
    let _ = key;
}
