//! Jobs (`offload.v1.Jobs`): submit, wait, get, list, cancel, idempotency,
//! checks at Submit, failures, permissions, retention, and jobs that survive
//! a SIGKILL, a SIGTERM or a SIGHUP of their front. Each test that does not
//! depend on the store runs twice: on the embedded SQLite file and on a real
//! PostgreSQL server started for it.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use offload_e2e::{Server, postgres::Postgres};
use offload_proto::offload::v1::{
    CancelJobRequest, ExecutionMode, GetJobRequest, Job, JobState, ListJobsRequest, ResubmitJobRequest,
    SubmitJobRequest, WaitJobRequest, jobs_client::JobsClient,
};
use sha2::Digest as _;
use tonic::{Code, transport::Channel};

pub(crate) async fn jobs(server: &Server) -> JobsClient<Channel> {
    JobsClient::new(server.channel().await)
}

pub(crate) fn submit(task: &str, params: &[(&str, &str)], input: &[u8]) -> SubmitJobRequest {
    SubmitJobRequest {
        task: task.into(),
        input: input.to_vec().into(),
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

/// Every state `Wait` streams for `id`, until the stream ends.
pub(crate) async fn wait(client: &mut JobsClient<Channel>, id: &str) -> Vec<Job> {
    let mut stream = client.wait(WaitJobRequest { id: id.into() }).await.expect("wait").into_inner();
    let mut seen = Vec::new();
    while let Some(job) = stream.message().await.expect("a job") {
        seen.push(job);
    }
    seen
}

pub(crate) fn state(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap()
}

/// Polls the job until `check` holds, and returns it then; fails the test,
/// showing the job, if it does not within 20 s.
pub(crate) async fn until(client: &mut JobsClient<Channel>, id: &str, check: impl Fn(&Job) -> bool) -> Job {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let job = client.get(GetJobRequest { id: id.into() }).await.expect("get").into_inner();
        if check(&job) {
            return job;
        }
        assert!(Instant::now() < end, "the job did not get there within 20 s: {job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where a test's fronts keep their jobs.
pub(crate) enum Store {
    /// A SQLite file of its own (in a folder removed with it).
    Sqlite(tempfile::TempDir),
    /// A PostgreSQL server of its own.
    Postgres(Postgres),
}

impl Store {
    fn sqlite() -> Self {
        Store::Sqlite(tempfile::tempdir().expect("a folder for the store"))
    }

    fn postgres() -> Self {
        Store::Postgres(Postgres::start())
    }

    /// What `--job-store` (`OFFLOAD_JOB_STORE`) is given.
    pub(crate) fn spec(&self) -> String {
        match self {
            Store::Sqlite(dir) => dir.path().join("jobs.sqlite3").display().to_string(),
            Store::Postgres(db) => db.url(),
        }
    }

    /// A front on this store with the debug tasks and `args`.
    pub(crate) fn front(&self, args: &[&str]) -> Server {
        let all = [&["--listen", "127.0.0.1:0", "--debug-tasks"], args].concat();
        Server::start_with_env(&all, &[("OFFLOAD_JOB_STORE", &self.spec())])
    }
}

/// Makes each test named (an async fn taking a `&Store`) two tests, `sqlite`
/// and `postgres`, in a module of its name: one per store.
macro_rules! on_each_store {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$test(&super::Store::sqlite()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$test(&super::Store::postgres()).await
            }
        }
    )*};
}

on_each_store!(
    a_job_is_submitted_waited_for_got_and_listed,
    submit_checks_the_task_and_keys_are_idempotent,
    a_failing_job_fails_with_its_calls_status_and_is_not_retried,
    a_job_is_cancelled_queued_or_running,
    progress_is_streamed_to_waiters,
    a_job_survives_a_sigkill_of_its_front,
    a_job_running_at_shutdown_is_handed_back_uncounted,
    a_sighup_rolling_restart_loses_and_repeats_no_job,
    clients_see_only_their_own_jobs_and_admins_see_all,
    a_clients_queued_jobs_are_bounded_by_its_max_queued_jobs,
    finished_jobs_are_deleted_after_their_retention,
    a_job_out_of_attempts_fails_naming_the_lost_front,
    a_job_is_resubmitted_as_a_new_job_of_the_same_work,
);

/// Resubmit: the same task, params, mode and input, as a new job.
async fn a_job_is_resubmitted_as_a_new_job_of_the_same_work(store: &Store) {
    let server = store.front(&["--cache-max-bytes", "0"]);
    let mut client = jobs(&server).await;
    let data = b"resubmitted work".to_vec();
    let first = client.submit(submit("hash.sha256", &[], &data)).await.unwrap().into_inner();
    let first = wait(&mut client, &first.id).await.pop().unwrap();
    let again = client.resubmit(ResubmitJobRequest { id: first.id.clone() }).await.unwrap().into_inner();
    assert_ne!(again.id, first.id, "a new job");
    assert_eq!((state(&again), again.task.as_str()), (JobState::Queued, "hash.sha256"));
    let done = wait(&mut client, &again.id).await.pop().unwrap();
    assert_eq!((state(&done), done.attempts), (JobState::Succeeded, 1), "it ran again");
    assert_eq!(done.output.as_ref(), sha2::Sha256::digest(&data).as_slice());
    let missing = client.resubmit(ResubmitJobRequest { id: "0".repeat(32) }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
}

async fn a_job_is_submitted_waited_for_got_and_listed(store: &Store) {
    let server = store.front(&[]);
    let mut client = jobs(&server).await;
    let data = vec![7u8; 100_000];
    let submitted = client.submit(submit("hash.sha256", &[], &data)).await.unwrap().into_inner();
    assert_eq!(state(&submitted), JobState::Queued);
    assert_eq!(submitted.id.len(), 32, "128 random bits in hex: {}", submitted.id);
    assert!(submitted.create_time.is_some());

    let seen = wait(&mut client, &submitted.id).await;
    let last = seen.last().expect("at least the job as it is");
    assert_eq!(state(last), JobState::Succeeded, "{seen:#?}");
    assert_eq!(last.output.as_ref(), sha2::Sha256::digest(&data).as_slice());
    assert_eq!((last.attempts, last.progress), (1, 1.0));
    assert!(last.finish_time.is_some() && last.start_time.is_some());
    // Waiting again, or looking it up, gives the same end.
    assert_eq!(wait(&mut client, &submitted.id).await, vec![last.clone()]);
    let got = client.get(GetJobRequest { id: submitted.id.clone() }).await.unwrap().into_inner();
    assert_eq!(&got, last);

    let listed = client.list(ListJobsRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.jobs.len(), 1);
    assert_eq!((listed.jobs[0].id.as_str(), listed.jobs[0].output.is_empty()), (submitted.id.as_str(), true));
    let none = ListJobsRequest { state: JobState::Queued as i32, ..Default::default() };
    assert!(client.list(none).await.unwrap().into_inner().jobs.is_empty());
    let err = client.get(GetJobRequest { id: "no-such-job".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

async fn submit_checks_the_task_and_keys_are_idempotent(store: &Store) {
    let server = store.front(&[]);
    let mut client = jobs(&server).await;
    for (request, code, says) in [
        (submit("no.such", &[], b""), Code::NotFound, "no.such"),
        (submit("primes.count", &[("limit", "ten")], b""), Code::InvalidArgument, "limit"),
        (submit("primes.count", &[], b""), Code::InvalidArgument, "missing required param"),
        (
            SubmitJobRequest { mode: ExecutionMode::Pool as i32, ..submit("debug.abort", &[], b"") },
            Code::InvalidArgument,
            "does not run in mode POOL",
        ),
    ] {
        let err = client.submit(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{err:?}");
    }
    assert!(client.list(ListJobsRequest::default()).await.unwrap().into_inner().jobs.is_empty(), "nothing recorded");

    let keyed = SubmitJobRequest { idempotency_key: "order-17".into(), ..submit("hash.sha256", &[], b"abc") };
    let first = client.submit(keyed.clone()).await.unwrap().into_inner();
    let again = client.submit(keyed.clone()).await.unwrap().into_inner();
    assert_eq!(first.id, again.id, "the same key and request: the same job");
    let other = SubmitJobRequest { input: b"abd".to_vec().into(), ..keyed };
    let err = client.submit(other).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains(&first.id), "{err:?}");
}

async fn a_failing_job_fails_with_its_calls_status_and_is_not_retried(store: &Store) {
    let server = store.front(&[]);
    let mut client = jobs(&server).await;
    let panics = client.submit(submit("debug.panic", &[], b"")).await.unwrap().into_inner();
    let seen = wait(&mut client, &panics.id).await;
    let last = seen.last().unwrap();
    assert_eq!(state(last), JobState::Failed);
    let error = last.error.clone().expect("why");
    assert_eq!(error.code, Code::Internal as i32, "{error:?}");
    assert_eq!(last.attempts, 1);
}

async fn a_job_is_cancelled_queued_or_running(store: &Store) {
    // One pool thread: a running spin keeps the next job queued.
    let server = store.front(&["--pool-threads", "1", "--workers", "1"]);
    let mut client = jobs(&server).await;
    let spin =
        |ms: &str| SubmitJobRequest { mode: ExecutionMode::Pool as i32, ..submit("debug.spin", &[("ms", ms)], b"") };
    let running = client.submit(spin("30000")).await.unwrap().into_inner();
    let job = until(&mut client, &running.id, |j| state(j) == JobState::Running).await;
    assert_eq!(state(&job), JobState::Running);

    let started = Instant::now();
    client.cancel(CancelJobRequest { id: running.id.clone() }).await.unwrap();
    let seen = wait(&mut client, &running.id).await;
    let last = seen.last().unwrap();
    assert_eq!(state(last), JobState::Cancelled, "{seen:#?}");
    assert_eq!(last.error.as_ref().map(|e| e.code), Some(Code::Cancelled as i32));
    assert!(started.elapsed() < Duration::from_secs(3), "stopped within a second or so: {:?}", started.elapsed());

    // The front takes as many jobs as it has pool threads and workers (two
    // here); a third waits in the store's queue and is cancelled at once.
    let blockers = [
        client.submit(spin("30000")).await.unwrap().into_inner(),
        client.submit(spin("30000")).await.unwrap().into_inner(),
    ];
    for blocker in &blockers {
        until(&mut client, &blocker.id, |j| state(j) == JobState::Running).await;
    }
    let queued = client.submit(spin("10")).await.unwrap().into_inner();
    let cancelled = client.cancel(CancelJobRequest { id: queued.id.clone() }).await.unwrap().into_inner();
    assert_eq!(state(&cancelled), JobState::Cancelled, "{cancelled:?}");
    assert_eq!(cancelled.attempts, 0, "it never ran");
    for blocker in blockers {
        client.cancel(CancelJobRequest { id: blocker.id }).await.unwrap();
    }
}

async fn progress_is_streamed_to_waiters(store: &Store) {
    let server = store.front(&[]);
    let mut client = jobs(&server).await;
    let job = client.submit(submit("debug.spin", &[("ms", "1500")], b"")).await.unwrap().into_inner();
    let seen = wait(&mut client, &job.id).await;
    let progress: Vec<f64> = seen.iter().filter(|j| state(j) == JobState::Running).map(|j| j.progress).collect();
    assert!(progress.len() >= 3 && progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(state(seen.last().unwrap()), JobState::Succeeded);
}

/// A front with `args` on the job store file `store`, running a job that
/// spins for `ms`.
pub(crate) async fn front_running_a_spin(store: &str, args: &[&str], ms: &str) -> (Server, Job) {
    let front = Server::start_with_env(args, &[("OFFLOAD_JOB_STORE", store)]);
    let mut client = jobs(&front).await;
    let job = client.submit(submit("debug.spin", &[("ms", ms)], b"")).await.unwrap().into_inner();
    let job = until(&mut client, &job.id, |j| state(j) == JobState::Running).await;
    assert_eq!(state(&job), JobState::Running, "{job:?}");
    (front, job)
}

/// A job whose front is killed mid-run is run again by the next front on
/// the same store once its lease lapses: it succeeds with 2 attempts.
async fn a_job_survives_a_sigkill_of_its_front(store: &Store) {
    let store = &store.spec();
    let args = ["--listen", "127.0.0.1:0", "--debug-tasks", "--job-lease-secs", "1"];
    let (mut first, job) = front_running_a_spin(store, &args, "1500").await;
    let queued = jobs(&first).await.submit(submit("hash.sha256", &[], b"later")).await.unwrap().into_inner();
    first.signal(Signal::SIGKILL);
    assert!(first.wait_exit(Duration::from_secs(5)).is_some());

    let with_metrics = [&args[..], &["--metrics-listen", "127.0.0.1:0"]].concat();
    let second = Server::start_with_env(&with_metrics, &[("OFFLOAD_JOB_STORE", store)]);
    let mut client = jobs(&second).await;
    let seen = wait(&mut client, &job.id).await;
    let last = seen.last().unwrap();
    assert_eq!((state(last), last.attempts), (JobState::Succeeded, 2), "{seen:#?}");
    let other = until(&mut client, &queued.id, |j| state(j) == JobState::Succeeded).await;
    assert_eq!(other.output.as_ref(), sha2::Sha256::digest(b"later").as_slice());

    let metrics = second.scrape();
    let value = |series: &str| offload_e2e::metric_value(&metrics, series);
    assert_eq!(value("offload_jobs{state=\"succeeded\"}"), 2.0, "{metrics}");
    assert_eq!(value("offload_jobs{state=\"queued\"}"), 0.0);
    assert_eq!(value("offload_oldest_queued_job_age_seconds"), 0.0);
    // The killed front may have run the tiny job itself before it died.
    assert!(value("offload_job_runs_total{outcome=\"succeeded\"}") >= 1.0, "{metrics}");
    assert!(value("offload_job_lease_expiries_total") >= 1.0, "the killed front's lease lapsed: {metrics}");
}

/// SIGTERM mid-job: the draining front hands its running job back at the
/// end of its grace, without counting an attempt and without waiting for
/// the lease (30 s here) to lapse; the next front runs it.
async fn a_job_running_at_shutdown_is_handed_back_uncounted(store: &Store) {
    let store = &store.spec();
    let args = ["--listen", "127.0.0.1:0", "--debug-tasks", "--shutdown-grace-secs", "0.5"];
    let (mut first, job) = front_running_a_spin(store, &args, "3000").await;
    first.signal(Signal::SIGTERM);
    assert!(first.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));

    let started = Instant::now();
    let second = Server::start_with_env(&args, &[("OFFLOAD_JOB_STORE", store)]);
    let mut client = jobs(&second).await;
    let last = wait(&mut client, &job.id).await.pop().unwrap();
    assert_eq!((state(&last), last.attempts), (JobState::Succeeded, 1), "the handed-back run is not counted");
    assert!(started.elapsed() < Duration::from_secs(15), "not left to its lease: {:?}", started.elapsed());
}

/// SIGHUP to a front of two replicas rolls them one at a time: jobs running
/// on a replica that drains are handed back at the end of its grace and
/// run by another. Every job succeeds, none with an attempt counted twice.
async fn a_sighup_rolling_restart_loses_and_repeats_no_job(store: &Store) {
    let server = store.front(&["--replicas", "2", "--shutdown-grace-secs", "0.5", "--pool-threads", "1"]);
    // The supervisor says where it listens before its replicas serve.
    let serving = || server.logs().iter().filter(|l| l.contains(" serving")).count() >= 2;
    assert!(offload_e2e::wait_for(Duration::from_secs(30), serving).await, "{:?}", server.logs());
    let mut client = jobs(&server).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let spin =
            SubmitJobRequest { mode: ExecutionMode::Pool as i32, ..submit("debug.spin", &[("ms", "1500")], b"") };
        ids.push(client.submit(spin).await.unwrap().into_inner().id);
    }
    until(&mut client, &ids[0], |j| state(j) == JobState::Running).await;
    server.signal(Signal::SIGHUP);
    assert!(server.wait_logged("SIGHUP: rolling restart").await);
    // A draining replica answers UNAVAILABLE (and a channel to it may
    // break): asked again, as a client retries, until each job has ended.
    let end = Instant::now() + Duration::from_secs(30);
    for id in &ids {
        let last = loop {
            match client.get(GetJobRequest { id: id.clone() }).await {
                Ok(job) if state(job.get_ref()) == JobState::Succeeded || state(job.get_ref()) == JobState::Failed => {
                    break job.into_inner();
                }
                Ok(_) => {}
                // A connection closed by an exiting replica as a request
                // went out on it is a transport error: retried as well.
                Err(err) => assert!(
                    err.code() == Code::Unavailable
                        || (err.code() == Code::Unknown && err.message() == "transport error"),
                    "{err:?}"
                ),
            }
            assert!(Instant::now() < end, "jobs still unfinished 30 s after the SIGHUP");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!((state(&last), last.attempts), (JobState::Succeeded, 1), "{last:?}");
    }
}

/// A request carrying `token` as its bearer credential.
fn with_token<T>(token: &str, body: T) -> tonic::Request<T> {
    crate::auth::authorized(Some(&crate::auth::bearer(token)), body)
}

/// With authenticated clients, a client sees, waits on and cancels only its
/// own jobs (another's id is NOT_FOUND), lists only its own, and submits
/// only tasks it may run; an admin client sees every job.
async fn clients_see_only_their_own_jobs_and_admins_see_all(store: &Store) {
    let (billing, reports, ops) = ("billing-token-0123456789", "reports-token-0123456789", "ops-token-0123456789");
    let dir = tempfile::tempdir().unwrap();
    let mut config = String::new();
    for (name, token, tasks, extra) in [
        ("billing", billing, "[\"*\"]", ""),
        ("reports", reports, "[\"hash.*\"]", ""),
        ("ops", ops, "[\"*\"]", "admin = true\n"),
    ] {
        let hash = hex::encode(sha2::Sha256::digest(token.as_bytes()));
        config += &format!("[[client]]\nname = \"{name}\"\ntoken_sha256 = \"{hash}\"\ntasks = {tasks}\n{extra}\n");
    }
    let file = dir.path().join("offload.toml");
    std::fs::write(&file, config).unwrap();
    let server = store.front(&["--config", file.to_str().unwrap(), "--metrics-listen", "127.0.0.1:0"]);
    let mut client = jobs(&server).await;

    // (A spin: a call this cheap would run inline, unscheduled.)
    let mut interactive = with_token(billing, submit("debug.spin", &[("ms", "20")], b""));
    interactive.metadata_mut().insert("offload-priority", "interactive".parse().unwrap());
    let job = client.submit(interactive).await.unwrap().into_inner();
    let get = |token| with_token(token, GetJobRequest { id: job.id.clone() });
    let list = |token| with_token(token, ListJobsRequest::default());
    assert_eq!(client.get(get(reports)).await.unwrap_err().code(), Code::NotFound, "another client's job");
    let waited = client.wait(with_token(reports, WaitJobRequest { id: job.id.clone() })).await;
    assert_eq!(waited.err().map(|e| e.code()), Some(Code::NotFound));
    let cancelled = client.cancel(with_token(reports, CancelJobRequest { id: job.id.clone() })).await;
    assert_eq!(cancelled.err().map(|e| e.code()), Some(Code::NotFound));
    let resubmitted = client.resubmit(with_token(reports, ResubmitJobRequest { id: job.id.clone() })).await;
    assert_eq!(resubmitted.err().map(|e| e.code()), Some(Code::NotFound), "nor resubmits it");
    assert!(client.list(list(reports)).await.unwrap().into_inner().jobs.is_empty());
    assert_eq!(client.list(list(billing)).await.unwrap().into_inner().jobs.len(), 1);
    assert_eq!(client.list(list(ops)).await.unwrap().into_inner().jobs.len(), 1, "an admin sees every job");
    assert_eq!(client.get(get(ops)).await.unwrap().into_inner().id, job.id);
    assert_eq!(client.get(get(billing)).await.unwrap().into_inner().id, job.id);

    // Its run was scheduled as a call of its submitter, at the priority
    // its Submit asked for.
    let mut waited =
        client.wait(with_token(billing, WaitJobRequest { id: job.id.clone() })).await.unwrap().into_inner();
    while waited.message().await.unwrap().is_some() {}
    let metrics = server.scrape();
    let waits = "offload_class_queue_wait_seconds_count{priority=\"interactive\",client=\"billing\"}";
    assert_eq!(offload_e2e::metric_value(&metrics, waits), 1.0, "{metrics}");

    let outside = submit("primes.count", &[("limit", "10")], b"");
    let outside = client.submit(with_token(reports, outside)).await.unwrap_err();
    assert_eq!(outside.code(), Code::PermissionDenied, "{outside:?}");
    let anonymous = client.get(GetJobRequest { id: job.id.clone() }).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
}

/// A declared client's `max_queued_jobs` bounds its jobs waiting for a
/// front: one over it is refused at Submit, naming the limit.
async fn a_clients_queued_jobs_are_bounded_by_its_max_queued_jobs(store: &Store) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("offload.toml");
    std::fs::write(&file, "[[client]]\nname = \"batchy\"\nmax_queued_jobs = 1\n").unwrap();
    // One pool thread and one worker: the front runs two jobs at once.
    let server = store.front(&["--config", file.to_str().unwrap(), "--pool-threads", "1", "--workers", "1"]);
    let mut client = jobs(&server).await;
    let as_batchy = |body: SubmitJobRequest| {
        let mut request = tonic::Request::new(body);
        request.metadata_mut().insert("offload-client", "batchy".parse().unwrap());
        request
    };
    let spin =
        || SubmitJobRequest { mode: ExecutionMode::Pool as i32, ..submit("debug.spin", &[("ms", "30000")], b"") };
    let mut submitted = Vec::new();
    for _ in 0..2 {
        let job = client.submit(as_batchy(spin())).await.unwrap().into_inner();
        until(&mut client, &job.id, |j| state(j) == JobState::Running).await;
        submitted.push(job.id);
    }
    submitted.push(client.submit(as_batchy(spin())).await.unwrap().into_inner().id);
    let err = client.submit(as_batchy(spin())).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("already has 1 jobs queued, its max_queued_jobs"), "{err:?}");
    // Another client is not held to it.
    assert!(client.submit(spin()).await.is_ok());
    for id in submitted {
        client.cancel(CancelJobRequest { id }).await.unwrap();
    }
}

/// `--job-store` names the file (it is created), and an output over
/// `--max-job-output-bytes` fails the job with RESOURCE_EXHAUSTED.
#[tokio::test]
async fn the_job_store_flag_and_the_output_cap() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("nested/jobs.sqlite3");
    let args = ["--job-store", store.to_str().unwrap(), "--max-job-output-bytes", "16", "--job-max-attempts", "2"];
    let server = Server::start(&args);
    let kept = format!("jobs kept in SQLite file {}", store.display());
    assert!(server.wait_logged(&kept).await, "{:?}", server.logs());
    let mut client = jobs(&server).await;
    let job = client.submit(submit("hash.sha256", &[], b"abc")).await.unwrap().into_inner();
    let last = wait(&mut client, &job.id).await.pop().unwrap();
    assert_eq!(state(&last), JobState::Failed);
    let error = last.error.unwrap();
    assert_eq!(error.code, Code::ResourceExhausted as i32, "{error:?}");
    assert!(error.message.contains("its output of 32 bytes exceeds --max-job-output-bytes (16)"), "{error:?}");
    assert!(store.is_file());
}

/// A finished job is deleted once `--job-retention-secs` has passed.
async fn finished_jobs_are_deleted_after_their_retention(store: &Store) {
    let server = store.front(&["--job-retention-secs", "1"]);
    let mut client = jobs(&server).await;
    let job = client.submit(submit("hash.sha256", &[], b"abc")).await.unwrap().into_inner();
    assert_eq!(state(&wait(&mut client, &job.id).await.pop().unwrap()), JobState::Succeeded);
    let end = Instant::now() + Duration::from_secs(10);
    let gone = loop {
        match client.get(GetJobRequest { id: job.id.clone() }).await {
            Err(err) if err.code() == Code::NotFound => break true,
            Ok(_) if Instant::now() < end => tokio::time::sleep(Duration::from_millis(50)).await,
            other => break other.is_err(),
        }
    };
    assert!(gone, "still kept 10 s after it finished");
}

/// With `OFFLOAD_JOB_MAX_ATTEMPTS=1` (and the lease from the environment
/// too), a job whose front is killed is not run again: it fails UNAVAILABLE,
/// saying which attempt was lost.
async fn a_job_out_of_attempts_fails_naming_the_lost_front(store: &Store) {
    let spec = store.spec();
    let env =
        [("OFFLOAD_JOB_STORE", spec.as_str()), ("OFFLOAD_JOB_LEASE_SECS", "1"), ("OFFLOAD_JOB_MAX_ATTEMPTS", "1")];
    let args = ["--listen", "127.0.0.1:0", "--debug-tasks"];
    let mut first = Server::start_with_env(&args, &env);
    let mut client = jobs(&first).await;
    let job = client.submit(submit("debug.spin", &[("ms", "5000")], b"")).await.unwrap().into_inner();
    until(&mut client, &job.id, |j| state(j) == JobState::Running).await;
    first.signal(Signal::SIGKILL);
    assert!(first.wait_exit(Duration::from_secs(5)).is_some());

    let second = Server::start_with_env(&args, &env);
    let mut client = jobs(&second).await;
    let last = wait(&mut client, &job.id).await.pop().unwrap();
    assert_eq!((state(&last), last.attempts), (JobState::Failed, 1), "{last:?}");
    let error = last.error.unwrap();
    assert_eq!(error.code, Code::Unavailable as i32);
    assert!(error.message.contains("stopped renewing its lease on attempt 1 of 1"), "{}", error.message);
}
