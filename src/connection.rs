//! The per-connection task: drives one protocol over one socket.
//!
//! This is the reactor side of a Twisted connection, written for memory and CPU per connection:
//!
//! - **A small task.** [`ConnectionTask`] is a hand-written future holding only the socket, the
//!   protocol, the outgoing buffer and a pointer to what all connections share; no channel or
//!   timer futures per connection (its size is checked by a test).
//! - **No read buffer while idle.** Reads go into one buffer per worker thread, handed to
//!   `data_received` by reference; an idle connection owns no buffer at all.
//! - **Writes go straight to the socket.** `Transport::write` tries the socket first and only
//!   buffers what the kernel would not take, so a ping-pong exchange copies nothing.
//! - **Backpressure.** Buffered outgoing bytes are capped by `--write-buffer-limit`: each read is
//!   sized to fit the room left, and reading stops while the buffer is full. A peer that sends
//!   but never reads fills its own kernel buffers and then blocks; the server holds at most the
//!   cap for it.
//! - **Half-close.** On EOF from the peer everything pending is flushed, then our write side is
//!   shut down (FIN), so the peer gets every byte back and a clean end.
//! - **Lingering close.** When we close first (max age, `lose_connection`), we send FIN and then
//!   read and discard until the peer's FIN, for at most [`LINGER_TIMEOUT`], so the peer sees a
//!   clean close rather than a reset that could destroy echoed bytes it has not read yet.
//! - **Policy timers** (idle, write stall, max age, throttle) live in a boxed clock that exists
//!   only when a time policy is configured.
//! - **Exactly-once accounting.** `active` goes up when the task is created and down when it is
//!   dropped, and `lost{reason}` is counted on drop, as `panic` if the protocol panicked, so
//!   the shared state stays right whatever happens. `echo_sent_bytes_total` counts what the
//!   kernel took (`Protocol::bytes_sent`), not what was queued.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::abort::AbortSignal;
use crate::policies::timeouts::{Expiry, PolicyClock};
use crate::protocol::{LossReason, Protocol};
use crate::state::ServiceState;
use crate::transport::Transport;

/// How long a connection we close ourselves keeps reading and discarding after our FIN.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// Per-connection settings, shared by every connection of a server.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// Largest single read (`--read-buffer-size`); the buffer is per worker thread, not per
    /// connection.
    pub read_buffer_size: usize,
    /// Most outgoing bytes buffered for one connection (`--write-buffer-limit`); reading stops
    /// while it is full.
    pub write_buffer_limit: usize,
    /// Most unsent bytes the kernel queues for one connection (`--send-queue-limit`, set as
    /// `TCP_NOTSENT_LOWAT`). Without it a peer that does not read parks megabytes in kernel
    /// buffers, invisible to backpressure and to the write-stall timeout.
    pub send_queue_limit: u32,
    /// TCP keepalive idle time (`--tcp-keepalive`), so dead peers (pulled cable, expired NAT
    /// entry) are noticed and closed with a reset; `None` turns keepalive off.
    pub tcp_keepalive: Option<Duration>,
    /// Close after this long with no bytes either way (`--idle-timeout`).
    pub idle_timeout: Option<Duration>,
    /// Close when the peer has read nothing for this long while we have data for it
    /// (`--write-stall-timeout`).
    pub write_stall_timeout: Option<Duration>,
    /// Close gracefully after this age, +- `max_age_jitter` (`--max-connection-age`).
    pub max_age: Option<Duration>,
    /// Random spread applied to `max_age` so connections don't all close at once.
    pub max_age_jitter: Duration,
    /// Read at most this many bytes per second per connection (`--throttle-bytes-per-second`).
    pub throttle_bytes_per_second: Option<u64>,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            read_buffer_size: 16 * 1024,
            write_buffer_limit: 64 * 1024,
            send_queue_limit: 64 * 1024,
            tcp_keepalive: Some(Duration::from_secs(60)),
            idle_timeout: None,
            write_stall_timeout: None,
            max_age: None,
            max_age_jitter: Duration::ZERO,
            throttle_bytes_per_second: None,
        }
    }
}

/// What every connection task of one server shares, behind one `Arc` per task.
#[derive(Debug)]
pub(crate) struct ConnectionShared {
    pub settings: ConnectionSettings,
    pub state: Arc<ServiceState>,
    /// Flipped at the end of the shutdown timeout: every open connection closes.
    pub abort: AbortSignal,
    /// Notified when the last open connection is gone.
    pub all_closed: Notify,
}

/// How the connection is being closed, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// Not closing.
    No,
    /// Flush everything pending, send FIN, end with this reason.
    Graceful(LossReason),
    /// Close now without flushing.
    Abort,
}

