//! The gRPC handlers of `offload.v1.Compute`. Each one only decodes the
//! request, hands it to the [`Dispatcher`], and encodes the outcome; errors
//! become statuses through `CallError`'s one mapping.

use std::{pin::Pin, sync::Arc, time::Instant};

use futures::{Stream, StreamExt, stream::FuturesUnordered};
use offload_proto::offload::v1::{
    ExecuteEvent, ExecuteRequest, ExecuteResponse, ExecutionMode, ListTasksRequest, ListTasksResponse, ParamInfo,
    Progress, Stage, TaskInfo, TaskStats, compute_server::Compute, execute_event::Event,
};
use offload_worker::Mode;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use tracing::Instrument as _;

use crate::{
    auth::Authenticated,
    cache::{self, Directives, Lookup},
    clients::{self, Client},
    deadline,
    dispatch::{Call, Dispatcher, Outcome, ProgressState},
    error::{CallError, request_status},
    inflight::Usage,
    schedule::Priority,
    telemetry,
};

/// A boxed stream of results, as tonic's streaming methods return.
type ResultStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The Compute service.
#[derive(Debug, Clone)]
pub struct ComputeService {
    dispatcher: Arc<Dispatcher>,
    /// Reported in every response's stats.
    replica: Arc<str>,
    /// Items of one batch stream run at once.
    batch_concurrency: usize,
    /// Largest message, for rewriting tonic's decode errors.
    max_message_bytes: usize,
    /// Counts calls in flight, so that shutdown can wait for them.
    in_flight: TaskTracker,
}

impl ComputeService {
    /// A service over `dispatcher`.
    pub fn new(
        dispatcher: Arc<Dispatcher>,
        replica: &str,
        batch_concurrency: usize,
        max_message_bytes: usize,
        in_flight: TaskTracker,
    ) -> Self {
        Self { dispatcher, replica: replica.into(), batch_concurrency, max_message_bytes, in_flight }
    }

    /// Answers `call` from the result cache when `cacheable` (its key, from
    /// [`Dispatcher::cache_key`]) and an identical call's result is stored
    /// or under way (then true), else runs it with `run` and stores its
    /// result.
    async fn run_cached<F>(
        &self,
        call: Call,
        cacheable: Option<(cache::Key, &'static str, Mode)>,
        directives: Directives,
        run: impl FnOnce(Call) -> F,
    ) -> Result<(Outcome, bool), CallError>
    where
        F: Future<Output = Result<Outcome, CallError>>,
    {
        let Some((cache, (key, task, mode))) = self.dispatcher.cache().zip(cacheable) else {
            return Ok((run(call).await?, false));
        };
        let metrics = self.dispatcher.metrics();
        // Waiting for an identical call is bounded by this call's deadline.
        let lookup = cache.lookup(key, task, directives);
        let lookup = match call.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), lookup).await.map_err(|_| {
                metrics.call(task, mode.as_str(), tonic::Code::DeadlineExceeded, None);
                CallError::DeadlineExceeded { task, stage: "waiting for an identical call" }
            })?,
            None => lookup.await,
        };
        match lookup {
            Lookup::Hit(output, kind) => Ok((self.hit(output, task, mode, kind), true)),
            Lookup::Miss(leader) => {
                metrics.cache_lookup(task, "miss");
                let outcome = run(call).await?;
                metrics.cache_evicted(&leader.finish(&outcome.output).await.evicted);
                Ok((outcome, false))
            }
        }
    }

    /// A call of `task` in `mode` answered from the cache (`kind`): no
    /// queue, no run, no worker. Counted as a call that succeeded, and as a
    /// cache answer of its kind, with a span saying so.
    fn hit(&self, output: bytes::Bytes, task: &'static str, mode: Mode, kind: cache::HitKind) -> Outcome {
        drop(telemetry::cache_span(task, kind.label()));
        let metrics = self.dispatcher.metrics();
        metrics.cache_lookup(task, kind.label());
        metrics.call(task, mode.as_str(), tonic::Code::Ok, None);
        let zero = std::time::Duration::ZERO;
        Outcome { output, mode, queued: zero, run: zero, worker_pid: 0 }
    }

    /// The response carrying `outcome`; its output counts against the
    /// in-flight budget until it is written to the connection.
    fn response(&self, id: String, outcome: Outcome, cached: bool, usage: &Usage) -> ExecuteResponse {
        usage.charge_output(outcome.output.len());
        ExecuteResponse {
            id,
            output: outcome.output,
            mode: wire_mode(outcome.mode) as i32,
            stats: Some(TaskStats {
                queued_us: Some(outcome.queued.as_micros() as u64),
                run_us: Some(outcome.run.as_micros() as u64),
                worker_pid: outcome.worker_pid,
                replica: self.replica.to_string(),
                cached,
            }),
            error: None,
        }
    }
}

