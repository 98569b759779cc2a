//! The baselines: a plain tonic server on the same proto and tonic version,
//! running the same task code either inline in the handler (no dispatch at
//! all: the throughput ceiling, at the cost of everyone else's latency) or
//! through `spawn_blocking` (what users write by hand); and a bare
//! request/response ping-pong between two processes over a Unix socket, the
//! floor for any isolated call.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::net::UnixStream,
    },
    pin::Pin,
    process::Command,
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

/// The peer of the ping-pong: echoes `size`-byte messages on the inherited
/// socket `fd` until it closes.
pub fn pingpong_peer(fd: i32, size: usize) -> anyhow::Result<()> {
    anyhow::ensure!(fd > 2, "--fd {fd} is a standard stream");
    // SAFETY: `pingpong` passes this process its end of a socketpair, open,
    // under this number; nothing else here owns it.
    #[allow(unsafe_code)]
    let mut stream = unsafe { UnixStream::from_raw_fd(fd) };
    let mut buf = vec![0u8; size];
    loop {
        if stream.read_exact(&mut buf).is_err() {
            return Ok(());
        }
        stream.write_all(&buf)?;
    }
}

/// Median round trip of `size`-byte messages to a peer process (this
/// program's `pingpong-peer`) over a socketpair, as the front reaches its
/// workers, for `duration`.
pub fn pingpong(size: usize, duration: Duration) -> anyhow::Result<Duration> {
    let (mut stream, theirs) = UnixStream::pair()?;
    // Inherited by the peer alone: nothing else is spawned meanwhile.
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())?;
    let mut peer = Command::new(std::env::current_exe()?)
        .args(["pingpong-peer", "--size", &size.to_string(), "--fd", &theirs.as_raw_fd().to_string()])
        .spawn()?;
    drop(theirs);
    let mut measure = || -> anyhow::Result<Duration> {
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
    };
    let measured = measure();
    let _ = peer.kill();
    let _ = peer.wait();
    measured
}
