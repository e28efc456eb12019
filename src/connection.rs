//! The per-connection task: drives one protocol over one socket.
//!
//! This is the reactor side of a Twisted connection, written for memory and CPU per connection:
//!
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
//! - **Policy timers** (idle, write stall, max age, throttle) exist only when configured; a
//!   connection without them carries no timer.

use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::factory::ConnectionInfo;
use crate::protocol::{LossReason, Protocol};
use crate::transport::Transport;

/// How long a connection we close ourselves (max age, `lose_connection`) keeps reading and
/// discarding after our FIN, so the peer sees a clean close instead of a reset that could
/// destroy echoed bytes it has not read yet.
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
            idle_timeout: None,
            write_stall_timeout: None,
            max_age: None,
            max_age_jitter: Duration::ZERO,
            throttle_bytes_per_second: None,
        }
    }
}

impl ConnectionSettings {
    fn has_policy_timers(&self) -> bool {
        self.idle_timeout.is_some()
            || self.write_stall_timeout.is_some()
            || self.max_age.is_some()
            || self.throttle_bytes_per_second.is_some()
    }
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
}

/// The [`Transport`] a protocol sees while the driver calls it.
struct SocketTransport<'a> {
    stream: &'a TcpStream,
    outbox: &'a mut Outbox,
    info: &'a ConnectionInfo,
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
                Ok(n) => rest = &data[n..],
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

    fn peer_addr(&self) -> std::net::SocketAddr {
        self.info.peer
    }

    fn local_addr(&self) -> std::net::SocketAddr {
        self.info.local
    }
}

