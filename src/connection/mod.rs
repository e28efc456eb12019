//! The per-connection task: drives one protocol over one byte stream.
//!
//! This is the reactor side of a Twisted connection, written for memory and CPU per connection:
//!
//! - **A small task.** `ConnectionTask` is a hand-written future holding only the stream, the
//!   protocol, the outgoing buffer and a pointer to what all connections share; no channel or
//!   timer futures per connection (its size is checked by a test).
//! - **Any stream.** The driver is generic over [`ConnectionIo`] (`AsyncRead + AsyncWrite` plus
//!   a non-waiting write, addresses, FIN and reset): TCP in production, TLS over TCP, and
//!   [`DuplexIo`] in unit tests, where every time policy runs through the driver with paused
//!   time.
//! - **No read buffer while idle.** Reads go into one buffer per worker thread, handed to
//!   `data_received` by reference; an idle connection owns no buffer at all.
//! - **Writes go straight to the stream.** `Transport::write` tries the stream first and only
//!   buffers what it would not take, so a ping-pong exchange copies nothing
//!   (`Transport::write_vectored` does the same with one `writev`). Such a write
//!   spends tokio's cooperative budget like a `poll_write` would, so a busy connection yields
//!   its worker as often as a plain tokio echo does.
//! - **Backpressure.** Buffered outgoing bytes are capped by `--write-buffer-limit`: each read is
//!   sized to fit the room left, and reading stops while the buffer is full. A peer that sends
//!   but never reads fills its own kernel buffers and then blocks; the server holds at most the
//!   cap for it.
//! - **Half-close.** On EOF from the peer everything pending is flushed, then our write side is
//!   shut down (FIN), so the peer gets every byte back and a clean end.
//! - **Lingering close.** When we close first (max age, `lose_connection`), we send FIN and then
//!   read and discard until the peer's FIN, for at most [`LINGER_TIMEOUT`], so the peer sees a
//!   clean close rather than a reset that could destroy echoed bytes it has not read yet. A
//!   peer that resets during the linger is counted as `reset`, not as the clean reason we closed
//!   for: it did not read everything.
//! - **Policy timers** (idle, write stall, max age and its grace, throttle) live in a boxed
//!   clock that exists only when a time policy is configured. A protocol's own deadline and
//!   timer (`Protocol::deadline`, `Protocol::timer`) share that timer, created on demand.
//! - **Protocol control** (the general hooks fault injection is built on, Twisted-style):
//!   `Transport::pause_reading` / `resume_reading` (`pauseProducing`), `close_for` /
//!   `abort_for` with a loss reason, and `Protocol::write_pending` so a half-closed connection
//!   waits for bytes a protocol still holds (a delay queue).
//! - **Exactly-once accounting.** `active` goes up when the task is created and down when it is
//!   dropped, and `lost{reason}` is counted on drop, as `panic` if the protocol panicked, so
//!   the shared state stays right whatever happens. A task dropped unfinished without a panic
//!   (the runtime shut down) tells its protocol `connection_lost(shutdown)`, so the protocol's
//!   own record agrees. `echo_sent_bytes_total` counts what the stream took
//!   (`Protocol::bytes_sent`), not what was queued.

mod io;
mod outbox;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use tokio::io::ReadBuf;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::abort::AbortSignal;
use crate::policies::timeouts::{Expiry, PolicyClock, TimePolicies};
use crate::protocol::{LossReason, Protocol};
use crate::state::ServiceState;

pub use io::{ConnectionIo, DuplexIo};
pub(crate) use outbox::canonical;
use outbox::{Closing, Outbox, StreamTransport};

/// How long a connection we close ourselves keeps reading and discarding after our FIN.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// Default of `--max-connection-age-grace`: how long a max-age close may take to flush.
pub const DEFAULT_MAX_AGE_GRACE: Duration = Duration::from_secs(10);
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
    /// Close after this long with no bytes either way (`--idle-timeout`). Data waiting for a
    /// peer that does not read is a stall, not idleness (see `write_stall_timeout`).
    pub idle_timeout: Option<Duration>,
    /// Close when the peer has read nothing for this long while we have data for it
    /// (`--write-stall-timeout`); when unset, `idle_timeout` bounds the stall instead (counted
    /// as `write_stall` all the same).
    pub write_stall_timeout: Option<Duration>,
    /// Close gracefully after this age, +- `max_age_jitter` (`--max-connection-age`).
    pub max_age: Option<Duration>,
    /// Random spread applied to `max_age` so connections don't all close at once.
    pub max_age_jitter: Duration,
    /// Read at most this many bytes per second per connection (`--throttle-bytes-per-second`).
    pub throttle_bytes_per_second: Option<u64>,
    /// After a max-age close starts, abort the connection (`lost{reason="max_age_grace"}`) if
    /// it has not flushed within this long (`--max-connection-age-grace`): a peer that does not
    /// read cannot hold it open.
    pub max_age_grace: Duration,
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
            max_age_grace: DEFAULT_MAX_AGE_GRACE,
        }
    }
}

