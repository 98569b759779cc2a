//! Logs and traces. Logs go through `tracing-subscriber`: text on a
//! terminal, JSON otherwise or when asked, level from RUST_LOG (default
//! info). Traces are off unless an OTLP endpoint is configured (the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, or `--otlp-endpoint`); then spans are
//! batched and exported over OTLP/gRPC (what Jaeger ingests on port 4317),
//! the sampler comes from `OTEL_TRACES_SAMPLER`/`_ARG` and the resource from
//! `OTEL_SERVICE_NAME`/`OTEL_RESOURCE_ATTRIBUTES`. Export never blocks a
//! call: a dead collector only loses spans. W3C `traceparent` propagation
//! is installed either way.

use std::{
    collections::HashMap,
    io::IsTerminal,
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use offload_proto::offload::worker::v1::{WorkerSpan, span_attribute};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{SdkTracer, SdkTracerProvider},
};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::LogFormat;

/// Whether spans are exported. Call spans cost a few microseconds each, so
/// without an exporter they are not created at all.
static EXPORTING: AtomicBool = AtomicBool::new(false);

fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The service name used when neither the flag nor the environment sets one.
pub const DEFAULT_SERVICE_NAME: &str = "offload";

/// Where traces go, if anywhere.
#[derive(Debug, Clone, Default)]
pub struct TraceSettings {
    /// OTLP/gRPC endpoint; None reads OTEL_EXPORTER_OTLP_ENDPOINT (and off if unset).
    pub endpoint: Option<String>,
    /// service.name; None reads OTEL_SERVICE_NAME, then the default.
    pub service_name: Option<String>,
    /// Which traces are kept.
    pub sampler: Sampling,
    /// Extra resource attributes.
    pub resource_attributes: Vec<(String, String)>,
    /// service.instance.id: the replica's name.
    pub instance: String,
}

/// A trace sampler, as the OTEL_TRACES_SAMPLER values name them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Sampling {
    /// Follow the caller's decision; sample root traces (the default).
    #[default]
    ParentBasedAlwaysOn,
    /// Follow the caller's decision; drop root traces.
    ParentBasedAlwaysOff,
    /// Follow the caller's decision; sample this share of root traces.
    ParentBasedRatio(f64),
    /// Sample everything.
    AlwaysOn,
    /// Sample nothing.
    AlwaysOff,
    /// Sample this share of all traces.
    Ratio(f64),
}

impl Sampling {
    /// Parses a sampler name and its argument.
    pub fn parse(name: Option<&str>, arg: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<f64, String> {
            match arg {
                None => Ok(1.0),
                Some(a) => a
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("sampler argument {a:?} is not a ratio in 0..=1")),
            }
        };
        Ok(match name.map(str::trim).unwrap_or("parentbased_always_on") {
            "parentbased_always_on" | "" => Sampling::ParentBasedAlwaysOn,
            "parentbased_always_off" => Sampling::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => Sampling::ParentBasedRatio(ratio()?),
            "always_on" => Sampling::AlwaysOn,
            "always_off" => Sampling::AlwaysOff,
            "traceidratio" => Sampling::Ratio(ratio()?),
            other => {
                return Err(format!(
                    "unknown sampler {other:?}; use always_on, always_off, traceidratio or their parentbased_ forms"
                ));
            }
        })
    }

    /// The OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG values naming it.
    pub fn env(self) -> (&'static str, Option<String>) {
        match self {
            Sampling::ParentBasedAlwaysOn => ("parentbased_always_on", None),
            Sampling::ParentBasedAlwaysOff => ("parentbased_always_off", None),
            Sampling::ParentBasedRatio(r) => ("parentbased_traceidratio", Some(r.to_string())),
            Sampling::AlwaysOn => ("always_on", None),
            Sampling::AlwaysOff => ("always_off", None),
            Sampling::Ratio(r) => ("traceidratio", Some(r.to_string())),
        }
    }

    fn sampler(self) -> opentelemetry_sdk::trace::Sampler {
        use opentelemetry_sdk::trace::Sampler;
        match self {
            Sampling::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Sampling::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Sampling::ParentBasedRatio(r) => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r))),
            Sampling::AlwaysOn => Sampler::AlwaysOn,
            Sampling::AlwaysOff => Sampler::AlwaysOff,
            Sampling::Ratio(r) => Sampler::TraceIdRatioBased(r),
        }
    }
}

/// Parses `key=value,key=value` resource attributes.
pub fn parse_attributes(raw: &str) -> Result<Vec<(String, String)>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(format!("{pair:?} is not key=value")),
        })
        .collect()
}

impl TraceSettings {
    /// Whether traces are exported at all.
    pub fn enabled(&self) -> bool {
        self.endpoint.is_some() || endpoint_from_env().is_some()
    }

    /// The front's service.name: the setting, else a `service.name`
    /// resource attribute, else the default.
    fn service_name(&self) -> String {
        let attribute = self.resource_attributes.iter().find(|(k, _)| k == "service.name").map(|(_, v)| v.clone());
        self.service_name.clone().or(attribute).unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string())
    }
}

