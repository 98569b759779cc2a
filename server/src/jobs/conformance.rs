//! What every [`JobStore`] must do, as checks any backend's tests run on an
//! empty store of theirs: the SQLite store's unit tests, and the PostgreSQL
//! store's end-to-end tests against a real server. One set of checks keeps
//! the backends interchangeable.
//!
//! Each check panics, saying what was wrong, on the first broken promise.

use std::time::Duration;

use bytes::Bytes;

use super::store::{
    Claimant, Filter, Finished, JobFailure, JobRecord, JobStore, NewJob, RunResult, Start, State, Submission, Submitted,
};
use crate::schedule::Priority;

/// A lease that lapses at once (for checks of what follows a lost front).
const LAPSED: Duration = Duration::ZERO;
/// A lease that does not lapse while a check runs.
const HELD: Duration = Duration::from_secs(600);

/// A job of id `id` (with idempotency key `key`) for the checks.
pub fn job(id: &str, key: Option<&str>) -> NewJob {
    NewJob {
        id: id.into(),
        task: "hash.sha256".into(),
        mode: 0,
        params: [("a".to_string(), "1".to_string())].into(),
        input: Bytes::from_static(b"abc"),
        client: String::new(),
        idempotency_key: key.map(String::from),
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        priority: Priority::Interactive,
    }
}

/// The oldest queued job, claimed for `owner`.
async fn claim(store: &dyn JobStore, owner: &str, lease: Duration) -> Option<JobRecord> {
    let mut claimed = store.claim(owner, lease, 1).await.unwrap();
    assert!(claimed.len() <= 1, "at most the limit: {claimed:?}");
    claimed.pop()
}

/// Ends run `attempt` of `id` with `result`: whether it was written.
async fn finish(store: &dyn JobStore, id: &str, attempt: u32, result: RunResult) -> Option<JobRecord> {
    store.finish(vec![Finished { id: id.into(), attempt, result }]).await.unwrap().remove(0)
}

/// Every check, each on a store emptied of the previous one's jobs.
pub async fn check_all(store: &dyn JobStore) {
    claimed_once_fenced_and_finished(store).await;
    empty(store).await;
    attempts_cancels_hand_backs_and_listing(store).await;
    empty(store).await;
    concurrent_claims_never_share_a_job(store).await;
}

/// Deletes every job (each check starts from an empty store).
async fn empty(store: &dyn JobStore) {
    // Queued and running jobs are cancelled, then every finished one goes.
    loop {
        let page = store.list(&Filter::default(), 1000, None).await.unwrap();
        if page.jobs.is_empty() {
            break;
        }
        for job in page.jobs {
            if let Some(record) = store.cancel(&job.job.id).await.unwrap()
                && record.state == State::Running
            {
                let ended = RunResult::Ended(State::Cancelled, JobFailure { code: 1, message: String::new() });
                finish(store, &job.job.id, record.attempts, ended).await;
            }
        }
        store.delete_finished(Duration::ZERO).await.unwrap();
    }
}