thread_local! {
    /// The read buffer of this worker thread, shared by all its connections: reads never
    /// overlap on one thread, and `data_received` only borrows the bytes.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Token bucket for `--throttle-bytes-per-second` (one second of burst).
struct Throttle {
    rate: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl Throttle {
    fn new(rate: u64, now: Instant) -> Self {
        Throttle {
            rate: rate as f64,
            tokens: rate as f64,
            refilled_at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.refilled_at = now;
    }

    /// When reading may resume, if the bucket is in debt.
    fn resume_at(&self) -> Option<Instant> {
        (self.tokens < 0.0)
            .then(|| self.refilled_at + Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// Time-based policy state, allocated only for connections that have policies.
struct PolicyClock {
    last_activity: Instant,
    /// Since when the peer has been holding up our writes (pending non-empty, no progress).
    stalled_since: Option<Instant>,
    /// When to close for `--max-connection-age`, until that close has started.
    max_age_at: Option<Instant>,
    throttle: Option<Throttle>,
}

impl PolicyClock {
    fn new(settings: &ConnectionSettings, conn_id: u64) -> Self {
        let now = Instant::now();
        PolicyClock {
            last_activity: now,
            stalled_since: None,
            max_age_at: settings
                .max_age
                .map(|age| now + jittered(age, settings.max_age_jitter, conn_id)),
            throttle: settings
                .throttle_bytes_per_second
                .map(|rate| Throttle::new(rate, now)),
        }
    }

    /// The earliest moment a policy needs to look at this connection again.
    fn next_deadline(&self, settings: &ConnectionSettings, outbox: &Outbox) -> Option<Instant> {
        let idle = settings.idle_timeout.map(|t| self.last_activity + t);
        let stall = settings
            .write_stall_timeout
            .zip(self.stalled_since)
            .map(|(t, since)| since + t);
        let resume = self.throttle.as_ref().and_then(Throttle::resume_at);
        let age = match outbox.closing {
            Closing::No => self.max_age_at,
            _ => None,
        };
        [idle, stall, resume, age].into_iter().flatten().min()
    }
}

/// `age` moved by a pseudo-random amount in `[-jitter, +jitter]`, derived from the connection
/// id (spread is all that matters here, not unpredictability).
fn jittered(age: Duration, jitter: Duration, conn_id: u64) -> Duration {
    if jitter.is_zero() {
        return age;
    }
    // SplitMix64 finaliser: consecutive ids land far apart.
    let mut x = conn_id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let unit = (x >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    let offset = jitter.as_secs_f64() * (2.0 * unit - 1.0);
    Duration::from_secs_f64((age.as_secs_f64() + offset).max(0.0))
}

/// Why the I/O loop handed control back to the driver.
enum Step {
    /// The connection is over.
    Lost(LossReason),
    /// Our write side is flushed and shut down; linger, then end with this reason.
    Linger(LossReason),
    /// Policy state changed (a stall began, the throttle paused): recompute the deadline.
    Rearm,
}

/// Run `protocol` on `stream` until the connection is lost; returns why.
///
/// `abort` flips when the server gives up on open connections at the end of a shutdown.
pub(crate) async fn drive<P: Protocol>(
    mut stream: TcpStream,
    info: &ConnectionInfo,
    protocol: &mut P,
    settings: &ConnectionSettings,
    abort: &mut watch::Receiver<bool>,
) -> LossReason {
    let mut outbox = Outbox {
        pending: BytesMut::new(),
        closing: Closing::No,
        error: None,
    };
    protocol.connection_made(&mut SocketTransport {
        stream: &stream,
        outbox: &mut outbox,
        info,
    });
    let mut clock = settings
        .has_policy_timers()
        .then(|| Box::new(PolicyClock::new(settings, info.id)));
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    let mut read_open = true;

    let reason = loop {
        let deadline = clock
            .as_ref()
            .and_then(|c| c.next_deadline(settings, &outbox));
        if let Some(deadline) = deadline {
            match timer.as_mut() {
                Some(sleep) if sleep.deadline() == deadline => {}
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let io = poll_fn(|cx| {
            poll_io(
                cx,
                &mut stream,
                info,
                protocol,
                &mut outbox,
                &mut read_open,
                clock.as_deref_mut(),
                settings,
            )
        });
        tokio::select! {
            biased;
            _ = abort.changed() => break LossReason::Shutdown,
            step = io => match step {
                Step::Lost(reason) => break reason,
                Step::Linger(reason) => {
                    // Boxed: a rare path whose buffer and timer should not enlarge every
                    // connection's future.
                    Box::pin(linger(&mut stream, abort)).await;
                    break reason;
                }
                Step::Rearm => {}
            },
            _ = async { timer.as_mut().expect("guarded").await }, if deadline.is_some() => {
                let clock = clock.as_deref_mut().expect("a deadline implies a clock");
                if let Some(reason) = expire(clock, settings, &mut outbox) {
                    break reason;
                }
            }
        }
    };
    if reason == LossReason::Aborted {
        // An abort is a reset by definition: discard what is queued, send RST.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    protocol.connection_lost(reason);
    reason
}

/// Apply the time-based policies after the timer fired; returns a reason to close now.
fn expire(
    clock: &mut PolicyClock,
    settings: &ConnectionSettings,
    outbox: &mut Outbox,
) -> Option<LossReason> {
    let now = Instant::now();
    if let Some(idle) = settings.idle_timeout {
        if now >= clock.last_activity + idle {
            return Some(LossReason::IdleTimeout);
        }
    }
    if let (Some(stall), Some(since)) = (settings.write_stall_timeout, clock.stalled_since) {
        if now >= since + stall {
            return Some(LossReason::WriteStall);
        }
    }
    if clock.max_age_at.is_some_and(|at| now >= at) && outbox.closing == Closing::No {
        outbox.closing = Closing::Graceful(LossReason::MaxAge);
        clock.max_age_at = None;
    }
    if let Some(throttle) = clock.throttle.as_mut() {
        throttle.refill(now);
    }
    None
}

/// After our FIN on a close we started: read and discard until the peer's FIN, for at most
/// [`LINGER_TIMEOUT`].
async fn linger(stream: &mut TcpStream, abort: &mut watch::Receiver<bool>) {
    use tokio::io::AsyncReadExt;
    let mut scrap = [0u8; 512];
    let drain = async {
        while let Ok(n) = stream.read(&mut scrap).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = drain => {}
        _ = tokio::time::sleep(LINGER_TIMEOUT) => {}
        _ = abort.changed() => {}
    }
}

/// One round of socket work: flush what is pending, then read and hand data to the protocol,
/// until the socket has nothing more for us (Pending) or the connection ends.
#[allow(clippy::too_many_arguments)]
fn poll_io<P: Protocol>(
    cx: &mut Context<'_>,
    stream: &mut TcpStream,
    info: &ConnectionInfo,
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
                    if outbox.pending.is_empty() {
                        // Give the memory back: an idle connection should own no buffer.
                        outbox.pending = BytesMut::new();
                    }
                    if let Some(clock) = clock.as_deref_mut() {
                        let now = Instant::now();
                        clock.last_activity = now;
                        clock.stalled_since = (!outbox.pending.is_empty()).then_some(now);
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
        let throttled = clock
            .as_deref()
            .and_then(|c| c.throttle.as_ref())
            .is_some_and(|t| t.tokens < 0.0);
        if !*read_open || outbox.closing != Closing::No || room == 0 || throttled {
            return Poll::Pending;
        }

        let want = room.min(settings.read_buffer_size);
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
                        protocol.data_received(
                            data,
                            &mut SocketTransport {
                                stream,
                                outbox,
                                info,
                            },
                        );
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
                    let now = Instant::now();
                    clock.last_activity = now;
                    let mut rearm = false;
                    if !outbox.pending.is_empty() && clock.stalled_since.is_none() {
                        clock.stalled_since = Some(now);
                        rearm = true;
                    }
                    if let Some(throttle) = clock.throttle.as_mut() {
                        throttle.refill(now);
                        throttle.tokens -= n as f64;
                        rearm |= throttle.tokens < 0.0;
                    }
                    if rearm {
                        return Poll::Ready(Step::Rearm);
                    }
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

    #[test]
    fn jitter_stays_within_bounds_and_spreads() {
        let age = Duration::from_secs(60);
        let jitter = Duration::from_secs(10);
        let ages: Vec<Duration> = (1..200).map(|id| jittered(age, jitter, id)).collect();
        assert!(ages
            .iter()
            .all(|a| *a >= age - jitter && *a <= age + jitter));
        let min = ages.iter().min().unwrap();
        let max = ages.iter().max().unwrap();
        assert!(
            *max - *min > Duration::from_secs(10),
            "jitter should spread ages"
        );
        assert_eq!(jittered(age, Duration::ZERO, 7), age);
    }

    #[test]
    fn throttle_pauses_when_in_debt() {
        let now = Instant::now();
        let mut throttle = Throttle::new(1000, now);
        assert!(throttle.resume_at().is_none());
        throttle.tokens -= 1500.0;
        let resume = throttle.resume_at().expect("in debt");
        assert_eq!(resume - now, Duration::from_millis(500));
        throttle.refill(now + Duration::from_secs(1));
        assert!(throttle.resume_at().is_none());
    }
}
