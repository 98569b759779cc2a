//! The baselines: a plain tonic server on the same proto and tonic version,
//! running the same task code either inline in the handler (no dispatch at
//! all: the throughput ceiling, at the cost of everyone else's latency) or
//! through `spawn_blocking` (what users write by hand); and a bare
//! request/response ping-pong between two processes over a Unix socket, the
//! floor for any isolated call.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::Stream;
use offload_proto::offload::v1::{
    ExecuteEvent, ExecuteRequest, ExecuteResponse, ListTasksRequest, ListTasksResponse,
    compute_server::{Compute, ComputeServer},
};
use offload_worker::{CancelFlag, Catalog, CatalogOptions, Context, run_job};
use tonic::{Request, Response, Status, Streaming};

/// How the baseline server runs a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Style {
    /// In the handler, on the tokio thread.
    Inline,
    /// On tokio's blocking pool.
    Blocking,
}

struct Baseline {
    catalog: Arc<Catalog>,
    style: Style,
}

fn run_task(catalog: &Catalog, request: ExecuteRequest) -> Result<Bytes, Status> {
    let task = catalog.get(&request.task).map_err(|e| Status::not_found(e.to_string()))?;
    let job = Catalog::prepare(task.as_ref(), &request.params).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let ctx = Context::new(None, CancelFlag::new(), None);
    run_job(job.as_ref(), &ctx, request.input).map_err(|e| Status::internal(e.to_string()))
}

type Events = Pin<Box<dyn Stream<Item = Result<ExecuteEvent, Status>> + Send>>;
type Results = Pin<Box<dyn Stream<Item = Result<ExecuteResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Compute for Baseline {
    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<ExecuteResponse>, Status> {
        let request = request.into_inner();
        let id = request.id.clone();
        let output = match self.style {
            Style::Inline => run_task(&self.catalog, request)?,
            Style::Blocking => {
                let catalog = Arc::clone(&self.catalog);
                tokio::task::spawn_blocking(move || run_task(&catalog, request))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))??
            }
        };
        Ok(Response::new(ExecuteResponse { id, output, ..Default::default() }))
    }

    type ExecuteStreamStream = Events;

    async fn execute_stream(&self, _: Request<ExecuteRequest>) -> Result<Response<Events>, Status> {
        Err(Status::unimplemented("baseline: Execute only"))
    }

    type ExecuteBatchStream = Results;

    async fn execute_batch(&self, _: Request<Streaming<ExecuteRequest>>) -> Result<Response<Results>, Status> {
        Err(Status::unimplemented("baseline: Execute only"))
    }

    async fn list_tasks(&self, _: Request<ListTasksRequest>) -> Result<Response<ListTasksResponse>, Status> {
        Err(Status::unimplemented("baseline: Execute only"))
    }
}

/// Serves the baseline on `addr` until the process is killed.
pub async fn serve(addr: SocketAddr, style: Style) -> anyhow::Result<()> {
    let catalog = Arc::new(Catalog::builtin(&CatalogOptions { debug_tasks: true, ..Default::default() }));
    let service = ComputeServer::new(Baseline { catalog, style })
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    tonic::transport::Server::builder().add_service(service).serve(addr).await?;
    Ok(())
}

/// The peer of the ping-pong: echoes `size`-byte messages on `path`.
pub fn pingpong_peer(path: &Path, size: usize) -> anyhow::Result<()> {
    let listener = UnixListener::bind(path)?;
    let (mut stream, _) = listener.accept()?;
    let mut buf = vec![0u8; size];
    loop {
        if stream.read_exact(&mut buf).is_err() {
            return Ok(());
        }
        stream.write_all(&buf)?;
    }
}

/// Median round trip of `size`-byte messages to a peer process on `path`.
pub fn pingpong(path: &Path, size: usize, duration: Duration) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.into()),
        }
    };
    let mut buf = vec![7u8; size];
    let mut samples = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let sent = Instant::now();
        stream.write_all(&buf)?;
        stream.read_exact(&mut buf)?;
        samples.push(sent.elapsed());
    }
    samples.sort_unstable();
    Ok(samples[samples.len() / 2])
}
