//! The driver under test: every time policy through a real [`ConnectionTask`] over
//! [`DuplexIo`], with paused time (`start_paused`: the clock only moves when every task is
//! waiting, so deadlines are exact and nothing depends on the machine's speed), plus the
//! transport contract and the cooperative budget over real loopback TCP.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use super::*;
use crate::echo::Echo;
use crate::policies::timeouts::jittered;
use crate::transport::{MemoryTransport, Transport};

/// The task of every idle connection is allocated whole: keep it small. tokio allocates a
/// task cell of the future plus ~104 bytes of header and trailer, in 128-byte steps; up to
/// 280 bytes of future the cell is 384 bytes, above it 512. The stack tested is the echo
/// service's over TCP (instrumentation + per-peer limit + echo).
#[test]
fn connection_task_stays_small() {
    type Stack = crate::telemetry::InstrumentedProtocol<crate::policies::PeerLimited<Echo>>;
    let size = std::mem::size_of::<ConnectionTask<tokio::net::TcpStream, Stack>>();
    eprintln!("ConnectionTask: {size} bytes");
    assert!(size <= 280, "ConnectionTask grew to {size} bytes");
}

/// What a test protocol saw, shared with the test.
#[derive(Default)]
struct Seen {
    lost: Mutex<Option<LossReason>>,
    reads: AtomicUsize,
}

/// Echo, recording the loss reason and the number of reads; with `close_after_first_read`, it
/// echoes the first read, calls `lose_connection`, then writes again (which must be dropped).
struct Recorder {
    seen: Arc<Seen>,
    close_after_first_read: bool,
}

impl Protocol for Recorder {
    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        self.seen.reads.fetch_add(1, Ordering::Relaxed);
        transport.write(data);
        if self.close_after_first_read {
            transport.lose_connection();
            transport.write(b"after close");
        }
    }

    fn connection_lost(&mut self, reason: LossReason) {
        *self.seen.lost.lock().unwrap() = Some(reason);
    }
}

/// Counts the polls of the future it wraps.
struct Counted<F> {
    inner: F,
    polls: Arc<AtomicUsize>,
}

impl<F: Future + Unpin> Future for Counted<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// One connection driven over an in-memory pipe.
struct Harness {
    client: DuplexStream,
    shared: Arc<ConnectionShared>,
    seen: Arc<Seen>,
    polls: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

const CONN_ID: u64 = 7;

impl Harness {
    /// Start a connection with `settings` whose pipe buffers `buffer` bytes each way.
    fn start(settings: ConnectionSettings, buffer: usize) -> Harness {
        Self::start_with(settings, buffer, false)
    }

    fn start_with(settings: ConnectionSettings, buffer: usize, close_after: bool) -> Harness {
        let shared = Arc::new(ConnectionShared::new(
            settings,
            Arc::new(ServiceState::new(None)),
        ));
        let seen = Arc::new(Seen::default());
        let (io, client) = DuplexIo::pair(buffer);
        let protocol = Recorder {
            seen: seen.clone(),
            close_after_first_read: close_after,
        };
        let polls = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(Counted {
            inner: ConnectionTask::new(io, protocol, CONN_ID, shared.clone()),
            polls: polls.clone(),
        });
        Harness {
            client,
            shared,
            seen,
            polls,
            task,
        }
    }

    fn lost(&self) -> Option<LossReason> {
        *self.seen.lost.lock().unwrap()
    }

    fn counted(&self, reason: LossReason) -> u64 {
        self.shared.state.stats.lost(reason).get()
    }

    /// Write `data` and read exactly as much back.
    async fn round_trip(&mut self, data: &[u8]) {
        self.client.write_all(data).await.unwrap();
        let mut back = vec![0; data.len()];
        self.client.read_exact(&mut back).await.unwrap();
        assert_eq!(back, data);
    }

