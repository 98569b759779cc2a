//! Traces from inside a worker process: one span per task, parented through
//! the `traceparent` the front puts in the task frame, exported over OTLP by
//! the worker itself under its own service name. Off unless the front passed
//! an OTLP endpoint (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) in the environment.
//!
//! The exporter's gRPC channel needs a tokio runtime: a one-thread runtime
//! runs in the background only when tracing is on.

use std::collections::HashMap;

use opentelemetry::{
    KeyValue,
    trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{SdkTracer, SdkTracerProvider, Span},
};

/// The worker's span service name when the front gives none.
pub const DEFAULT_SERVICE_NAME: &str = "offload-worker";

/// The OTLP traces endpoint the environment names, if any (the
/// signal-specific variable wins, as the OpenTelemetry spec says). The front
/// decides with it whether traces are on, and passes both on to workers.
pub fn endpoint_from_env() -> Option<String> {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|e| !e.is_empty()))
}

/// The worker's tracer, if tracing is on.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    _runtime: tokio::runtime::Runtime,
}

impl Tracing {
    /// Starts tracing if the environment names an OTLP endpoint.
    pub fn from_env() -> Option<Self> {
        let endpoint = endpoint_from_env()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("offload-otlp")
            .enable_all()
            .build()
            .ok()?;
        let provider = runtime.block_on(async {
            use opentelemetry_otlp::WithExportConfig as _;
            let exporter =
                opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build().ok()?;
            let mut resource = Resource::builder();
            if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
                resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
            }
            Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
        })?;
        let tracer = provider.tracer("offload-worker");
        Some(Self { provider, tracer, _runtime: runtime })
    }

    /// A span for running `task`, continuing the trace of `traceparent`.
    pub fn task_span(&self, task: &str, traceparent: &str) -> Span {
        let carrier: HashMap<String, String> = [("traceparent".to_string(), traceparent.to_string())].into();
        let parent = opentelemetry::propagation::TextMapPropagator::extract(&TraceContextPropagator::new(), &carrier);
        self.tracer
            .span_builder(format!("worker {task}"))
            .with_kind(SpanKind::Internal)
            .with_attributes([
                KeyValue::new("task.name", task.to_string()),
                KeyValue::new("worker.pid", i64::from(std::process::id())),
            ])
            .start_with_context(&self.tracer, &parent)
    }

    /// Ends `span`, marking it failed with `error` if there was one.
    pub fn end(mut span: Span, error: Option<String>) {
        if let Some(message) = error {
            span.set_status(Status::error(message));
        }
        span.end();
    }

    /// Exports what is buffered.
    pub fn shutdown(self) {
        let _ = self.provider.shutdown();
    }
}
