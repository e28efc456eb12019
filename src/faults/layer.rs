//! The fault layer: a wrapping factory and protocol (Twisted's `WrappingFactory` /
//! `ProtocolWrapper`) that applies the fault chosen for a connection, through the same
//! transport calls any protocol has, so neither the driver nor the protocol it wraps knows
//! faults exist. It is installed only when a fault is configured or `--admin-control` is on;
//! a connection that draws no fault forwards every event and holds no fault state.
//!
//! The fault is chosen at `connection_made` (after any PROXY header, so `peers` sees the
//! original client) and applied with:
//! - `pause_reading` / `resume_reading`: `accept_delay` (paused until its timer), `latency`
//!   (paused while its queue holds `--write-buffer-limit` bytes),
//!   `bandwidth` (paused while the read throttle, the same token bucket as
//!   `--throttle-bytes-per-second`, is in debt);
//! - `stop_reading`: `blackhole` (never reads again; the driver still ends the connection when
//!   the peer closes or resets it);
//! - the protocol timer (`Protocol::timer`): the accept delay, each delayed chunk's release,
//!   `after` durations, the throttle's refill;
//! - `close_for(fault_close)` / `abort_for(fault_reset)`: `refuse`, `close`, `reset`.
//!
//! The inner protocol sees a transport that counts or delays its writes and answers
//! `fault()` with the fault's label, which the instrumentation puts on the span as
//! `echo.fault`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;

use super::set::FaultControl;
use super::spec::{FaultKind, FaultSpec};
use crate::factory::{ConnectionInfo, Factory, Refusal};
use crate::mix::splitmix64;
use crate::policies::throttle::Throttle;
use crate::protocol::{LossReason, Protocol};
use crate::transport::{TlsInfo, Transport};

/// What every connection of the layer shares.
struct Layer {
    control: Arc<FaultControl>,
    /// `--write-buffer-limit`: the most bytes the latency queue holds before reading pauses.
    write_buffer_limit: usize,
}

/// Wraps a factory; every protocol it builds is a [`Faulty`] protocol.
pub struct FaultFactory<F> {
    inner: F,
    layer: Arc<Layer>,
}

impl<F> FaultFactory<F> {
    /// Apply the faults of `control` to the connections of `inner`; a latency queue holds at
    /// most `write_buffer_limit` bytes before reading pauses.
    pub fn new(inner: F, control: Arc<FaultControl>, write_buffer_limit: usize) -> Self {
        FaultFactory {
            inner,
            layer: Arc::new(Layer {
                control,
                write_buffer_limit,
            }),
        }
    }
}

impl<F: Factory> Factory for FaultFactory<F> {
    type Protocol = Faulty<F::Protocol>;

    fn build_protocol(&self, conn: &ConnectionInfo) -> Result<Self::Protocol, Refusal> {
        Ok(Faulty {
            inner: self.inner.build_protocol(conn)?,
            state: State::Start(self.layer.clone(), conn.id),
        })
    }

    fn start_factory(&self) {
        self.inner.start_factory();
    }

    fn stop_factory(&self) {
        self.inner.stop_factory();
    }
}

/// The wrapped protocol: forwards every event, applying its fault if it drew one.
pub struct Faulty<P> {
    inner: P,
    state: State,
}

/// Before the choice, or after it: the fault (boxed: only faulted connections carry it).
enum State {
    Start(Arc<Layer>, u64),
    Clean,
    Faulted(Box<Active>),
}

/// A fault at work on one connection.
struct Active {
    kind: FaultKind,
    spec: FaultSpec,
    write_buffer_limit: usize,
    /// `accept_delay`: reading resumes at this moment.
    hold_until: Option<Instant>,
    /// `latency`: chunks waiting for their release time, in order, and their total size.
    queue: VecDeque<(Instant, Vec<u8>)>,
    queued: usize,
    /// `latency`: reading paused because the queue is full.
    queue_full: bool,
    /// `latency`: the state of the jitter's random draws.
    jitter_state: u64,
    /// `latency`: the inner protocol closed while chunks were queued; close once they are out.
    close_when_drained: Option<LossReason>,
    /// `close` / `reset` after bytes: how many more may be echoed.
    bytes_left: Option<u64>,
    /// `close` / `reset` after a duration: when.
    end_at: Option<Instant>,
    /// `bandwidth`: the token bucket, and whether reading is paused for it.
    throttle: Option<Throttle>,
    throttled: bool,
}

impl Active {
    fn new(spec: FaultSpec, conn_id: u64, write_buffer_limit: usize, now: Instant) -> Self {
        Active {
            kind: spec.kind,
            write_buffer_limit,
            hold_until: None,
            queue: VecDeque::new(),
            queued: 0,
            queue_full: false,
            jitter_state: splitmix64(conn_id),
            close_when_drained: None,
            bytes_left: spec.after_bytes,
            end_at: spec.after.map(|after| now + after),
            throttle: (spec.kind == FaultKind::Bandwidth)
                .then(|| Throttle::new(spec.bytes_per_second, now)),
            throttled: false,
            spec,
        }
    }