    /// Wait for the task to end; assert it was lost for `reason`, in the protocol's record and
    /// in the counters alike.
    async fn ended(mut self, reason: LossReason) -> DuplexStream {
        (&mut self.task).await.unwrap();
        assert_eq!(self.lost(), Some(reason));
        assert_eq!(self.counted(reason), 1);
        assert_eq!(self.shared.state.stats.active.get(), 0);
        self.client
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A writer on the client side that sends `total` bytes and never reads, in the background.
fn flood(mut writer: tokio::io::WriteHalf<DuplexStream>, total: usize) -> JoinHandle<()> {
    tokio::spawn(async move {
        let chunk = vec![b'x'; 1024];
        let mut sent = 0;
        while sent < total {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
            sent += chunk.len();
        }
    })
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_at_the_deadline_counted_from_the_last_byte() {
    let settings = ConnectionSettings {
        idle_timeout: Some(Duration::from_secs(10)),
        ..ConnectionSettings::default()
    };
    let mut conn = Harness::start(settings, 4096);
    tokio::time::sleep(Duration::from_secs(6)).await;
    conn.round_trip(b"ping").await; // activity moves the deadline to 16 s
    tokio::time::sleep(Duration::from_secs(10) - ms(1)).await;
    assert!(!conn.task.is_finished(), "closed before the idle timeout");
    tokio::time::sleep(ms(2)).await;
    assert!(conn.task.is_finished(), "still open after the idle timeout");
    let mut client = conn.ended(LossReason::IdleTimeout).await;
    assert_eq!(
        client.read(&mut [0; 8]).await.unwrap(),
        0,
        "EOF to the client"
    );
}

#[tokio::test(start_paused = true)]
async fn write_stall_timeout_closes_a_peer_that_does_not_read() {
    let settings = ConnectionSettings {
        write_stall_timeout: Some(Duration::from_secs(3)),
        write_buffer_limit: 4096,
        ..ConnectionSettings::default()
    };
    let conn = Harness::start(settings, 1024);
    let (_reader, writer) = tokio::io::split(conn.client);
    let conn = Harness {
        client: tokio::io::duplex(1).0,
        ..conn
    };
    let _writer = flood(writer, 1 << 20);
    tokio::time::sleep(Duration::from_secs(3) - ms(1)).await;
    assert!(!conn.task.is_finished(), "closed before the stall timeout");
    tokio::time::sleep(ms(2)).await;
    assert!(conn.task.is_finished(), "open after the stall timeout");
    conn.ended(LossReason::WriteStall).await;
}

#[tokio::test(start_paused = true)]
async fn unsent_data_is_a_stall_not_idleness_even_with_a_shorter_idle_timeout() {
    // Issue 12 §6: with --idle-timeout <= --write-stall-timeout, a peer that sends and never
    // reads is not idle; it is closed at the stall timeout and counted as write_stall.
    let settings = ConnectionSettings {
        idle_timeout: Some(Duration::from_secs(1)),
        write_stall_timeout: Some(Duration::from_secs(3)),
        write_buffer_limit: 4096,
        ..ConnectionSettings::default()
    };
    let conn = Harness::start(settings, 1024);
    let (_reader, writer) = tokio::io::split(conn.client);
    let conn = Harness {
        client: tokio::io::duplex(1).0,
        ..conn
    };
    let _writer = flood(writer, 1 << 20);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!conn.task.is_finished(), "closed as idle with data waiting");
    tokio::time::sleep(Duration::from_secs(2)).await;
    conn.ended(LossReason::WriteStall).await;
}

#[tokio::test(start_paused = true)]
async fn max_age_with_jitter_closes_gracefully_at_the_jittered_age() {
    let age = Duration::from_secs(10);
    let jitter = Duration::from_secs(2);
    let expected = jittered(age, jitter, CONN_ID);
    assert_ne!(expected, age, "the jitter moved this connection's age");
    let settings = ConnectionSettings {
        max_age: Some(age),
        max_age_jitter: jitter,
        ..ConnectionSettings::default()
    };
    let mut conn = Harness::start(settings, 4096);
    let start = Instant::now();
    // An active connection: a ping every 500 ms until just before its age.
    while Instant::now() + ms(500) < start + expected {
        conn.round_trip(b"ping").await;
        tokio::time::sleep(ms(500)).await;
    }
    tokio::time::sleep_until(start + expected - ms(1)).await;
    assert!(!conn.task.is_finished(), "closed before its age");
    conn.client.write_all(b"last words").await.unwrap();
    // After the age: every byte the server read is echoed, then EOF (its FIN).
    let mut back = Vec::new();
    conn.client.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"last words");
    assert!(Instant::now() >= start + expected);
    // The server lingers for our FIN; we send it, and the close is clean.
    assert!(
        !conn.task.is_finished(),
        "did not linger for the peer's FIN"
    );
    conn.client.shutdown().await.unwrap();
    conn.ended(LossReason::MaxAge).await;
}

#[tokio::test(start_paused = true)]
async fn max_age_grace_resets_a_peer_that_does_not_read_and_counts_it_apart() {
    let settings = ConnectionSettings {
        max_age: Some(Duration::from_secs(1)),
        max_age_grace: Duration::from_secs(2),
        write_buffer_limit: 4096,
        ..ConnectionSettings::default()
    };
    let conn = Harness::start(settings, 1024);
    let (_reader, writer) = tokio::io::split(conn.client);
    let conn = Harness {
        client: tokio::io::duplex(1).0,
        ..conn
    };
    let _writer = flood(writer, 1 << 20);
    tokio::time::sleep(Duration::from_secs(3) - ms(1)).await;
    assert!(!conn.task.is_finished(), "aborted before the grace ended");
    tokio::time::sleep(ms(2)).await;
    assert!(conn.task.is_finished(), "still open after age + grace");
    conn.ended(LossReason::MaxAgeGrace).await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_that_drains_within_the_grace_is_a_clean_max_age_close() {
    let settings = ConnectionSettings {
        max_age: Some(Duration::from_secs(1)),
        max_age_grace: Duration::from_secs(5),
        write_buffer_limit: 4096,
        ..ConnectionSettings::default()
    };
    let mut conn = Harness::start(settings, 1024);
    conn.client.write_all(&[b'x'; 2048]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // the close has started, unflushed
    let mut back = Vec::new();
    conn.client.read_to_end(&mut back).await.unwrap();
    assert_eq!(back.len(), 2048);
    conn.client.shutdown().await.unwrap();
    conn.ended(LossReason::MaxAge).await;
}

#[tokio::test(start_paused = true)]
async fn throttle_reads_at_the_rate_and_loses_nothing() {
    let settings = ConnectionSettings {
        throttle_bytes_per_second: Some(100),
        ..ConnectionSettings::default()
    };
    let mut conn = Harness::start(settings, 4096);
    let start = Instant::now();
    conn.client.write_all(&[b'y'; 350]).await.unwrap();
    conn.client.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.client.read_to_end(&mut back))
        .await
        .expect("the throttled echo stalled")
        .unwrap();
    assert_eq!(back.len(), 350);
    // 100 bytes of burst, then 100 bytes/s: the last byte is read after 2.5 s.
    let took = Instant::now() - start;
    assert!(
        took >= ms(2500) && took <= ms(2600),
        "350 bytes at 100 B/s took {took:?}"
    );
    conn.ended(LossReason::PeerClosed).await;
}

#[tokio::test(start_paused = true)]
async fn throttle_with_an_idle_timeout_sleeps_instead_of_spinning() {
    // Defect 1: while the throttle paused reading, the clock offered the past idle deadline
    // and the driver re-armed its timer every millisecond.
    let settings = ConnectionSettings {
        throttle_bytes_per_second: Some(1),
        idle_timeout: Some(ms(100)),
        ..ConnectionSettings::default()
    };
    let mut conn = Harness::start(settings, 4096);
    conn.client.write_all(&[b'z'; 10]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let polls = conn.polls.load(Ordering::Relaxed);
    assert!(
        polls < 50,
        "{polls} polls in 5 s for a connection reading 1 byte/s"
    );
    assert!(
        !conn.task.is_finished(),
        "a throttled connection is not idle"
    );
    // It read one byte per second (plus the burst), and echoed each.
    let mut back = [0; 16];
    let n = conn.client.read(&mut back).await.unwrap();
    assert!((5..=7).contains(&n), "{n} bytes echoed after 5 s at 1 B/s");
    // Once everything is read and the last pause is over, the idle timeout applies.
    tokio::time::sleep(Duration::from_secs(6)).await;
    conn.ended(LossReason::IdleTimeout).await;
}

#[tokio::test(start_paused = true)]
async fn linger_waits_for_the_peers_fin_at_most_the_linger_timeout() {
    // We close first (the protocol's lose_connection): FIN, then read until the peer's FIN.
    let mut conn = Harness::start_with(ConnectionSettings::default(), 4096, true);
    conn.client.write_all(b"bye").await.unwrap();
    let mut back = Vec::new();
    conn.client.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"bye", "the write after lose_connection was dropped");
    // The client keeps talking and never closes: discarded, and cut at the linger timeout.
    conn.client.write_all(b"more").await.unwrap();
    tokio::time::sleep(LINGER_TIMEOUT - ms(1)).await;
    assert!(!conn.task.is_finished(), "stopped lingering early");
    tokio::time::sleep(ms(2)).await;
    assert!(conn.task.is_finished(), "lingered past the linger timeout");
    assert_eq!(
        conn.seen.reads.load(Ordering::Relaxed),
        1,
        "read after close"
    );
    conn.ended(LossReason::Closed).await;

    // A peer that closes promptly ends the linger at once.
    let mut conn = Harness::start_with(ConnectionSettings::default(), 4096, true);
    conn.client.write_all(b"bye").await.unwrap();
    conn.client.read_to_end(&mut Vec::new()).await.unwrap();
    let start = Instant::now();
    conn.client.shutdown().await.unwrap();
    conn.task.await.unwrap();
    assert_eq!(Instant::now(), start, "lingered after the peer's FIN");
}

#[tokio::test(start_paused = true)]
async fn a_task_dropped_by_a_runtime_shutdown_tells_its_protocol_shutdown() {
    // The protocol's own record (for the instrumented one: span and duration) and the loss
    // counter must agree when the runtime drops a live connection task.
    let conn = Harness::start(ConnectionSettings::default(), 4096);
    tokio::task::yield_now().await;
    let shared = conn.shared.clone();
    let seen = conn.seen.clone();
    conn.task.abort(); // dropped without finishing, like a runtime shutdown does
    let _ = conn.task.await;
    assert_eq!(*seen.lost.lock().unwrap(), Some(LossReason::Shutdown));
    assert_eq!(shared.state.stats.lost(LossReason::Shutdown).get(), 1);
    assert_eq!(shared.state.stats.lost(LossReason::Panic).get(), 0);
}

/// The `Transport` contract, checked against the driver's transport and `MemoryTransport`
/// alike: writes after `lose_connection` are dropped.
#[tokio::test]
async fn memory_and_stream_transports_drop_writes_after_lose_connection() {
    let mut seen = Recorder {
        seen: Arc::default(),
        close_after_first_read: true,
    };
    let mut memory = MemoryTransport::new();
    seen.data_received(b"bye", &mut memory);
    assert_eq!(memory.written(), b"bye");
    assert!(memory.is_disconnecting());

    let mut conn = Harness::start_with(ConnectionSettings::default(), 4096, true);
    conn.client.write_all(b"bye").await.unwrap();
    let mut back = Vec::new();
    conn.client.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, memory.written());
}

/// The `Transport` contract on both transports: `pause_reading` is undone by
/// `resume_reading`, `stop_reading` is not (watching for the peer's hang-up consumed the read
/// readiness, so bytes that arrived meanwhile would wait for the next arrival).
#[test]
fn stop_reading_is_final_where_pause_reading_is_not() {
    let mut memory = MemoryTransport::new();
    memory.pause_reading();
    memory.resume_reading();
    assert!(!memory.is_read_paused());
    memory.stop_reading();
    memory.resume_reading();
    assert!(memory.is_read_paused() && memory.is_read_stopped());

    let (mut io, _client) = DuplexIo::pair(64);
    let mut outbox = outbox::Outbox::new();
    let mut stream = outbox::StreamTransport {
        stream: &mut io,
        outbox: &mut outbox,
    };
    stream.pause_reading();
    stream.resume_reading();
    assert!(!stream.outbox.read_paused);
    stream.stop_reading();
    stream.resume_reading();
    assert!(stream.outbox.read_paused && stream.outbox.read_stopped);
}

/// Over real TCP (whose `try_write` spends no budget by itself): one poll of the driver runs
/// at most as many read+write rounds as a plain tokio echo (`read` + `write_all`, one budget
/// unit each out of 128), so a busy connection yields its worker like any other task.
#[tokio::test]
async fn direct_writes_spend_the_cooperative_budget() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    // One-byte reads: every byte is one read and one direct write.
    let settings = ConnectionSettings {
        read_buffer_size: 1,
        ..ConnectionSettings::default()
    };
    let shared = Arc::new(ConnectionShared::new(
        settings,
        Arc::new(ServiceState::new(None)),
    ));
    let seen = Arc::new(Seen::default());
    client.write_all(&[b'b'; 1000]).await.unwrap();
    tokio::time::sleep(ms(50)).await; // let loopback deliver it all
    let mut task = ConnectionTask::new(
        server,
        Recorder {
            seen: seen.clone(),
            close_after_first_read: false,
        },
        1,
        shared,
    );
    // Poll once, as the scheduler would, with a fresh budget.
    let first_poll = std::future::poll_fn(|cx| {
        let _ = Pin::new(&mut task).poll(cx);
        Poll::Ready(())
    });
    first_poll.await;
    let reads = seen.reads.load(Ordering::Relaxed);
    assert!(
        (1..=64).contains(&reads),
        "{reads} read+write rounds in one poll (a plain tokio echo does 64)"
    );
    // And the rest still arrives.
    let mut back = vec![0; 1000];
    tokio::spawn(task);
    client.read_exact(&mut back).await.unwrap();
}

/// A protocol using the general hooks fault injection is built on: it holds reading paused
/// until its timer fires `hold` after `connection_made`, then echoes every read `delay` later
/// from a queue (`write_pending` while it holds bytes). `close` in the data closes with
/// `fault_close`, `reset` aborts with `fault_reset`.
struct Delayer {
    seen: Arc<Seen>,
    hold: Duration,
    delay: Duration,
    held_until: Option<Instant>,
    queue: std::collections::VecDeque<(Instant, Vec<u8>)>,
}

impl Protocol for Delayer {
    fn connection_made(&mut self, transport: &mut dyn Transport) {
        transport.pause_reading();
        self.held_until = Some(Instant::now() + self.hold);
    }

    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        self.seen.reads.fetch_add(1, Ordering::Relaxed);
        if data == b"close" {
            transport.close_for(LossReason::FaultClose);
        } else if data == b"reset" {
            transport.abort_for(LossReason::FaultReset);
        } else {
            self.queue
                .push_back((Instant::now() + self.delay, data.to_vec()));
        }
    }

