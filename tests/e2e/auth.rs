//! Authenticated clients: bearer tokens and client-certificate names
//! declared in `[[client]]` tables, task permissions by glob pattern,
//! health left open, and the settings that cannot work refused at start.

use std::{path::Path, process::Command, time::Duration};

use offload_e2e::{Server, bin_dir, metric_value, pki::Ca, request};
use offload_proto::offload::v1::{ExecuteRequest, ListTasksRequest, compute_client::ComputeClient};
use sha2::Digest as _;
use tonic::{Code, transport::Channel};

use crate::tls::tls_channel;

const BILLING_TOKEN: &str = "billing-secret-token-0123456789";
const OPS_TOKEN: &str = "ops-secret-token-9876543210";

fn sha256_hex(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// `body` carrying `authorization: <value>` when given.
pub(crate) fn authorized<T>(value: Option<&str>, body: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    if let Some(value) = value {
        request.metadata_mut().insert("authorization", value.parse().unwrap());
    }
    request
}

pub(crate) fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn hash(input: &[u8]) -> ExecuteRequest {
    request("hash.sha256", &[], input.to_vec())
}

/// The task names ListTasks gives `auth`.
async fn listed(client: &mut ComputeClient<Channel>, auth: &str) -> Vec<String> {
    let tasks = client.list_tasks(authorized(Some(auth), ListTasksRequest {})).await.expect("ListTasks").into_inner();
    tasks.tasks.into_iter().map(|t| t.name).collect()
}

fn write_config(dir: &Path, text: &str) -> String {
    let file = dir.join("offload.toml");
    std::fs::write(&file, text).unwrap();
    file.to_str().unwrap().to_string()
}

#[tokio::test]
async fn bearer_tokens_name_the_client_and_its_patterns_bound_what_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[[client]]\nname = \"billing\"\ntoken_sha256 = \"{}\"\ntasks = [\"hash.*\"]\nmax_in_flight = 8\n\n\
             [[client]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\ntasks = [\"*\"]\n",
            sha256_hex(BILLING_TOKEN),
            sha256_hex(OPS_TOKEN).to_uppercase()
        ),
    );
    let server = Server::start(&["--config", &config, "--metrics-listen", "127.0.0.1:0"]);
    let mut client = server.client().await;

    // No credential, a wrong token, another scheme: UNAUTHENTICATED, saying why.
    for (auth, says) in [
        (None, "requires credentials"),
        (Some(bearer("guessed-token").as_str()), "not one of a declared client"),
        (Some("Basic YmlsbGluZzpzZWNyZXQ="), "not `Bearer <token>`"),
        (Some("Bearer "), "not `Bearer <token>`"),
    ] {
        let status = client.execute(authorized(auth, hash(b"x"))).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{auth:?}: {status:?}");
        assert!(status.message().contains(says), "{auth:?}: {}", status.message());
    }
    let status = client.list_tasks(authorized(None, ListTasksRequest {})).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // billing runs what its patterns match, and nothing else.
    let billing = bearer(BILLING_TOKEN);
    let reply = client.execute(authorized(Some(&billing), hash(b"abc"))).await.expect("billing hashes").into_inner();
    assert_eq!(reply.output, sha2::Sha256::digest(b"abc").to_vec());
    let denied =
        client.execute(authorized(Some(&billing), request("compress.zstd", &[], b"abc".to_vec()))).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert_eq!(denied.message(), "client \"billing\" may not run task \"compress.zstd\" (its tasks: hash.*)");
    // Outside its patterns a name is refused whether it exists or not, and
    // an unknown name inside them lists only what it may run.
    let status = client.execute(authorized(Some(&billing), request("secret.task", &[], vec![]))).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client.execute(authorized(Some(&billing), request("hash.nope", &[], vec![]))).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(!status.message().contains("compress.zstd"), "{}", status.message());
    let billing_tasks = listed(&mut client, &billing).await;
    assert!(!billing_tasks.is_empty() && billing_tasks.iter().all(|t| t.starts_with("hash.")), "{billing_tasks:?}");
    // A batch: each item judged on its own.
    let items = vec![hash(b"a"), request("compress.zstd", &[], b"a".to_vec())];
    let mut results = client
        .execute_batch(authorized(Some(&billing), tokio_stream::iter(items)))
        .await
        .expect("batch accepted")
        .into_inner();
    let mut codes = Vec::new();
    while let Some(item) = results.message().await.expect("batch item") {
        codes.push(item.error.map_or(0, |e| e.code));
    }
    codes.sort();
    assert_eq!(codes, vec![0, Code::PermissionDenied as i32]);

    // ops (its hash given in upper case) runs everything and sees everything.
    let ops = bearer(OPS_TOKEN);
    client.execute(authorized(Some(&ops), request("compress.zstd", &[], b"abc".to_vec()))).await.expect("ops");
    let ops_tasks = listed(&mut client, &ops).await;
    assert!(ops_tasks.len() > billing_tasks.len() && ops_tasks.contains(&"compress.zstd".to_string()));

    // Health stays open for probes; reflection needs credentials.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let check = tonic_health::pb::HealthCheckRequest { service: "offload.v1.Compute".into() };
    assert_eq!(health.check(check).await.expect("health without credentials").into_inner().status, 1);
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let ask = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let refused = reflection.server_reflection_info(tokio_stream::iter(vec![ask])).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    // Refusals are counted by reason; the tokens never reach the log.
    let metrics = server.scrape();
    assert!(metric_value(&metrics, r#"offload_rejected_calls_total{reason="unauthenticated"}"#) >= 6.0);
    assert!(metric_value(&metrics, r#"offload_rejected_calls_total{reason="permission_denied"}"#) >= 3.0);
    let logs = server.logs().join("\n");
    assert!(logs.contains("call refused"), "refusals are logged");
    for secret in [BILLING_TOKEN, OPS_TOKEN, "guessed-token", &sha256_hex(BILLING_TOKEN)] {
        assert!(!logs.contains(secret), "the log holds {secret}");
    }

    // The CLI's --token.
    let cli = |token: Option<&str>| {
        let mut command = Command::new(bin_dir().join("offload"));
        command.args(["--server", &server.url(), "tasks"]).env_remove("OFFLOAD_TOKEN");
        if let Some(token) = token {
            command.env("OFFLOAD_TOKEN", token);
        }
        command.output().unwrap()
    };
    let out = cli(Some(BILLING_TOKEN));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hash.sha256") && !text.contains("compress.zstd"), "{text}");
    let out = cli(None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("requires credentials"));
}

#[tokio::test]
async fn a_client_certificate_name_is_the_identity_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let (cert, key) = server_ca.leaf(&["127.0.0.1"]).write(dir.path(), "server");
    let client_ca_file = client_ca.write(dir.path(), "client-ca.pem");
    let config = write_config(
        dir.path(),
        &format!(
            "tls_cert = {cert:?}\ntls_key = {key:?}\ntls_client_ca = {client_ca_file:?}\n\n\
             [[client]]\nname = \"billing\"\ncert_san = \"billing.internal\"\ntasks = [\"hash.sha256\"]\n\n\
             [[client]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\ntasks = [\"*\"]\n",
            sha256_hex(OPS_TOKEN)
        ),
    );
    let server = Server::start(&["--config", &config]);
    let channel = |leaf| {
        let server_ca = server_ca.pem();
        let server = &server;
        async move { tls_channel(server, &server_ca, Some(&leaf)).await.expect("mTLS connection") }
    };

    let mut billing = ComputeClient::new(channel(client_ca.leaf(&["billing.internal"])).await);
    let reply = billing.execute(hash(b"abc")).await.expect("billing by certificate").into_inner();
    assert_eq!(reply.output, sha2::Sha256::digest(b"abc").to_vec());
    let denied = billing.execute(request("compress.zstd", &[], b"abc".to_vec())).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // A certificate from the CA whose names match no client.
    let mut intruder = ComputeClient::new(channel(client_ca.leaf(&["intruder.internal"])).await);
    let status = intruder.execute(hash(b"abc")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("intruder.internal"), "{}", status.message());
    // The same connection with a token: the token names the client.
    intruder.execute(authorized(Some(&bearer(OPS_TOKEN)), hash(b"abc"))).await.expect("ops by token");
}

#[test]
fn credential_settings_that_cannot_work_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let start = |config: &str| {
        let file = write_config(dir.path(), config);
        let out = Command::new(bin_dir().join("offload-server")).args(["--config", &file]).output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let token = sha256_hex("t");
    for (config, says) in [
        ("[[client]]\nname = \"a\"\ntoken_sha256 = \"abc\"\ntasks = [\"*\"]\n", "64 hex digits"),
        (&format!("[[client]]\nname = \"a\"\ntoken_sha256 = \"{token}\"\n"), "tasks is missing"),
        (&format!("[[client]]\nname = \"a\"\ntoken_sha256 = \"{token}\"\ntasks = [\"[\"]\n"), "task pattern"),
        (
            &format!(
                "[[client]]\nname = \"a\"\ntoken_sha256 = \"{token}\"\ntasks = [\"*\"]\n[[client]]\nname = \"b\"\n"
            ),
            "neither token_sha256 nor cert_san",
        ),
        (
            &format!(
                "[[client]]\nname = \"a\"\ntoken_sha256 = \"{token}\"\ntasks = [\"*\"]\n[[client]]\nname = \"b\"\ntoken_sha256 = \"{token}\"\ntasks = [\"*\"]\n"
            ),
            "same credential",
        ),
        (
            "[[client]]\nname = \"a\"\ncert_san = \"a.internal\"\ntasks = [\"*\"]\n",
            "needs client certificates (--tls-client-ca)",
        ),
        ("[[client]]\nname = \"a\"\ntasks = [\"*\"]\n", "give it a token_sha256 or cert_san"),
    ] {
        let (code, err) = start(config);
        assert_eq!(code, 64, "{config}: {err}");
        assert!(err.contains(says), "{config}: {err}");
    }
}

#[tokio::test]
async fn an_open_port_beyond_loopback_is_warned_about() {
    let server = Server::start_exact(&["--listen", "0.0.0.0:0"]);
    assert!(
        offload_e2e::wait_for(Duration::from_secs(10), || server.logged("without authentication")).await,
        "no warning for an unauthenticated non-loopback port"
    );
    let quiet = Server::start(&[]);
    assert!(quiet.wait_logged("serving").await);
    assert!(!quiet.logged("without authentication"));
}