/// Submit (with idempotency keys), claim, renew, progress, a lapsed lease
/// taken over by another front, and fencing of the stale run's writes.
pub async fn claimed_once_fenced_and_finished(store: &dyn JobStore) {
    let submitted = store.submit(vec![job("a", None).into(), job("b", Some("k")).into()]).await.unwrap();
    let Submitted::New(a) = &submitted[0] else { panic!("a new job: {submitted:?}") };
    assert_eq!((a.state, a.attempts, a.job.priority), (State::Queued, 0, Priority::Interactive));
    assert_eq!(a.job, job("a", None), "recorded as submitted");
    let again = store.submit(vec![job("c", Some("k")).into()]).await.unwrap();
    assert!(matches!(&again[0], Submitted::Existing(r) if r.job.id == "b"), "the key's job: {again:?}");
    let mut other = job("c", Some("k"));
    other.client = "billing".into();
    assert!(matches!(&store.submit(vec![other.into()]).await.unwrap()[0], Submitted::New(_)), "keys are per client");
    let twice = store.submit(vec![job("x", Some("k2")).into(), job("y", Some("k2")).into()]).await.unwrap();
    assert!(
        matches!(&twice[..], [Submitted::New(x), Submitted::Existing(y)] if x.job.id == "x" && y.job.id == "x"),
        "one key twice in a group: the first's job both times: {twice:?}"
    );

    let claimed = claim(store, "front-1", HELD).await.expect("the oldest");
    assert_eq!((claimed.job.id.as_str(), claimed.state, claimed.attempts), ("a", State::Running, 1));
    assert!(claimed.started_ms.is_some());
    assert!(store.renew("a", 1, LAPSED).await.unwrap());
    assert!(store.progress("a", 1, 0.5, "half").await.unwrap());
    let halfway = store.get("a").await.unwrap().unwrap();
    assert_eq!((halfway.progress, halfway.progress_message.as_str()), (0.5, "half"));
    assert!(halfway.job.input.is_empty(), "a lookup leaves the input out");
    assert_eq!(store.input("a").await.unwrap().as_deref(), Some(&b"abc"[..]), "which is kept");
    assert_eq!(store.input("nope").await.unwrap(), None);
    assert_eq!(claimed.job.input.as_ref(), b"abc", "a claim reads it");
    // Its lease ran out: the job is queued again, and the old run's writes
    // are refused once another run has it.
    assert_eq!(store.expire_leases(3).await.unwrap(), 1);
    let retaken = claim(store, "front-2", HELD).await.unwrap();
    assert_eq!((retaken.job.id.as_str(), retaken.attempts), ("a", 2));
    let output = RunResult::Succeeded(Bytes::from_static(b"out"));
    assert!(finish(store, "a", 1, output.clone()).await.is_none(), "the stale run changes nothing");
    assert!(!store.renew("a", 1, HELD).await.unwrap());
    assert!(!store.progress("a", 1, 0.9, "stale").await.unwrap());
    let ended = finish(store, "a", 2, output.clone()).await.expect("the current run's end is written");
    let done = store.get("a").await.unwrap().unwrap();
    assert_eq!(ended, done, "a finish reads back the job as a lookup would");
    assert_eq!((done.state, done.output.as_deref(), done.progress), (State::Succeeded, Some(&b"out"[..]), 1.0));
    assert!(done.finished_ms.is_some_and(|f| f >= done.created_ms));
    assert!(store.get("nope").await.unwrap().is_none());
    // A group of finishes writes each current run's own end.
    let (b, c) = (claim(store, "front-1", HELD).await.unwrap(), claim(store, "front-1", HELD).await.unwrap());
    let failure = JobFailure { code: 3, message: "bad".into() };
    let group = vec![
        Finished {
            id: c.job.id.clone(),
            attempt: c.attempts,
            result: RunResult::Ended(State::Failed, failure.clone()),
        },
        Finished { id: b.job.id.clone(), attempt: b.attempts, result: output },
    ];
    let written = store.finish(group).await.unwrap();
    let shown =
        |w: &Option<JobRecord>| w.as_ref().map(|j| (j.job.id.clone(), j.state, j.output.clone(), j.failure.clone()));
    assert_eq!(
        written.iter().map(shown).collect::<Vec<_>>(),
        [
            Some((c.job.id.clone(), State::Failed, None, Some(failure))),
            Some((b.job.id.clone(), State::Succeeded, Some(Bytes::from_static(b"out")), None)),
        ],
        "in the group's order"
    );
}

