//! Traces from inside a worker process: the span of each traced task (one
//! whose RunTask carries a `traceparent`), recorded as plain data and sent
//! back in its TaskDone. The front exports it under the worker service's
//! name, so the worker needs no exporter, no runtime and no OpenTelemetry
//! SDK, and a span is never lost with a worker stopped right after its task.

use std::time::SystemTime;

use offload_proto::offload::worker::v1::{SpanAttribute, WorkerSpan, span_attribute::Value};

/// A task's span being recorded.
#[derive(Debug)]
pub struct TaskSpan {
    task: String,
    start: u64,
}

impl TaskSpan {
    /// Starts the span of `task`, if the front traces it (a non-empty
    /// `traceparent`).
    pub fn start(task: &str, traceparent: &str) -> Option<Self> {
        (!traceparent.is_empty()).then(|| Self { task: task.to_string(), start: unix_nanos(SystemTime::now()) })
    }

    /// Ends the span now, failed with `error` if there was one.
    pub fn end(self, error: Option<String>) -> WorkerSpan {
        let attribute = |key: &str, value: Value| SpanAttribute { key: key.to_string(), value: Some(value) };
        WorkerSpan {
            name: format!("worker {}", self.task),
            start_unix_nanos: self.start,
            end_unix_nanos: unix_nanos(SystemTime::now()),
            attributes: vec![
                attribute("task.name", Value::Text(self.task)),
                attribute("worker.pid", Value::Integer(i64::from(std::process::id()))),
            ],
            error: error.unwrap_or_default(),
            children: Vec::new(),
        }
    }
}

fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_traced_tasks_are_recorded() {
        assert!(TaskSpan::start("hash.sha256", "").is_none());
        let span = TaskSpan::start("hash.sha256", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let data = span.end(Some("bad input".into()));
        assert_eq!(data.name, "worker hash.sha256");
        assert!(data.start_unix_nanos > 0 && data.end_unix_nanos >= data.start_unix_nanos);
        assert_eq!(data.error, "bad input");
        let pid = data.attributes.iter().find(|a| a.key == "worker.pid").unwrap();
        assert_eq!(pid.value, Some(Value::Integer(i64::from(std::process::id()))));
    }
}
