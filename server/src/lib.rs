//! Offload's front service: the gRPC API, the dispatcher and its executors.
//! A program embeds it with [`main`], passing the [`TaskSet`] it serves.
//!
//! Layout, in the order a request flows:
//! - [`launch`]: the program: flags, config, tasks, runtime, signals.
//! - [`cluster`]: the replica supervisor (`--replicas`).
//! - [`server`]: assembles the services and layers, serves HTTP/2, drains.
//! - [`connection`]: one connection's life: first-byte and idle timeouts, TLS.
//! - [`tls`]: TLS and mutual TLS, certificates reloaded when their files change.
//! - [`web`]: gRPC-Web for browsers, beside plain gRPC.
//! - [`service`]: thin gRPC handlers of `offload.v1.Compute`.
//! - [`admin`]: `offload.admin.v1.Admin`: the live view of a replica and its workers.
//! - [`console`]: the web console's page (`--console-listen`), embedded.
//! - [`deadline`]: the call's deadline from `grpc-timeout`.
//! - [`auth`]: bearer tokens and client certificates of declared clients.
//! - [`clients`]: who a call is from, its priority, declared clients' limits and permissions.
//! - [`cache`]: the result cache: identical calls answered once (stored, coalesced).
//! - [`dispatch`]: request checks, executor choice, deadline and cancellation.
//! - [`inflight`]: the budget of request and response bytes held at once.
//! - [`admission`] and [`cost`]: bounded queues and deadline-aware admission.
//! - [`schedule`]: the order waiting calls are served in (priorities, clients in turn).
//! - [`pool`]: the rayon executor (POOL mode).
//! - [`isolated`]: the worker-process executor (ISOLATED mode).
//! - [`error`]: call errors and their one mapping to gRPC statuses.
//! - [`metrics`]: Prometheus counters and the `/metrics` endpoint.
//! - [`pg`]: PostgreSQL connections for what fronts share (jobs, the cache).
//! - [`plain_http`]: the HTTP/1.1 endpoints beside gRPC (metrics, console).
//! - [`telemetry`]: logs and OpenTelemetry traces.
//! - [`config`], [`shutdown`]: process set-up around it all.
//! - [`check`]: `--check-config`, one worker of each kind started and reported.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod cache;
pub mod check;
pub mod clients;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod console;
pub mod cost;
pub mod deadline;
pub mod dispatch;
pub mod error;
pub mod inflight;
pub mod isolated;
pub mod jobs;
pub mod launch;
pub mod metrics;
pub mod pg;
pub mod plain_http;
pub mod pool;
pub mod schedule;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod web;

pub use launch::main;
pub use offload_worker::TaskSet;
