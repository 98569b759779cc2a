//! Jobs shared by several fronts on one real PostgreSQL server (started by
//! the harness): the store's contract, word of changes between fronts,
//! waits and cancels from another front, idle fronts taking queued work
//! (also work a busy front took ahead and could not start), hand-backs at
//! shutdown, fencing of a front that comes back after its
//! lease lapsed, and a front on another host (a network namespace) whose
//! link is cut mid-job.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use offload_e2e::{Server, metric_value, netns::Host, postgres::Postgres};
use offload_proto::offload::v1::{
    CancelJobRequest, ExecutionMode, JobState, SubmitJobRequest, WaitJobRequest, jobs_client::JobsClient,
};
use offload_server::jobs::{
    conformance,
    postgres::PgStore,
    store::{JobStore, Notice, NoticeKind},
};
use tonic::transport::Channel;

use crate::jobs::{front_running_a_spin, jobs, state, submit, until, wait};

/// A front on the job store `url`, with `args` after the usual ones.
fn front(url: &str, args: &[&str]) -> Server {
    let all = [&["--listen", "127.0.0.1:0", "--debug-tasks", "--metrics-listen", "127.0.0.1:0"], args].concat();
    Server::start_with_env(&all, &[("OFFLOAD_JOB_STORE", url)])
}

