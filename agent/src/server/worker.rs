//! One worker thread: owns one SO_REUSEPORT socket of every served port, waits on all of them
//! and on its control eventfd in one epoll set, and per ready socket loops receive batch →
//! decide and build every reply → stamp transmit time → send batch.
//!
//! There is one worker per core for all ports together, so threads, stacks and wake-ups do
//! not grow with the number of tenants; the kernel still spreads each port's load over the
//! workers by SO_REUSEPORT. A worker with no traffic sleeps in `epoll_wait` without a timeout:
//! only a datagram or its eventfd (a port added or removed, or stop) wakes it.
//!
//! Per batch it loads the port's policy generation and the clock snapshot (two lock-free
//! `ArcSwap` loads) and takes the port's rate-table lock once. Why one lock per port and not
//! a table per worker: clients pick a fresh source port per request (RFC 9109), so the
//! kernel's 4-tuple hash spreads one client over every worker, and per-worker tables would
//! multiply each client's limit (and the tenant budget) by the number of workers. Held for
//! the decisions of one batch (at most 32 trie lookups and table probes, a few microseconds),
//! while the syscalls, which dominate, run outside it in parallel.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use stratum_ntp::server::patch_transmit_timestamp;

use super::batch_io::{BATCH, RecvBatch, SendBatch};
use super::path::{ClockSnapshot, PortPolicy, PortState, Request, Seal, handle_request_sealing};
use super::stats::Tally;
use crate::clock::host_realtime;

/// What the workers of one port share.
pub struct PortShared {
    /// The current policy generation.
    pub policy: ArcSwap<PortPolicy>,
    /// Rate table and client log, made on the port's first datagram: a tenant nobody asks
    /// costs no table (about 320 KiB each at 4096 clients, so 1000 idle tenants would hold
    /// over 300 MiB).
    pub state: Mutex<Option<PortState>>,
    /// Clients the tables hold once made.
    pub client_capacity: usize,
    /// Their hash seed.
    pub seed: u64,
}

/// A change the owner hands to a worker; applied in order.
pub enum Command {
    /// Serve `socket`, this worker's socket of `port` (replacing any it had).
    Add {
        /// The port.
        port: u16,
        /// Bound, non-blocking, with timestamps and packet info on.
        socket: UdpSocket,
        /// Policy and state of the port.
        shared: Arc<PortShared>,
    },
    /// Close this worker's socket of the port.
    Remove(u16),
    /// Answered once every earlier command is done (their sockets closed, for a remove).
    Ack(std::sync::mpsc::Sender<()>),
}

/// epoll token of the control eventfd; sockets use their port number.
const CONTROL_TOKEN: u64 = u64::MAX;
/// Ready sockets taken per `epoll_wait`.
const EVENTS: usize = 64;
/// Full batches read from one ready socket before the others get their turn: amortises the
/// `epoll_wait` under load without letting one flooded port starve the rest.
const BATCHES_PER_TURN: usize = 4;

/// What the owner and the worker share.
struct Control {
    commands: Mutex<Vec<Command>>,
    stop: AtomicBool,
    wake: EventFd,
}

/// The owner's handle on one running worker.
pub struct Worker {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts worker `index` (its counter slot), serving nothing until [`Self::send`] adds
    /// ports.
    pub fn spawn(index: usize, clock: Arc<ArcSwap<ClockSnapshot>>) -> io::Result<Self> {
        let wake = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&wake, EpollEvent::new(EpollFlags::EPOLLIN, CONTROL_TOKEN))?;
        let control = Arc::new(Control {
            commands: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            wake,
        });
        let worker_control = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ntp-worker-{index}"))
            .spawn(move || run(&epoll, &worker_control, &clock, index))?;
        Ok(Self {
            control,
            thread: Some(thread),
        })
    }

    /// Queues `commands` and wakes the worker.
    pub fn send(&self, commands: impl IntoIterator<Item = Command>) {
        self.control
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(commands);
        self.wake();
    }

    fn wake(&self) {
        // Only fails when the counter would overflow, i.e. it is already set: woken anyway.
        let _ = self.control.wake.write(1);
    }

    /// Stops the worker and waits for it; its sockets close with it.
    pub fn stop(self) {
        drop(self);
    }
}

/// A worker never outlives its handle: it would keep its sockets (and their ports) open.
impl Drop for Worker {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::Relaxed);
        self.wake();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("a server worker panicked");
        }
    }
}

/// One served port as a worker holds it.
struct Member {
    socket: UdpSocket,
    shared: Arc<PortShared>,
}

/// Per-thread buffers, allocated once.
struct Buffers {
    received: RecvBatch,
    replies: SendBatch,
    /// Per queued reply: the NTS sealing it still needs (authenticated requests only).
    seals: Vec<Option<Seal>>,
    tally: Tally,
}

