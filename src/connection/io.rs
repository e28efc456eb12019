//! What the connection driver needs from a byte stream: [`ConnectionIo`].
//!
//! The driver reads and waits through `AsyncRead` / `AsyncWrite`, and needs six things more:
//! a write that never waits (so a ping-pong reply goes out during `data_received` without a
//! copy; plain and vectored, for the TLS layer's records), the two addresses, a half-close
//! (FIN), a reset on close, and a way to notice the peer leaving while the protocol does not
//! read (a blackhole). TCP implements them with
//! socket calls; a TLS stream will with its record layer; [`DuplexIo`] implements them over
//! `tokio::io::duplex` so the driver is unit-tested without sockets, with paused time.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A byte stream the connection driver can run a protocol over.
pub trait ConnectionIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// Write as much of `data` as the stream takes right now, or fail with `WouldBlock`; never
    /// waits and registers no waker (the driver waits with `poll_write` for what is left).
    fn try_write(&mut self, data: &[u8]) -> io::Result<usize>;

    /// [`ConnectionIo::try_write`] of several buffers in order, in one go (`writev`): returns
    /// how many bytes of their concatenation the stream took.
    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// The remote end.
    fn peer_addr(&self) -> io::Result<SocketAddr>;

    /// Our end.
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Shut our write side down now (FIN), after what was written so far. Best effort: a peer
    /// that already went away makes this fail, which changes nothing for the driver.
    fn shutdown_write(&mut self);

    /// Make the coming close a reset (RST) that discards whatever is still queued.
    fn reset_on_close(&mut self);

    /// Ready once the peer has closed its side (`Ok`) or reset the connection (`Err`), found
    /// without reading: how a connection whose protocol paused reading still ends when its
    /// peer goes. Pending otherwise, with a waker registered for the next change.
    fn poll_peer_gone(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ConnectionIo for TcpStream {
    fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, data)
    }

    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::peer_addr(self)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::local_addr(self)
    }

    fn shutdown_write(&mut self) {
        let _ = socket2::SockRef::from(&*self).shutdown(std::net::Shutdown::Write);
    }

    fn reset_on_close(&mut self) {
        let _ = socket2::SockRef::from(&*self).set_linger(Some(Duration::ZERO));
    }

    /// The socket turns read-ready for data and for the peer's FIN or RST alike; a `poll(2)`
    /// of the socket for `POLLRDHUP` (which reads nothing) tells them apart. Readiness for
    /// mere data is then cleared, so the next wake-up is the next arrival or the hang-up (the
    /// closed state, once tokio has seen it, is never cleared).
    fn poll_peer_gone(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Err(e) = std::task::ready!(self.poll_read_ready(cx)) {
                return Poll::Ready(Err(e));
            }
            let mut fds = [PollFd::new(&*self, PollFlags::RDHUP)];
            if rustix::event::poll(&mut fds, 0).is_ok() {
                let events = fds[0].revents();
                if events.intersects(PollFlags::ERR | PollFlags::HUP) {
                    let error = self.take_error().ok().flatten();
                    return Poll::Ready(Err(
                        error.unwrap_or_else(|| io::ErrorKind::ConnectionReset.into())
                    ));
                }
                if events.contains(PollFlags::RDHUP) {
                    return Poll::Ready(Ok(()));
                }
            }
            let _ = self.try_io(Interest::READABLE, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
        }
    }
}

/// One end of an in-memory pipe (`tokio::io::duplex`) posing as a connection, for tests of the
/// driver: its buffer size plays the kernel's socket buffers (so backpressure and stalls are
/// real), shutting down its write side is the FIN, and dropping it closes the connection (a
/// pipe has no reset: an abort looks like EOF to the client).
#[derive(Debug)]
pub struct DuplexIo {
    stream: DuplexStream,
    peer: SocketAddr,
    local: SocketAddr,
}

impl DuplexIo {
    /// A connected pair: the server's end (this type) and the client's end. Each direction
    /// buffers at most `buffer` bytes.
    pub fn pair(buffer: usize) -> (DuplexIo, DuplexStream) {
        let (server, client) = tokio::io::duplex(buffer);
        let io = DuplexIo {
            stream: server,
            peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
            local: SocketAddr::from(([127, 0, 0, 1], 8000)),
        };
        (io, client)
    }
}

impl AsyncRead for DuplexIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for DuplexIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl ConnectionIo for DuplexIo {
    fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut self.stream).poll_write(&mut cx, data) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut self.stream).poll_write_vectored(&mut cx, bufs) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn shutdown_write(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        let _ = Pin::new(&mut self.stream).poll_shutdown(&mut cx);
    }

    /// A pipe has no reset: its peer sees the close as EOF.
    fn reset_on_close(&mut self) {}

    /// A pipe cannot tell its peer's close without reading: never (the black-box tests cover
    /// TCP's).
    fn poll_peer_gone(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}