    /// What the fault does at accept.
    fn start(&mut self, transport: &mut dyn Transport, now: Instant) {
        match self.kind {
            FaultKind::AcceptDelay => {
                transport.pause_reading();
                self.hold_until = Some(now + self.spec.delay);
            }
            FaultKind::Blackhole => transport.stop_reading(),
            FaultKind::Refuse => transport.close_for(LossReason::FaultClose),
            FaultKind::Reset if self.end_at.is_none() && self.bytes_left.is_none() => {
                transport.abort_for(LossReason::FaultReset);
            }
            _ => {}
        }
    }

    /// End the connection the way the fault does.
    fn end(&self, transport: &mut dyn Transport) {
        match self.kind {
            FaultKind::Reset => transport.abort_for(LossReason::FaultReset),
            _ => transport.close_for(LossReason::FaultClose),
        }
    }

    /// The delay of the next chunk: `delay` +- `jitter`, never before the chunk ahead of it.
    fn release_time(&mut self, now: Instant) -> Instant {
        let jitter = self.spec.jitter.as_nanos() as u64;
        let mut delay = self.spec.delay;
        if jitter > 0 {
            self.jitter_state = splitmix64(self.jitter_state);
            let offset = self.jitter_state % (2 * jitter + 1);
            delay = if offset >= jitter {
                delay + std::time::Duration::from_nanos(offset - jitter)
            } else {
                delay.saturating_sub(std::time::Duration::from_nanos(jitter - offset))
            };
        }
        let at = now + delay;
        self.queue.back().map_or(at, |(last, _)| at.max(*last))
    }

    fn timer(&self) -> Option<Instant> {
        let throttle = self
            .throttle
            .as_ref()
            .filter(|_| self.throttled)
            .and_then(Throttle::resume_at);
        [
            self.hold_until,
            self.queue.front().map(|(at, _)| *at),
            self.end_at,
            throttle,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn fire(&mut self, transport: &mut dyn Transport, now: Instant) {
        if self.hold_until.is_some_and(|at| at <= now) {
            self.hold_until = None;
            transport.resume_reading();
        }
        while self.queue.front().is_some_and(|(at, _)| *at <= now) {
            let (_, chunk) = self.queue.pop_front().expect("checked");
            self.queued -= chunk.len();
            transport.write(&chunk);
        }
        if self.queue_full && self.queued < self.write_buffer_limit {
            self.queue_full = false;
            transport.resume_reading();
        }
        if self.queue.is_empty() {
            if let Some(reason) = self.close_when_drained.take() {
                transport.close_for(reason);
            }
        }
        if self.end_at.is_some_and(|at| at <= now) {
            self.end_at = None;
            self.end(transport);
        }
        if let Some(throttle) = self.throttle.as_mut() {
            if self.throttled && throttle.resume_at().is_none_or(|at| at <= now) {
                throttle.refill(now);
                self.throttled = false;
                transport.resume_reading();
            }
        }
    }
}

/// The transport the inner protocol sees on a faulted connection.
struct FaultTransport<'a> {
    outer: &'a mut dyn Transport,
    active: &'a mut Active,
}

impl Transport for FaultTransport<'_> {
    fn write(&mut self, data: &[u8]) {
        let active = &mut *self.active;
        match active.kind {
            FaultKind::Latency if !data.is_empty() => {
                let at = active.release_time(Instant::now());
                active.queue.push_back((at, data.to_vec()));
                active.queued += data.len();
                if !active.queue_full && active.queued >= active.write_buffer_limit {
                    active.queue_full = true;
                    self.outer.pause_reading();
                }
            }
            FaultKind::Close | FaultKind::Reset if active.bytes_left.is_some() => {
                let left = active.bytes_left.unwrap_or(0);
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                self.outer.write(&data[..n]);
                let left = left - n as u64;
                active.bytes_left = Some(left);
                if left == 0 {
                    active.bytes_left = None;
                    active.end(self.outer);
                }
            }
            _ => self.outer.write(data),
        }
    }

    fn lose_connection(&mut self) {
        self.close_for(LossReason::Closed);
    }

    fn abort_connection(&mut self) {
        self.outer.abort_connection();
    }

    fn peer_addr(&self) -> SocketAddr {
        self.outer.peer_addr()
    }

    fn local_addr(&self) -> SocketAddr {
        self.outer.local_addr()
    }

    fn tls(&self) -> Option<&TlsInfo> {
        self.outer.tls()
    }