/// What a call's metadata says of it: its deadline, client and priority.
#[derive(Debug, Clone)]
struct Origin {
    deadline: Option<Instant>,
    client: Arc<Client>,
    priority: Priority,
}

impl Origin {
    /// Reads `request`'s metadata; `priority` unless it asks for another.
    /// A malformed value refuses the call (counted like any refused call).
    /// The client is recorded on the call's `span`.
    fn of<T>(
        dispatcher: &Dispatcher,
        request: &Request<T>,
        priority: Priority,
        span: &tracing::Span,
    ) -> Result<Self, Status> {
        let metadata = request.metadata();
        let read = || -> Result<Self, CallError> {
            Ok(Self {
                deadline: deadline::from_metadata(metadata, Instant::now()),
                client: match request.extensions().get::<Authenticated>() {
                    Some(Authenticated(client)) => Arc::clone(client),
                    None => dispatcher.clients().identify(metadata, request.remote_addr())?,
                },
                priority: clients::priority(metadata, priority)?,
            })
        };
        let origin = read().map_err(|err| {
            dispatcher.metrics().refused("unknown", "unknown", err.code(), err.rejection());
            Status::from(err)
        })?;
        span.record("offload.client", origin.client.name().as_ref());
        Ok(origin)
    }

    /// Splits a request into its id and the dispatcher's call.
    fn call(&self, request: ExecuteRequest) -> (String, Call) {
        let ExecuteRequest { task, input, params, mode, id } = request;
        let (deadline, priority) = (self.deadline, self.priority);
        (id, Call { task, input, params, mode, deadline, client: Some(Arc::clone(&self.client)), priority })
    }
}

/// The call's `offload-cache` directives; a malformed one refuses it
/// (counted like any refused call).
fn cache_directives<T>(dispatcher: &Dispatcher, request: &Request<T>) -> Result<Directives, Status> {
    Directives::of(request.metadata()).map_err(|err| {
        dispatcher.metrics().refused("unknown", "unknown", err.code(), err.rejection());
        Status::from(err)
    })
}

/// The response's `offload-cache` header.
fn cache_header(hit: bool) -> tonic::metadata::AsciiMetadataValue {
    tonic::metadata::AsciiMetadataValue::from_static(if hit { "hit" } else { "miss" })
}

fn wire_mode(mode: Mode) -> ExecutionMode {
    match mode {
        Mode::Pool => ExecutionMode::Pool,
        Mode::Isolated => ExecutionMode::Isolated,
    }
}

fn progress_event(stage: Stage, state: &ProgressState) -> ExecuteEvent {
    ExecuteEvent {
        event: Some(Event::Progress(Progress {
            fraction: state.fraction,
            message: state.message.clone(),
            stage: stage as i32,
        })),
    }
}

#[tonic::async_trait]
impl Compute for ComputeService {
    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<ExecuteResponse>, Status> {
        let _in_flight = self.in_flight.token();
        let span = telemetry::rpc_span("Execute", request.metadata());
        let origin = Origin::of(&self.dispatcher, &request, Priority::Interactive, &span)?;
        let directives = cache_directives(&self.dispatcher, &request)?;
        let usage = Usage::of(&request);
        let input = usage.claim_input();
        let (id, call) = origin.call(request.into_inner());
        let result = async {
            let run = |call| async { self.dispatcher.admit(call).await?.run_unary().await };
            let cacheable = self.dispatcher.cache_key(&call).await;
            let (outcome, hit) = self.run_cached(call, cacheable, directives, run).await?;
            drop(input);
            let mut response = Response::new(self.response(id, outcome, hit, &usage));
            response.metadata_mut().insert(cache::HEADER, cache_header(hit));
            Ok(response)
        }
        .instrument(span.clone())
        .await;
        telemetry::record_status(&span, result.as_ref().err());
        result
    }

