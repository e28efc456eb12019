//! The span processor: a bounded queue of finished spans and one tokio task that exports them
//! in batches, counting everything it does.
//!
//! It replaces the SDK's `BatchSpanProcessor`, which offers no hook for what an operator needs
//! to see (how many spans were dropped and why, how long exports take, how full the queue is)
//! and which runs each export on a thread of its own through a blocking executor. Here:
//!
//! - [`SpanProcessor::on_end`] (on the connection's worker, when the span closes) pushes the
//!   span into a mutex-guarded vector and returns: no channel node, no wake-up per span. When
//!   the queue is full the span is dropped and counted (`queue_full`). When a full batch is
//!   waiting, the export task is notified (one notification per batch).
//! - The export task sleeps until a batch is full or the schedule delay passed, then exports
//!   what is queued in batches, one request at a time, each bounded by the batch export
//!   timeout. Success counts `echo_otlp_spans_exported_total`; failure counts the batch as
//!   `export_failed` and the error by kind, and logs at most one line per second per distinct
//!   error ([`LogLimiter`]) with the number of lines suppressed.
//! - Shutdown exports what is queued until the shutdown deadline; what is left, and anything
//!   that ends after shutdown began, is counted as `shutdown`.
//!
//! The exporter is async (tonic for gRPC, hyper for HTTP) and runs on the service's tokio
//! runtime: no extra thread and no blocking HTTP client.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::{mpsc as tokio_mpsc, Notify};

use super::log_limit::LogLimiter;
use super::metrics::OtlpMetrics;
use super::otel_env::BatchSettings;

/// What the processor asks of its export task besides exporting on schedule.
enum Command {
    /// Export everything queued now; answer when done.
    Flush(mpsc::SyncSender<OTelSdkResult>),
    /// Export what can be exported before the deadline, count the rest, stop.
    Shutdown(Instant, mpsc::SyncSender<OTelSdkResult>),
}

/// State shared by the processor (span ends) and its export task.
struct Shared {
    queue: Mutex<Vec<SpanData>>,
    /// Notified when a full batch is waiting.
    batch_ready: Notify,
    shutting_down: AtomicBool,
    settings: BatchSettings,
    metrics: Arc<OtlpMetrics>,
}

impl Shared {
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<SpanData>> {
        // A panic while holding the lock leaves a valid Vec behind: keep using it.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take up to one batch from the queue.
    fn take_batch(&self) -> Vec<SpanData> {
        let mut queue = self.lock_queue();
        let batch = if queue.len() <= self.settings.max_export_batch_size {
            std::mem::take(&mut *queue)
        } else {
            queue.drain(..self.settings.max_export_batch_size).collect()
        };
        self.metrics.queue_spans.set(queue.len() as i64);
        batch
    }

    fn dropped(&self, reason: &str, count: usize) {
        if count > 0 {
            self.metrics
                .spans_dropped
                .with_label_values(&[reason])
                .inc_by(count as u64);
        }
    }
}

/// The batching, counting span processor. See the module documentation.
pub struct MeteredBatchProcessor {
    shared: Arc<Shared>,
    commands: tokio_mpsc::UnboundedSender<Command>,
    /// Logs "span queue full" at most once per second.
    queue_full_log: LogLimiter,
}

impl std::fmt::Debug for MeteredBatchProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBatchProcessor")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl MeteredBatchProcessor {
    /// Start the export task for `exporter` on the current tokio runtime.
    pub fn start<E>(exporter: E, settings: BatchSettings, metrics: Arc<OtlpMetrics>) -> Self
    where
        E: SpanExporter + 'static,
    {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            batch_ready: Notify::new(),
            shutting_down: AtomicBool::new(false),
            settings,
            metrics,
        });
        let (commands, receiver) = tokio_mpsc::unbounded_channel();
        tokio::spawn(export_task(exporter, shared.clone(), receiver));
        MeteredBatchProcessor {
            shared,
            commands,
            queue_full_log: LogLimiter::default(),
        }
    }

    /// Send `command` to the export task and wait (blocking this thread) for its answer.
    fn ask(
        &self,
        command: impl FnOnce(mpsc::SyncSender<OTelSdkResult>) -> Command,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (reply, answer) = mpsc::sync_channel(1);
        if self.commands.send(command(reply)).is_err() {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        answer
            .recv_timeout(timeout)
            .unwrap_or(Err(OTelSdkError::Timeout(timeout)))
    }
}