    fn proxy_header(&self) -> Option<&crate::proxy_protocol::Header> {
        self.outer.proxy_header()
    }

    fn pause_reading(&mut self) {
        self.outer.pause_reading();
    }

    fn resume_reading(&mut self) {
        self.outer.resume_reading();
    }

    fn stop_reading(&mut self) {
        self.outer.stop_reading();
    }

    /// A graceful close waits for the latency queue: the delayed bytes are still the
    /// protocol's writes, and a graceful close sends everything written first.
    fn close_for(&mut self, reason: LossReason) {
        if self.active.queue.is_empty() {
            self.outer.close_for(reason);
        } else {
            self.active.close_when_drained.get_or_insert(reason);
        }
    }

    fn abort_for(&mut self, reason: LossReason) {
        self.outer.abort_for(reason);
    }

    fn fault(&self) -> Option<&'static str> {
        Some(self.active.kind.label())
    }
}

impl<P: Protocol> Faulty<P> {
    /// Call the inner protocol with the transport it should see.
    fn with_inner(
        &mut self,
        transport: &mut dyn Transport,
        f: impl FnOnce(&mut P, &mut dyn Transport),
    ) {
        match &mut self.state {
            State::Faulted(active) => f(
                &mut self.inner,
                &mut FaultTransport {
                    outer: transport,
                    active,
                },
            ),
            _ => f(&mut self.inner, transport),
        }
    }
}