    fn timer(&self) -> Option<Instant> {
        self.held_until
            .into_iter()
            .chain(self.queue.front().map(|(at, _)| *at))
            .min()
    }

    fn timer_fired(&mut self, transport: &mut dyn Transport) {
        let now = Instant::now();
        if self.held_until.is_some_and(|at| at <= now) {
            self.held_until = None;
            transport.resume_reading();
        }
        while self.queue.front().is_some_and(|(at, _)| *at <= now) {
            let (_, data) = self.queue.pop_front().expect("checked");
            transport.write(&data);
        }
    }

    fn write_pending(&self) -> bool {
        !self.queue.is_empty()
    }

    fn connection_lost(&mut self, reason: LossReason) {
        *self.seen.lost.lock().unwrap() = Some(reason);
    }
}

fn start_delayer(settings: ConnectionSettings, hold: Duration, delay: Duration) -> Harness {
    let shared = Arc::new(ConnectionShared::new(
        settings,
        Arc::new(ServiceState::new(None)),
    ));
    let seen = Arc::new(Seen::default());
    let (io, client) = DuplexIo::pair(4096);
    let protocol = Delayer {
        seen: seen.clone(),
        hold,
        delay,
        held_until: None,
        queue: Default::default(),
    };
    let polls = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(Counted {
        inner: ConnectionTask::new(io, protocol, CONN_ID, shared.clone()),
        polls: polls.clone(),
    });
    Harness {
        client,
        shared,
        seen,
        polls,
        task,
    }
}

