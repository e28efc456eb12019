//! Opening client connections, spread over several source addresses when one is not enough.
//!
//! Towards one server address, each source IP has one ephemeral port range (~28k ports here).
//! Holding 50k connections, or churning faster than TIME_WAIT frees ports, needs more: we bind
//! each socket to 127.0.0.x in turn with `IP_BIND_ADDRESS_NO_PORT`, so the kernel still picks
//! the port at `connect` time from the full 4-tuple space.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

pub struct Connector {
    target: SocketAddr,
    sources: Vec<IpAddr>,
    next: AtomicUsize,
    timeout: Duration,
}

impl Connector {
    pub fn new(target: SocketAddr, sources: Vec<IpAddr>, timeout: Duration) -> Self {
        Connector {
            target,
            sources,
            next: AtomicUsize::new(0),
            timeout,
        }
    }

    /// The bound on one connect; modes use it for one echo too.
    pub fn io_timeout(&self) -> Duration {
        self.timeout
    }

    pub fn source_count(&self) -> usize {
        self.sources.len()
    }

    /// Connects (bounded by the I/O timeout) with `TCP_NODELAY` set, so the client itself never
    /// adds Nagle delays to what we measure.
    pub async fn connect(&self) -> io::Result<TcpStream> {
        let fut = async {
            let stream = if self.sources.is_empty() {
                TcpStream::connect(self.target).await?
            } else {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.sources.len();
                let socket = match self.target {
                    SocketAddr::V4(_) => TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => TcpSocket::new_v6()?,
                };
                bind_address_no_port(&socket)?;
                socket.bind(SocketAddr::new(self.sources[i], 0))?;
                socket.connect(self.target).await?
            };
            stream.set_nodelay(true)?;
            Ok(stream)
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(|e: io::Error| {
                io::Error::new(e.kind(), format!("connect to {}: {e}", self.target))
            }),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {} timed out", self.target),
            )),
        }
    }
}

/// Defers the choice of local port from `bind` to `connect`, so ports are shared between
/// connections to different servers and the whole 4-tuple space is usable.
fn bind_address_no_port(socket: &TcpSocket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: valid fd, valid pointer and length for an int option.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
