//! Log lines reach stdout through a bounded queue and one writer thread, so a reader of stdout
//! that stops draining (a stalled container log pipe, `echo-service | sleep 40`) can never
//! block echo, the admin port or shutdown.
//!
//! Writing to stdout directly blocks the writing thread in `write(2)` once the pipe is full;
//! with logs on the runtime's workers that froze the whole process, signals included. Here a
//! log line is copied into a queue of at most `--log-buffer-size` bytes and the call returns at
//! once; a dedicated thread moves the queue to stdout and is the only thread that may block.
//! When the queue is full the line is dropped and counted in `echo_log_lines_dropped_total`:
//! losing log lines is better than losing the service. At exit, [`StdoutLog::flush`] waits a
//! bounded time for the queue to drain.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tracing_subscriber::fmt::MakeWriter;

/// `echo_log_lines_dropped_total`: one per log line dropped because the queue was full. One
/// per process, like stdout itself.
pub fn lines_dropped() -> &'static IntCounter {
    static DROPPED: OnceLock<IntCounter> = OnceLock::new();
    DROPPED.get_or_init(|| {
        IntCounter::new(
            "echo_log_lines_dropped_total",
            "Log lines dropped because stdout was not being read fast enough (the log queue was full).",
        )
        .expect("a valid metric name")
    })
}

/// The queue between loggers and the writer thread.
#[derive(Debug, Default)]
struct Queue {
    /// Whole lines waiting for the writer thread, in order.
    bytes: Vec<u8>,
    /// The writer thread holds a batch it took from `bytes` and has not finished writing.
    writing: bool,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Most bytes `queue.bytes` may hold.
    capacity: usize,
    /// Signalled when lines are queued.
    queued: Condvar,
    /// Signalled when the writer thread finished a batch.
    written: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A logger that panicked mid-push left whole bytes behind at worst: keep logging.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queue one line, or drop and count it if it does not fit. Never waits for stdout.
    fn push(&self, line: &[u8]) {
        let mut queue = self.lock();
        if queue.bytes.len() + line.len() > self.capacity {
            drop(queue);
            lines_dropped().inc();
            return;
        }
        queue.bytes.extend_from_slice(line);
        drop(queue);
        self.queued.notify_one();
    }
}

/// The process's stdout log: a [`MakeWriter`] for `tracing-subscriber` that never blocks.
#[derive(Debug, Clone)]
pub struct StdoutLog {
    shared: Arc<Shared>,
}

impl StdoutLog {
    /// Start the writer thread, with a queue of at most `capacity` bytes.
    pub fn start(capacity: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            capacity,
            queued: Condvar::new(),
            written: Condvar::new(),
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_forever(&writer, &mut io::stdout().lock()))?;
        Ok(StdoutLog { shared })
    }

    /// Wait at most `timeout` for every queued line to reach stdout; true if they all did.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut queue = self.shared.lock();
        while !queue.bytes.is_empty() || queue.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            queue = match self.shared.written.wait_timeout(queue, left) {
                Ok((queue, _)) => queue,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

/// The writer thread: move queued lines to `out` until the process exits. This is the only
/// place allowed to block on stdout. Write errors (stdout closed) drop the batch.
fn write_forever(shared: &Shared, out: &mut dyn Write) {
    let mut batch = Vec::new();
    loop {
        {
            let mut queue = shared.lock();
            queue.writing = false;
            shared.written.notify_all();
            while queue.bytes.is_empty() {
                queue = shared
                    .queued
                    .wait(queue)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            // Swap buffers: the loggers get the (cleared) buffer written last time.
            batch.clear();
            std::mem::swap(&mut batch, &mut queue.bytes);
            queue.writing = true;
        }
        let _ = out.write_all(&batch).and_then(|()| out.flush());
    }
}

/// One log event's writer: `tracing-subscriber` formats a whole line, then writes it at once.
pub struct LogLine<'a> {
    shared: &'a Shared,
}

impl Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for StdoutLog {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogLine {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that blocks until released, like a pipe nobody reads.
    struct Stalled {
        release: Arc<(Mutex<bool>, Condvar)>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (open, cv) = &*self.release;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_drops_lines_instead_of_blocking_and_keeps_order() {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            capacity: 100,
            queued: Condvar::new(),
            written: Condvar::new(),
        });
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut sink = Stalled {
            release: release.clone(),
            got: got.clone(),
        };
        let writer = shared.clone();
        std::thread::spawn(move || write_forever(&writer, &mut sink));
        let log = StdoutLog { shared };

        let before = lines_dropped().get();
        // 1,000 lines of 10 bytes into a 100-byte queue whose sink is stuck: every call returns.
        for i in 0..1000 {
            let line = format!("line {i:04}\n");
            log.make_writer().write_all(line.as_bytes()).unwrap();
        }
        // The writer thread holds at most one batch; the queue at most 100 bytes: at most 20
        // lines kept, so at least 980 dropped (other tests may add to the global counter).
        assert!(lines_dropped().get() - before >= 980);
        assert!(!log.flush(Duration::from_millis(50)), "the sink is stuck");

        *release.0.lock().unwrap() = true;
        release.1.notify_all();
        assert!(log.flush(Duration::from_secs(10)));
        let got = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = got.lines().collect();
        assert!(!lines.is_empty() && lines.len() <= 20, "{lines:?}");
        // Whole lines, in the order they were logged.
        let mut sorted = lines.clone();
        sorted.sort();
        assert_eq!(lines, sorted);
        assert!(lines.iter().all(|l| l.len() == 9 && l.starts_with("line ")));
    }
}