#[tokio::test(start_paused = true)]
async fn paused_reading_holds_data_until_the_protocol_timer_resumes_it() {
    let start = Instant::now();
    let mut conn = start_delayer(ConnectionSettings::default(), ms(1000), ms(100));
    conn.client.write_all(b"ping").await.unwrap();
    tokio::time::sleep(ms(999)).await;
    assert_eq!(
        conn.seen.reads.load(Ordering::Relaxed),
        0,
        "read while paused"
    );
    let mut back = [0u8; 4];
    conn.client.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    // Held 1 s, then echoed 100 ms after the read: exact under paused time.
    assert_eq!(Instant::now() - start, ms(1100));
    conn.round_trip(b"pong").await;
    assert_eq!(Instant::now() - start, ms(1200));
}

#[tokio::test(start_paused = true)]
async fn a_half_closed_connection_waits_for_the_protocols_pending_writes() {
    let mut conn = start_delayer(ConnectionSettings::default(), ms(0), ms(500));
    conn.client.write_all(b"late").await.unwrap();
    conn.client.shutdown().await.unwrap();
    let mut back = Vec::new();
    conn.client.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"late", "EOF came before the delayed echo");
    conn.ended(LossReason::PeerClosed).await;
}

#[tokio::test(start_paused = true)]
async fn close_for_and_abort_for_end_with_the_given_reason() {
    let mut conn = start_delayer(ConnectionSettings::default(), ms(0), ms(10));
    conn.round_trip(b"x").await;
    conn.client.write_all(b"close").await.unwrap();
    let mut client = conn.ended(LossReason::FaultClose).await;
    assert_eq!(client.read(&mut [0; 8]).await.unwrap(), 0, "FIN");

    let mut conn = start_delayer(ConnectionSettings::default(), ms(0), ms(10));
    conn.client.write_all(b"reset").await.unwrap();
    conn.ended(LossReason::FaultReset).await;
}