/// What the protocol has asked of the socket, and what is waiting to be sent.
struct Outbox {
    /// Bytes the kernel would not take yet, in order.
    pending: BytesMut,
    closing: Closing,
    /// A write error seen by `Transport::write`, reported by the driver.
    error: Option<io::Error>,
    /// Bytes the kernel took during the current protocol callback, reported to the protocol
    /// (`Protocol::bytes_sent`) once the callback returns.
    sent_in_callback: usize,
}

impl Outbox {
    fn take_sent(&mut self) -> usize {
        std::mem::take(&mut self.sent_in_callback)
    }
}

/// Show IPv4 peers of a dual-stack socket as plain IPv4 (`1.2.3.4`, not `::ffff:1.2.3.4`).
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The [`Transport`] a protocol sees while the driver calls it.
struct SocketTransport<'a> {
    stream: &'a TcpStream,
    outbox: &'a mut Outbox,
}

impl Transport for SocketTransport<'_> {
    fn write(&mut self, data: &[u8]) {
        let outbox = &mut *self.outbox;
        if data.is_empty() || outbox.closing != Closing::No || outbox.error.is_some() {
            return;
        }
        let mut rest = data;
        if outbox.pending.is_empty() {
            match self.stream.try_write(data) {
                Ok(n) => {
                    outbox.sent_in_callback += n;
                    rest = &data[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    outbox.error = Some(e);
                    return;
                }
            }
        }
        if !rest.is_empty() {
            outbox.pending.extend_from_slice(rest);
        }
    }

    fn lose_connection(&mut self) {
        if self.outbox.closing == Closing::No {
            self.outbox.closing = Closing::Graceful(LossReason::Closed);
        }
    }

    fn abort_connection(&mut self) {
        self.outbox.closing = Closing::Abort;
    }

    fn peer_addr(&self) -> SocketAddr {
        self.stream
            .peer_addr()
            .map(canonical)
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    fn local_addr(&self) -> SocketAddr {
        self.stream
            .local_addr()
            .map(canonical)
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

thread_local! {
    /// The read buffer of this worker thread, shared by all its connections: reads never
    /// overlap on one thread, and `data_received` only borrows the bytes.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Why the I/O loop stopped making progress.
enum Step {
    /// The connection is over.
    Lost(LossReason),
    /// Our write side is flushed and shut down; linger, then end with this reason.
    Linger(LossReason),
}

const NOT_REGISTERED: usize = usize::MAX;

/// The lingering close: why we closed, and when we stop waiting for the peer's FIN.
struct Linger {
    reason: LossReason,
    deadline: Pin<Box<Sleep>>,
}

/// One connection: a future that runs `protocol` on `stream` until the connection is lost.
pub(crate) struct ConnectionTask<P> {
    stream: TcpStream,
    protocol: P,
    outbox: Outbox,
    clock: Option<Box<PolicyClock>>,
    /// After our FIN: why we closed, and until when we drain the peer (boxed: rare).
    linger: Option<Box<Linger>>,
    made: bool,
    read_open: bool,
    /// Declared last: fields drop in order, so the socket and the protocol (and its span) are
    /// gone before this counts the connection as lost and may tell the server that the last
    /// connection has closed.
    accounting: Accounting,
}

/// The connection's entry in the shared state, settled exactly once when it is dropped.
struct Accounting {
    shared: Arc<ConnectionShared>,
    abort_key: usize,
    /// Set once, when the connection is lost (before `connection_lost` runs).
    reason: Option<LossReason>,
}

impl Drop for Accounting {
    fn drop(&mut self) {
        let reason = self.reason.unwrap_or(if std::thread::panicking() {
            LossReason::Panic
        } else {
            LossReason::Shutdown
        });
        let shared = &self.shared;
        shared.state.stats.lost(reason).inc();
        shared.state.stats.active.dec();
        if self.abort_key != NOT_REGISTERED {
            shared.abort.unregister(self.abort_key);
        }
        if shared.state.stats.active.get() == 0 {
            shared.all_closed.notify_one();
        }
    }
}

impl<P: Protocol> ConnectionTask<P> {
    /// A task for an accepted connection; counts it as active until dropped.
    pub fn new(stream: TcpStream, protocol: P, id: u64, shared: Arc<ConnectionShared>) -> Self {
        shared.state.stats.active.inc();
        let clock = PolicyClock::for_connection(&shared.settings, id);
        ConnectionTask {
            stream,
            protocol,
            outbox: Outbox {
                pending: BytesMut::new(),
                closing: Closing::No,
                error: None,
                sent_in_callback: 0,
            },
            clock,
            linger: None,
            made: false,
            read_open: true,
            accounting: Accounting {
                abort_key: NOT_REGISTERED,
                reason: None,
                shared,
            },
        }
    }

    fn finish(&mut self, reason: LossReason) -> Poll<()> {
        if reason == LossReason::Aborted {
            // An abort is a reset by definition: discard what is queued, send RST.
            let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        }
        if let LossReason::Error(kind) = reason {
            // Counted in lost{reason="error"}; peers and networks cause these, so one line per
            // connection would flood the log during a partition.
            tracing::debug!(peer = ?self.stream.peer_addr().ok(), error = %kind, "connection failed");
        }
        self.accounting.reason = Some(reason);
        self.protocol.connection_lost(reason);
        Poll::Ready(())
    }

    /// Discard what the peer still sends after our FIN, until its FIN or the linger timeout.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(linger) = self.linger.as_mut() else {
            return Poll::Pending;
        };
        let reason = linger.reason;
        let done = loop {
            let read = READ_BUFFER.with(|cell| {
                let mut buffer = cell.borrow_mut();
                if buffer.len() < 4096 {
                    buffer.resize(4096, 0);
                }
                let mut buf = ReadBuf::new(&mut buffer[..]);
                Pin::new(&mut self.stream)
                    .poll_read(cx, &mut buf)
                    .map_ok(|()| buf.filled().len())
            });
            match read {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => break true,
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => break linger.deadline.as_mut().poll(cx).is_ready(),
            }
        };
        if done {
            self.finish(reason)
        } else {
            Poll::Pending
        }
    }
}

impl<P: Protocol> Future for ConnectionTask<P> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.accounting.reason.is_some() {
            return Poll::Ready(());
        }
        let shared = &this.accounting.shared;
        if this.accounting.abort_key == NOT_REGISTERED {
            this.accounting.abort_key = shared.abort.register(cx.waker());
        }
        if shared.abort.is_aborted() {
            return this.finish(LossReason::Shutdown);
        }
        if !this.made {
            this.made = true;
            this.protocol.connection_made(&mut SocketTransport {
                stream: &this.stream,
                outbox: &mut this.outbox,
            });
            report_sent(&mut this.protocol, &mut this.outbox);
            if let Some(clock) = this.clock.as_deref_mut() {
                clock.record_write_progress(Instant::now(), !this.outbox.pending.is_empty());
            }
        }
        let mut expired = false;
        loop {
            if this.linger.is_some() {
                return this.poll_linger(cx);
            }
            match poll_io(
                cx,
                &mut this.stream,
                &mut this.protocol,
                &mut this.outbox,
                &mut this.read_open,
                this.clock.as_deref_mut(),
                &this.accounting.shared.settings,
            ) {
                Poll::Ready(Step::Lost(reason)) => return this.finish(reason),
                Poll::Ready(Step::Linger(reason)) => {
                    this.linger = Some(Box::new(Linger {
                        reason,
                        deadline: Box::pin(tokio::time::sleep(LINGER_TIMEOUT)),
                    }));
                    continue;
                }
                Poll::Pending => {}
            }

            // Policy timers: one Sleep set to the earliest deadline. It is moved earlier at
            // once, but never later: a timer that fires early just finds nothing expired and
            // is set again, which is cheaper than resetting it on every read.
            // A protocol deadline (Protocol::deadline) shares the policy timer; the clock is
            // created for it on demand.
            let protocol_deadline = this.protocol.deadline();
            if let Some((at, reason)) = protocol_deadline {
                if Instant::now() >= at {
                    return this.finish(reason);
                }
                if this.clock.is_none() {
                    this.clock = Some(PolicyClock::bare());
                }
            }
            let Some(clock) = this.clock.as_deref_mut() else {
                return Poll::Pending;
            };
            let settings = &this.accounting.shared.settings;
            if clock.timer.is_elapsed() && !expired {
                // Apply the policies once per poll, then give the socket another turn: a
                // refilled throttle may read again, a max-age close must flush and FIN.
                expired = true;
                match clock.expire(settings, Instant::now()) {
                    Some(Expiry::Close(reason)) => return this.finish(reason),
                    Some(Expiry::CloseGracefully(reason)) if this.outbox.closing == Closing::No => {
                        this.outbox.closing = Closing::Graceful(reason);
                    }
                    _ => {}
                }
                continue;
            }
            let closing = this.outbox.closing != Closing::No;
            let policy_deadline = clock.next_deadline(settings, closing);
            let Some(deadline) = policy_deadline
                .into_iter()
                .chain(protocol_deadline.map(|(at, _)| at))
                .min()
            else {
                return Poll::Pending;
            };
            if clock.timer.is_elapsed() {
                let soonest = Instant::now() + Duration::from_millis(1);
                clock.timer.as_mut().reset(deadline.max(soonest));
            } else if deadline < clock.timer.deadline() {
                clock.timer.as_mut().reset(deadline);
            }
            if clock.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Already due: the next turn of the loop applies it.
        }
    }
}