/// The OTLP traces endpoint the environment names, if any (the
/// signal-specific variable wins, as the OpenTelemetry spec says).
fn endpoint_from_env() -> Option<String> {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|e| !e.is_empty()))
}

/// The tracers of the spans workers report: Offload's own workers' (service
/// `<front>-worker`), and each worker program's (`<front>-<program>`).
static WORKER_TRACERS: OnceLock<WorkerTracers> = OnceLock::new();

#[derive(Debug)]
struct WorkerTracers {
    offload: SdkTracer,
    programs: HashMap<String, SdkTracer>,
}

/// Keeps the trace pipelines (the front's and its workers') alive;
/// `shutdown` flushes what is buffered.
#[derive(Debug)]
pub struct Telemetry {
    providers: Vec<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports buffered spans (bounded by the exporter's timeout) and stops.
    pub fn shutdown(self) {
        for provider in self.providers {
            if let Err(err) = provider.shutdown() {
                tracing::warn!(error = %err, "flushing traces at shutdown failed");
            }
        }
    }
}

/// Installs the global subscriber and, if configured, the trace exporters:
/// the front's, its workers', and one per worker program of `programs`.
/// Must run inside the tokio runtime (the exporters' channels live there).
pub fn init<'a>(format: LogFormat, traces: &TraceSettings, programs: impl IntoIterator<Item = &'a str>) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // JSON lines carry the fields of the spans they are in, the call's trace id among them.
    let fmt = if json {
        let instance = traces.instance.clone();
        fmt.json()
            .flatten_event(true)
            .with_current_span(true)
            .map_event_format(|json| WithReplica { inner: json, field: replica_field(&instance) })
            .boxed()
    } else {
        fmt.boxed()
    };
    let front = traces.service_name();
    // The front's pipeline, its workers', then one per worker program.
    let programs: Vec<&str> = programs.into_iter().collect();
    let services = [front.clone(), format!("{front}-worker")]
        .into_iter()
        .chain(programs.iter().map(|program| format!("{front}-{program}")));
    let (providers, error) = if traces.enabled() {
        match services.map(|service| provider(traces, &service)).collect::<Result<Vec<_>, _>>() {
            Ok(providers) => (providers, None),
            Err(err) => (Vec::new(), Some(err)),
        }
    } else {
        (Vec::new(), None)
    };
    if let [_, offload, for_programs @ ..] = providers.as_slice() {
        let programs = programs
            .iter()
            .zip(for_programs)
            .map(|(program, provider)| (program.to_string(), provider.tracer("offload-worker-program")))
            .collect();
        let _ = WORKER_TRACERS.set(WorkerTracers { offload: offload.tracer("offload-worker"), programs });
    }
    let otel = providers.first().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("offload-server")));
    EXPORTING.store(otel.is_some(), Ordering::Relaxed);
    tracing_subscriber::registry().with(filter).with(fmt).with(otel).init();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if let Some(err) = error {
        tracing::warn!(error = %err, "traces are off: the OTLP exporter could not be built");
    }
    Telemetry { providers }
}

/// A pipeline exporting spans of the service `service`.
fn provider(
    traces: &TraceSettings,
    service: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = &traces.endpoint {
        exporter = exporter.with_endpoint(endpoint.clone());
    }
    let resource = Resource::builder().with_attributes(
        traces.resource_attributes.iter().map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone())),
    );
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new("service.instance.id", traces.instance.clone()))
        .with_service_name(service.to_string());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter.build()?)
        .with_sampler(traces.sampler.sampler())
        .with_resource(resource.build())
        .build())
}

/// Reads W3C trace context from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl opentelemetry::propagation::Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The server span of one RPC, named and attributed after the OpenTelemetry
/// RPC conventions, continuing the caller's trace when its metadata carries
/// a `traceparent`.
pub fn rpc_span(method: &'static str, metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
    service_rpc_span("offload.v1.Compute", method, metadata)
}

/// The span of an RPC of `service`, as [`rpc_span`] for Compute's.
pub fn service_rpc_span(
    service: &'static str,
    method: &'static str,
    metadata: &tonic::metadata::MetadataMap,
) -> tracing::Span {
    use tracing::field::Empty;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "rpc",
        otel.name = format!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        offload.client = Empty,
        trace_id = Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    let _ = span.set_parent(parent);
    use opentelemetry::trace::TraceContextExt as _;
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", trace_id.to_string());
    }
    span
}

/// Records how an RPC ended on its span; failures mark it as an error.
pub fn record_status(span: &tracing::Span, status: Option<&tonic::Status>) {
    let code = status.map_or(tonic::Code::Ok, tonic::Status::code);
    span.record("rpc.grpc.status_code", code as i64);
    if let Some(status) = status {
        mark_error(span, status.message().to_string());
    }
}

/// Marks `span` as failed with `message`.
fn mark_error(span: &tracing::Span, message: String) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    span.set_status(opentelemetry::trace::Status::error(message));
}

/// The W3C `traceparent` of `span`, for a worker to continue the trace.
pub fn traceparent(span: &tracing::Span) -> String {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !exporting() {
        return String::new();
    }
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&span.context(), &mut carrier));
    carrier.remove("traceparent").unwrap_or_default()
}