#[tokio::test(start_paused = true)]
async fn the_idle_timeout_still_ends_a_connection_paused_for_good() {
    let settings = ConnectionSettings {
        idle_timeout: Some(Duration::from_secs(5)),
        ..ConnectionSettings::default()
    };
    let start = Instant::now();
    let mut conn = start_delayer(settings, Duration::from_secs(3600), ms(0));
    conn.client.write_all(b"never read").await.unwrap();
    let client = conn.ended(LossReason::IdleTimeout).await;
    drop(client);
    assert_eq!(Instant::now() - start, Duration::from_secs(5));
}

/// Echo through [`Transport::write_vectored`], each read split in uneven buffers (one empty).
struct VectoredEcho;

impl Protocol for VectoredEcho {
    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        let (head, rest) = data.split_at(data.len().min(1));
        let (middle, tail) = rest.split_at(rest.len() / 3);
        transport.write_vectored(&[
            std::io::IoSlice::new(head),
            std::io::IoSlice::new(&[]),
            std::io::IoSlice::new(middle),
            std::io::IoSlice::new(tail),
        ]);
    }
}

/// A vectored write over a pipe far smaller than the data: the stream takes part of the
/// buffers, the driver buffers the rest, later writes queue behind it, and the peer gets
/// every byte in order (and the write buffer limit still stops reading while it is full).
#[tokio::test]
async fn vectored_writes_keep_their_order_through_partial_writes_and_the_buffer() {
    let settings = ConnectionSettings {
        write_buffer_limit: 8 * 1024,
        ..ConnectionSettings::default()
    };
    let shared = Arc::new(ConnectionShared::new(
        settings,
        Arc::new(ServiceState::new(None)),
    ));
    let (io, client) = DuplexIo::pair(1000);
    let task = tokio::spawn(ConnectionTask::new(
        io,
        VectoredEcho,
        CONN_ID,
        shared.clone(),
    ));
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut reader, mut writer) = tokio::io::split(client);
    let sent = data.clone();
    let send = tokio::spawn(async move {
        writer.write_all(&sent).await.unwrap();
        writer.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), reader.read_to_end(&mut back))
        .await
        .expect("the vectored echo stalled")
        .unwrap();
    send.await.unwrap();
    task.await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echo came back reordered or corrupted");
    assert_eq!(shared.state.stats.lost(LossReason::PeerClosed).get(), 1);
}
