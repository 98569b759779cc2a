//! `offload.admin.v1.Admin`: what this replica and its workers are doing
//! now (read by `offload top` and `offload workers`), and the operator's
//! levers on its workers (recycle one, change how many run).
//!
//! It shares the gRPC port. Who may call it: when clients authenticate,
//! those declared with `admin = true`; otherwise only callers on loopback
//! (the machine's own operators), so an open port does not hand out the
//! levers.

use std::{sync::Arc, time::Instant};

use offload_proto::offload::admin::v1::{
    ExecutorLoad, RecycleWorkerRequest, RecycleWorkerResponse, SetWorkersRequest, SetWorkersResponse, SnapshotRequest,
    SnapshotResponse, TaskTotals, Worker, admin_server::Admin,
};
use tonic::{Request, Response, Status};

use crate::{auth::Authenticated, dispatch::Dispatcher, isolated::Supervisor};

/// The admin service of one replica.
#[derive(Debug)]
pub struct AdminService {
    dispatcher: Arc<Dispatcher>,
    replica: String,
    started: Instant,
}

/// The pool name of Offload's own workers.
const OWN_POOL: &str = "ISOLATED";

impl AdminService {
    /// The admin service of `dispatcher`'s replica, named `replica`.
    pub fn new(dispatcher: Arc<Dispatcher>, replica: &str) -> Self {
        Self { dispatcher, replica: replica.to_string(), started: Instant::now() }
    }

    /// Refuses callers that may not use the admin service.
    fn allowed<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.dispatcher.clients().authenticating() {
            return match request.extensions().get::<Authenticated>() {
                Some(Authenticated(client)) if client.admin() => Ok(()),
                Some(Authenticated(client)) => Err(Status::permission_denied(format!(
                    "client {:?} may not use the admin service (set admin = true in its [[client]] table)",
                    client.name()
                ))),
                None => Err(Status::unauthenticated("the admin service needs credentials")),
            };
        }
        match request.remote_addr() {
            Some(peer) if peer.ip().is_loopback() => Ok(()),
            _ => Err(Status::permission_denied(
                "the admin service answers callers on loopback only, unless clients authenticate (admin = true)",
            )),
        }
    }

    /// Every pool: Offload's own workers, then each worker program's.
    fn pools(&self) -> impl Iterator<Item = (&str, &Supervisor)> {
        std::iter::once((OWN_POOL, self.dispatcher.isolated()))
            .chain(self.dispatcher.programs().iter().map(|p| (p.name.as_str(), &p.supervisor)))
    }

    fn pool(&self, name: &str) -> Result<&Supervisor, Status> {
        let name = if name.is_empty() { OWN_POOL } else { name };
        self.pools().find(|(pool, _)| *pool == name).map(|(_, s)| s).ok_or_else(|| {
            let known: Vec<&str> = self.pools().map(|(pool, _)| pool).collect();
            Status::not_found(format!("no worker pool {name:?}; pools: {}", known.join(", ")))
        })
    }
}

/// Resident memory of `pid`, from /proc (0 when it cannot be read).
fn resident_bytes(pid: u32) -> u64 {
    let page = rustix::param::page_size() as u64;
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1).and_then(|pages| pages.parse::<u64>().ok()))
        .map_or(0, |pages| pages * page)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn snapshot(&self, request: Request<SnapshotRequest>) -> Result<Response<SnapshotResponse>, Status> {
        self.allowed(&request)?;
        let tasks = self
            .dispatcher
            .metrics()
            .task_totals()
            .into_iter()
            .map(|t| TaskTotals {
                task: t.task.to_string(),
                mode: t.mode.to_string(),
                calls: t.calls,
                failed: t.failed,
                ran: t.ran,
                run_seconds: t.run.as_secs_f64(),
                queued_seconds: t.queued.as_secs_f64(),
                codes: t.codes.iter().map(|(code, count)| (code.to_string(), *count)).collect(),
                recent_p50_run_seconds: t.recent.0.as_secs_f64(),
                recent_p99_run_seconds: t.recent.1.as_secs_f64(),
            })
            .collect();
        let pool = self.dispatcher.pool();
        let mut executors = vec![ExecutorLoad {
            executor: "POOL".into(),
            queued: pool.admission().queued() as u64,
            busy: pool.admission().running() as u64,
            size: pool.threads() as u64,
        }];
        let mut workers = Vec::new();
        let now = Instant::now();
        for (name, supervisor) in self.pools() {
            executors.push(ExecutorLoad {
                executor: name.to_string(),
                queued: supervisor.admission().queued() as u64,
                busy: supervisor.admission().running() as u64,
                size: supervisor.size() as u64,
            });
            workers.extend(supervisor.workers().into_iter().map(|w| Worker {
                pool: name.to_string(),
                slot: w.slot as u32,
                pid: w.pid.unwrap_or(0),
                state: w.state.to_string(),
                task: w.task.to_string(),
                rss_bytes: w.pid.map_or(0, resident_bytes),
                tasks_done: w.tasks_done,
                age_seconds: w.started.map_or(0.0, |s| now.duration_since(s).as_secs_f64()),
            }));
        }
        Ok(Response::new(SnapshotResponse {
            replica: self.replica.clone(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            tasks,
            executors,
            workers,
            inflight_bytes: self.dispatcher.budget().used() as u64,
            inflight_budget: self.dispatcher.budget().limit() as u64,
        }))
    }

    async fn recycle_worker(
        &self,
        request: Request<RecycleWorkerRequest>,
    ) -> Result<Response<RecycleWorkerResponse>, Status> {
        self.allowed(&request)?;
        let pid = request.get_ref().pid;
        if !self.pools().any(|(_, supervisor)| supervisor.recycle(pid)) {
            return Err(Status::not_found(format!("no worker of this replica has pid {pid}")));
        }
        tracing::info!(worker.pid = pid, "the admin API asked to recycle worker {pid}");
        Ok(Response::new(RecycleWorkerResponse {}))
    }

    async fn set_workers(&self, request: Request<SetWorkersRequest>) -> Result<Response<SetWorkersResponse>, Status> {
        self.allowed(&request)?;
        let SetWorkersRequest { pool, workers } = request.into_inner();
        if !(1..=256).contains(&workers) {
            return Err(Status::invalid_argument(format!("workers = {workers} is not in 1..=256")));
        }
        let previous = self.pool(&pool)?.resize(workers as usize);
        tracing::info!(pool = %pool, workers, previous, "the admin API set the number of workers");
        Ok(Response::new(SetWorkersResponse { previous: previous as u32 }))
    }
}