/// How many of a front's job runs ended with `outcome` (none before the
/// first, whose series is absent until then).
fn runs(front: &Server, outcome: &str) -> f64 {
    let metrics = front.scrape();
    let series = format!("offload_job_runs_total{{outcome=\"{outcome}\"}}");
    if metrics.lines().any(|line| line.starts_with(&series)) { metric_value(&metrics, &series) } else { 0.0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_the_job_store_contract_and_tells_other_fronts() {
    let db = Postgres::start();
    let store = PgStore::connect(&db.url()).await.expect("connect");
    conformance::check_all(&store).await;

    // Another front's store hears of each change, through LISTEN/NOTIFY.
    let other = PgStore::connect(&db.url()).await.expect("connect");
    let mut notices = other.notices().expect("a PostgreSQL store tells of other fronts' changes");
    let next = async |notices: &mut tokio::sync::mpsc::Receiver<Notice>| {
        tokio::time::timeout(Duration::from_secs(10), notices.recv()).await.expect("a notice within 10 s")
    };
    store.submit(vec![conformance::job("n1", None).into()]).await.unwrap();
    let notice = |kind| Some(Notice { id: "n1".into(), kind });
    assert_eq!(next(&mut notices).await, notice(NoticeKind::Queued));
    let run = store.claim("front-1", Duration::from_secs(60), 1).await.unwrap().pop().unwrap();
    assert_eq!(next(&mut notices).await, notice(NoticeKind::Changed));
    store.cancel("n1").await.unwrap();
    assert_eq!(next(&mut notices).await, notice(NoticeKind::CancelAsked));
    assert!(store.release("n1", run.attempts).await.unwrap());
    assert_eq!(next(&mut notices).await, notice(NoticeKind::Queued));

    // What is kept can be inspected with the database's own tools: handed
    // back with its cancel asked, the job was cancelled.
    assert_eq!(db.psql("SELECT state, attempts, error_code FROM offload_jobs WHERE id = 'n1'"), "5|0|1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_waited_on_and_cancelled_from_another_front_within_a_second() {
    let db = Postgres::start();
    let url = db.url();
    let args = ["--listen", "127.0.0.1:0", "--debug-tasks"];
    let (_runner, job) = front_running_a_spin(&url, &args, "30000").await;
    let other = front(&url, &[]);
    let mut client = jobs(&other).await;

    // The wait on the other front streams the progress made on the first.
    let mut stream = client.wait(WaitJobRequest { id: job.id.clone() }).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().expect("the job now");
    assert_eq!(state(&first), JobState::Running);
    let later = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    assert!(later.progress > first.progress, "{first:?} then {later:?}");

    let asked = Instant::now();
    let answer = client.cancel(CancelJobRequest { id: job.id.clone() }).await.unwrap().into_inner();
    assert_eq!(state(&answer), JobState::Running, "a running job stops through its front");
    let done = until(&mut client, &job.id, |j| state(j) == JobState::Cancelled).await;
    let took = asked.elapsed();
    assert_eq!(state(&done), JobState::Cancelled, "{done:?}");
    assert!(took < Duration::from_secs(1), "the run on the other front stopped after {took:?}");
    // The waiter's stream ends with it.
    let mut last = later;
    while let Some(job) = stream.message().await.unwrap() {
        last = job;
    }
    assert_eq!(state(&last), JobState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_fronts_take_queued_work_and_no_job_runs_twice() {
    let db = Postgres::start();
    let url = db.url();
    let small = ["--pool-threads", "1", "--workers", "1"];
    let (a, b) = (front(&url, &small), front(&url, &small));
    let mut client = jobs(&a).await;
    let mut ids = Vec::new();
    for _ in 0..8 {
        let spin = SubmitJobRequest { mode: ExecutionMode::Pool as i32, ..submit("debug.spin", &[("ms", "400")], b"") };
        ids.push(client.submit(spin).await.unwrap().into_inner().id);
    }
    each_ran_once_on_either(&mut client, &ids, &a, &b, 8.0).await;
}

/// Waits for each of `ids` to succeed on its first attempt (a hand-back is
/// not an attempt), then checks that the runs of fronts `a` and `b` add up
/// to `total` (no job ran twice) and that `b` ran some.
async fn each_ran_once_on_either(client: &mut JobsClient<Channel>, ids: &[String], a: &Server, b: &Server, total: f64) {
    for id in ids {
        let last = wait(client, id).await.pop().unwrap();
        assert_eq!((state(&last), last.attempts), (JobState::Succeeded, 1), "{last:?}");
    }
    let (on_a, on_b) = (runs(a, "succeeded"), runs(b, "succeeded"));
    assert_eq!(on_a + on_b, total, "each job ran once: {on_a} + {on_b}");
    assert!(on_b >= 1.0, "the other front took some: {on_a} + {on_b}");
}

/// A front whose runs were tiny takes more jobs than it has executors;
/// when the work turns heavy, the jobs it cannot start within 100 ms go
/// back, uncounted, to a front that can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_a_front_took_ahead_but_cannot_start_go_to_another_front() {
    let db = Postgres::start();
    let url = db.url();
    let small = ["--pool-threads", "1", "--workers", "1"];
    let a = front(&url, &small);
    let mut client = jobs(&a).await;
    let mut tiny = Vec::new();
    for n in 0..30 {
        // Distinct: identical ones would be answered by the result cache.
        let input = format!("tiny {n}");
        tiny.push(client.submit(submit("hash.sha256", &[], input.as_bytes())).await.unwrap().into_inner().id);
    }
    for id in &tiny {
        assert_eq!(state(&wait(&mut client, id).await.pop().unwrap()), JobState::Succeeded);
    }
    let mut heavy = Vec::new();
    for _ in 0..6 {
        let spin = SubmitJobRequest { mode: ExecutionMode::Pool as i32, ..submit("debug.spin", &[("ms", "600")], b"") };
        heavy.push(client.submit(spin).await.unwrap().into_inner().id);
    }
    let end = Instant::now() + Duration::from_secs(10);
    while runs(&a, "handed_back") < 1.0 {
        assert!(Instant::now() < end, "no job taken ahead was handed back:\n{}", a.scrape());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = front(&url, &small);
    // The 30 tiny jobs ran on `a`.
    each_ran_once_on_either(&mut client, &heavy, &a, &b, 36.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_at_shutdown_is_handed_to_a_live_front_uncounted() {
    let db = Postgres::start();
    let url = db.url();
    let args = ["--listen", "127.0.0.1:0", "--debug-tasks", "--shutdown-grace-secs", "0.5"];
    let (mut draining, job) = front_running_a_spin(&url, &args, "2000").await;
    let other = front(&url, &[]);
    draining.signal(Signal::SIGTERM);
    assert!(draining.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
    let mut client = jobs(&other).await;
    let last = wait(&mut client, &job.id).await.pop().unwrap();
    assert_eq!((state(&last), last.attempts), (JobState::Succeeded, 1), "the handed-back run is not counted");
    assert_eq!(runs(&other, "succeeded"), 1.0);
}

/// A front frozen (SIGSTOP) past its lease is replaced by another; when it
/// wakes it stops its stale run and writes nothing over the newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_back_after_its_lease_lapsed_cannot_overwrite_the_newer_run() {
    let db = Postgres::start();
    let url = db.url();
    let lease = ["--job-lease-secs", "1"];
    let stale = front(&url, &lease);
    let mut client = jobs(&stale).await;
    let job = client.submit(submit("debug.spin", &[("ms", "3000")], b"")).await.unwrap().into_inner();
    until(&mut client, &job.id, |j| state(j) == JobState::Running).await;
    stale.signal(Signal::SIGSTOP);

    let newer = front(&url, &lease);
    let mut client = jobs(&newer).await;
    let retaken = until(&mut client, &job.id, |j| j.attempts == 2).await;
    assert_eq!((state(&retaken), retaken.attempts), (JobState::Running, 2), "{retaken:?}");
    stale.signal(Signal::SIGCONT);
    assert!(
        offload_e2e::wait_for(Duration::from_secs(10), || runs(&stale, "lost") == 1.0).await,
        "the woken front stops its stale run: {}",
        stale.scrape()
    );

    let last = wait(&mut client, &job.id).await.pop().unwrap();
    assert_eq!((state(&last), last.attempts), (JobState::Succeeded, 2), "{last:?}");
    assert_eq!(runs(&newer, "succeeded"), 1.0);
    assert_eq!(runs(&stale, "succeeded"), 0.0, "the stale run recorded nothing");
}

/// Fronts on two hosts share a database on one of them. The link of the
/// other host is cut while its front runs a job: that front stops the run
/// itself before its lease can lapse, the front across the cut runs the job
/// again, and once the link is back the cut-off front writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_mid_job_loses_it_to_another_host_and_cannot_write_back() {
    let host = Host::new();
    let db = Postgres::start_on(&[host.gateway]);
    let at = format!("{}:0", host.addr);
    let remote_args = ["--listen", &at, "--metrics-listen", &at, "--debug-tasks", "--job-lease-secs", "2"];
    let remote = Server::start_in(&host, &remote_args, &[("OFFLOAD_JOB_STORE", &db.url_at(host.gateway))]);
    let mut client = jobs(&remote).await;
    let job = client.submit(submit("debug.spin", &[("ms", "4000")], b"")).await.unwrap().into_inner();
    until(&mut client, &job.id, |j| state(j) == JobState::Running).await;
    let local = front(&db.url(), &["--job-lease-secs", "2"]);

    host.cut();
    assert!(
        offload_e2e::wait_for(Duration::from_secs(10), || remote
            .logged("stopping a job whose lease could not be renewed"))
        .await,
        "the cut-off front stops its run; it logged:\n{}",
        remote.logs().join("\n")
    );
    let mut client = jobs(&local).await;
    let retaken = until(&mut client, &job.id, |j| j.attempts == 2).await;
    assert_eq!((state(&retaken), retaken.attempts), (JobState::Running, 2), "{retaken:?}");
    host.restore();

    let last = wait(&mut client, &job.id).await.pop().unwrap();
    assert_eq!((state(&last), last.attempts), (JobState::Succeeded, 2), "{last:?}");
    assert_eq!(runs(&local, "succeeded"), 1.0);
    assert!(
        offload_e2e::wait_for(Duration::from_secs(10), || runs(&remote, "lost") == 1.0).await,
        "{}",
        remote.scrape()
    );
    assert_eq!(runs(&remote, "succeeded"), 0.0, "the cut-off run recorded nothing");
}
