//! The admin service (`offload.admin.v1`) and the CLI views on it: the
//! workers and task totals it reports, recycling a worker, changing how
//! many run, and who may use it.

use std::{collections::HashSet, process::Command, time::Duration};

use offload_e2e::{Server, bin_dir, is_alive, request, wait_for};
use offload_proto::offload::{
    admin::v1::{
        RecycleWorkerRequest, SetWorkersRequest, SnapshotRequest, SnapshotResponse, admin_client::AdminClient,
    },
    v1::{ExecuteRequest, ExecutionMode},
};
use sha2::Digest as _;
use tonic::{Code, transport::Channel};

async fn snapshot(admin: &mut AdminClient<Channel>) -> SnapshotResponse {
    admin.snapshot(SnapshotRequest {}).await.expect("snapshot").into_inner()
}

/// The pids of Offload's own workers in `now`.
fn own_pids(now: &SnapshotResponse) -> HashSet<u32> {
    now.workers.iter().filter(|w| w.pool == "ISOLATED" && w.pid != 0).map(|w| w.pid).collect()
}

/// Waits (bounded) until the pool has `n` started workers, as the admin
/// service and the process table both say; returns their pids.
async fn settled(server: &Server, admin: &mut AdminClient<Channel>, n: usize) -> HashSet<u32> {
    let mut pids = HashSet::new();
    for _ in 0..200 {
        let now = snapshot(admin).await;
        pids = own_pids(&now);
        let children: HashSet<u32> = server.worker_pids().into_iter().collect();
        if pids.len() == n && now.workers.len() == n && pids == children {
            return pids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the pool did not settle at {n} workers: admin says {pids:?}, children {:?}", server.worker_pids());
}

#[tokio::test]
async fn the_admin_service_reports_workers_and_tasks_recycles_one_and_resizes_the_pool() {
    let server = Server::start(&["--workers", "2"]);
    let mut client = server.client().await;
    let isolated = |input: &[u8]| ExecuteRequest {
        mode: ExecutionMode::Isolated as i32,
        ..request("hash.sha256", &[], input.to_vec())
    };
    for i in 0..5u8 {
        client.execute(request("hash.sha256", &[], vec![i])).await.expect("POOL call");
        // Another input: the same one would be a cache hit, run nowhere.
        let out = client.execute(isolated(&[i, i])).await.expect("ISOLATED call").into_inner();
        assert_eq!(out.output, sha2::Sha256::digest([i, i]).to_vec());
    }
    let mut admin = AdminClient::new(server.channel().await);
    let pids = settled(&server, &mut admin, 2).await;

    let now = snapshot(&mut admin).await;
    let pool = now.tasks.iter().find(|t| t.task == "hash.sha256" && t.mode == "POOL").expect("POOL totals");
    let iso = now.tasks.iter().find(|t| t.task == "hash.sha256" && t.mode == "ISOLATED").expect("ISOLATED totals");
    assert_eq!((pool.calls, pool.failed, iso.calls), (5, 0, 5));
    assert_eq!(pool.codes.get("OK"), Some(&5), "{:?}", pool.codes);
    assert!(iso.recent_p50_run_seconds > 0.0 && iso.recent_p99_run_seconds >= iso.recent_p50_run_seconds, "{iso:?}");
    assert!(now.inflight_budget > 0 && now.inflight_bytes <= now.inflight_budget, "{now:?}");
    assert!(iso.run_seconds > 0.0 && iso.ran == 5);
    assert!(now.workers.iter().all(|w| w.state == "idle" && w.rss_bytes > 0 && w.age_seconds > 0.0), "{now:?}");
    assert_eq!(now.workers.iter().map(|w| w.tasks_done).sum::<u64>(), 5);
    let own = now.executors.iter().find(|e| e.executor == "ISOLATED").expect("ISOLATED executor");
    assert_eq!(own.size, 2);

    // Recycling: a new process takes the slot, the old one exits.
    let old = *pids.iter().next().unwrap();
    admin.recycle_worker(RecycleWorkerRequest { pid: old }).await.expect("recycle");
    let replaced = wait_for(Duration::from_secs(10), || !is_alive(old)).await;
    assert!(replaced, "worker {old} still runs after being recycled");
    let after = settled(&server, &mut admin, 2).await;
    assert!(!after.contains(&old) && after.len() == 2, "{after:?}");
    let missing = admin.recycle_worker(RecycleWorkerRequest { pid: 1 }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Resizing, up and down; calls keep working.
    let previous = admin.set_workers(SetWorkersRequest { pool: String::new(), workers: 3 }).await.expect("grow");
    assert_eq!(previous.into_inner().previous, 2);
    settled(&server, &mut admin, 3).await;
    admin.set_workers(SetWorkersRequest { pool: "ISOLATED".into(), workers: 1 }).await.expect("shrink");
    settled(&server, &mut admin, 1).await;
    client.execute(isolated(b"after")).await.expect("a call after resizing");
    let bad = admin.set_workers(SetWorkersRequest { pool: "nope".into(), workers: 2 }).await.unwrap_err();
    assert_eq!(bad.code(), Code::NotFound);
    assert!(bad.message().contains("ISOLATED"), "{}", bad.message());
    let bad = admin.set_workers(SetWorkersRequest { pool: String::new(), workers: 0 }).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // The CLI's views.
    let cli = |args: &[&str]| {
        let out =
            Command::new(bin_dir().join("offload")).arg("--server").arg(server.url()).args(args).output().unwrap();
        assert!(out.status.success(), "offload {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let pid = own_pids(&snapshot(&mut admin).await).into_iter().next().unwrap();
    let workers = cli(&["workers"]);
    assert!(workers.contains("PID") && workers.contains(&pid.to_string()), "{workers}");
    let top = cli(&["top", "--interval", "0.2", "--iterations", "2"]);
    assert!(top.contains("hash.sha256") && top.contains("CALLS/S") && top.contains(&pid.to_string()), "{top}");
    cli(&["scale", "2"]);
    settled(&server, &mut admin, 2).await;
}

#[tokio::test]
async fn with_authenticated_clients_only_admin_clients_may_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let hash = |token: &str| hex::encode(sha2::Sha256::digest(token.as_bytes()));
    let config = dir.path().join("offload.toml");
    std::fs::write(
        &config,
        format!(
            "[[client]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\ntasks = [\"*\"]\nadmin = true\n\n\
             [[client]]\nname = \"billing\"\ntoken_sha256 = \"{}\"\ntasks = [\"hash.*\"]\n",
            hash("ops-token"),
            hash("billing-token")
        ),
    )
    .unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap(), "--workers", "1"]);
    let mut admin = AdminClient::new(server.channel().await);
    let ask = |token: Option<&str>| {
        let mut request = tonic::Request::new(SnapshotRequest {});
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    };
    assert_eq!(admin.snapshot(ask(None)).await.unwrap_err().code(), Code::Unauthenticated);
    let denied = admin.snapshot(ask(Some("billing-token"))).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("admin = true"), "{}", denied.message());
    let now = admin.snapshot(ask(Some("ops-token"))).await.expect("an admin client").into_inner();
    assert_eq!(now.workers.len(), 1);
    // The CLI with the admin's token.
    let out = Command::new(bin_dir().join("offload"))
        .args(["--server", &server.url(), "--token", "ops-token", "workers"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
