//! ISOLATED mode against real worker processes: results, crashes,
//! deadlines and cancellation, limits, recycling, outside kills, hangs, and
//! no worker outliving the front.

use std::time::{Duration, Instant};

use futures::future::join_all;
use nix::{sys::signal::Signal, unistd::Pid};
use offload_e2e::{Server, is_alive, request, wait_for, with_deadline};
use offload_proto::offload::v1::{ExecuteRequest, ExecuteResponse, ExecutionMode};
use sha2::Digest;
use tonic::Code;

fn isolated(task: &str, params: &[(&str, &str)], input: impl Into<bytes::Bytes>) -> ExecuteRequest {
    ExecuteRequest { mode: ExecutionMode::Isolated as i32, ..request(task, params, input) }
}

fn signal(pid: u32, signal: Signal) {
    nix::sys::signal::kill(Pid::from_raw(pid as i32), signal).expect("signal worker");
}

fn pid_of(response: &ExecuteResponse) -> u32 {
    response.stats.as_ref().unwrap().worker_pid
}

#[tokio::test]
async fn tasks_run_in_worker_processes_with_the_same_results() {
    let server = Server::start(&["--workers", "2"]);
    let workers = server.wait_for_workers(2, Duration::from_secs(10)).await;
    let mut client = server.client().await;
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + i / 1000) as u8).collect();

    let out = client.execute(isolated("hash.sha256", &[], data.clone())).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), sha2::Sha256::digest(&data).as_slice());
    assert_eq!(out.mode, ExecutionMode::Isolated as i32);
    assert!(workers.contains(&pid_of(&out)), "{} not among {workers:?}", pid_of(&out));

    let out = client.execute(isolated("debug.echo", &[], data.clone())).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), data.as_slice(), "5 MB through the socket and back");
    let out = client.execute(isolated("primes.count", &[("limit", "1000000")], vec![])).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), b"78498");
    let packed = client.execute(isolated("compress.zstd", &[], data.clone())).await.unwrap().into_inner().output;
    // decompress.zstd and image.thumbnail default to ISOLATED.
    let out = client.execute(request("decompress.zstd", &[], packed)).await.unwrap().into_inner();
    assert_eq!((out.output.as_ref(), out.mode), (data.as_slice(), ExecutionMode::Isolated as i32));
    let err = client.execute(isolated("primes.count", &[("limit", "x")], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client.execute(isolated("debug.panic", &[], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(err.message().contains("panicked"), "{}", err.message());
    // The worker that panicked answered, then exited: it is replaced.
    assert!(
        server.wait_logged("exited after its task panicked while running debug.panic; replacing it").await,
        "{:?}",
        server.logs()
    );
    let after = server.wait_for_workers(2, Duration::from_secs(10)).await;
    assert_eq!(after.iter().filter(|pid| workers.contains(pid)).count(), 1, "{workers:?} then {after:?}");
}

#[tokio::test]
async fn a_crash_fails_only_its_call_names_the_cause_and_the_worker_is_replaced() {
    let server = Server::start(&["--workers", "2"]);
    let before = server.wait_for_workers(2, Duration::from_secs(10)).await;
    let mut client = server.client().await;
    let mut bystander_client = server.client().await;
    let bystander =
        tokio::spawn(async move { bystander_client.execute(isolated("debug.sleep", &[("ms", "600")], vec![])).await });
    for (kind, signal) in [("abort", "SIGABRT"), ("segv", "SIGSEGV")] {
        let err = client.execute(isolated("debug.abort", &[("kind", kind)], vec![])).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{err:?}");
        let message = err.message();
        assert!(
            message.starts_with("worker ")
                && message.contains(&format!("died with {signal} while running debug.abort")),
            "{message}"
        );
    }
    let other = bystander.await.unwrap().expect("the call on the other worker is unaffected");
    assert!(before.contains(&pid_of(&other.into_inner())));
    let after = server.wait_for_workers(2, Duration::from_secs(10)).await;
    assert_ne!(after, before, "crashed workers were replaced");
    assert!(
        server.wait_logged("died with SIGSEGV while running debug.abort; replacing it").await,
        "{:?}",
        server.logs()
    );
}

#[tokio::test]
async fn ten_aborts_in_a_row_then_twenty_good_calls() {
    let server = Server::start(&["--workers", "2"]);
    server.wait_for_workers(2, Duration::from_secs(10)).await;
    let mut client = server.client().await;
    for _ in 0..10 {
        let err = client.execute(isolated("debug.abort", &[], vec![])).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{err:?}");
    }
    for i in 0..20 {
        let body = isolated("debug.echo", &[], format!("call {i}").into_bytes());
        let out =
            client.execute(with_deadline(body, Duration::from_secs(10))).await.expect("good call after the aborts");
        assert_eq!(out.into_inner().output.as_ref(), format!("call {i}").as_bytes());
    }
    server.wait_for_workers(2, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_deadline_stops_the_task_with_the_cancel_frame_and_keeps_the_worker() {
    let server = Server::start(&["--workers", "1"]);
    let before = server.wait_for_workers(1, Duration::from_secs(10)).await;
    let mut client = server.wire_client();
    let started = Instant::now();
    let body = isolated("debug.spin", &[("ms", "60000")], vec![]);
    let err = client.execute(with_deadline(body, Duration::from_millis(300))).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The task saw its deadline (by itself or through the cancel frame) and
    // the same worker serves the next call at once: the spin really stopped.
    let out =
        client.execute(with_deadline(isolated("debug.echo", &[], &b"x"[..]), Duration::from_secs(2))).await.unwrap();
    assert_eq!(vec![pid_of(&out.into_inner())], before);
}

#[tokio::test]
async fn a_task_that_ignores_the_cancel_frame_is_killed_and_its_worker_replaced() {
    let server = Server::start(&["--workers", "1", "--worker-heartbeat-timeout-ms", "30000"]);
    let before = server.wait_for_workers(1, Duration::from_secs(10)).await;
    let mut client = server.wire_client();
    let call = tokio::spawn(async move {
        let body = isolated("debug.sleep", &[("ms", "60000")], vec![]);
        client.execute(with_deadline(body, Duration::from_millis(1500))).await
    });
    // A stopped process answers nothing: neither the cancel frame nor SIGTERM.
    // Whether it stops before or after reading the task, the ladder's last
    // rung is what ends it.
    signal(before[0], Signal::SIGSTOP);
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        wait_for(Duration::from_secs(5), || server.logged("debug.sleep stopped by SIGKILL; worker killed")).await,
        "{:?}",
        server.logs()
    );
    let after = server.wait_for_workers(1, Duration::from_secs(10)).await;
    assert_ne!(after, before);
    assert!(!is_alive(before[0]));
}

#[tokio::test]
async fn a_client_that_goes_away_frees_its_worker() {
    let server = Server::start(&["--workers", "1"]);
    let before = server.wait_for_workers(1, Duration::from_secs(10)).await;
    let mut client = server.client().await;
    let stream = super::start_running(&mut client, isolated("debug.spin", &[("ms", "60000")], vec![])).await;
    drop(stream);
    assert!(server.wait_logged("debug.spin stopped by the cancel frame").await, "{:?}", server.logs());
    let body = isolated("debug.echo", &[], &b"next"[..]);
    let out = client.execute(with_deadline(body, Duration::from_secs(2))).await.expect("the worker is free again");
    assert_eq!(vec![pid_of(&out.into_inner())], before);
}

#[tokio::test]
async fn the_memory_limit_fails_the_call_with_resource_exhausted_and_replaces_the_worker() {
    let server = Server::start(&["--workers", "1", "--worker-memory-limit-bytes", "268435456"]);
    let before = server.wait_for_workers(1, Duration::from_secs(10)).await;
    let mut client = server.client().await;
    let err = client.execute(isolated("debug.alloc", &[("bytes", "1073741824")], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let after = server.wait_for_workers(1, Duration::from_secs(10)).await;
    assert_ne!(after, before);
    assert!(server.wait_logged("exceeded its memory limit while running debug.alloc").await, "{:?}", server.logs());
    // Within the limit it works.
    let out = client.execute(isolated("debug.alloc", &[("bytes", "16777216")], vec![])).await.unwrap().into_inner();
    assert_eq!(out.output.as_ref(), b"16777216");
}

#[tokio::test]
async fn workers_run_niced_without_core_dumps_under_their_address_space_limit() {
    let server = Server::start(&["--workers", "1", "--worker-nice", "7", "--worker-memory-limit-bytes", "1073741824"]);
    let pid = server.wait_for_workers(1, Duration::from_secs(10)).await[0];
    let worker = offload_e2e::process(pid).expect("worker in /proc");
    assert_eq!(worker.stat().unwrap().nice, 7, "nice level");
    let limits = worker.limits().unwrap();
    // (soft, hard), None for unlimited.
    let values = |limit: procfs::process::Limit| {
        [limit.soft_limit, limit.hard_limit].map(|value| match value {
            procfs::process::LimitValue::Value(n) => Some(n),
            procfs::process::LimitValue::Unlimited => None,
        })
    };
    assert_eq!(values(limits.max_core_file_size), [Some(0), Some(0)], "core dumps off");
    assert_eq!(values(limits.max_address_space), [Some(1 << 30), Some(1 << 30)], "address space limit");
}

#[tokio::test]
async fn a_worker_is_recycled_after_its_task_count_with_no_dip_in_capacity() {
    let server = Server::start(&["--workers", "1", "--worker-max-tasks", "3"]);
    server.wait_for_workers(1, Duration::from_secs(10)).await;
    let mut client = server.client().await;
    let mut pids = Vec::new();
    for _ in 0..7 {
        pids.push(pid_of(&client.execute(isolated("debug.echo", &[], &b"r"[..])).await.unwrap().into_inner()));
    }
    assert_eq!(pids[0], pids[2]);
    assert_ne!(pids[2], pids[3], "recycled after 3 tasks: {pids:?}");
    assert_eq!(pids[3], pids[5]);
    assert_ne!(pids[5], pids[6]);
    assert!(server.wait_logged("ran 3 tasks").await, "{:?}", server.logs());
    assert!(!is_alive(pids[0]), "the retired worker exited and was reaped");
}

#[tokio::test]
async fn an_idle_worker_killed_from_outside_is_replaced_before_it_is_needed() {
    let server = Server::start(&["--workers", "1"]);
    let before = server.wait_for_workers(1, Duration::from_secs(10)).await;
    signal(before[0], Signal::SIGKILL);
    let mut after = Vec::new();
    assert!(
        wait_for(Duration::from_secs(5), || {
            after = server.worker_pids();
            after.len() == 1 && after != before
        })
        .await
    );
    assert!(server.wait_logged("idle worker").await, "{:?}", server.logs());
    let mut client = server.client().await;
    let out = client.execute(isolated("debug.echo", &[], &b"x"[..])).await.unwrap().into_inner();
    assert_eq!(vec![pid_of(&out)], after);
}

#[tokio::test]
async fn a_busy_worker_killed_from_outside_fails_its_call_with_the_signal() {
    let server = Server::start(&["--workers", "1"]);
    let before = server.wait_for_workers(1, Duration::from_secs(10)).await;
    let mut client = server.client().await;
    let mut stream = super::start_running(&mut client, isolated("debug.sleep", &[("ms", "30000")], vec![])).await;
    signal(before[0], Signal::SIGKILL);
    let err = super::final_status(&mut stream).await;
    assert_eq!(err.code(), Code::Internal);
    assert!(
        err.message().contains(&format!("worker {} died with SIGKILL while running debug.sleep", before[0])),
        "{}",
        err.message()
    );
    server.wait_for_workers(1, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_worker_that_stops_answering_is_killed_and_replaced() {
    let server =
        Server::start(&["--workers", "1", "--worker-heartbeat-ms", "100", "--worker-heartbeat-timeout-ms", "600"]);
    let before = server.wait_for_workers(1, Duration::from_secs(10)).await;
    signal(before[0], Signal::SIGSTOP);
    assert!(server.wait_logged("idle worker stopped answering").await, "{:?}", server.logs());
    // The log line comes just before the kill: wait for the replacement.
    assert!(wait_for(Duration::from_secs(10), || !is_alive(before[0])).await, "the hung worker was killed");
    let after = server.wait_for_workers(1, Duration::from_secs(10)).await;
    assert_ne!(after, before);
    // A long task is not mistaken for a hang: it outlives the heartbeat timeout.
    let mut client = server.client().await;
    let out = client.execute(isolated("debug.spin", &[("ms", "1500")], vec![])).await.expect("long task survives");
    assert_eq!(vec![pid_of(&out.into_inner())], after);
}

#[tokio::test]
async fn no_worker_survives_a_sigkilled_front() {
    let mut server = Server::start(&["--workers", "2"]);
    let workers = server.wait_for_workers(2, Duration::from_secs(10)).await;
    let mut client = server.client().await;
    // One busy, one idle.
    let _busy = super::start_running(&mut client, isolated("debug.spin", &[("ms", "60000")], vec![])).await;
    server.signal(Signal::SIGKILL);
    server.wait_exit(Duration::from_secs(5)).expect("front died");
    assert!(
        wait_for(Duration::from_secs(5), || workers.iter().all(|p| !is_alive(*p))).await,
        "workers outlived the front: {workers:?}"
    );
}

#[tokio::test]
async fn a_worker_that_cannot_start_backs_off_and_the_front_stays_up() {
    let server = Server::start(&["--workers", "1", "--worker-program", "/bin/false"]);
    assert!(server.wait_logged("backing off").await, "{:?}", server.logs());
    let mut client = server.client().await;
    let err = client.execute(isolated("debug.echo", &[], vec![])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("the last start failed"), "{}", err.message());
    // POOL is unaffected.
    client.execute(request("debug.echo", &[], vec![])).await.expect("pool still serves");
    let grows = || server.logs().iter().any(|l| l.contains("backing off") && l.contains("\"retry_in\":\"400ms\""));
    assert!(wait_for(Duration::from_secs(5), grows).await, "backoff grows: {:?}", server.logs());
}

#[tokio::test]
async fn many_isolated_calls_at_once_all_succeed() {
    let server = Server::start(&["--workers", "2"]);
    server.wait_for_workers(2, Duration::from_secs(10)).await;
    let calls = (0..50).map(|i| {
        let server = &server;
        async move {
            let mut client = server.client().await;
            let body = isolated("hash.blake3", &[], format!("item {i}").into_bytes());
            let out = client.execute(body).await.unwrap().into_inner();
            assert_eq!(out.output.as_ref(), blake3::hash(format!("item {i}").as_bytes()).as_bytes());
        }
    });
    join_all(calls).await;
}

#[tokio::test]
async fn a_worker_whose_memory_grew_past_the_limit_is_recycled_between_tasks() {
    // Any worker's resident memory exceeds one byte: every task retires its worker.
    let server = Server::start(&["--workers", "1", "--worker-max-rss-bytes", "1"]);
    server.wait_for_workers(1, Duration::from_secs(10)).await;
    let mut client = server.client().await;
    let first = pid_of(&client.execute(isolated("debug.echo", &[], &b"a"[..])).await.unwrap().into_inner());
    let second = pid_of(&client.execute(isolated("debug.echo", &[], &b"b"[..])).await.unwrap().into_inner());
    assert_ne!(first, second);
    assert!(server.wait_logged("its resident memory is").await, "{:?}", server.logs());
    assert!(wait_for(Duration::from_secs(3), || !is_alive(first)).await);
}

#[tokio::test]
async fn workers_killed_under_pipelined_load_fail_at_most_the_calls_they_were_running() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let server = Server::start(&["--workers", "1"]);
    let before = server.wait_for_workers(1, Duration::from_secs(10)).await;
    // The front learns that debug.echo is tiny, and pipelines such calls.
    let mut client = server.client().await;
    for _ in 0..20 {
        client.execute(isolated("debug.echo", &[], &b"warm"[..])).await.unwrap();
    }
    let (done, killed, ok_after_kill) = (AtomicUsize::new(0), AtomicBool::new(false), AtomicUsize::new(0));
    const KILLS: usize = 3;
    let callers = (0..16).map(|caller| {
        let (server, done, killed, ok_after_kill) = (&server, &done, &killed, &ok_after_kill);
        async move {
            let mut client = server.client().await;
            let mut failures = Vec::new();
            for i in 0.. {
                let input = format!("caller {caller} call {i}");
                match client.execute(isolated("debug.echo", &[], input.clone().into_bytes())).await {
                    Ok(out) => {
                        assert_eq!(out.into_inner().output.as_ref(), input.as_bytes());
                        if killed.load(Ordering::SeqCst) {
                            ok_after_kill.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(status) => failures.push(status),
                }
                done.fetch_add(1, Ordering::SeqCst);
                if ok_after_kill.load(Ordering::SeqCst) >= 1000 {
                    break;
                }
            }
            failures
        }
    });
    let kill = async {
        let mut victim = before[0];
        for round in 1..=KILLS {
            assert!(wait_for(Duration::from_secs(10), || done.load(Ordering::SeqCst) >= 300 * round).await);
            signal(victim, Signal::SIGKILL);
            killed.store(true, Ordering::SeqCst);
            let replacement = || server.worker_pids().into_iter().find(|p| *p != victim && is_alive(*p));
            assert!(wait_for(Duration::from_secs(10), || replacement().is_some()).await);
            victim = replacement().expect("a replacement worker");
        }
    };
    let (failures, ()) = tokio::time::timeout(Duration::from_secs(60), futures::future::join(join_all(callers), kill))
        .await
        .expect("the callers finish");
    let failures: Vec<tonic::Status> = failures.into_iter().flatten().collect();
    // Calls queued in the dead worker behind the one it ran had not started:
    // they went to its replacement.
    assert!(failures.len() <= KILLS, "{failures:?}");
    for status in &failures {
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(status.message().contains("died with SIGKILL while running debug.echo"), "{status:?}");
    }
    assert!(!server.wait_for_workers(1, Duration::from_secs(10)).await.contains(&before[0]));
}
