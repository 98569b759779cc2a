//! The gRPC handlers of `offload.v1.Jobs`: each decodes, checks, asks
//! [`Jobs`] and encodes; errors become statuses through the one mapping in
//! [`crate::error`].

use std::{collections::BTreeMap, pin::Pin, sync::Arc, time::Instant};

use futures::Stream;
use offload_proto::{
    google::rpc,
    offload::v1::{
        CancelJobRequest, GetJobRequest, Job, JobState, ListJobsRequest, ListJobsResponse, ResubmitJobRequest,
        SubmitJobRequest, WaitJobRequest, jobs_server,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::{
    Jobs,
    store::{Filter, JobRecord, NewJob, State, Submitted},
};
use crate::{
    auth::Authenticated,
    cache::{Directives, Lookup},
    clients,
    dispatch::{Call, Dispatcher},
    schedule::Priority,
    telemetry,
};

/// Longest idempotency key.
const MAX_KEY_BYTES: usize = 128;
/// Largest (and default) page of List.
const MAX_PAGE: usize = 1000;
/// How often a waiter looks at its job for changes made by other fronts.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// The Jobs service; without a store, every method answers UNAVAILABLE.
#[derive(Debug, Clone)]
pub struct JobsService {
    jobs: Result<Arc<Jobs>, String>,
    dispatcher: Arc<Dispatcher>,
}

impl JobsService {
    /// The service over `jobs` (or why there is no store).
    pub fn new(jobs: Result<Arc<Jobs>, String>, dispatcher: Arc<Dispatcher>) -> Self {
        Self { jobs, dispatcher }
    }

    fn jobs(&self) -> Result<&Arc<Jobs>, Status> {
        self.jobs.as_ref().map_err(|why| Status::unavailable(format!("jobs are not available: {why}")))
    }

    /// Checks and records the job `request` asks for.
    async fn record(&self, request: Request<SubmitJobRequest>, traceparent: String) -> Result<Response<Job>, Status> {
        let jobs = self.jobs()?;
        // Its runs are scheduled as calls of its submitter (fair share, at
        // the priority it asked for): the authenticated client, else the
        // one `offload-client` names (not the peer's address, which a
        // retried Submit from another network would not share).
        let client = match request.extensions().get::<Authenticated>() {
            Some(Authenticated(client)) => Arc::clone(client),
            None => self.dispatcher.clients().identify(request.metadata(), None)?,
        };
        let priority = clients::priority(request.metadata(), Priority::Batch)?;
        let directives = Directives::of(request.metadata())?;
        let SubmitJobRequest { task, input, params, mode, idempotency_key } = request.into_inner();
        if idempotency_key.len() > MAX_KEY_BYTES {
            return Err(Status::invalid_argument(format!(
                "idempotency_key is {} bytes; at most {MAX_KEY_BYTES}",
                idempotency_key.len()
            )));
        }
        // Checked now as a call would be: a job that cannot run is refused
        // before it is recorded.
        let call = Call {
            task: task.clone(),
            input: input.clone(),
            params: params.clone(),
            mode,
            deadline: None,
            client: Some(Arc::clone(&client)),
            priority,
        };
        self.dispatcher.check(&call)?;
        // Checked before recording; concurrent submits of one client may
        // pass it together and overshoot by their number.
        if let Some(limit) = client.max_queued_jobs()
            && jobs.store.queued_of(client.name()).await? >= limit
        {
            return Err(Status::resource_exhausted(format!(
                "client {:?} already has {limit} jobs queued, its max_queued_jobs; submit again when one starts",
                client.name()
            )));
        }
        let output = self.cached(&call, directives, jobs.options.max_output_bytes).await;
        let new = NewJob {
            id: new_id()?,
            task,
            mode,
            params: params.into_iter().collect::<BTreeMap<_, _>>(),
            input,
            client: client.name().to_string(),
            priority,
            idempotency_key: (!idempotency_key.is_empty()).then_some(idempotency_key),
            traceparent,
        };
        match jobs.submit(new.clone(), output).await? {
            Submitted::New(record) => Ok(Response::new(job(record))),
            Submitted::Existing(record) if record.job.same_request(&new) => Ok(Response::new(job(record))),
            Submitted::Existing(record) => Err(Status::already_exists(format!(
                "idempotency_key {:?} names job {} of another request",
                new.idempotency_key.unwrap_or_default(),
                record.job.id
            ))),
        }
    }

    /// The stored result of work identical to `call`'s, if its task is
    /// cacheable and the cache holds one that fits a job's output: the job
    /// is then done at Submit, never run.
    async fn cached(&self, call: &Call, directives: Directives, max_output_bytes: usize) -> Option<bytes::Bytes> {
        let (cache, (key, task, _)) = self.dispatcher.cache().zip(self.dispatcher.cache_key(call).await)?;
        if directives.no_cache {
            return None;
        }
        match cache.lookup_stored(key, task, directives).await {
            Lookup::Hit(output, kind) if output.len() <= max_output_bytes => {
                drop(telemetry::cache_span(task, kind.label()));
                self.dispatcher.metrics().cache_lookup(task, kind.label());
                Some(output)
            }
            // Counted when it runs.
            _ => None,
        }
    }

    /// The job `id`, if `viewer` may see it: another client's job is as
    /// good as missing.
    async fn found(&self, id: &str, viewer: &Viewer) -> Result<JobRecord, Status> {
        match self.jobs()?.store.get(id).await? {
            Some(record) if viewer.sees(&record) => Ok(record),
            _ => Err(not_found(id)),
        }
    }
}

/// Whose jobs a caller may see.
#[derive(Debug, Clone, PartialEq)]
enum Viewer {
    /// Every job: an admin client, or an unauthenticated caller on loopback.
    All,
    /// Its own: an authenticated client.
    Client(String),
    /// Any whose id it knows, none listed: an unauthenticated caller from
    /// elsewhere (the id is the capability).
    ById,
}

impl Viewer {
    fn of<T>(request: &Request<T>) -> Self {
        match request.extensions().get::<Authenticated>() {
            Some(Authenticated(client)) if client.admin() => Viewer::All,
            Some(Authenticated(client)) => Viewer::Client(client.name().to_string()),
            None if request.remote_addr().is_some_and(|peer| peer.ip().is_loopback()) => Viewer::All,
            None => Viewer::ById,
        }
    }

    fn sees(&self, record: &JobRecord) -> bool {
        match self {
            Viewer::All | Viewer::ById => true,
            Viewer::Client(name) => record.job.client == *name,
        }
    }
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("no job {id:?}"))
}

/// A fresh job id: 128 random bits.
fn new_id() -> Result<String, Status> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| Status::internal(format!("no randomness for a job id: {e}")))?;
    Ok(format!("{:032x}", u128::from_be_bytes(bytes)))
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

