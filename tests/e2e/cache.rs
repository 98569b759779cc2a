//! The result cache over a real server: hits and misses (`offload-cache`
//! header), coalescing of identical concurrent calls into one run (counted
//! by the task itself, in a Python and a Node worker program), a leader
//! cancelled while followers wait, `no-store` and `no-cache`, eviction by
//! bytes, tasks that are not cacheable, bad directives, and permissions
//! between two authenticated clients.

use std::time::Duration;

use futures::{StreamExt as _, future::join_all};
use offload_e2e::{Server, metric_value, node_sdk_modules, python_with_sdk, request, wait_for, with_deadline};
use offload_proto::offload::v1::{
    ExecuteRequest, ExecuteResponse, ListTasksRequest, compute_client::ComputeClient, execute_event::Event,
};
use sha2::Digest as _;
use tonic::{Code, transport::Channel};

use crate::auth::{authorized, bearer};

/// A call's response and its `offload-cache` header.
async fn call(
    client: &mut ComputeClient<Channel>,
    request: ExecuteRequest,
    directives: Option<&str>,
) -> Result<(ExecuteResponse, String), tonic::Status> {
    let mut request = tonic::Request::new(request);
    if let Some(value) = directives {
        request.metadata_mut().insert("offload-cache", value.parse().unwrap());
    }
    request.set_timeout(Duration::from_secs(30));
    let response = client.execute(request).await?;
    let header = response.metadata().get("offload-cache").map(|v| v.to_str().unwrap().to_string());
    Ok((response.into_inner(), header.expect("every response says hit or miss")))
}

fn hash(input: &[u8]) -> ExecuteRequest {
    request("hash.sha256", &[], input.to_vec())
}

#[tokio::test]
async fn a_repeated_call_of_a_cacheable_task_is_a_hit_and_others_are_not() {
    let server = Server::start(&["--debug-tasks"]);
    let mut client = server.client().await;
    let (first, header) = call(&mut client, hash(b"abc"), None).await.unwrap();
    assert_eq!(header, "miss");
    assert_eq!(first.output.as_ref(), sha2::Sha256::digest(b"abc").as_slice());
    let (again, header) = call(&mut client, hash(b"abc"), None).await.unwrap();
    assert_eq!((header.as_str(), &again.output), ("hit", &first.output), "the same output, not run again");
    let stats = again.stats.unwrap();
    assert_eq!((stats.run_us, stats.queued_us, stats.worker_pid), (Some(0), Some(0), 0), "no executor");
    // Another input, another task: misses.
    assert_eq!(call(&mut client, hash(b"abd"), None).await.unwrap().1, "miss");
    assert_eq!(call(&mut client, request("hash.blake3", &[], &b"abc"[..]), None).await.unwrap().1, "miss");
    // Not cacheable: never a hit.
    for _ in 0..2 {
        let (echo, header) = call(&mut client, request("debug.echo", &[], &b"abc"[..]), None).await.unwrap();
        assert_eq!((header.as_str(), echo.output.as_ref()), ("miss", &b"abc"[..]));
    }
    // ExecuteStream: a stored result is its one event.
    let stream = client.execute_stream(hash(b"abc")).await.unwrap();
    assert_eq!(stream.metadata().get("offload-cache").unwrap(), "hit");
    let events: Vec<_> = stream.into_inner().collect().await;
    assert_eq!(events.len(), 1, "{events:?}");
    match &events[0].as_ref().unwrap().event {
        Some(Event::Result(result)) => assert_eq!(result.output, first.output),
        other => panic!("a result: {other:?}"),
    }
    let stream = client.execute_stream(hash(b"streamed")).await.unwrap();
    assert_eq!(stream.metadata().get("offload-cache").unwrap(), "miss");
    let _: Vec<_> = stream.into_inner().collect().await;
    assert_eq!(call(&mut client, hash(b"streamed"), None).await.unwrap().1, "hit", "a stream's result is stored");
    // ListTasks says which tasks are cacheable.
    let tasks = client.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let cacheable = |name: &str| tasks.iter().find(|t| t.name == name).map(|t| (t.cacheable, t.version));
    assert_eq!(cacheable("image.thumbnail"), Some((true, 1)));
    assert_eq!(cacheable("debug.echo"), Some((false, 1)));
}