/// The span of a job's run, continuing the trace of the Submit that
/// recorded it (`traceparent`, W3C; empty: a trace of its own).
pub fn job_span(id: &str, task: &str, attempt: u32, traceparent: &str) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "job",
        otel.name = format!("job {task}"),
        job.id = id,
        job.attempt = attempt,
        task.name = task,
    );
    if !traceparent.is_empty() {
        let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
        let _ = span.set_parent(opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier)));
    }
    span
}

/// The span of a task's run, under `parent` (the RPC's span, or the batch
/// stream's for each of its items).
pub fn execution_span(parent: &tracing::Span, task: &str, mode: &'static str, input_bytes: usize) -> tracing::Span {
    use tracing::field::Empty;
    if !exporting() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        parent: parent,
        "execute",
        otel.name = format!("execute {task}"),
        task.name = task,
        offload.mode = mode,
        input.bytes = input_bytes as i64,
        output.bytes = Empty,
        worker.pid = Empty,
    )
}

/// The span of the time a call waited for an executor.
pub fn queue_span(mode: &'static str) -> tracing::Span {
    if !exporting() {
        return tracing::Span::none();
    }
    tracing::info_span!("queue", otel.name = "queue", offload.mode = mode)
}

/// The span of a call answered from the result cache: `result` is `hit`
/// (a stored result) or `coalesced` (an identical call's). Entered and
/// dropped at once: the answer takes no time worth showing, only its kind.
pub fn cache_span(task: &'static str, result: &'static str) -> tracing::Span {
    if !exporting() {
        return tracing::Span::none();
    }
    tracing::info_span!("cache", otel.name = "cache", task.name = task, offload.cache = result)
}

/// Exports the span a worker reported for a task, as a child of the task's
/// `execution` span, under the service of Offload's workers or, for a
/// worker of `program`, that program's.
pub fn export_worker_span(execution: &tracing::Span, reported: &WorkerSpan, program: Option<&str>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let Some(tracers) = WORKER_TRACERS.get() else { return };
    let tracer = match program {
        Some(program) => tracers.programs.get(program),
        None => Some(&tracers.offload),
    };
    if let Some(tracer) = tracer {
        export_reported(tracer, &execution.context(), reported);
    }
}

fn export_reported(tracer: &SdkTracer, parent: &opentelemetry::Context, reported: &WorkerSpan) {
    use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _};
    use span_attribute::Value;
    let at = |nanos: u64| SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos);
    let attributes = reported.attributes.iter().filter_map(|a| {
        let value = match a.value.as_ref()? {
            Value::Text(text) => opentelemetry::Value::from(text.clone()),
            Value::Integer(n) => opentelemetry::Value::from(*n),
            Value::Number(x) => opentelemetry::Value::from(*x),
            Value::Flag(b) => opentelemetry::Value::from(*b),
        };
        Some(opentelemetry::KeyValue::new(a.key.clone(), value))
    });
    let mut span = tracer
        .span_builder(reported.name.clone())
        .with_kind(SpanKind::Internal)
        .with_start_time(at(reported.start_unix_nanos))
        .with_attributes(attributes)
        .start_with_context(tracer, parent);
    if !reported.error.is_empty() {
        span.set_status(opentelemetry::trace::Status::error(reported.error.clone()));
    }
    let context = parent.with_span(span);
    for child in &reported.children {
        export_reported(tracer, &context, child);
    }
    context.span().end_with_timestamp(at(reported.end_unix_nanos));
}

/// Records a run's result on its execution span.
pub fn record_run<E: std::fmt::Display>(span: &tracing::Span, result: Result<usize, E>) {
    match result {
        Ok(output_bytes) => {
            span.record("output.bytes", output_bytes as i64);
        }
        Err(err) => mark_error(span, err.to_string()),
    }
}

/// JSON log lines with the replica's name as their first field, so lines of
/// several replicas sharing one output stay attributable.
struct WithReplica<F> {
    inner: F,
    /// `"replica":"<name>",` ready to insert.
    field: String,
}

fn replica_field(name: &str) -> String {
    format!("\"replica\":{},", serde_json::Value::from(name))
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithReplica<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.inner.format_event(ctx, tracing_subscriber::fmt::format::Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{{}{rest}", self.field),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_and_attributes_parse_as_the_spec_names_them() {
        assert_eq!(Sampling::parse(None, None), Ok(Sampling::ParentBasedAlwaysOn));
        assert_eq!(Sampling::parse(Some("traceidratio"), Some("0.25")), Ok(Sampling::Ratio(0.25)));
        assert_eq!(Sampling::parse(Some("parentbased_traceidratio"), None), Ok(Sampling::ParentBasedRatio(1.0)));
        assert!(Sampling::parse(Some("traceidratio"), Some("2")).is_err());
        assert!(Sampling::parse(Some("sometimes"), None).is_err());
        assert_eq!(
            parse_attributes("deployment.environment=prod, team = compute"),
            Ok(vec![("deployment.environment".into(), "prod".into()), ("team".into(), "compute".into())])
        );
        assert!(parse_attributes("novalue").is_err());
    }
}
