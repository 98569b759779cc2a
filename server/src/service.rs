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

    /// The response carrying `outcome`; its output counts against the
    /// in-flight budget until it is written to the connection.
    fn response(&self, id: String, outcome: Outcome, usage: &Usage) -> ExecuteResponse {
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
        let usage = Usage::of(&request);
        let input = usage.claim_input();
        let (id, call) = origin.call(request.into_inner());
        let result = async {
            let outcome = self.dispatcher.admit(call).await?.run_unary().await?;
            drop(input);
            Ok(Response::new(self.response(id, outcome, &usage)))
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
        let usage = Usage::of(&request);
        let input = usage.claim_input();
        let (id, call) = origin.call(request.into_inner());
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
                                Ok(ExecuteEvent { event: Some(Event::Result(service.response(id, outcome, &usage))) })
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
        Ok(Response::new(Box::pin(ReceiverStream::new(events_rx))))
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
        let usage = Usage::of(&request);
        let mut requests = request.into_inner();
        let (results, results_rx) = mpsc::channel(self.batch_concurrency);
        let service = self.clone();
        tokio::spawn(
            async move {
                let _in_flight = in_flight;
                let mut running = FuturesUnordered::new();
                let mut input_open = true;
                while input_open || !running.is_empty() {
                    let reply = tokio::select! {
                        next = requests.message(), if input_open && running.len() < service.batch_concurrency => {
                            match next {
                                Ok(Some(request)) => {
                                    // Held while the item's input is in use.
                                    let input = usage.claim_input();
                                    let (id, call) = origin.call(request);
                                    match service.dispatcher.admit(call).await {
                                        Ok(admitted) => {
                                            running.push(async move {
                                                let result = admitted.run(None).await;
                                                drop(input);
                                                (id, result)
                                            });
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
                            Ok(outcome) => service.response(id, outcome, &usage),
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
fn failed_item(id: String, err: CallError) -> ExecuteResponse {
    ExecuteResponse { id, error: Some(err.into()), ..Default::default() }
}
