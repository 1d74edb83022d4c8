//! Upstream IO: one NTP request per fresh UDP socket on a random ephemeral port (RFC 9109),
//! with the reply's kernel receive timestamp, and DNS resolution of configured hosts.
//!
//! Everything protocol-related (what to send, whether a reply is valid) is the core's; this
//! module only moves bytes and timestamps.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use stratum_ntp::time::ClockTime;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Largest reply we accept: a header plus generous extension fields (an NTS reply with eight
/// of the largest cookies a key exchange may hand out is about 2.2 KiB).
const MAX_REPLY: usize = 4096;

/// A reply and when the kernel received it (host realtime).
#[derive(Debug)]
pub struct Reply {
    /// The datagram.
    pub bytes: Vec<u8>,
    /// Kernel receive timestamp on the host's realtime clock; falls back to a user-space
    /// reading when the kernel gives none.
    pub host_rx: ClockTime,
    /// Whether `host_rx` came from the kernel.
    pub kernel_timestamp: bool,
}

/// Why an exchange produced no reply.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Socket setup or send failed.
    #[error("sending to {0} failed: {1}")]
    Send(SocketAddr, #[source] std::io::Error),
    /// Nothing arrived in time.
    #[error("no reply from {0} within {1:?}")]
    Timeout(SocketAddr, Duration),
    /// Receiving failed.
    #[error("receiving from {0} failed: {1}")]
    Receive(SocketAddr, #[source] std::io::Error),
}

/// A request on the wire, waiting for its reply.
pub struct InFlight {
    server: SocketAddr,
    socket: UdpSocket,
    /// Host realtime just before the datagram was handed to the kernel.
    pub host_tx: ClockTime,
}

/// Sends `request` to `server` from a new socket on a random ephemeral port. Synchronous on
/// purpose: the caller stamped the request just before, and every microsecond between that
/// stamp and the send is error in the measured offset.
pub fn send(server: SocketAddr, request: &[u8]) -> Result<InFlight, ExchangeError> {
    let bind: SocketAddr = match server.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let err = |e| ExchangeError::Send(server, e);
    let socket = std::net::UdpSocket::bind(bind).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    // Best effort: without kernel timestamps we fall back to reading the clock on wake-up.
    let _ = setsockopt(&socket, sockopt::ReceiveTimestampns, &true);
    socket.connect(server).map_err(err)?;
    let host_tx = crate::clock::host_realtime();
    socket.send(request).map_err(err)?;
    let socket = UdpSocket::from_std(socket).map_err(err)?;
    Ok(InFlight {
        server,
        socket,
        host_tx,
    })
}

impl InFlight {
    /// Waits up to `timeout` for the reply; datagrams from any other address never arrive on
    /// a connected socket.
    pub async fn reply(self, timeout: Duration) -> Result<Reply, ExchangeError> {
        let server = self.server;
        let received = tokio::time::timeout(
            timeout,
            self.socket
                .async_io(Interest::READABLE, || receive(&self.socket)),
        )
        .await;
        match received {
            Err(_) => Err(ExchangeError::Timeout(server, timeout)),
            // ICMP port unreachable shows up as ConnectionRefused: same as no reply.
            Ok(Err(e)) => Err(ExchangeError::Receive(server, e)),
            Ok(Ok(reply)) => Ok(reply),
        }
    }
}

/// Sends `request` and waits for the reply: [`send`] then [`InFlight::reply`].
pub async fn exchange(
    server: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<Reply, ExchangeError> {
    send(server, request)?.reply(timeout).await
}

fn receive(socket: &UdpSocket) -> std::io::Result<Reply> {
    let mut buf = vec![0u8; MAX_REPLY];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)?;
    let len = msg.bytes;
    let mut kernel_rx = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmTimestampns(ts) = c {
                kernel_rx = Some(ClockTime::from_unix_nanos(
                    ts.tv_sec() * 1_000_000_000 + ts.tv_nsec(),
                ));
            }
        }
    }
    buf.truncate(len);
    let (host_rx, kernel_timestamp) = match kernel_rx {
        Some(t) => (t, true),
        None => (crate::clock::host_realtime(), false),
    };
    Ok(Reply {
        bytes: buf,
        host_rx,
        kernel_timestamp,
    })
}

/// Resolves a configured host to addresses: an IP literal as itself, a name through the
/// system resolver, at most `limit` addresses, IPv4 and IPv6 interleaved in resolver order.
pub async fn resolve(host: &str, port: u16, limit: usize) -> std::io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let mut seen = Vec::new();
    for addr in tokio::net::lookup_host((host, port)).await? {
        if !seen.contains(&addr) {
            seen.push(addr);
        }
        if seen.len() >= limit {
            break;
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn exchange_returns_the_reply_with_a_kernel_receive_timestamp() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let echo = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            server.send_to(&buf[..n], from).unwrap();
            from
        });
        let before = crate::clock::host_realtime();
        let reply = exchange(addr, b"hello", Duration::from_secs(5))
            .await
            .unwrap();
        let client = echo.join().unwrap();
        assert_eq!(reply.bytes, b"hello");
        assert!(reply.kernel_timestamp);
        assert!(reply.host_rx >= before);
        assert_ne!(client.port(), 123, "client source port must be ephemeral");
    }

    #[tokio::test]
    async fn every_exchange_uses_a_fresh_source_port() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let echo = std::thread::spawn(move || {
            let mut ports = Vec::new();
            for _ in 0..2 {
                let mut buf = [0u8; 8];
                let (n, from) = server.recv_from(&mut buf).unwrap();
                server.send_to(&buf[..n], from).unwrap();
                ports.push(from.port());
            }
            ports
        });
        exchange(addr, b"a", Duration::from_secs(5)).await.unwrap();
        exchange(addr, b"b", Duration::from_secs(5)).await.unwrap();
        let ports = echo.join().unwrap();
        assert_ne!(ports[0], ports[1]);
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = exchange(
            silent.local_addr().unwrap(),
            b"x",
            Duration::from_millis(50),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ExchangeError::Timeout(..)));
    }

    #[tokio::test]
    async fn ip_literals_resolve_to_themselves() {
        assert_eq!(
            resolve("127.0.0.1", 123, 4).await.unwrap(),
            vec!["127.0.0.1:123".parse().unwrap()]
        );
        assert_eq!(
            resolve("::1", 4123, 4).await.unwrap(),
            vec!["[::1]:4123".parse().unwrap()]
        );
    }
}
