//! Batched UDP IO for the server workers, the raw echo baseline and the load generator:
//! `recvmmsg(2)` with kernel receive timestamps (SO_TIMESTAMPNS) and each datagram's
//! destination address (IP_PKTINFO / IPV6_RECVPKTINFO), and `sendmmsg(2)`, over buffers
//! allocated once per thread. A reply leaves from the address its request was sent to: on a
//! wildcard-bound socket the kernel would otherwise pick the source by route, so a client that
//! asked a node's second address would get its answer from the first (and drop it).
//!
//! The only module of the server with `unsafe`: the two syscalls, which take arrays of
//! `mmsghdr` pointing into this module's own boxed buffers, and the reading of the addresses
//! and control messages the kernel wrote there. Every pointer handed to the kernel is derived
//! from a `&mut` borrow of a buffer owned by the batch, re-derived right before each call, and
//! not used after the call returns; so the kernel never writes through a stale pointer and no
//! other reference aliases the buffers while it writes.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use stratum_ntp::time::ClockTime;

/// Datagrams per syscall. 32 amortises the syscall well; more only adds latency under load.
pub const BATCH: usize = 32;
/// Largest datagram read whole. NTP requests with extension fields (NTS) stay well below;
/// longer ones arrive truncated and are counted malformed.
pub const MAX_DATAGRAM: usize = 1024;
/// Largest datagram sent: a plain reply is one 48-byte header, an NTS reply (never longer
/// than its request, so no amplification) up to the longest request read.
pub const MAX_SEND: usize = MAX_DATAGRAM;
/// Control-message space per datagram, in 8-byte words (one SCM_TIMESTAMPNS needs 32 bytes,
/// one IP_PKTINFO 28; keep room for both).
const CONTROL_WORDS: usize = 12;

/// Options of the UDP sockets this module opens.
#[derive(Clone, Copy, Debug)]
pub struct SocketOptions {
    /// Share the port with the other workers (SO_REUSEPORT).
    pub reuse_port: bool,
    /// For `[::]`, accept IPv4 too (IPV6_V6ONLY off).
    pub dual_stack: bool,
    /// Requested SO_RCVBUF (the kernel caps it at net.core.rmem_max unless forced).
    pub receive_buffer: usize,
    /// SO_RCVTIMEO: how long a blocking receive waits before the thread looks at its stop
    /// flag; `None` opens the socket non-blocking, for a caller that waits in epoll.
    pub receive_timeout: Option<Duration>,
}

/// Opens a UDP socket bound to `addr` with kernel receive timestamps and destination
/// addresses on.
pub fn bind_udp(addr: SocketAddr, options: SocketOptions) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(!options.dual_stack)?;
    }
    if options.reuse_port {
        socket.set_reuse_port(true)?;
    }
    if options.receive_buffer > 0 {
        // Forcing past rmem_max needs CAP_NET_ADMIN; without it take what the kernel allows.
        if socket.set_recv_buffer_size(options.receive_buffer).is_err() {
            tracing::debug!("SO_RCVBUF refused; keeping the kernel default");
        }
        force_receive_buffer(&socket, options.receive_buffer);
    }
    match options.receive_timeout {
        Some(timeout) => socket.set_read_timeout(Some(timeout))?,
        None => socket.set_nonblocking(true)?,
    }
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::ReceiveTimestampns,
        &true,
    )
    .map_err(io::Error::from)?;
    // Each datagram's destination address, to answer from it. On an IPv6 socket this covers
    // the IPv4 clients of a dual-stack one too (as IPv4-mapped addresses).
    if addr.is_ipv6() {
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::Ipv6RecvPacketInfo,
            &true,
        )
    } else {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv4PacketInfo, &true)
    }
    .map_err(io::Error::from)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// SO_RCVBUFFORCE (best effort: only with CAP_NET_ADMIN).
