//! Which replica answered: the identity protocol (`--identity-listen`) and the echo greeting
//! (`--greeting`).
//!
//! Behind a load balancer a client cannot tell which replica served it. The identity port
//! answers every connection (after any PROXY header) with one JSON line and closes; with
//! `--greeting` the echo port sends the same line first, then echoes. Both are a factory and a
//! few lines of protocol on the same framework, so they get the same metrics, spans, policies
//! and PROXY layer as echo. The line's fields:
//!
//! | field | value |
//! |---|---|
//! | `service`, `version` | `echo-service` and its version |
//! | `hostname` | the kernel's host name (the pod name in Kubernetes) |
//! | `pod_name`, `pod_namespace`, `node_name`, `pod_ip` | `POD_NAME`, `POD_NAMESPACE`, `NODE_NAME`, `POD_IP` (the chart sets them from the downward API); `null` when unset |
//! | `listener` | `identity` or `tcp` (the echo port's greeting) |
//! | `listener_address` | the local address the client reached |
//! | `connection_id` | the connection's id (also on its span and log lines) |
//! | `peer` | the peer as seen on the socket (`address`, `port`): the proxy, behind one |
//! | `client` | the original client (from the PROXY header), else the peer |
//! | `proxy` | `null`, or the PROXY header: `version` and the TLVs kept (`alpn`, `authority`, `unique_id`, `netns`, `aws_vpce_id`, `ssl`, `crc32c_checked`) |

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::factory::{ConnectionInfo, Factory, Refusal};
use crate::protocol::{LossReason, Protocol};
use crate::proxy_protocol::Header;
use crate::transport::Transport;

/// What does not change per connection: who this replica is, read once at startup.
#[derive(Debug, Clone)]
pub struct Identity {
    hostname: Option<String>,
    pod_name: Option<String>,
    pod_namespace: Option<String>,
    node_name: Option<String>,
    pod_ip: Option<String>,
}

impl Identity {
    /// Read the host name and the downward-API variables.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| var("HOSTNAME"));
        Identity {
            hostname,
            pod_name: var("POD_NAME"),
            pod_namespace: var("POD_NAMESPACE"),
            node_name: var("NODE_NAME"),
            pod_ip: var("POD_IP"),
        }
    }

    /// The JSON line for one connection, newline included.
    pub fn line(
        &self,
        listener: &str,
        id: u64,
        peer: SocketAddr,
        transport: &dyn Transport,
    ) -> Vec<u8> {
        let client = transport.peer_addr();
        let value = json!({
            "service": "echo-service",
            "version": env!("CARGO_PKG_VERSION"),
            "hostname": self.hostname,
            "pod_name": self.pod_name,
            "pod_namespace": self.pod_namespace,
            "node_name": self.node_name,
            "pod_ip": self.pod_ip,
            "listener": listener,
            "listener_address": transport.local_addr().to_string(),
            "connection_id": id,
            "peer": address(peer),
            "client": address(client),
            "proxy": transport.proxy_header().map(proxy_json),
        });
        let mut line = value.to_string().into_bytes();
        line.push(b'\n');
        line
    }
}