/// The API's view of `record`.
fn job(record: JobRecord) -> Job {
    Job {
        id: record.job.id,
        task: record.job.task,
        state: record.state.number() as i32,
        output: record.output.unwrap_or_default(),
        error: record.failure.map(|f| rpc::Status { code: f.code, message: f.message, details: Vec::new() }),
        progress: record.progress,
        progress_message: record.progress_message,
        attempts: record.attempts,
        create_time: Some(timestamp(record.created_ms)),
        start_time: record.started_ms.map(timestamp),
        finish_time: record.finished_ms.map(timestamp),
        mode: record.job.mode,
    }
}

/// What a waiter is told again only when it changed.
fn shown(record: &JobRecord) -> (State, u32, u64, &str) {
    (record.state, record.attempts, record.progress.to_bits(), &record.progress_message)
}

type JobStream = Pin<Box<dyn Stream<Item = Result<Job, Status>> + Send>>;

#[tonic::async_trait]
impl jobs_server::Jobs for JobsService {
    async fn submit(&self, request: Request<SubmitJobRequest>) -> Result<Response<Job>, Status> {
        // The job's runs continue this span's trace, wherever they run.
        let span = telemetry::service_rpc_span("offload.v1.Jobs", "Submit", request.metadata());
        let traceparent = telemetry::traceparent(&span);
        let result = self.record(request, traceparent).instrument(span.clone()).await;
        telemetry::record_status(&span, result.as_ref().err());
        result
    }