fn force_receive_buffer(socket: &Socket, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` is a live c_int and the length passed is its size; the kernel only reads.
    let _ = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Wakes every thread blocked receiving on `socket` (and makes later receives return at
/// once, with one zero-length datagram): `shutdown(SHUT_RD)` on a UDP socket reports
/// ENOTCONN but still marks the socket shut down and wakes its waiters, which is all a
/// stopping worker needs. Callers set their stop flag first and check it after each receive.
pub fn wake_receivers(socket: BorrowedFd<'_>) {
    // SAFETY: a plain syscall on a file descriptor we borrow for its duration.
    let _ = unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RD) };
}

/// One received datagram.
#[derive(Clone, Copy, Debug)]
pub struct Datagram<'a> {
    /// The bytes (a prefix when `truncated`).
    pub bytes: &'a [u8],
    /// Who sent it (IPv4 clients of a dual-stack socket appear IPv4-mapped).
    pub source: Option<SocketAddr>,
    /// The local address it was sent to (IPv4-mapped likewise), which its reply leaves from.
    pub destination: Option<IpAddr>,
    /// The interface it arrived on (0 when unknown).
    pub interface: u32,
    /// Kernel receive timestamp on the host's realtime clock.
    pub host_rx: Option<ClockTime>,
    /// The datagram was longer than [`MAX_DATAGRAM`].
    pub truncated: bool,
}

/// Buffers for one `recvmmsg` call, reused for every call.
pub struct RecvBatch {
    buffers: Box<[[u8; MAX_DATAGRAM]]>,
    names: Box<[libc::sockaddr_storage]>,
    controls: Box<[[u64; CONTROL_WORDS]]>,
    iovecs: Box<[libc::iovec]>,
    headers: Box<[libc::mmsghdr]>,
    received: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    /// Allocates the buffers (the only allocation; receiving reuses them).
    pub fn new() -> Self {
        Self {
            buffers: vec![[0u8; MAX_DATAGRAM]; BATCH].into_boxed_slice(),
            // SAFETY: all-zero is a valid sockaddr_storage, iovec and mmsghdr (null pointers
            // and zero lengths); they are re-pointed before every call.
            names: vec![unsafe { zeroed::<libc::sockaddr_storage>() }; BATCH].into_boxed_slice(),
            controls: vec![[0u64; CONTROL_WORDS]; BATCH].into_boxed_slice(),
            iovecs: vec![unsafe { zeroed::<libc::iovec>() }; BATCH].into_boxed_slice(),
            headers: vec![unsafe { zeroed::<libc::mmsghdr>() }; BATCH].into_boxed_slice(),
            received: 0,
        }
    }

    /// Blocks until at least one datagram arrives (or SO_RCVTIMEO passes, or at once on a
    /// non-blocking socket: `WouldBlock`), then takes up to [`BATCH`] without waiting for
    /// more. Returns how many arrived.
    pub fn receive(&mut self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        self.received = 0;
        for i in 0..BATCH {
            self.iovecs[i] = libc::iovec {
                iov_base: self.buffers[i].as_mut_ptr().cast(),
                iov_len: MAX_DATAGRAM,
            };
            let header = &mut self.headers[i];
            header.msg_len = 0;
            header.msg_hdr.msg_name = (&raw mut self.names[i]).cast();
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_iov = &raw mut self.iovecs[i];
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_control = self.controls[i].as_mut_ptr().cast();
            // `as _`: msg_controllen is size_t in glibc and socklen_t in musl (static images).
            header.msg_hdr.msg_controllen = (CONTROL_WORDS * 8) as _;
            header.msg_hdr.msg_flags = 0;
        }
        // SAFETY: `headers` holds BATCH entries whose pointers were just derived from buffers
        // this batch owns (sizes as declared above); `&mut self` excludes any other access
        // while the kernel writes; a null timeout means none (SO_RCVTIMEO applies).
        let count = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                // c_int in glibc, c_uint in musl.
                libc::MSG_WAITFORONE as _,
                std::ptr::null_mut(),
            )
        };
        if count < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received = count as usize;
        Ok(self.received)
    }

    /// Datagrams of the last call.
    pub fn len(&self) -> usize {
        self.received
    }

    /// Whether the last call returned nothing.
    pub fn is_empty(&self) -> bool {
        self.received == 0
    }

    /// The `index`th datagram of the last call.
    pub fn get(&self, index: usize) -> Option<Datagram<'_>> {
        if index >= self.received {
            return None;
        }
        let header = &self.headers[index].msg_hdr;
        let len = (self.headers[index].msg_len as usize).min(MAX_DATAGRAM);
        Some(Datagram {
            bytes: &self.buffers[index][..len],
            source: socket_addr(&self.names[index], header.msg_namelen),
            destination: self.destination(index).map(|(ip, _)| ip),
            interface: self
                .destination(index)
                .map_or(0, |(_, interface)| interface),
            host_rx: receive_timestamp(&self.controls[index], header.msg_controllen as _),
            truncated: header.msg_flags & libc::MSG_TRUNC != 0,
        })
    }

    /// The local address the `index`th datagram was sent to and the interface it came in on
    /// (its IP_PKTINFO or IPV6_PKTINFO).
    fn destination(&self, index: usize) -> Option<(IpAddr, u32)> {
        // `as _`: size_t in glibc, socklen_t in musl (static images).
        let len = self.headers[index].msg_hdr.msg_controllen as _;
        packet_destination(&self.controls[index], len)
    }

    /// The raw source address of the `index`th datagram, to answer it without conversion.
    fn raw_source(&self, index: usize) -> (libc::sockaddr_storage, libc::socklen_t) {
        (self.names[index], self.headers[index].msg_hdr.msg_namelen)
    }
}

/// Reads a socket address the kernel wrote (`len` bytes of `storage`).
fn socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, which is smaller than
            // and no more aligned than sockaddr_storage.
            let sin = unsafe { &*(&raw const *storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*(&raw const *storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The data of the first control message of `level` and `kind` among those the kernel wrote
/// (`len` bytes of `control`).
fn control_message(
    control: &[u64; CONTROL_WORDS],
    len: usize,
    level: libc::c_int,
    kind: libc::c_int,
) -> Option<&[u8]> {
    let bytes: &[u8] = bytemuck_words(control);
    let bytes = bytes.get(..len)?;
    let header_len = size_of::<libc::cmsghdr>();
    let align = size_of::<usize>();
    let mut at = 0usize;
    while at + header_len <= bytes.len() {
        // SAFETY: reading a cmsghdr by value (read_unaligned) from within the buffer bounds
        // just checked; any bit pattern is a valid cmsghdr.
        let cmsg: libc::cmsghdr =
            unsafe { std::ptr::read_unaligned(bytes[at..].as_ptr().cast::<libc::cmsghdr>()) };
        let cmsg_len = cmsg.cmsg_len as usize;
        if cmsg_len < header_len || at + cmsg_len > bytes.len() {
            return None;
        }
        if cmsg.cmsg_level == level && cmsg.cmsg_type == kind {
            return Some(&bytes[at + header_len..at + cmsg_len]);
        }
        at += cmsg_len.div_ceil(align) * align;
    }
    None
}

/// SCM_TIMESTAMPNS among the control messages the kernel wrote (`len` bytes).
fn receive_timestamp(control: &[u64; CONTROL_WORDS], len: usize) -> Option<ClockTime> {
    let data = control_message(control, len, libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS)?;
    if data.len() < size_of::<libc::timespec>() {
        return None;
    }
    // SAFETY: reading a timespec by value from a slice at least that long; any bit pattern
    // is a valid timespec.
    let ts: libc::timespec = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
    Some(ClockTime::from_unix_nanos(
        ts.tv_sec.saturating_mul(1_000_000_000) + ts.tv_nsec,
    ))
}

/// The destination address and arrival interface in an IP_PKTINFO or IPV6_PKTINFO control
/// message. An IPv4 datagram on a dual-stack IPv6 socket comes with IPV6_PKTINFO holding the
/// IPv4-mapped address (IP_PKTINFO is only delivered where IP_PKTINFO was enabled, i.e. on
/// IPv4 sockets); the reply's IPV6_PKTINFO with that mapped address is accepted by the IPv4
/// send path, so both cases need nothing more.
fn packet_destination(control: &[u64; CONTROL_WORDS], len: usize) -> Option<(IpAddr, u32)> {
    if let Some(data) = control_message(control, len, libc::IPPROTO_IP, libc::IP_PKTINFO)
        && data.len() >= size_of::<libc::in_pktinfo>()
    {
        // SAFETY: as above, for an in_pktinfo.
        let info: libc::in_pktinfo = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
        let interface = u32::try_from(info.ipi_ifindex).unwrap_or(0);
        return Some((
            IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))),
            interface,
        ));
    }
    let data = control_message(control, len, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)?;
    if data.len() < size_of::<libc::in6_pktinfo>() {
        return None;
    }
    // SAFETY: as above, for an in6_pktinfo.
    let info: libc::in6_pktinfo = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
    Some((
        IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)),
        info.ipi6_ifindex,
    ))
}

fn bytemuck_words(words: &[u64; CONTROL_WORDS]) -> &[u8] {
    // SAFETY: u64 has no padding and every byte of it is initialised; u8 needs no alignment;
    // the length is the array's size in bytes.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), CONTROL_WORDS * 8) }
}

/// Buffers for one `sendmmsg` call: fill with [`SendBatch::push_reply`] or
/// [`SendBatch::push_to`], then [`SendBatch::send`].
pub struct SendBatch {
    payloads: Box<[[u8; MAX_SEND]]>,
    lens: [usize; BATCH],
    names: Box<[libc::sockaddr_storage]>,
    name_lens: [libc::socklen_t; BATCH],
    controls: Box<[[u64; CONTROL_WORDS]]>,
    control_lens: [usize; BATCH],
    iovecs: Box<[libc::iovec]>,
    headers: Box<[libc::mmsghdr]>,
    queued: usize,
}

/// What one [`SendBatch::send`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendOutcome {
    /// Datagrams the kernel accepted.
    pub sent: usize,
    /// Datagrams refused (e.g. no route, buffer full); skipped, never retried.
    pub failed: usize,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl SendBatch {
    /// Allocates the buffers.
    pub fn new() -> Self {
        Self {
            payloads: vec![[0u8; MAX_SEND]; BATCH].into_boxed_slice(),
            lens: [0; BATCH],
            // SAFETY: all-zero is valid for these C structs (see RecvBatch::new).
            names: vec![unsafe { zeroed::<libc::sockaddr_storage>() }; BATCH].into_boxed_slice(),
            name_lens: [0; BATCH],
            controls: vec![[0u64; CONTROL_WORDS]; BATCH].into_boxed_slice(),
            control_lens: [0; BATCH],
            iovecs: vec![unsafe { zeroed::<libc::iovec>() }; BATCH].into_boxed_slice(),
            headers: vec![unsafe { zeroed::<libc::mmsghdr>() }; BATCH].into_boxed_slice(),
            queued: 0,
        }
    }

    /// Queued datagrams.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Whether another datagram fits.
    pub fn is_full(&self) -> bool {
        self.queued == BATCH
    }

    /// The buffer the next pushed datagram will use, to build a reply in place before
    /// deciding whether to send it.
    pub fn next_buffer(&mut self) -> Option<&mut [u8; MAX_SEND]> {
        self.payloads.get_mut(self.queued)
    }

    /// Queues the first `len` bytes of [`Self::next_buffer`] as the answer to datagram
    /// `index` of `received`, addressed exactly as it came (no address conversion), from the
    /// address it was sent to.
    pub fn push_reply(&mut self, received: &RecvBatch, index: usize, len: usize) -> bool {
        if self.queued == BATCH || index >= received.len() {
            return false;
        }
        let (name, name_len) = received.raw_source(index);
        let slot = self.queued;
        self.names[slot] = name;
        self.name_lens[slot] = name_len;
        self.lens[slot] = len.min(MAX_SEND);
        self.control_lens[slot] = received.destination(index).map_or(0, |(ip, interface)| {
            write_pktinfo(&mut self.controls[slot], ip, interface)
        });
        self.queued += 1;
        true
    }

    /// Queues `payload` to `destination`, from `source` when given (IP_PKTINFO / IPV6_PKTINFO:
    /// any local address, e.g. any of 127.0.0.0/8, on a socket bound to the wildcard).
    pub fn push_to(
        &mut self,
        payload: &[u8],
        destination: SocketAddr,
        source: Option<IpAddr>,
    ) -> bool {
        if self.queued == BATCH {
            return false;
        }
        let slot = self.queued;
        let len = payload.len().min(MAX_SEND);
        self.payloads[slot][..len].copy_from_slice(&payload[..len]);
        self.lens[slot] = len;
        let (name, name_len) = raw_socket_addr(destination);
        self.names[slot] = name;
        self.name_lens[slot] = name_len;
        self.control_lens[slot] = match source {
            Some(ip) => write_pktinfo(&mut self.controls[slot], ip, 0),
            None => 0,
        };
        self.queued += 1;
        true
    }

    /// The payload of queued datagram `index`, to patch it (the transmit timestamp) last.
    pub fn payload_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        if index >= self.queued {
            return None;
        }
        let len = self.lens[index];
        self.payloads.get_mut(index).map(|p| &mut p[..len])
    }

    /// Replaces the payload of queued datagram `index` (an NTS reply sealed after the transmit
    /// time was stamped); `false`, and nothing changed, when it does not fit.
    pub fn set_payload(&mut self, index: usize, payload: &[u8]) -> bool {
        if index >= self.queued || payload.len() > MAX_SEND {
            return false;
        }
        self.payloads[index][..payload.len()].copy_from_slice(payload);
        self.lens[index] = payload.len();
        true
    }

    /// Takes queued datagram `index` back: it is not sent (an authenticated reply that could
    /// not be sealed must not go out plain).
    pub fn withdraw(&mut self, index: usize) {
        if index < self.queued {
            self.lens[index] = 0;
        }
    }

    /// Sends everything queued (but withdrawn datagrams) and empties the batch. A datagram the kernel refuses is
    /// skipped so one bad destination cannot hold back the rest.
    pub fn send(&mut self, socket: BorrowedFd<'_>) -> SendOutcome {
        let mut kept = 0;
        for i in 0..self.queued {
            if self.lens[i] == 0 {
                continue;
            }
            self.iovecs[kept] = libc::iovec {
                iov_base: self.payloads[i].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            };
            let header = &mut self.headers[kept];
            header.msg_len = 0;
            header.msg_hdr.msg_name = (&raw mut self.names[i]).cast();
            header.msg_hdr.msg_namelen = self.name_lens[i];
            header.msg_hdr.msg_iov = &raw mut self.iovecs[kept];
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_control = if self.control_lens[i] > 0 {
                self.controls[i].as_mut_ptr().cast()
            } else {
                std::ptr::null_mut()
            };
            header.msg_hdr.msg_controllen = self.control_lens[i] as _;
            header.msg_hdr.msg_flags = 0;
            kept += 1;
        }
        // Entries 0..kept were just pointed at buffers this batch owns, with the lengths
        // recorded when they were queued.
        let outcome = send_headers(socket, &mut self.headers[..kept]);
        self.queued = 0;
        outcome
    }
}

/// Most datagrams one [`FanOutBatch`] sends per call (the kernel's UIO_MAXIOV).
pub const FAN_OUT_MAX: usize = 1024;

/// One payload to one destination from many source addresses, built once for a load
/// generator: every header points at the same payload, iovec and destination, so a call
/// changes only the source addresses (IP_PKTINFO) and copies no datagram. With up to
/// [`FAN_OUT_MAX`] datagrams per syscall the sender's cost is the kernel's own per-datagram
/// work.
pub struct FanOutBatch {
    payload: Box<[u8; MAX_SEND]>,
    len: usize,
    name: Box<libc::sockaddr_storage>,
    name_len: libc::socklen_t,
    iovec: Box<libc::iovec>,
    controls: Box<[[u64; CONTROL_WORDS]]>,
    control_lens: Box<[usize]>,
    headers: Box<[libc::mmsghdr]>,
}

impl FanOutBatch {
    /// Up to `capacity` (at most [`FAN_OUT_MAX`]) copies of `payload` (at most [`MAX_SEND`]
    /// bytes) to `destination`, each from the kernel's choice of source until
    /// [`Self::set_source`] picks one.
    pub fn new(payload: &[u8], destination: SocketAddr, capacity: usize) -> Self {
        let capacity = capacity.clamp(1, FAN_OUT_MAX);
        let len = payload.len().min(MAX_SEND);
        let mut buffer = Box::new([0u8; MAX_SEND]);
        buffer[..len].copy_from_slice(&payload[..len]);
        let (name, name_len) = raw_socket_addr(destination);
        Self {
            payload: buffer,
            len,
            name: Box::new(name),
            name_len,
            // SAFETY: all-zero is valid for these C structs (see RecvBatch::new).
            iovec: Box::new(unsafe { zeroed::<libc::iovec>() }),
            controls: vec![[0u64; CONTROL_WORDS]; capacity].into_boxed_slice(),
            control_lens: vec![0; capacity].into_boxed_slice(),
            headers: vec![unsafe { zeroed::<libc::mmsghdr>() }; capacity].into_boxed_slice(),
        }
    }

    /// Datagrams one call can send.
    pub fn capacity(&self) -> usize {
        self.headers.len()
    }

    /// The shared payload, to patch (e.g. a transmit timestamp) before a call.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.payload[..self.len]
    }

    /// Datagram `index` of every following call leaves from `source` (IP_PKTINFO /
    /// IPV6_PKTINFO: any local address on a wildcard-bound socket).
    pub fn set_source(&mut self, index: usize, source: IpAddr) {
        if let Some(control) = self.controls.get_mut(index) {
            self.control_lens[index] = write_pktinfo(control, source, 0);
        }
    }

    /// Sends the first `count` datagrams (at most the capacity). A datagram the kernel
    /// refuses is skipped and counted, never retried.
    pub fn send(&mut self, socket: BorrowedFd<'_>, count: usize) -> SendOutcome {
        let count = count.min(self.headers.len());
        *self.iovec = libc::iovec {
            iov_base: self.payload.as_mut_ptr().cast(),
            iov_len: self.len,
        };
        let name = (&raw mut *self.name).cast::<libc::c_void>();
        let iovec = &raw mut *self.iovec;
        for i in 0..count {
            let header = &mut self.headers[i];
            header.msg_len = 0;
            header.msg_hdr.msg_name = name;
            header.msg_hdr.msg_namelen = self.name_len;
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_control = if self.control_lens[i] > 0 {
                self.controls[i].as_mut_ptr().cast()
            } else {
                std::ptr::null_mut()
            };
            header.msg_hdr.msg_controllen = self.control_lens[i] as _;
            header.msg_hdr.msg_flags = 0;
        }
        // Entries 0..count were just pointed at the payload, iovec, address and control
        // buffers this batch owns (shared ones are only read by the kernel).
        send_headers(socket, &mut self.headers[..count])
    }
}

/// `sendmmsg` of every header, skipping (and counting) a datagram the kernel refuses so one
/// bad destination cannot hold back the rest; never retried. Every header must point at
/// buffers that live for the call, as both batches arrange right before calling.
fn send_headers(socket: BorrowedFd<'_>, headers: &mut [libc::mmsghdr]) -> SendOutcome {
    let mut outcome = SendOutcome::default();
    let mut start = 0;
    while start < headers.len() {
        // SAFETY: the caller pointed every header at live buffers of the recorded lengths;
        // the kernel only reads them and writes msg_len.
        let sent = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                headers[start..].as_mut_ptr(),
                (headers.len() - start) as libc::c_uint,
                0,
            )
        };
        if sent <= 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The first remaining datagram failed: drop it and go on with the rest.
            outcome.failed += 1;
            start += 1;
        } else {
            outcome.sent += sent as usize;
            start += sent as usize;
        }
    }
    outcome
}

/// A socket address as the kernel reads it.
fn raw_socket_addr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let sock = socket2::SockAddr::from(addr);
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = (sock.len() as usize).min(size_of::<libc::sockaddr_storage>());
    // SAFETY: copies `len` initialised bytes of socket2's storage into ours; both are
    // sockaddr_storage-sized and the ranges do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            sock.as_ptr().cast::<u8>(),
            (&raw mut storage).cast::<u8>(),
            len,
        );
    }
    (storage, len as libc::socklen_t)
}

/// Writes an IP_PKTINFO (or IPV6_PKTINFO) control message choosing the source address;
/// returns its length. `interface` is set only for an IPv6 link-local source, whose scope it
/// is: elsewhere it would pin the outgoing interface and defeat the routing table (a reply
/// may rightly leave by another interface than its request came in on).
fn write_pktinfo(control: &mut [u64; CONTROL_WORDS], source: IpAddr, interface: u32) -> usize {
    let header_len = size_of::<libc::cmsghdr>();
    let (level, kind, data_len) = match source {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            size_of::<libc::in_pktinfo>(),
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            size_of::<libc::in6_pktinfo>(),
        ),
    };
    let align = size_of::<usize>();
    let cmsg_len = header_len + data_len;
    let space = cmsg_len.div_ceil(align) * align;
    if space > CONTROL_WORDS * 8 {
        return 0;
    }
    // SAFETY: all-zero is a valid cmsghdr.
    let mut header: libc::cmsghdr = unsafe { zeroed() };
    header.cmsg_len = cmsg_len as _;
    header.cmsg_level = level;
    header.cmsg_type = kind;
    let base = control.as_mut_ptr().cast::<u8>();
    // SAFETY: `space` ≤ the buffer's size was checked above; the header goes at offset 0 and
    // the data right after it (the header length is a multiple of the alignment).
    unsafe {
        std::ptr::write_bytes(base, 0, space);
        std::ptr::write_unaligned(base.cast::<libc::cmsghdr>(), header);
        let data = base.add(header_len);
        match source {
            IpAddr::V4(v4) => {
                let mut info: libc::in_pktinfo = zeroed();
                info.ipi_spec_dst.s_addr = u32::from(v4).to_be();
                std::ptr::write_unaligned(data.cast::<libc::in_pktinfo>(), info);
            }
            IpAddr::V6(v6) => {
                let mut info: libc::in6_pktinfo = zeroed();
                info.ipi6_addr.s6_addr = v6.octets();
                if v6.is_unicast_link_local() {
                    info.ipi6_ifindex = interface;
                }
                std::ptr::write_unaligned(data.cast::<libc::in6_pktinfo>(), info);
            }
        }
    }
    space
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::fd::AsFd;

    fn options() -> SocketOptions {
        SocketOptions {
            reuse_port: false,
            dual_stack: true,
            receive_buffer: 0,
            receive_timeout: Some(Duration::from_millis(500)),
        }
    }

    #[test]
    fn a_batch_round_trip_carries_addresses_timestamps_and_chosen_sources() {
        let server = bind_udp("[::]:0".parse().unwrap(), options()).unwrap();
        let port = server.local_addr().unwrap().port();
        let client = bind_udp("0.0.0.0:0".parse().unwrap(), options()).unwrap();
        let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut out = SendBatch::new();
        for i in 0..3u8 {
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 3, 1 + i));
            assert!(out.push_to(&[i; 48], target, Some(source)));
        }
        assert_eq!(out.send(client.as_fd()).sent, 3);
        let mut batch = RecvBatch::new();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let n = batch.receive(server.as_fd()).unwrap();
            for i in 0..n {
                let d = batch.get(i).unwrap();
                assert_eq!(d.bytes.len(), 48);
                assert!(d.host_rx.is_some(), "kernel timestamp missing");
                assert!(!d.truncated);
                seen.push((d.bytes[0], d.source.unwrap().ip()));
            }
        }
        seen.sort();
        for (i, (first, ip)) in seen.iter().enumerate() {
            assert_eq!(*first, i as u8);
            let expected: IpAddr = format!("::ffff:127.0.3.{}", 1 + i).parse().unwrap();
            assert_eq!(
                *ip, expected,
                "IPv4 client seen IPv4-mapped on a dual-stack socket"
            );
        }
    }

    #[test]
    fn a_fan_out_batch_sends_one_payload_from_each_chosen_source() {
        let server = bind_udp("127.0.0.1:0".parse().unwrap(), options()).unwrap();
        let target = server.local_addr().unwrap();
        let client = bind_udp("0.0.0.0:0".parse().unwrap(), options()).unwrap();
        let mut out = FanOutBatch::new(&[7u8; 48], target, 8);
        out.payload_mut()[0] = 9;
        for i in 0..5u8 {
            out.set_source(usize::from(i), IpAddr::V4(Ipv4Addr::new(127, 0, 4, 1 + i)));
        }
        assert_eq!(out.send(client.as_fd(), 5).sent, 5);
        let mut batch = RecvBatch::new();
        let mut seen = Vec::new();
        while seen.len() < 5 {
            let n = batch.receive(server.as_fd()).unwrap();
            for i in 0..n {
                let d = batch.get(i).unwrap();
                assert_eq!((d.bytes.len(), d.bytes[0], d.bytes[1]), (48, 9, 7));
                seen.push(d.source.unwrap().ip());
            }
        }
        seen.sort();
        let expected: Vec<IpAddr> = (0..5u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 4, 1 + i)))
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn replies_go_back_to_the_exact_source() {
        let server = bind_udp("[::]:0".parse().unwrap(), options()).unwrap();
        let port = server.local_addr().unwrap().port();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"ping", ("127.0.0.1", port)).unwrap();
        let mut batch = RecvBatch::new();
        assert_eq!(batch.receive(server.as_fd()).unwrap(), 1);
        let mut out = SendBatch::new();
        out.next_buffer().unwrap()[..4].copy_from_slice(b"pong");
        assert!(out.push_reply(&batch, 0, 4));
        assert_eq!(out.send(server.as_fd()).sent, 1);
        let mut buf = [0u8; 8];
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"pong");
        assert_eq!(from.port(), port);
    }

    #[test]
    fn a_withdrawn_datagram_is_never_sent_and_the_others_are() {
        let server = bind_udp("127.0.0.1:0".parse().unwrap(), options()).unwrap();
        let target = server.local_addr().unwrap();
        let client = bind_udp("0.0.0.0:0".parse().unwrap(), options()).unwrap();
        let mut out = SendBatch::new();
        for i in 0..4u8 {
            assert!(out.push_to(&[i; 48], target, None));
        }
        out.withdraw(1);
        out.withdraw(3);
        out.withdraw(9);
        assert_eq!(out.send(client.as_fd()).sent, 2);
        assert!(out.is_empty());
        let mut batch = RecvBatch::new();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let n = batch.receive(server.as_fd()).unwrap();
            seen.extend((0..n).map(|i| batch.get(i).unwrap().bytes[0]));
        }
        seen.sort();
        assert_eq!(seen, [0, 2]);
        // Nothing else arrives: the withdrawn ones were not sent late either.
        server
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(batch.receive(server.as_fd()).is_err());
    }

    /// A reply leaves from the address its request was sent to, although the route to the
    /// client would pick another one (127.0.0.1): on an IPv4 socket and, for an IPv4 client,
    /// on a dual-stack one.
    #[test]
    fn replies_leave_from_the_address_the_request_was_sent_to() {
        for bind in ["0.0.0.0:0", "[::]:0"] {
            let server = bind_udp(bind.parse().unwrap(), options()).unwrap();
            let port = server.local_addr().unwrap().port();
            let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            for asked in [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 5, 7)] {
                client.send_to(b"ping", (asked, port)).unwrap();
                let mut batch = RecvBatch::new();
                assert_eq!(batch.receive(server.as_fd()).unwrap(), 1);
                let destination = batch.get(0).unwrap().destination.unwrap();
                if bind == "[::]:0" {
                    // A dual-stack socket reports IPv4 destinations in IPV6_PKTINFO, mapped.
                    assert_eq!(
                        destination,
                        IpAddr::V6(asked.to_ipv6_mapped()),
                        "{bind}: destination of a request to {asked}"
                    );
                }
                assert_ne!(batch.get(0).unwrap().interface, 0, "arrival interface");
                assert_eq!(
                    destination.to_canonical(),
                    IpAddr::V4(asked),
                    "{bind}: destination of a request to {asked}"
                );
                let mut out = SendBatch::new();
                out.next_buffer().unwrap()[..4].copy_from_slice(b"pong");
                assert!(out.push_reply(&batch, 0, 4));
                assert_eq!(out.send(server.as_fd()).sent, 1);
                let mut buf = [0u8; 8];
                let (n, from) = client.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], b"pong");
                assert_eq!(
                    from,
                    SocketAddr::from((asked, port)),
                    "{bind}: the reply to a request for {asked} left from {from}"
                );
            }
        }
    }

    #[test]
    fn wake_receivers_unblocks_a_waiting_receive() {
        let mut opts = options();
        opts.receive_timeout = Some(Duration::from_secs(30));
        let server = bind_udp("127.0.0.1:0".parse().unwrap(), opts).unwrap();
        let waker = server.try_clone().unwrap();
        let started = std::time::Instant::now();
        let receiver = std::thread::spawn(move || {
            let mut batch = RecvBatch::new();
            batch.receive(server.as_fd())
        });
        // Whether the receive is already blocked or not yet started, the shutdown is sticky:
        // the receive returns at once either way (with a zero-length datagram), long before
        // the 30 s receive timeout.
        wake_receivers(waker.as_fd());
        let _ = receiver.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