impl ConnectionSettings {
    /// The time-policy part, as the policy clock takes it.
    pub fn time_policies(&self) -> TimePolicies {
        TimePolicies {
            idle_timeout: self.idle_timeout,
            write_stall_timeout: self.write_stall_timeout,
            max_age: self.max_age,
            max_age_jitter: self.max_age_jitter,
            max_age_grace: self.max_age_grace,
            throttle_bytes_per_second: self.throttle_bytes_per_second,
        }
    }
}

/// What every connection task of one server shares, behind one `Arc` per task.
#[derive(Debug)]
pub(crate) struct ConnectionShared {
    pub settings: ConnectionSettings,
    /// `settings.time_policies()`, taken once.
    pub time: TimePolicies,
    pub state: Arc<ServiceState>,
    /// Flipped at the end of the shutdown timeout: every open connection closes.
    pub abort: AbortSignal,
    /// Notified when the last open connection is gone.
    pub all_closed: Notify,
}

impl ConnectionShared {
    pub fn new(settings: ConnectionSettings, state: Arc<ServiceState>) -> Self {
        ConnectionShared {
            time: settings.time_policies(),
            settings,
            state,
            abort: AbortSignal::default(),
            all_closed: Notify::new(),
        }
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

/// The policy clock and the one timer set to its next deadline (boxed: only connections with a
/// time policy have one).
struct Timed {
    clock: PolicyClock,
    timer: Pin<Box<Sleep>>,
}

/// One connection: a future that runs `protocol` on `stream` until the connection is lost.
pub(crate) struct ConnectionTask<S, P: Protocol> {
    stream: S,
    protocol: P,
    outbox: Outbox,
    timed: Option<Box<Timed>>,
    /// After our FIN: why we closed, and until when we drain the peer (boxed: rare).
    linger: Option<Box<Linger>>,
    made: bool,
    read_open: bool,
    /// Declared last: fields drop in order, so the stream and the protocol (and its span) are
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
        shared.state.stats.closed();
        if self.abort_key != NOT_REGISTERED {
            shared.abort.unregister(self.abort_key);
        }
        if shared.state.stats.active.get() == 0 {
            shared.all_closed.notify_one();
        }
    }
}

impl<S, P: Protocol> Drop for ConnectionTask<S, P> {
    /// Dropped unfinished: by a panic (the protocol must not be called again; `Accounting`
    /// counts `panic`), or by the runtime shutting down with the task still alive, which is a
    /// shutdown like the abort at the end of the drain: tell the protocol so, so that its own
    /// record (span, duration) and the loss counter say the same.
    fn drop(&mut self) {
        if self.accounting.reason.is_none() && !std::thread::panicking() {
            self.accounting.reason = Some(LossReason::Shutdown);
            self.protocol.connection_lost(LossReason::Shutdown);
        }
    }
}

impl<S: ConnectionIo, P: Protocol> ConnectionTask<S, P> {
    /// A task for an accepted connection; counts it as active until dropped.
    pub fn new(stream: S, protocol: P, id: u64, shared: Arc<ConnectionShared>) -> Self {
        shared.state.stats.opened();
        let now = Instant::now();
        let timed = PolicyClock::for_connection(&shared.time, id, now).map(|clock| {
            Box::new(Timed {
                clock,
                timer: Box::pin(tokio::time::sleep_until(now + FAR_FUTURE)),
            })
        });
        ConnectionTask {
            stream,
            protocol,
            outbox: Outbox::new(),
            timed,
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

    /// Run a protocol callback from outside the stream loop (`connection_made`,
    /// `timer_fired`): report what its writes sent and record the write progress they made.
    fn callback(
        &mut self,
        now: Instant,
        call: impl FnOnce(&mut P, &mut dyn crate::transport::Transport),
    ) {
        call(
            &mut self.protocol,
            &mut StreamTransport {
                stream: &mut self.stream,
                outbox: &mut self.outbox,
            },
        );
        report_sent(&mut self.protocol, &mut self.outbox);
        if let Some(timed) = self.timed.as_deref_mut() {
            timed
                .clock
                .record_write_progress(now, !self.outbox.pending.is_empty());
        }
    }

    fn finish(&mut self, reason: LossReason) -> Poll<()> {
        if matches!(
            reason,
            LossReason::Aborted | LossReason::MaxAgeGrace | LossReason::FaultReset
        ) {
            // An abort is a reset by definition: discard what is queued, send RST.
            self.stream.reset_on_close();
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
    /// A reset here means the peer closed without reading everything we sent: counted as such.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(linger) = self.linger.as_mut() else {
            return Poll::Pending;
        };
        let reason = linger.reason;
        let stream = &mut self.stream;
        let outcome = loop {
            let read = READ_BUFFER.with(|cell| {
                let mut buffer = cell.borrow_mut();
                if buffer.len() < 4096 {
                    buffer.resize(4096, 0);
                }
                let mut buf = ReadBuf::new(&mut buffer[..]);
                Pin::new(&mut *stream)
                    .poll_read(cx, &mut buf)
                    .map_ok(|()| buf.filled().len())
            });
            match read {
                Poll::Ready(Ok(0)) => break Some(reason),
                Poll::Ready(Err(e)) => break Some(LossReason::from_io_error(&e)),
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => {
                    break linger
                        .deadline
                        .as_mut()
                        .poll(cx)
                        .is_ready()
                        .then_some(reason);
                }
            }
        };
        match outcome {
            Some(reason) => self.finish(reason),
            None => Poll::Pending,
        }
    }
}

/// The timer's resting deadline when no policy needs it.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365);

impl<S: ConnectionIo, P: Protocol> Future for ConnectionTask<S, P> {
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
            this.callback(Instant::now(), P::connection_made);
        }
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
                this.timed.as_deref_mut().map(|t| &mut t.clock),
                &this.accounting.shared.settings,
            ) {
                Poll::Ready(Step::Lost(reason)) => return this.finish(reason),
                Poll::Ready(Step::Linger(reason)) => {
                    if let Some(timed) = this.timed.as_deref_mut() {
                        timed.clock.flushed();
                    }
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
            // is set again, which is cheaper than resetting it on every read. When the clock's
            // `expire(now)` finds nothing due, its next deadline is after `now` (a property
            // test holds it to that), so the timer is always re-armed in the future and this
            // loop cannot spin. A protocol's own deadline (`Protocol::deadline`: the PROXY
            // header and TLS handshake timeouts) shares the timer; the clock is created for it
            // on demand, so connections without either pay nothing.
            let protocol_deadline = this.protocol.deadline();
            if let Some((at, reason)) = protocol_deadline {
                if Instant::now() >= at {
                    return this.finish(reason);
                }
            }
            // The protocol's own timer (`Protocol::timer`) shares the same Sleep.
            let protocol_timer = this.protocol.timer();
            if let Some(at) = protocol_timer {
                let now = Instant::now();
                if now >= at {
                    this.callback(now, P::timer_fired);
                    debug_assert!(
                        this.protocol.timer().is_none_or(|next| next > now),
                        "Protocol::timer_fired left its timer due"
                    );
                    // It may have written, closed or resumed reading: another turn of the I/O.
                    continue;
                }
            }
            let protocol_wake = protocol_deadline
                .map(|(at, _)| at)
                .into_iter()
                .chain(protocol_timer)
                .min();
            if protocol_wake.is_some() && this.timed.is_none() {
                let now = Instant::now();
                this.timed = Some(Box::new(Timed {
                    clock: PolicyClock::bare(now),
                    timer: Box::pin(tokio::time::sleep_until(now + FAR_FUTURE)),
                }));
            }
            let Some(timed) = this.timed.as_deref_mut() else {
                return Poll::Pending;
            };
            let policies = &this.accounting.shared.time;
            if timed.timer.is_elapsed() {
                let now = Instant::now();
                let expiry = timed.clock.expire(policies, now);
                match expiry {
                    Some(Expiry::Close(reason)) => return this.finish(reason),
                    Some(Expiry::CloseGracefully(reason)) if this.outbox.closing == Closing::No => {
                        this.outbox.closing = Closing::Graceful(reason);
                    }
                    _ => {}
                }
                let closing = this.outbox.closing != Closing::No;
                let next = timed.clock.next_deadline(policies, closing);
                debug_assert!(
                    expiry.is_some() || next.is_none_or(|at| at > now),
                    "policy clock: nothing due at {now:?}, yet the next deadline is {next:?}"
                );
                // The floor only matters if the clock broke its rule: then it costs a wake-up
                // per millisecond instead of a busy loop.
                let floor = now + Duration::from_millis(1);
                let next = next.into_iter().chain(protocol_wake).min();
                let timer = timed.timer.as_mut();
                timer.reset(next.map_or(now + FAR_FUTURE, |at| at.max(floor)));
                // Give the stream another turn: a refilled throttle may read, a max-age close
                // must flush and FIN.
                continue;
            }
            let closing = this.outbox.closing != Closing::No;
            let earliest = timed
                .clock
                .next_deadline(policies, closing)
                .into_iter()
                .chain(protocol_wake)
                .min();
            let Some(deadline) = earliest else {
                return Poll::Pending;
            };
            if deadline < timed.timer.deadline() {
                timed.timer.as_mut().reset(deadline);
            }
            if timed.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired: the next turn of the loop applies it.
        }
    }
}

/// Tell the protocol what the stream took during the callback that just returned.
fn report_sent<P: Protocol>(protocol: &mut P, outbox: &mut Outbox) {
    let n = outbox.take_sent();
    if n > 0 {
        protocol.bytes_sent(n);
    }
}

/// One round of stream work: flush what is pending, then read and hand data to the protocol,
/// until the stream has nothing more for us (Pending) or the connection ends.
fn poll_io<S: ConnectionIo, P: Protocol>(
    cx: &mut Context<'_>,
    stream: &mut S,
    protocol: &mut P,
    outbox: &mut Outbox,
    read_open: &mut bool,
    mut clock: Option<&mut PolicyClock>,
    settings: &ConnectionSettings,
) -> Poll<Step> {
    loop {
        if let Closing::Abort(reason) = outbox.closing {
            return Poll::Ready(Step::Lost(reason));
        }
        if let Some(err) = outbox.error.take() {
            return Poll::Ready(Step::Lost(LossReason::from_io_error(&err)));
        }

        if !outbox.pending.is_empty() {
            match Pin::new(&mut *stream).poll_write(cx, &outbox.pending) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Step::Lost(LossReason::Error(
                        std::io::ErrorKind::WriteZero,
                    )))
                }
                Poll::Ready(Ok(n)) => {
                    outbox.pending.advance(n);
                    protocol.bytes_sent(n);
                    if outbox.pending.is_empty() {
                        // Give the memory back: an idle connection should own no buffer.
                        outbox.pending = bytes::BytesMut::new();
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
                _ if !*read_open && !protocol.write_pending() => {
                    Some(Step::Lost(LossReason::PeerClosed))
                }
                _ => None,
            };
            if let Some(step) = finished {
                // Everything is sent: FIN.
                stream.shutdown_write();
                return Poll::Ready(step);
            }
        }

        let room = settings
            .write_buffer_limit
            .saturating_sub(outbox.pending.len());
        let throttled = clock.as_deref().is_some_and(PolicyClock::read_paused);
        if outbox.read_stopped && *read_open && outbox.closing == Closing::No {
            // Never reading again, but still ending when the peer goes (a blackhole would
            // otherwise hold the connection until the idle timeout).
            return match stream.poll_peer_gone(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Step::Lost(LossReason::PeerClosed)),
                Poll::Ready(Err(e)) => Poll::Ready(Step::Lost(LossReason::from_io_error(&e))),
                Poll::Pending => Poll::Pending,
            };
        }
        if !*read_open
            || outbox.closing != Closing::No
            || room == 0
            || throttled
            || outbox.read_paused
        {
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
                        protocol.data_received(data, &mut StreamTransport { stream, outbox });
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
                let sent = outbox.take_sent();
                if sent > 0 {
                    protocol.bytes_sent(sent);
                    // The direct write spent none of tokio's cooperative budget (a
                    // `poll_write` would have): charge it, or one poll runs twice as many
                    // read+write rounds as a plain tokio echo and starves its neighbours.
                    match tokio::task::coop::poll_proceed(cx) {
                        Poll::Ready(progress) => progress.made_progress(),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Step::Lost(LossReason::from_io_error(&e))),
            Poll::Pending => return Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests;
