//! What a worker writes to stderr: read line by line, its last lines kept
//! to explain a death, and logged. While the worker starts, its lines are
//! held rather than logged: once it has shaken hands they are logged as
//! usual, and if it fails to start they go with the failure (its last line
//! into the reason callers see, all of them into one log entry), so a
//! program that keeps failing its start does not log each line of its
//! traceback on every retry.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::ChildStderr,
    sync::watch,
};

/// Lines kept to explain a death.
const TAIL_LINES: usize = 20;
/// Lines held while a worker starts (a long traceback's end is what matters).
const STARTUP_LINES: usize = 200;

/// A worker's stderr, read by a task of its own.
#[derive(Debug)]
pub(super) struct Stderr {
    lines: Arc<Mutex<Lines>>,
    done: watch::Receiver<bool>,
}

#[derive(Debug, Default)]
struct Lines {
    tail: VecDeque<String>,
    /// Held while the worker starts; `None` once its lines are logged live.
    startup: Option<VecDeque<String>>,
}

fn push_bounded(lines: &mut VecDeque<String>, line: String, bound: usize) {
    if lines.len() == bound {
        lines.pop_front();
    }
    lines.push_back(line);
}

impl Stderr {
    /// Reads `pipe`, the stderr of worker `pid`, until it closes.
    pub(super) fn read(pipe: Option<ChildStderr>, pid: u32) -> Self {
        let lines = Arc::new(Mutex::new(Lines { tail: VecDeque::new(), startup: Some(VecDeque::new()) }));
        let (tx, done) = watch::channel(false);
        match pipe {
            Some(pipe) => {
                let sink = Arc::clone(&lines);
                tokio::spawn(async move {
                    let mut reader = BufReader::new(pipe).lines();
                    while let Ok(Some(line)) = reader.next_line().await {
                        if line.trim().is_empty() {
                            continue;
                        }
                        let mut lines = sink.lock().unwrap_or_else(|e| e.into_inner());
                        match &mut lines.startup {
                            Some(held) => push_bounded(held, line.clone(), STARTUP_LINES),
                            None => tracing::warn!(worker.pid = pid, "worker stderr: {line}"),
                        }
                        push_bounded(&mut lines.tail, line, TAIL_LINES);
                    }
                    let _ = tx.send(true);
                });
            }
            None => drop(tx.send(true)),
        }
        Self { lines, done }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The worker has shaken hands: what it wrote while starting is
    /// logged now, and later lines as they come.
    pub(super) fn started(&self, pid: u32) {
        for line in self.lock().startup.take().unwrap_or_default() {
            tracing::warn!(worker.pid = pid, "worker stderr: {line}");
        }
    }

    /// Every line the worker wrote while starting, once its stderr has
    /// closed (waiting up to `bound` for that: the process is gone or going).
    pub(super) async fn startup(&self, bound: Duration) -> Vec<String> {
        self.closed(bound).await;
        self.lock().startup.as_ref().map(|held| held.iter().cloned().collect()).unwrap_or_default()
    }

    /// Its last lines, once its stderr has closed (waiting up to `bound`).
    pub(super) async fn tail(&self, bound: Duration) -> String {
        self.closed(bound).await;
        self.lock().tail.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }

    async fn closed(&self, bound: Duration) {
        let mut done = self.done.clone();
        let _ = tokio::time::timeout(bound, done.wait_for(|d| *d)).await;
    }
}