/// Attempts running out, cancels of queued and running jobs, hand-backs,
/// listing in pages, stats and retention.
pub async fn attempts_cancels_hand_backs_and_listing(store: &dyn JobStore) {
    store.submit(vec![job("a", None).into(), job("b", None).into(), job("c", None).into()]).await.unwrap();
    // Claims of several at once take the oldest, in order; a group of
    // finishes writes the current runs' ends and refuses stale ones.
    let two = store.claim("f", HELD, 2).await.unwrap();
    assert_eq!(two.iter().map(|j| (j.job.id.as_str(), j.attempts)).collect::<Vec<_>>(), [("a", 1), ("b", 1)]);
    for id in ["a", "b"] {
        assert!(store.release(id, 1).await.unwrap());
    }
    let a = claim(store, "f", HELD).await.unwrap();
    let ended = RunResult::Ended(State::Failed, JobFailure { code: 13, message: "x".into() });
    let group = vec![
        Finished { id: "a".into(), attempt: a.attempts + 1, result: ended.clone() },
        Finished { id: "nope".into(), attempt: 1, result: ended },
    ];
    assert!(store.finish(group).await.unwrap().iter().all(Option::is_none), "neither is a current run");
    assert!(store.release("a", a.attempts).await.unwrap());
    // "a" loses its front three times: then it fails, naming why.
    for attempt in 1..=3 {
        let claimed = claim(store, "f", LAPSED).await.unwrap();
        assert_eq!((claimed.job.id.as_str(), claimed.attempts), ("a", attempt));
        store.expire_leases(3).await.unwrap();
    }
    let failed = store.get("a").await.unwrap().unwrap();
    assert_eq!(failed.state, State::Failed);
    let failure = failed.failure.unwrap();
    assert_eq!(failure.code, tonic::Code::Unavailable as i32);
    assert!(failure.message.contains("attempt 3 of 3"), "{}", failure.message);
    // Handed back by a draining front: queued, the attempt not counted.
    let b = claim(store, "f", HELD).await.unwrap();
    assert!(store.release("b", b.attempts).await.unwrap());
    let back = store.get("b").await.unwrap().unwrap();
    assert_eq!((back.state, back.attempts), (State::Queued, 0));
    assert_eq!(store.queued_of("").await.unwrap(), 2, "b and c");
    assert_eq!(store.queued_of("billing").await.unwrap(), 0);
    // A queued job is cancelled at once; a running one is flagged.
    let b = claim(store, "f", HELD).await.unwrap();
    assert_eq!(store.cancel("c").await.unwrap().unwrap().state, State::Cancelled);
    assert!(store.cancel("b").await.unwrap().unwrap().cancel_requested);
    assert_eq!(store.cancel_requests("f").await.unwrap(), vec![("b".to_string(), b.attempts)]);
    assert!(store.cancel_requests("g").await.unwrap().is_empty(), "another front's");
    assert!(store.cancel("nope").await.unwrap().is_none());
    // Listing, newest first, in pages, inputs left out.
    let all = Filter::default();
    let first = store.list(&all, 2, None).await.unwrap();
    assert_eq!(first.jobs.iter().map(|j| j.job.id.as_str()).collect::<Vec<_>>(), ["c", "b"]);
    let rest = store.list(&all, 2, first.next).await.unwrap();
    assert_eq!((rest.jobs.len(), rest.next), (1, None));
    assert!(rest.jobs[0].job.input.is_empty(), "inputs are left out");
    let cancelled = Filter { state: Some(State::Cancelled), ..Filter::default() };
    assert_eq!(store.list(&cancelled, 10, None).await.unwrap().jobs.len(), 1);
    let theirs = Filter { client: Some("billing".into()), ..Filter::default() };
    assert!(store.list(&theirs, 10, None).await.unwrap().jobs.is_empty(), "another client's");
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.by_state, [(State::Running, 1), (State::Failed, 1), (State::Cancelled, 1)]);
    assert_eq!(stats.oldest_queued_age, None, "none queued");
    assert_eq!(store.delete_finished(HELD).await.unwrap(), 0, "within their retention");
    assert_eq!(store.delete_finished(Duration::ZERO).await.unwrap(), 2, "a and c");
    // A cancel asked of a run whose front is then lost cancels the job.
    assert!(store.renew("b", b.attempts, LAPSED).await.unwrap());
    assert_eq!(store.expire_leases(3).await.unwrap(), 0);
    assert_eq!(store.get("b").await.unwrap().unwrap().state, State::Cancelled);
    // A cancel asked of a run whose front then hands it back cancels it.
    store.submit(vec![job("d", None).into()]).await.unwrap();
    let d = claim(store, "f", HELD).await.unwrap();
    assert_eq!(d.job.id, "d");
    assert!(store.stats().await.unwrap().oldest_queued_age.is_none());
    store.cancel("d").await.unwrap();
    assert!(store.release("d", d.attempts).await.unwrap());
    let d = store.get("d").await.unwrap().unwrap();
    assert_eq!((d.state, d.failure.map(|f| f.code)), (State::Cancelled, Some(tonic::Code::Cancelled as i32)));
    // The oldest queued job's age.
    store.submit(vec![job("e", None).into()]).await.unwrap();
    assert!(store.stats().await.unwrap().oldest_queued_age.is_some_and(|age| age < HELD));
    // A job submitted to a front with room is recorded as claimed by it:
    // running, its first attempt, under its lease, and never claimed again.
    let front = Claimant { owner: "f".into(), lease: LAPSED };
    let taken = store.submit(vec![Submission { job: job("t", None), start: Start::RunBy(front) }]).await.unwrap();
    let Submitted::New(t) = &taken[0] else { panic!("a new job: {taken:?}") };
    assert_eq!((t.state, t.attempts, t.started_ms.is_some()), (State::Running, 1, true));
    assert!(store.claim("g", HELD, 10).await.unwrap().iter().all(|j| j.job.id != "t"), "not queued");
    assert!(store.renew("t", 1, HELD).await.unwrap(), "its lease is the front's");
    assert!(store.release("t", 1).await.unwrap());
    assert!(store.cancel("t").await.unwrap().is_some_and(|t| t.state == State::Cancelled && t.attempts == 0));
    // A job whose result the cache held is recorded done: never run, never
    // claimed, its output kept.
    let cached = Start::Succeeded(Bytes::from_static(b"cached"));
    let done = store.submit(vec![Submission { job: job("s", None), start: cached }]).await.unwrap();
    let Submitted::New(s) = &done[0] else { panic!("a new job: {done:?}") };
    assert_eq!((s.state, s.attempts, s.progress), (State::Succeeded, 0, 1.0));
    assert!(s.started_ms.is_some() && s.finished_ms.is_some() && s.failure.is_none(), "{s:?}");
    assert_eq!(store.get("s").await.unwrap().unwrap().output.as_deref(), Some(&b"cached"[..]));
    assert!(store.claim("g", HELD, 10).await.unwrap().iter().all(|j| j.job.id != "s"), "not queued");
    assert!(store.cancel("s").await.unwrap().is_some_and(|s| s.state == State::Succeeded), "done stays done");
}

/// Fronts claiming at the same moment each get a job of their own.
pub async fn concurrent_claims_never_share_a_job(store: &dyn JobStore) {
    let ids: Vec<String> = (0..40).map(|n| format!("j{n}")).collect();
    store.submit(ids.iter().map(|id| job(id, None).into()).collect()).await.unwrap();
    let claims = (0..8).map(|front| async move {
        let mut mine = Vec::new();
        while let Some(job) = claim(store, &format!("front-{front}"), HELD).await {
            mine.push(job.job.id);
        }
        mine
    });
    let mut claimed: Vec<String> = futures::future::join_all(claims).await.into_iter().flatten().collect();
    claimed.sort();
    let mut expected = ids;
    expected.sort();
    assert_eq!(claimed, expected, "every job claimed exactly once");
}