#[tokio::test]
async fn directives_opt_a_call_out_and_an_unknown_one_is_refused() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    // no-store: run, not stored.
    assert_eq!(call(&mut client, hash(b"1"), Some("no-store")).await.unwrap().1, "miss");
    assert_eq!(call(&mut client, hash(b"1"), None).await.unwrap().1, "miss", "was not stored");
    assert_eq!(call(&mut client, hash(b"1"), None).await.unwrap().1, "hit", "stored by the plain call");
    // no-cache: not read, but stored.
    assert_eq!(call(&mut client, hash(b"1"), Some("no-cache")).await.unwrap().1, "miss", "not read");
    assert_eq!(call(&mut client, hash(b"2"), Some("no-cache")).await.unwrap().1, "miss");
    assert_eq!(call(&mut client, hash(b"2"), None).await.unwrap().1, "hit", "stored");
    assert_eq!(call(&mut client, hash(b"3"), Some("no-store, no-cache")).await.unwrap().1, "miss");
    assert_eq!(call(&mut client, hash(b"3"), None).await.unwrap().1, "miss");
    let err = call(&mut client, hash(b"1"), Some("no-store, max-age=60")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("max-age=60") && err.message().contains("offload-cache"), "{err:?}");
}

#[tokio::test]
async fn entries_are_evicted_by_bytes_least_recently_used_first() {
    // Room for two 100 KB results (and their bookkeeping), not three.
    let server = Server::start(&["--cache-max-bytes", "250000"]);
    let mut client = server.client().await;
    let big = |n: u8| {
        // Incompressible: its output is as large as its input.
        let mut state = u64::from(n) + 1;
        let data: Vec<u8> = (0..100_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        request("compress.zstd", &[("level", "1")], data)
    };
    for n in 0..2 {
        assert_eq!(call(&mut client, big(n), None).await.unwrap().1, "miss");
    }
    // 0 is used again, so 1 is the least recently used when 2 comes.
    assert_eq!(call(&mut client, big(0), None).await.unwrap().1, "hit");
    assert_eq!(call(&mut client, big(2), None).await.unwrap().1, "miss");
    assert_eq!(call(&mut client, big(0), None).await.unwrap().1, "hit");
    assert_eq!(call(&mut client, big(2), None).await.unwrap().1, "hit");
    assert_eq!(call(&mut client, big(1), None).await.unwrap().1, "miss", "evicted");
    // A result over --cache-max-entry-bytes is never stored; smaller ones are.
    let capped = Server::start(&["--cache-max-entry-bytes", "1000"]);
    let mut client = capped.client().await;
    for expected in ["miss", "miss"] {
        assert_eq!(call(&mut client, big(3), None).await.unwrap().1, expected, "100 KB over a 1000-byte cap");
    }
    for expected in ["miss", "hit"] {
        assert_eq!(call(&mut client, hash(b"small"), None).await.unwrap().1, expected, "32 bytes under it");
    }
    // Off: nothing is cached.
    let off = Server::start(&["--cache-max-bytes", "0"]);
    let mut client = off.client().await;
    for _ in 0..2 {
        assert_eq!(call(&mut client, hash(b"x"), None).await.unwrap().1, "miss");
    }
}

/// The test program of `lang` ("py" or "js") as a `[[worker_program]]`.
fn program(lang: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let programs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("programs");
    let table = match lang {
        "py" => format!(
            "[[worker_program]]\nname = \"py\"\ncommand = [{:?}, {:?}]\nworkers = 1\n",
            python_with_sdk().display().to_string(),
            programs.join("app.py").display().to_string()
        ),
        _ => format!(
            "[[worker_program]]\nname = \"js\"\ncommand = [\"node\", {:?}]\nenv = {{ NODE_PATH = {:?} }}\nworkers = 1\n",
            programs.join("app.js").display().to_string(),
            node_sdk_modules().display().to_string()
        ),
    };
    let path = dir.path().join("offload.toml");
    std::fs::write(&path, table).unwrap();
    let path = path.to_str().unwrap().to_string();
    (dir, path)
}

/// 50 identical calls at once run once: the task counts its runs, and every
/// caller gets the first run's answer ("1"). A later identical call is a
/// stored hit; another input runs again ("2").
async fn coalesced(lang: &str) {
    let (_dir, config) = program(lang);
    let server = Server::start(&["--config", &config]);
    let client = server.client().await;
    let counted = format!("{lang}.counted");
    let calls = (0..50).map(|_| {
        let (mut client, counted) = (client.clone(), counted.clone());
        async move { call(&mut client, request(&counted, &[("ms", "300")], &b"same"[..]), None).await }
    });
    let answers = join_all(calls).await;
    let mut headers: Vec<String> = Vec::new();
    for answer in answers {
        let (response, header) = answer.unwrap();
        assert_eq!(response.output.as_ref(), b"1", "one run for all");
        headers.push(header);
    }
    assert_eq!(headers.iter().filter(|h| *h == "miss").count(), 1, "{headers:?}");
    let mut client = client;
    let (again, header) = call(&mut client, request(&counted, &[("ms", "300")], &b"same"[..]), None).await.unwrap();
    assert_eq!((header.as_str(), again.output.as_ref()), ("hit", &b"1"[..]));
    let (other, header) = call(&mut client, request(&counted, &[("ms", "1")], &b"same"[..]), None).await.unwrap();
    assert_eq!((header.as_str(), other.output.as_ref()), ("miss", &b"2"[..]), "other params run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identical_python_calls_run_once() {
    coalesced("py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identical_node_calls_run_once() {
    coalesced("js").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiters_deadline_is_its_own_and_a_cancelled_leader_does_not_fail_the_rest() {
    let (_dir, config) = program("py");
    let server = Server::start(&["--config", &config, "--metrics-listen", "127.0.0.1:0"]);
    let client = server.client().await;
    let series = |result: &str| format!("offload_cache_lookups_total{{task=\"py.counted\",result=\"{result}\"}}");
    let slow = || request("py.counted", &[("ms", "3000")], &b"x"[..]);
    let bound = Duration::from_secs(20);
    // The leader runs, and is cancelled by its caller later.
    let mut leader_client = client.clone();
    let leader = tokio::spawn(async move { leader_client.execute(slow()).await });
    assert!(wait_for(bound, || server.scrape().contains(&format!("{} 1", series("miss")))).await, "the leader runs");
    // A waiter whose deadline passes gets DEADLINE_EXCEEDED, alone (from
    // the server: this client does not enforce deadlines itself).
    let mut impatient = server.wire_client();
    let status = impatient.execute(with_deadline(slow(), Duration::from_millis(200))).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("identical call"), "{status:?}");
    assert!(!leader.is_finished(), "the leader runs on");
    // Three more wait; then the leader's caller cancels.
    let followers = (0..3).map(|_| {
        let mut client = client.clone();
        async move { call(&mut client, slow(), None).await }
    });
    let followers = tokio::spawn(join_all(followers));
    let waiting = || metric_value(&server.scrape(), "offload_cache_waiting");
    assert!(wait_for(bound, || waiting() == 3.0).await, "three calls wait for the leader");
    leader.abort();
    let answers = tokio::time::timeout(Duration::from_secs(30), followers).await.expect("followers answered").unwrap();
    let mut headers = Vec::new();
    for answer in answers {
        let (response, header) = answer.unwrap();
        assert_eq!(response.output.as_ref(), b"2", "one follower ran it again, for all of them");
        headers.push(header);
    }
    assert_eq!(headers.iter().filter(|h| *h == "miss").count(), 1, "{headers:?}");
    assert_eq!(metric_value(&server.scrape(), &series("coalesced")), 2.0);
}

#[tokio::test]
async fn a_hit_never_crosses_a_permission_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let sha = |t: &str| hex::encode(sha2::Sha256::digest(t.as_bytes()));
    let config = dir.path().join("offload.toml");
    std::fs::write(
        &config,
        format!(
            "[[client]]\nname = \"hashes\"\ntoken_sha256 = \"{}\"\ntasks = [\"hash.*\"]\n\n\
             [[client]]\nname = \"images\"\ntoken_sha256 = \"{}\"\ntasks = [\"image.*\"]\n",
            sha("hashes-token-0123456789"),
            sha("images-token-0123456789")
        ),
    )
    .unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    let mut client = server.client().await;
    let (hashes, images) = (bearer("hashes-token-0123456789"), bearer("images-token-0123456789"));
    let first = client.execute(authorized(Some(&hashes), hash(b"secret"))).await.unwrap();
    assert_eq!(first.metadata().get("offload-cache").unwrap(), "miss");
    let again = client.execute(authorized(Some(&hashes), hash(b"secret"))).await.unwrap();
    assert_eq!(again.metadata().get("offload-cache").unwrap(), "hit");
    // The other client may not run hash.*: refused as ever, cached or not.
    let status = client.execute(authorized(Some(&images), hash(b"secret"))).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

#[tokio::test]
async fn a_job_whose_result_is_cached_succeeds_at_submit_and_a_jobs_result_is_cached() {
    use crate::jobs::{jobs, state, submit, wait};
    use offload_proto::offload::v1::JobState;
    let server = Server::start(&[]);
    let (mut client, mut jobs) = (server.client().await, jobs(&server).await);
    assert_eq!(call(&mut client, hash(b"known"), None).await.unwrap().1, "miss");
    // Its result is stored: the job is done at Submit, never run.
    let done = jobs.submit(submit("hash.sha256", &[], b"known")).await.unwrap().into_inner();
    assert_eq!((state(&done), done.attempts), (JobState::Succeeded, 0), "{done:?}");
    assert_eq!(done.output.as_ref(), sha2::Sha256::digest(b"known").as_slice());
    assert_eq!(state(wait(&mut jobs, &done.id).await.last().unwrap()), JobState::Succeeded);
    // Unless it asks not to read the cache.
    let mut fresh = tonic::Request::new(submit("hash.sha256", &[], b"known"));
    fresh.metadata_mut().insert("offload-cache", "no-cache".parse().unwrap());
    let fresh = jobs.submit(fresh).await.unwrap().into_inner();
    assert_eq!(state(&fresh), JobState::Queued);
    let ran = wait(&mut jobs, &fresh.id).await.pop().unwrap();
    assert_eq!((state(&ran), ran.attempts, ran.output), (JobState::Succeeded, 1, done.output));
    // A job that runs stores its result: the same call is then a hit.
    let new = jobs.submit(submit("hash.sha256", &[], b"new")).await.unwrap().into_inner();
    assert_eq!(state(&new), JobState::Queued);
    assert_eq!(state(&wait(&mut jobs, &new.id).await.pop().unwrap()), JobState::Succeeded);
    let (hit, header) = call(&mut client, hash(b"new"), None).await.unwrap();
    assert_eq!((header.as_str(), hit.output.as_ref()), ("hit", sha2::Sha256::digest(b"new").as_slice()));
    // A task that is not cacheable is never done at Submit.
    for _ in 0..2 {
        let echo = jobs.submit(submit("debug.echo", &[], b"known")).await.unwrap().into_inner();
        assert_eq!(state(&echo), JobState::Queued);
        assert_eq!(state(&wait(&mut jobs, &echo.id).await.pop().unwrap()), JobState::Succeeded);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fronts_sharing_a_postgresql_job_store_share_results() {
    let db = offload_e2e::postgres::Postgres::start();
    let url = db.url();
    let front = |args: &[&str]| {
        let all = [&["--listen", "127.0.0.1:0"], args].concat();
        Server::start_with_env(&all, &[("OFFLOAD_JOB_STORE", url.as_str())])
    };
    let (a, b) = (front(&[]), front(&[]));
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let (made, header) = call(&mut on_a, hash(b"made on a"), None).await.unwrap();
    assert_eq!(header, "miss");
    let (found, header) = call(&mut on_b, hash(b"made on b"), None).await.unwrap();
    assert_eq!(header, "miss", "another input");
    assert_ne!(found.output, made.output);
    let (again, header) = call(&mut on_b, hash(b"made on a"), None).await.unwrap();
    assert_eq!((header.as_str(), &again.output), ("hit", &made.output), "a's result, on b");
    assert_eq!(call(&mut on_a, hash(b"made on b"), None).await.unwrap().1, "hit", "and the other way");
    // A front told to keep its own results does not see theirs.
    let own = front(&["--cache-store", "memory"]);
    assert_eq!(call(&mut own.client().await, hash(b"made on a"), None).await.unwrap().1, "miss");
    // Entries expire with their TTL (the database's clock).
    let brief = front(&["--cache-ttl-secs", "1"]);
    let mut on_brief = brief.client().await;
    assert_eq!(call(&mut on_brief, hash(b"brief"), None).await.unwrap().1, "miss");
    assert_eq!(call(&mut on_brief, hash(b"brief"), None).await.unwrap().1, "hit");
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while call(&mut on_brief, hash(b"brief"), None).await.unwrap().1 == "hit" {
        assert!(std::time::Instant::now() < end, "the entry outlived its TTL by far");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = db.psql("SELECT COUNT(*) FROM offload_cache WHERE task = 'hash.sha256'");
    assert!(rows.trim().parse::<u32>().unwrap() >= 3, "{rows}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_store_expires_entries_and_trims_the_oldest_beyond_its_bytes() {
    use offload_server::cache::{CacheStore as _, Key, postgres::PgCacheStore};
    let db = offload_e2e::postgres::Postgres::start();
    let store = PgCacheStore::connect(&db.url(), 2500, Duration::from_secs(3600)).await.unwrap();
    let output = bytes::Bytes::from(vec![7u8; 1000]);
    for n in 1..=3u8 {
        store.put(Key([n; 32]), "hash.sha256", output.clone()).await.unwrap();
    }
    assert_eq!(store.get(&Key([1; 32])).await.unwrap(), Some(output.clone()));
    assert_eq!(store.get(&Key([9; 32])).await.unwrap(), None);
    // Stored in the order 1, 2, 3 (a second apart, as the trim sees it).
    db.psql("UPDATE offload_cache SET stored_ms = stored_ms - 1000 * (4 - get_byte(key, 0))");
    let (_, held) = offload_server::cache::postgres::trim_now(&store).await.unwrap();
    assert_eq!(held, 2000, "the oldest goes: 3000 bytes held, 2500 allowed");
    assert_eq!(store.get(&Key([1; 32])).await.unwrap(), None);
    assert!(store.get(&Key([2; 32])).await.unwrap().is_some() && store.get(&Key([3; 32])).await.unwrap().is_some());
    assert_eq!(store.bytes_held(), Some(2000));
    // An expired entry is no hit, and the trim deletes it.
    db.psql("UPDATE offload_cache SET expires_ms = 0 WHERE get_byte(key, 0) = 2");
    assert_eq!(store.get(&Key([2; 32])).await.unwrap(), None);
    assert_eq!(offload_server::cache::postgres::trim_now(&store).await.unwrap().1, 1000);
    assert_eq!(db.psql("SELECT COUNT(*) FROM offload_cache"), "1");
}