    async fn resubmit(&self, request: Request<ResubmitJobRequest>) -> Result<Response<Job>, Status> {
        let span = telemetry::service_rpc_span("offload.v1.Jobs", "Resubmit", request.metadata());
        let traceparent = telemetry::traceparent(&span);
        let result = async {
            let viewer = Viewer::of(&request);
            let (metadata, extensions, ResubmitJobRequest { id }) = request.into_parts();
            let old = self.found(&id, &viewer).await?;
            let input = self.jobs()?.store.input(&id).await?.ok_or_else(|| not_found(&id))?;
            let again = SubmitJobRequest {
                task: old.job.task,
                input,
                params: old.job.params.into_iter().collect(),
                mode: old.job.mode,
                idempotency_key: String::new(),
            };
            // Submitted as the caller's own, through Submit's every check.
            self.record(Request::from_parts(metadata, extensions, again), traceparent).await
        }
        .instrument(span.clone())
        .await;
        telemetry::record_status(&span, result.as_ref().err());
        result
    }

    async fn get(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let viewer = Viewer::of(&request);
        Ok(Response::new(job(self.found(&request.into_inner().id, &viewer).await?)))
    }

    async fn cancel(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let viewer = Viewer::of(&request);
        let id = request.into_inner().id;
        self.found(&id, &viewer).await?;
        let record = self.jobs()?.cancel(&id).await?.ok_or_else(|| not_found(&id))?;
        Ok(Response::new(job(record)))
    }

    async fn list(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let client = match Viewer::of(&request) {
            Viewer::All => None,
            Viewer::Client(name) => Some(name),
            Viewer::ById => {
                return Err(Status::permission_denied(
                    "jobs are listed to callers on loopback, or to authenticated clients (their own); elsewhere a \
                     job's id is what lets one see it",
                ));
            }
        };
        let ListJobsRequest { state, page_size, page_token } = request.into_inner();
        let state = match JobState::try_from(state) {
            Ok(JobState::Unspecified) => None,
            Ok(_) => State::from_number(i64::from(state)),
            Err(_) => return Err(Status::invalid_argument(format!("state {state} is not a JobState"))),
        };
        let after = match page_token.as_str() {
            "" => None,
            token => {
                Some(token.parse::<i64>().map_err(|_| Status::invalid_argument("page_token is not one List gave"))?)
            }
        };
        let limit = match page_size as usize {
            0 => MAX_PAGE,
            n => n.min(MAX_PAGE),
        };
        let page = self.jobs()?.store.list(&Filter { state, client }, limit, after).await?;
        Ok(Response::new(ListJobsResponse {
            jobs: page.jobs.into_iter().map(job).collect(),
            next_page_token: page.next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    type WaitStream = JobStream;

    async fn wait(&self, request: Request<WaitJobRequest>) -> Result<Response<Self::WaitStream>, Status> {
        let jobs = Arc::clone(self.jobs()?);
        let viewer = Viewer::of(&request);
        let id = request.into_inner().id;
        // Subscribed before the first look, so that no change is missed.
        let mut changes = jobs.watch(&id);
        let first = match jobs.known_now(&id) {
            Some(known) if viewer.sees(&known) => JobRecord::clone(&known),
            _ => self.found(&id, &viewer).await?,
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(job(last.clone()))).await.is_err() {
                return;
            }
            let mut poll = tokio::time::interval_at((Instant::now() + WAIT_POLL).into(), WAIT_POLL);
            while !last.state.is_terminal() {
                let told = tokio::select! {
                    told = changes.changed() => told,
                    _ = poll.tick() => None,
                    () = tx.closed() => return,
                };
                let now = match told {
                    Some(now) => JobRecord::clone(&now),
                    None => match jobs.store.get(&id).await {
                        Ok(Some(now)) => now,
                        Ok(None) => return drop(tx.send(Err(not_found(&id))).await),
                        Err(err) => return drop(tx.send(Err(err.into())).await),
                    },
                };
                if shown(&now) != shown(&last) {
                    last = now;
                    if tx.send(Ok(job(last.clone()))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