impl SpanProcessor for MeteredBatchProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let shared = &self.shared;
        if shared.shutting_down.load(Ordering::Relaxed) {
            shared.dropped("shutdown", 1);
            return;
        }
        let mut queue = shared.lock_queue();
        if queue.len() >= shared.settings.max_queue_size {
            drop(queue);
            shared.dropped("queue_full", 1);
            if let Some(suppressed) = self.queue_full_log.admit("queue_full", Instant::now()) {
                tracing::warn!(
                    max_queue_size = shared.settings.max_queue_size,
                    suppressed,
                    "span export queue full: dropping spans (OTEL_BSP_MAX_QUEUE_SIZE)"
                );
            }
            return;
        }
        if queue.capacity() == 0 {
            queue.reserve(shared.settings.max_export_batch_size);
        }
        queue.push(span);
        let len = queue.len();
        drop(queue);
        shared.metrics.queue_spans.set(len as i64);
        if len == shared.settings.max_export_batch_size {
            shared.batch_ready.notify_one();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let timeout = self.shared.settings.export_timeout * 2;
        self.ask(Command::Flush, timeout)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if self.shared.shutting_down.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        let deadline = Instant::now() + timeout;
        // A little longer than the task's own deadline, so its answer normally arrives.
        self.ask(
            |reply| Command::Shutdown(deadline, reply),
            timeout + Duration::from_millis(200),
        )
    }
}

/// The export task: wait for a full batch, the schedule delay or a command; export.
async fn export_task<E: SpanExporter>(
    exporter: E,
    shared: Arc<Shared>,
    mut commands: tokio_mpsc::UnboundedReceiver<Command>,
) {
    let failures = LogLimiter::default();
    let exporter = Exporter {
        exporter,
        shared: &shared,
        failures: &failures,
    };
    loop {
        let command = tokio::select! {
            () = tokio::time::sleep(shared.settings.schedule_delay) => None,
            () = shared.batch_ready.notified() => None,
            command = commands.recv() => match command {
                Some(command) => Some(command),
                // The processor is gone without a shutdown: nothing can end spans any more.
                None => return,
            },
        };
        match command {
            None => {
                // Failures are counted and logged inside; nobody waits for this result.
                let _ = exporter.export_queued(None).await;
            }
            Some(Command::Flush(reply)) => {
                let result = exporter.export_queued(None).await;
                let _ = reply.send(result);
            }
            Some(Command::Shutdown(deadline, reply)) => {
                let result = exporter.export_queued(Some(deadline)).await;
                let left = shared.take_all();
                shared.dropped("shutdown", left);
                let _ = exporter.exporter.shutdown();
                let _ = reply.send(if left == 0 {
                    result
                } else {
                    Err(OTelSdkError::Timeout(
                        deadline.saturating_duration_since(Instant::now()),
                    ))
                });
                return;
            }
        }
    }
}

impl Shared {
    /// Empty the queue, returning how many spans were in it.
    fn take_all(&self) -> usize {
        let mut queue = self.lock_queue();
        let left = queue.len();
        queue.clear();
        self.metrics.queue_spans.set(0);
        left
    }
}

/// The exporter with the counters around it.
struct Exporter<'a, E> {
    exporter: E,
    shared: &'a Shared,
    failures: &'a LogLimiter,
}

impl<E: SpanExporter> Exporter<'_, E> {
    /// Export what is queued now, batch by batch, stopping at `deadline` if given. Spans
    /// that end meanwhile wait for the next round. The result is the last batch's.
    async fn export_queued(&self, deadline: Option<Instant>) -> OTelSdkResult {
        let mut result = Ok(());
        let mut budget = self.shared.lock_queue().len();
        while budget > 0 {
            let batch = self.shared.take_batch();
            if batch.is_empty() {
                break;
            }
            budget = budget.saturating_sub(batch.len());
            let mut limit = self.shared.settings.export_timeout;
            if let Some(deadline) = deadline {
                limit = limit.min(deadline.saturating_duration_since(Instant::now()));
                if limit.is_zero() {
                    self.shared.dropped("shutdown", batch.len());
                    continue;
                }
            }
            result = self.export(batch, limit).await;
        }
        result
    }

    async fn export(&self, batch: Vec<SpanData>, limit: Duration) -> OTelSdkResult {
        let count = batch.len();
        let metrics = &self.shared.metrics;
        let started = Instant::now();
        let result = match tokio::time::timeout(limit, self.exporter.export(batch)).await {
            Ok(result) => result,
            Err(_) => Err(OTelSdkError::Timeout(limit)),
        };
        metrics
            .export_duration
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => metrics.spans_exported.inc_by(count as u64),
            Err(err) => {
                let kind = error_kind(err);
                metrics.export_errors.with_label_values(&[kind]).inc();
                self.shared.dropped("export_failed", count);
                let message = err.to_string();
                if let Some(suppressed) = self.failures.admit(&message, Instant::now()) {
                    tracing::warn!(
                        kind,
                        error = %message,
                        spans = count,
                        suppressed,
                        "OTLP export failed; spans dropped"
                    );
                }
            }
        }
        result
    }
}

/// The `kind` label of a failed export (one of `EXPORT_ERROR_KINDS`), from the error the
/// OTLP exporter returned.
pub fn error_kind(err: &OTelSdkError) -> &'static str {
    match err {
        OTelSdkError::Timeout(_) => "timeout",
        OTelSdkError::InternalFailure(message) => {
            if message.contains("DeadlineExceeded") || message.contains("timed out") {
                "timeout"
            } else if message.contains("network error") || message.contains("Unavailable") {
                "network"
            } else if message.contains("status code") {
                "http_status"
            } else if message.contains("gRPC code") {
                "grpc_status"
            } else {
                "other"
            }
        }
        _ => "other",
    }
}