    type ExecuteStreamStream = ResultStream<ExecuteEvent>;

    async fn execute_stream(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStreamStream>, Status> {
        let in_flight = self.in_flight.token();
        let span = telemetry::rpc_span("ExecuteStream", request.metadata());
        let origin = Origin::of(&self.dispatcher, &request, Priority::Interactive, &span)?;
        let directives = cache_directives(&self.dispatcher, &request)?;
        let usage = Usage::of(&request);
        let input = usage.claim_input();
        let (id, call) = origin.call(request.into_inner());
        // A stored result is the stream's one event; a miss runs and stores.
        let leader = match self.dispatcher.cache().zip(self.dispatcher.cache_key(&call).await) {
            Some((cache, (key, task, mode))) => match cache.lookup_stored(key, task, directives).await {
                Lookup::Hit(output, kind) => {
                    let outcome = span.in_scope(|| self.hit(output, task, mode, kind));
                    let response = self.response(id, outcome, true, &usage);
                    let result = ExecuteEvent { event: Some(Event::Result(response)) };
                    drop(input);
                    telemetry::record_status(&span, None);
                    let mut response =
                        Response::new(Box::pin(futures::stream::iter([Ok(result)])) as Self::ExecuteStreamStream);
                    response.metadata_mut().insert(cache::HEADER, cache_header(true));
                    return Ok(response);
                }
                Lookup::Miss(leader) => {
                    self.dispatcher.metrics().cache_lookup(task, "miss");
                    Some(leader)
                }
            },
            None => None,
        };
        let admitted = match self.dispatcher.admit(call).instrument(span.clone()).await {
            Ok(admitted) => admitted,
            Err(err) => {
                let status = Status::from(err);
                telemetry::record_status(&span, Some(&status));
                return Err(status);
            }
        };
        let (events, events_rx) = mpsc::channel(16);
        let service = self.clone();
        let stream_span = span.clone();
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let (progress_tx, mut progress) = watch::channel(ProgressState::default());
            if events.send(Ok(progress_event(Stage::Queued, &ProgressState::default()))).await.is_err() {
                return;
            }
            let run = admitted.run(Some(progress_tx));
            tokio::pin!(run);
            let mut reported_running = false;
            let mut progress_open = true;
            loop {
                tokio::select! {
                    biased;
                    result = &mut run => {
                        drop(input);
                        if !reported_running {
                            let state = progress.borrow().clone();
                            let _ = events.send(Ok(progress_event(Stage::Running, &state))).await;
                        }
                        let last = match result {
                            Ok(outcome) => {
                                if let Some(leader) = leader {
                                    let evicted = leader.finish(&outcome.output).await.evicted;
                                    service.dispatcher.metrics().cache_evicted(&evicted);
                                }
                                Ok(ExecuteEvent { event: Some(Event::Result(service.response(id, outcome, false, &usage))) })
                            }
                            Err(err) => Err(Status::from(err)),
                        };
                        telemetry::record_status(&stream_span, last.as_ref().err());
                        let _ = events.send(last).await;
                        return;
                    }
                    changed = progress.changed(), if progress_open => {
                        if changed.is_err() {
                            progress_open = false;
                            continue;
                        }
                        let state = progress.borrow_and_update().clone();
                        if state.running {
                            reported_running = true;
                            if events.send(Ok(progress_event(Stage::Running, &state))).await.is_err() {
                                return;
                            }
                        }
                    }
                    // The client went away: dropping `run` cancels the task.
                    () = events.closed() => return,
                }
            }
        }.instrument(span));
        let mut response = Response::new(Box::pin(ReceiverStream::new(events_rx)) as Self::ExecuteStreamStream);
        response.metadata_mut().insert(cache::HEADER, cache_header(false));
        Ok(response)
    }

    type ExecuteBatchStream = ResultStream<ExecuteResponse>;

    async fn execute_batch(
        &self,
        request: Request<Streaming<ExecuteRequest>>,
    ) -> Result<Response<Self::ExecuteBatchStream>, Status> {
        let in_flight = self.in_flight.token();
        let span = telemetry::rpc_span("ExecuteBatch", request.metadata());
        let stream_span = span.clone();
        // A batch's items are throughput work unless the caller says otherwise.
        let origin = Origin::of(&self.dispatcher, &request, Priority::Batch, &span)?;
        let directives = cache_directives(&self.dispatcher, &request)?;
        let usage = Usage::of(&request);
        let mut requests = request.into_inner();
        let (results, results_rx) = mpsc::channel(self.batch_concurrency);
        let service = self.clone();
        tokio::spawn(
            async move {
                let _in_flight = in_flight;
                let mut running = FuturesUnordered::<BatchItem>::new();
                let mut input_open = true;
                while input_open || !running.is_empty() {
                    let reply = tokio::select! {
                        next = requests.message(), if input_open && running.len() < service.batch_concurrency => {
                            match next {
                                Ok(Some(request)) => {
                                    // Held while the item's input is in use.
                                    let input = usage.claim_input();
                                    let (id, call) = origin.call(request);
                                    if let Some(cacheable) = service.dispatcher.cache_key(&call).await {
                                        // Admitted once the cache has no answer for it.
                                        let service = service.clone();
                                        running.push(Box::pin(async move {
                                            let run = |call| async { service.dispatcher.admit(call).await?.run(None).await };
                                            let result = service.run_cached(call, Some(cacheable), directives, run).await;
                                            drop(input);
                                            (id, result)
                                        }) as BatchItem);
                                        continue;
                                    }
                                    match service.dispatcher.admit(call).await {
                                        Ok(admitted) => {
                                            running.push(Box::pin(async move {
                                                let result = admitted.run(None).await.map(|outcome| (outcome, false));
                                                drop(input);
                                                (id, result)
                                            }));
                                            continue;
                                        }
                                        Err(err) => failed_item(id, err),
                                    }
                                }
                                Ok(None) => {
                                    input_open = false;
                                    continue;
                                }
                                Err(status) => {
                                    // The request stream is broken; nothing more can be read.
                                    let status = request_status(status, service.max_message_bytes);
                                    telemetry::record_status(&stream_span, Some(&status));
                                    let _ = results.send(Err(status)).await;
                                    return;
                                }
                            }
                        }
                        Some((id, result)) = running.next(), if !running.is_empty() => match result {
                            Ok((outcome, cached)) => service.response(id, outcome, cached, &usage),
                            Err(err) => failed_item(id, err),
                        },
                        // The client went away: dropping `running` cancels its tasks.
                        () = results.closed() => return,
                    };
                    if results.send(Ok(reply)).await.is_err() {
                        return;
                    }
                }
                telemetry::record_status(&stream_span, None);
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(results_rx))))
    }

    async fn list_tasks(&self, request: Request<ListTasksRequest>) -> Result<Response<ListTasksResponse>, Status> {
        // An authenticated client sees the tasks it may run.
        let client = request.extensions().get::<Authenticated>().map(|a| &a.0);
        let tasks = self
            .dispatcher
            .tasks()
            .iter()
            .filter(|task| client.is_none_or(|c| c.may_run(task.spec().name)))
            .map(|task| {
                let spec = task.spec();
                TaskInfo {
                    name: spec.name.to_string(),
                    description: spec.description.to_string(),
                    default_mode: wire_mode(spec.default_mode) as i32,
                    allowed_modes: spec.allowed_modes.iter().map(|m| wire_mode(*m) as i32).collect(),
                    cacheable: spec.cacheable,
                    version: spec.version,
                    params: spec
                        .params
                        .iter()
                        .map(|p| ParamInfo {
                            name: p.name.to_string(),
                            description: p.description.to_string(),
                            default_value: p.default.unwrap_or_default().to_string(),
                            required: p.default.is_none(),
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(ListTasksResponse { tasks }))
    }
}

/// A batch item that failed: its status travels in `error`.
/// A batch item under way: its id and its outcome, and whether the cache
/// answered it.
type BatchItem = std::pin::Pin<Box<dyn Future<Output = (String, Result<(Outcome, bool), CallError>)> + Send>>;

fn failed_item(id: String, err: CallError) -> ExecuteResponse {
    ExecuteResponse { id, error: Some(err.into()), ..Default::default() }
}
