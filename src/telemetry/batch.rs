//! The span processor: a bounded queue of finished connection spans and one tokio task that
//! encodes and exports them in batches, counting everything it does.
//!
//! It replaces the SDK's `BatchSpanProcessor`, which offers no hook for what an operator needs
//! to see (how many spans were dropped and why, how long exports take, how full the queue is)
//! and which runs each export on a thread of its own through a blocking executor. Here:
//!
//! - [`MeteredBatchProcessor::push`] (on the connection's worker, when the connection is
//!   lost) pushes the compact [`SpanRecord`] into a mutex-guarded vector and returns: no
//!   channel node, no wake-up per span, no encoding. When the queue is full the span is
//!   dropped and counted (`queue_full`). When a full batch is waiting, the export task is
//!   notified (one notification per batch).
//! - The export task sleeps until a batch is full or the schedule delay passed, then encodes
//!   what is queued to protobuf (module `otlp_proto`) and exports it in batches, one request
//!   at a time, each bounded by the batch export timeout. Success counts `echo_otlp_spans_exported_total`; failure counts the batch as
//!   `export_failed` and the error by kind, and logs at most one line per second per distinct
//!   error ([`LogLimiter`]) with the number of lines suppressed.
//! - Shutdown exports what is queued until the shutdown deadline; what is left, and anything
//!   that ends after shutdown began, is counted as `shutdown`.
//!
//! The client is async (tonic for gRPC, hyper for HTTP, module `exporter`) and runs on the
//! service's tokio runtime: no extra thread and no blocking HTTP client.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tokio_mpsc, oneshot, Notify};

use super::connection_span::SpanRecord;
use super::exporter::{ExportFailure, OtlpClient};
use super::log_limit::LogLimiter;
use super::metrics::OtlpMetrics;
use super::otel_env::BatchSettings;
use super::otlp_proto::SpanEncoder;

/// First wait before retrying a transient export failure.
const RETRY_INITIAL_DELAY: Duration = Duration::from_millis(200);
/// Longest wait between retries.
const RETRY_MAX_DELAY: Duration = Duration::from_millis(3200);
/// Most retries of one request (all within the export timeout).
const RETRY_MAX: u32 = 5;

/// What the processor asks of its export task besides exporting on schedule.
enum Command {
    /// Export what can be exported before the deadline, count the rest, stop; answer whether
    /// every span left.
    Shutdown(Instant, oneshot::Sender<bool>),
}

/// State shared by the processor (span ends) and its export task.
struct Shared {
    queue: Mutex<Vec<SpanRecord>>,
    /// Notified when a full batch is waiting.
    batch_ready: Notify,
    shutting_down: AtomicBool,
    settings: BatchSettings,
    metrics: Arc<OtlpMetrics>,
}

impl Shared {
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<SpanRecord>> {
        // A panic while holding the lock leaves a valid Vec behind: keep using it.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take up to one batch from the queue.
    fn take_batch(&self) -> Vec<SpanRecord> {
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
    /// Start the export task, encoding with `encoder` and sending with `client`, on the
    /// current tokio runtime.
    pub fn start(
        encoder: SpanEncoder,
        client: OtlpClient,
        settings: BatchSettings,
        metrics: Arc<OtlpMetrics>,
    ) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            batch_ready: Notify::new(),
            shutting_down: AtomicBool::new(false),
            settings,
            metrics,
        });
        let (commands, receiver) = tokio_mpsc::unbounded_channel();
        tokio::spawn(export_task(encoder, client, shared.clone(), receiver));
        MeteredBatchProcessor {
            shared,
            commands,
            queue_full_log: LogLimiter::default(),
        }
    }

    /// Queue a finished connection's span (or drop and count it: shutting down, queue full).
    pub fn push(&self, span: SpanRecord) {
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

    /// Export what is queued, waiting at most `timeout`; what cannot be exported in time, and
    /// every span that ends from now on, is dropped and counted as `shutdown`. Returns whether
    /// everything queued was exported (false also when called twice).
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        if self.shared.shutting_down.swap(true, Ordering::Relaxed) {
            return false;
        }
        let deadline = Instant::now() + timeout;
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::Shutdown(deadline, reply))
            .is_err()
        {
            return false;
        }
        // A little longer than the task's own deadline, so its answer normally arrives.
        tokio::time::timeout(timeout + Duration::from_millis(200), answer)
            .await
            .is_ok_and(|answer| answer.unwrap_or(false))
    }
}

/// The export task: wait for a full batch, the schedule delay or a command; export.
async fn export_task(
    encoder: SpanEncoder,
    client: OtlpClient,
    shared: Arc<Shared>,
    mut commands: tokio_mpsc::UnboundedReceiver<Command>,
) {
    let failures = LogLimiter::default();
    let mut exporter = Exporter {
        encoder,
        client,
        shared: &shared,
        failures: &failures,
        last_body: 0,
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
                exporter.export_queued(None).await;
            }
            Some(Command::Shutdown(deadline, reply)) => {
                let exported = exporter.export_queued(Some(deadline)).await;
                let left = shared.take_all();
                shared.dropped("shutdown", left);
                let _ = reply.send(exported && left == 0);
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

/// The encoder and client with the counters around them.
struct Exporter<'a> {
    encoder: SpanEncoder,
    client: OtlpClient,
    shared: &'a Shared,
    failures: &'a LogLimiter,
    /// Size of the last request body, to allocate the next one at once.
    last_body: usize,
}

impl Exporter<'_> {
    /// Export what is queued now, batch by batch, stopping at `deadline` if given. Spans
    /// that end meanwhile wait for the next round. Returns whether every batch was exported.
    async fn export_queued(&mut self, deadline: Option<Instant>) -> bool {
        let mut all = true;
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
                    all = false;
                    continue;
                }
            }
            all &= self.export(batch, limit).await;
        }
        all
    }

    /// Send `body`, retrying transient failures with exponential backoff (200 ms doubling to
    /// 3.2 s, at most 5 retries, as the SDK's exporter did); the caller bounds the whole.
    async fn send(&self, body: opentelemetry_http::Bytes) -> Result<(), ExportFailure> {
        let mut delay = RETRY_INITIAL_DELAY;
        let mut retries = 0;
        loop {
            match self.client.export(body.clone()).await {
                Err(err) if err.retryable && retries < RETRY_MAX => {
                    retries += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX_DELAY);
                }
                result => return result,
            }
        }
    }

    async fn export(&mut self, batch: Vec<SpanRecord>, limit: Duration) -> bool {
        let count = batch.len();
        let metrics = &self.shared.metrics;
        let started = Instant::now();
        let mut body = Vec::with_capacity(self.last_body + self.last_body / 8);
        self.encoder.encode(&batch, &mut body);
        drop(batch);
        self.last_body = body.len();
        let body = opentelemetry_http::Bytes::from(body);
        let result = match tokio::time::timeout(limit, self.send(body)).await {
            Ok(result) => result,
            Err(_) => Err(ExportFailure::new(
                "timeout",
                format!("no answer within the export timeout ({limit:?})"),
            )),
        };
        metrics
            .export_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                metrics.spans_exported.inc_by(count as u64);
                true
            }
            Err(err) => {
                metrics.export_errors.with_label_values(&[err.kind]).inc();
                self.shared.dropped("export_failed", count);
                if let Some(suppressed) = self.failures.admit(&err.message, Instant::now()) {
                    tracing::warn!(
                        kind = err.kind,
                        error = %err.message,
                        spans = count,
                        suppressed,
                        "OTLP export failed; spans dropped"
                    );
                }
                false
            }
        }
    }
}