impl<P: Protocol> Protocol for Faulty<P> {
    fn connection_made(&mut self, transport: &mut dyn Transport) {
        if let State::Start(layer, id) = std::mem::replace(&mut self.state, State::Clean) {
            let client = transport.peer_addr().ip();
            if let Some(spec) = layer.control.choose(id, client) {
                tracing::debug!(
                    connection_id = id,
                    fault = spec.kind.label(),
                    "fault injected"
                );
                let now = Instant::now();
                self.state = State::Faulted(Box::new(Active::new(
                    spec,
                    id,
                    layer.write_buffer_limit,
                    now,
                )));
            }
        }
        self.with_inner(transport, |inner, t| inner.connection_made(t));
        if let State::Faulted(active) = &mut self.state {
            active.start(transport, Instant::now());
        }
    }

    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        if let State::Faulted(active) = &mut self.state {
            if let Some(throttle) = active.throttle.as_mut() {
                throttle.consume(Instant::now(), data.len());
                if throttle.in_debt() && !active.throttled {
                    active.throttled = true;
                    transport.pause_reading();
                }
            }
        }
        self.with_inner(transport, |inner, t| inner.data_received(data, t));
    }

    fn bytes_sent(&mut self, n: usize) {
        self.inner.bytes_sent(n);
    }

    fn connection_lost(&mut self, reason: LossReason) {
        self.inner.connection_lost(reason);
    }

    fn deadline(&self) -> Option<(Instant, LossReason)> {
        self.inner.deadline()
    }

    fn timer(&self) -> Option<Instant> {
        let own = match &self.state {
            State::Faulted(active) => active.timer(),
            _ => None,
        };
        own.into_iter().chain(self.inner.timer()).min()
    }

    fn timer_fired(&mut self, transport: &mut dyn Transport) {
        let now = Instant::now();
        if let State::Faulted(active) = &mut self.state {
            if active.timer().is_some_and(|at| at <= now) {
                active.fire(transport, now);
            }
        }
        if self.inner.timer().is_some_and(|at| at <= now) {
            self.with_inner(transport, |inner, t| inner.timer_fired(t));
        }
    }

    fn write_pending(&self) -> bool {
        let own = matches!(&self.state, State::Faulted(active) if !active.queue.is_empty());
        own || self.inner.write_pending()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::echo::EchoFactory;
    use crate::faults::parse_specs;
    use crate::faults::FaultCounters;
    use crate::telemetry::Metrics;
    use crate::transport::MemoryTransport;
    use crate::ServiceState;

    fn factory(spec: &str, limit: usize) -> (FaultFactory<EchoFactory>, Arc<FaultCounters>) {
        let metrics = Metrics::register(&ServiceState::new(None)).unwrap().faults;
        let control = Arc::new(FaultControl::new(
            parse_specs(spec).unwrap(),
            1,
            metrics.clone(),
        ));
        (FaultFactory::new(EchoFactory, control, limit), metrics)
    }

    fn conn() -> ConnectionInfo {
        ConnectionInfo {
            id: 1,
            peer: "127.0.0.1:40000".parse().unwrap(),
            local: "127.0.0.1:8000".parse().unwrap(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_blackhole_stops_reading_for_good_where_an_accept_delay_only_pauses() {
        for (spec, stopped) in [("blackhole", true), ("accept-delay,delay=1s", false)] {
            let (faults, _) = factory(spec, 1000);
            let mut protocol = faults.build_protocol(&conn()).unwrap();
            let mut transport = MemoryTransport::new();
            protocol.connection_made(&mut transport);
            assert!(transport.is_read_paused(), "{spec}");
            // Stopped: the peer's close ends it. Only paused: a half-closed client still
            // waits for its echo.
            assert_eq!(transport.is_read_stopped(), stopped, "{spec}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_latency_queue_pauses_reading_at_the_write_buffer_limit() {
        let (factory, metrics) = factory("latency,delay=100ms", 1000);
        let mut protocol = factory.build_protocol(&conn()).unwrap();
        let mut transport = MemoryTransport::new();
        protocol.connection_made(&mut transport);
        assert_eq!(metrics.injected[FaultKind::Latency.index()].get(), 1);
        protocol.data_received(&[1; 600], &mut transport);
        assert!(!transport.is_read_paused());
        protocol.data_received(&[2; 600], &mut transport);
        assert!(
            transport.is_read_paused(),
            "1200 queued bytes > the 1000 limit"
        );
        assert!(transport.written().is_empty(), "echoed before the delay");
        assert!(protocol.write_pending());
        let due = protocol.timer().unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(Instant::now() >= due);
        protocol.timer_fired(&mut transport);
        assert_eq!(
            transport.written().len(),
            1200,
            "both chunks released, in order"
        );
        assert_eq!(transport.written()[0], 1);
        assert_eq!(transport.written()[1199], 2);
        assert!(
            !transport.is_read_paused(),
            "resumed once the queue drained"
        );
        assert!(!protocol.write_pending());
        assert_eq!(protocol.timer(), None);
    }

    /// Closes the connection after echoing its first read.
    struct EchoOnce;

    impl Protocol for EchoOnce {
        fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
            transport.write(data);
            transport.lose_connection();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_graceful_close_waits_for_the_latency_queue() {
        let metrics = Metrics::register(&ServiceState::new(None)).unwrap().faults;
        let control = Arc::new(FaultControl::new(
            parse_specs("latency,delay=100ms").unwrap(),
            1,
            metrics,
        ));
        struct Once;
        impl Factory for Once {
            type Protocol = EchoOnce;
            fn build_protocol(&self, _: &ConnectionInfo) -> Result<EchoOnce, Refusal> {
                Ok(EchoOnce)
            }
        }
        let mut protocol = FaultFactory::new(Once, control, 1 << 16)
            .build_protocol(&conn())
            .unwrap();
        let mut transport = MemoryTransport::new();
        protocol.connection_made(&mut transport);
        protocol.data_received(b"bye", &mut transport);
        assert!(
            !transport.is_disconnecting(),
            "closed before the delayed echo"
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        protocol.timer_fired(&mut transport);
        assert_eq!(transport.written(), b"bye");
        assert_eq!(transport.close_reason(), Some(LossReason::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn bandwidth_pauses_reading_in_debt_and_resumes_on_refill() {
        let (factory, _) = factory("bandwidth,bytes-per-second=1000", 1 << 16);
        let mut protocol = factory.build_protocol(&conn()).unwrap();
        let mut transport = MemoryTransport::new();
        protocol.connection_made(&mut transport);
        protocol.data_received(&[0; 1500], &mut transport);
        assert_eq!(transport.written().len(), 1500, "echoed at once");
        assert!(transport.is_read_paused(), "500 bytes in debt");
        let resume = protocol.timer().unwrap();
        assert_eq!(resume - Instant::now(), Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        protocol.timer_fired(&mut transport);
        assert!(!transport.is_read_paused());
    }

    #[test]
    fn close_after_bytes_writes_exactly_n_then_closes_with_fault_close() {
        let (factory, _) = factory("close,after-bytes=5", 1 << 16);
        let mut protocol = factory.build_protocol(&conn()).unwrap();
        let mut transport = MemoryTransport::new();
        protocol.connection_made(&mut transport);
        protocol.data_received(b"abc", &mut transport);
        assert_eq!(transport.close_reason(), None);
        protocol.data_received(b"defgh", &mut transport);
        assert_eq!(transport.written(), b"abcde");
        assert_eq!(transport.close_reason(), Some(LossReason::FaultClose));
    }

    #[test]
    fn a_connection_that_draws_no_fault_is_left_alone() {
        let (factory, metrics) = factory("reset,probability=0", 1 << 16);
        let mut protocol = factory.build_protocol(&conn()).unwrap();
        let mut transport = MemoryTransport::new();
        protocol.connection_made(&mut transport);
        protocol.data_received(b"hello", &mut transport);
        assert_eq!(transport.written(), b"hello");
        assert!(matches!(protocol.state, State::Clean));
        assert_eq!(protocol.timer(), None);
        assert!(metrics.injected.iter().all(|c| c.get() == 0));
    }
}