fn run(epoll: &Epoll, control: &Control, clock: &ArcSwap<ClockSnapshot>, index: usize) {
    let mut members: HashMap<u16, Member> = HashMap::new();
    let mut buffers = Buffers {
        received: RecvBatch::new(),
        replies: SendBatch::new(),
        seals: (0..BATCH).map(|_| None).collect(),
        tally: Tally::default(),
    };
    let mut events = [EpollEvent::empty(); EVENTS];
    loop {
        let ready = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                // Not expected for a valid epoll fd; do not spin on it.
                tracing::error!(error = %e, "epoll_wait failed in a server worker");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        for event in &events[..ready] {
            let token = event.data();
            if token == CONTROL_TOKEN {
                // Non-blocking read resets the counter; the queue below is the message.
                let _ = control.wake.read();
                apply_commands(epoll, control, &mut members);
                if control.stop.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            // A port removed by a control event earlier in this round is skipped.
            let Some(member) = u16::try_from(token).ok().and_then(|p| members.get(&p)) else {
                continue;
            };
            serve_ready(member, clock, index, &mut buffers);
        }
    }
}

fn apply_commands(epoll: &Epoll, control: &Control, members: &mut HashMap<u16, Member>) {
    let commands = std::mem::take(&mut *control.commands.lock().unwrap_or_else(|e| e.into_inner()));
    for command in commands {
        match command {
            Command::Add {
                port,
                socket,
                shared,
            } => {
                remove(epoll, members, port);
                // Level-triggered: datagrams queued since the bind are reported at once.
                match epoll.add(
                    &socket,
                    EpollEvent::new(EpollFlags::EPOLLIN, u64::from(port)),
                ) {
                    Ok(()) => {
                        members.insert(port, Member { socket, shared });
                    }
                    Err(e) => tracing::error!(port, error = %e, "cannot watch a tenant socket"),
                }
            }
            Command::Remove(port) => remove(epoll, members, port),
            Command::Ack(done) => {
                let _ = done.send(());
            }
        }
    }
}

fn remove(epoll: &Epoll, members: &mut HashMap<u16, Member>, port: u16) {
    if let Some(old) = members.remove(&port) {
        let _ = epoll.delete(old.socket.as_fd());
    }
}

/// Serves one ready socket: batches until it is drained or had its turn.
fn serve_ready(member: &Member, clock: &ArcSwap<ClockSnapshot>, index: usize, b: &mut Buffers) {
    for _ in 0..BATCHES_PER_TURN {
        match b.received.receive(member.socket.as_fd()) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if is_idle(&e) => return,
            Err(e) => {
                // The pending error is consumed by this receive, so the next wait does not
                // report it again.
                tracing::warn!(error = %e, "receive failed on a tenant socket");
                return;
            }
        }
        serve_batch(member, clock, index, b);
        if b.received.len() < BATCH {
            return;
        }
    }
}

fn serve_batch(member: &Member, clock: &ArcSwap<ClockSnapshot>, index: usize, b: &mut Buffers) {
    let Buffers {
        received,
        replies,
        seals,
        tally,
    } = b;
    let port = &member.shared;
    let policy = port.policy.load();
    let clock = clock.load();
    // Without a kernel timestamp (never expected with SO_TIMESTAMPNS) use one reading per
    // batch.
    let batch_host_now = host_realtime();
    {
        let mut made = port.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = made.get_or_insert_with(|| PortState::new(port.client_capacity, port.seed));
        for i in 0..received.len() {
            let Some(datagram) = received.get(i) else {
                break;
            };
            let source = datagram
                .source
                .map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |s| s.ip());
            let request = Request {
                source,
                bytes: datagram.bytes,
                truncated: datagram.truncated,
                received_at: clock
                    .timescale
                    .to_clock(datagram.host_rx.unwrap_or(batch_host_now)),
            };
            let Some(out) = replies.next_buffer() else {
                break;
            };
            let mut seal = None;
            let (outcome, len) =
                handle_request_sealing(&policy, state, &clock.state, request, out, &mut seal);
            tally.record(outcome);
            if outcome.answered() && datagram.source.is_some() {
                let slot = replies.len();
                if replies.push_reply(received, i, len) {
                    seals[slot] = seal;
                }
            }
        }
    }
    if !replies.is_empty() {
        // Transmit timestamp as late as possible: one reading right before the syscall. An
        // NTS reply is sealed after it, since the authenticator covers the whole header.
        let transmit_at = clock.timescale.to_clock(host_realtime());
        let mut rng = rand::rng();
        for (j, seal) in seals.iter_mut().enumerate().take(replies.len()) {
            let Some(reply) = replies.payload_mut(j) else {
                continue;
            };
            patch_transmit_timestamp(reply, transmit_at);
            if let Some(seal) = seal.take() {
                let header: Option<[u8; 48]> = reply.get(..48).and_then(|h| h.try_into().ok());
                if let Some(header) = header {
                    match seal.seal(&header, &mut rng) {
                        Some(sealed) if replies.set_payload(j, &sealed) => {
                            tally.record_authenticated(seal.method());
                        }
                        // Fail closed: an authenticated client never gets a plain answer.
                        _ => replies.withdraw(j),
                    }
                }
            }
        }
        replies.send(member.socket.as_fd());
    }
    policy.stats.worker(index).flush(tally);
}

fn is_idle(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}