fn address(addr: SocketAddr) -> Value {
    json!({ "address": addr.ip().to_string(), "port": addr.port() })
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn proxy_json(header: &Header) -> Value {
    let mut value = json!({ "version": header.version.label() });
    if let Some(tlvs) = header.tlvs.as_deref() {
        value["tlvs"] = json!({
            "alpn": tlvs.alpn.as_deref().map(lossy),
            "authority": tlvs.authority,
            "unique_id": tlvs.unique_id.as_deref().map(lossy),
            "netns": tlvs.netns,
            "aws_vpce_id": tlvs.aws_vpce_id,
            "crc32c_checked": tlvs.crc32c_checked,
            "ssl": tlvs.ssl.as_ref().map(|ssl| json!({
                "client": ssl.client,
                "verify": ssl.verify,
                "version": ssl.version,
                "cn": ssl.cn,
                "cipher": ssl.cipher,
                "sig_alg": ssl.sig_alg,
                "key_alg": ssl.key_alg,
                "group": ssl.group,
                "sig_scheme": ssl.sig_scheme,
            })),
        });
    }
    value
}

/// The `listener` label and JSON value of the identity port.
pub const IDENTITY_LISTENER: &str = "identity";

/// Builds an [`IdentityProtocol`] per connection.
pub struct IdentityFactory {
    identity: Arc<Identity>,
}

impl IdentityFactory {
    /// Answer with `identity`.
    pub fn new(identity: Arc<Identity>) -> Self {
        IdentityFactory { identity }
    }
}

impl Factory for IdentityFactory {
    type Protocol = IdentityProtocol;

    fn build_protocol(&self, conn: &ConnectionInfo) -> Result<IdentityProtocol, Refusal> {
        Ok(IdentityProtocol {
            identity: self.identity.clone(),
            id: conn.id,
            peer: conn.peer,
        })
    }
}

/// Writes the identity line, then closes; anything the client sends is ignored.
pub struct IdentityProtocol {
    identity: Arc<Identity>,
    id: u64,
    peer: SocketAddr,
}

impl Protocol for IdentityProtocol {
    fn connection_made(&mut self, transport: &mut dyn Transport) {
        let line = self
            .identity
            .line(IDENTITY_LISTENER, self.id, self.peer, transport);
        transport.write(&line);
        transport.lose_connection();
    }

    fn data_received(&mut self, _data: &[u8], _transport: &mut dyn Transport) {}
}

/// Wraps a factory: its protocols send the identity line first (`--greeting`).
pub struct GreetingFactory<F> {
    inner: F,
    identity: Arc<Identity>,
    listener: &'static str,
}

impl<F> GreetingFactory<F> {
    /// Greet with `identity` (listener label `listener`) before `inner`'s protocol starts.
    pub fn new(inner: F, identity: Arc<Identity>, listener: &'static str) -> Self {
        GreetingFactory {
            inner,
            identity,
            listener,
        }
    }
}

impl<F: Factory> Factory for GreetingFactory<F> {
    type Protocol = Greeting<F::Protocol>;

    fn build_protocol(&self, conn: &ConnectionInfo) -> Result<Self::Protocol, Refusal> {
        Ok(Greeting {
            inner: self.inner.build_protocol(conn)?,
            pending: Some(Box::new(PendingGreeting {
                identity: self.identity.clone(),
                listener: self.listener,
                id: conn.id,
                peer: conn.peer,
            })),
        })
    }

    fn start_factory(&self) {
        self.inner.start_factory();
    }

    fn stop_factory(&self) {
        self.inner.stop_factory();
    }
}

struct PendingGreeting {
    identity: Arc<Identity>,
    listener: &'static str,
    id: u64,
    peer: SocketAddr,
}

/// Sends the identity line at `connection_made`, then is the wrapped protocol.
pub struct Greeting<P> {
    inner: P,
    /// Until the greeting is sent (boxed: one pointer afterwards).
    pending: Option<Box<PendingGreeting>>,
}

impl<P: Protocol> Protocol for Greeting<P> {
    fn connection_made(&mut self, transport: &mut dyn Transport) {
        if let Some(g) = self.pending.take() {
            let line = g.identity.line(g.listener, g.id, g.peer, transport);
            transport.write(&line);
        }
        self.inner.connection_made(transport);
    }

    fn data_received(&mut self, data: &[u8], transport: &mut dyn Transport) {
        self.inner.data_received(data, transport);
    }

    fn bytes_sent(&mut self, n: usize) {
        self.inner.bytes_sent(n);
    }

    fn connection_lost(&mut self, reason: LossReason) {
        self.inner.connection_lost(reason);
    }

    fn deadline(&self) -> Option<(tokio::time::Instant, LossReason)> {
        self.inner.deadline()
    }

    fn timer(&self) -> Option<tokio::time::Instant> {
        self.inner.timer()
    }

    fn timer_fired(&mut self, transport: &mut dyn Transport) {
        self.inner.timer_fired(transport);
    }

    fn write_pending(&self) -> bool {
        self.inner.write_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo::EchoFactory;
    use crate::transport::MemoryTransport;

    fn info() -> ConnectionInfo {
        ConnectionInfo {
            id: 42,
            peer: "10.0.0.1:5000".parse().unwrap(),
            local: "10.0.0.2:8001".parse().unwrap(),
        }
    }

    /// A protocol with a timer and a delay queue, to see that the greeting forwards them.
    struct Delayed {
        at: tokio::time::Instant,
    }

    impl Protocol for Delayed {
        fn data_received(&mut self, _data: &[u8], _transport: &mut dyn Transport) {}

        fn timer(&self) -> Option<tokio::time::Instant> {
            Some(self.at)
        }

        fn timer_fired(&mut self, transport: &mut dyn Transport) {
            transport.write(b"later");
        }

        fn write_pending(&self) -> bool {
            true
        }
    }

    /// Like every wrapping protocol, the greeting forwards the wrapped one's timer and delay
    /// queue (the driver asks the outermost protocol only).
    #[tokio::test]
    async fn the_greeting_forwards_the_wrapped_protocols_timer_and_pending_writes() {
        let at = tokio::time::Instant::now();
        let mut greeting = Greeting {
            inner: Delayed { at },
            pending: None,
        };
        assert_eq!(greeting.timer(), Some(at));
        assert!(greeting.write_pending());
        let mut t = MemoryTransport::new();
        greeting.timer_fired(&mut t);
        assert_eq!(t.written(), b"later");
    }

    #[test]
    fn identity_writes_one_json_line_and_closes() {
        let factory = IdentityFactory::new(Arc::new(Identity::from_env()));
        let mut p = factory.build_protocol(&info()).unwrap();
        let mut t = MemoryTransport::with_addrs(info().peer, info().local);
        p.connection_made(&mut t);
        p.data_received(b"ignored", &mut t);
        assert!(t.is_disconnecting());
        let written = t.written();
        assert_eq!(written.iter().filter(|b| **b == b'\n').count(), 1);
        let v: Value = serde_json::from_slice(written).unwrap();
        assert_eq!(v["listener"], "identity");
        assert_eq!(v["connection_id"], 42);
        assert_eq!(v["peer"]["address"], "10.0.0.1");
        assert_eq!(v["client"]["port"], 5000);
        assert_eq!(v["listener_address"], "10.0.0.2:8001");
        assert_eq!(v["proxy"], Value::Null);
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn greeting_comes_before_the_echo() {
        let factory = GreetingFactory::new(EchoFactory, Arc::new(Identity::from_env()), "tcp");
        let mut p = factory.build_protocol(&info()).unwrap();
        let mut t = MemoryTransport::with_addrs(info().peer, info().local);
        p.connection_made(&mut t);
        p.data_received(b"ping", &mut t);
        let written = t.take_written();
        let newline = written.iter().position(|b| *b == b'\n').unwrap();
        let v: Value = serde_json::from_slice(&written[..newline]).unwrap();
        assert_eq!(v["listener"], "tcp");
        assert_eq!(&written[newline + 1..], b"ping");
        assert!(!t.is_disconnecting());
    }
}