/// Tell the protocol what the kernel took during the callback that just returned.
fn report_sent<P: Protocol>(protocol: &mut P, outbox: &mut Outbox) {
    let n = outbox.take_sent();
    if n > 0 {
        protocol.bytes_sent(n);
    }
}

/// One round of socket work: flush what is pending, then read and hand data to the protocol,
/// until the socket has nothing more for us (Pending) or the connection ends.
fn poll_io<P: Protocol>(
    cx: &mut Context<'_>,
    stream: &mut TcpStream,
    protocol: &mut P,
    outbox: &mut Outbox,
    read_open: &mut bool,
    mut clock: Option<&mut PolicyClock>,
    settings: &ConnectionSettings,
) -> Poll<Step> {
    loop {
        if outbox.closing == Closing::Abort {
            return Poll::Ready(Step::Lost(LossReason::Aborted));
        }
        if let Some(err) = outbox.error.take() {
            return Poll::Ready(Step::Lost(LossReason::from_io_error(&err)));
        }

        if !outbox.pending.is_empty() {
            match Pin::new(&mut *stream).poll_write(cx, &outbox.pending) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Step::Lost(LossReason::Error(io::ErrorKind::WriteZero)))
                }
                Poll::Ready(Ok(n)) => {
                    outbox.pending.advance(n);
                    protocol.bytes_sent(n);
                    if outbox.pending.is_empty() {
                        // Give the memory back: an idle connection should own no buffer.
                        outbox.pending = BytesMut::new();
                    }
                    if let Some(clock) = clock.as_deref_mut() {
                        clock.record_write_progress(Instant::now(), !outbox.pending.is_empty());
                    }
                    continue;
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Step::Lost(LossReason::from_io_error(&e)));
                }
                Poll::Pending => {}
            }
        }

        if outbox.pending.is_empty() {
            let finished = match outbox.closing {
                Closing::Graceful(reason) => Some(Step::Linger(reason)),
                _ if !*read_open => Some(Step::Lost(LossReason::PeerClosed)),
                _ => None,
            };
            if let Some(step) = finished {
                // Everything is sent: FIN. A peer that already went away makes this fail,
                // which changes nothing.
                let _ = socket2::SockRef::from(&*stream).shutdown(Shutdown::Write);
                return Poll::Ready(step);
            }
        }

        let room = settings
            .write_buffer_limit
            .saturating_sub(outbox.pending.len());
        let throttled = clock.as_deref().is_some_and(PolicyClock::read_paused);
        if !*read_open || outbox.closing != Closing::No || room == 0 || throttled {
            return Poll::Pending;
        }

        let allowance = clock
            .as_deref()
            .map_or(usize::MAX, PolicyClock::read_allowance);
        let want = room.min(settings.read_buffer_size).min(allowance);
        let read = READ_BUFFER.with(|cell| {
            let mut buffer = cell.borrow_mut();
            if buffer.len() < want {
                buffer.resize(want, 0);
            }
            let mut buf = ReadBuf::new(&mut buffer[..want]);
            match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    let data = buf.filled();
                    if !data.is_empty() {
                        protocol.data_received(data, &mut SocketTransport { stream, outbox });
                        report_sent(protocol, outbox);
                    }
                    Poll::Ready(Ok(data.len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        });
        match read {
            Poll::Ready(Ok(0)) => *read_open = false,
            Poll::Ready(Ok(n)) => {
                if let Some(clock) = clock.as_deref_mut() {
                    clock.record_read(Instant::now(), n, !outbox.pending.is_empty());
                }
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Step::Lost(LossReason::from_io_error(&e))),
            Poll::Pending => return Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo::Echo;
    use crate::telemetry::InstrumentedProtocol;

    /// The task of every idle connection is allocated whole: keep it small. tokio allocates a
    /// task cell of the future plus ~104 bytes of header and trailer, in 128-byte steps; up to
    /// 280 bytes of future the cell is 384 bytes, above it 512. The stack tested is the echo
    /// service's (instrumentation + per-peer limit + echo).
    #[test]
    fn connection_task_stays_small() {
        type Stack = InstrumentedProtocol<crate::policies::PeerLimited<Echo>>;
        let size = std::mem::size_of::<ConnectionTask<Stack>>();
        eprintln!("ConnectionTask: {size} bytes");
        assert!(size <= 280, "ConnectionTask grew to {size} bytes");
    }
}
