//! Name resolution off the run loop: a [`Resolver`] abstraction (the system resolver in
//! production, a simulated one in tests) and a task that runs lookups concurrently, each
//! with a timeout, and hands results back to the loop as [`Resolution`] events.
//!
//! When and what to look up is decided by [`crate::driver`]; this module only does the IO.
//! The loop never waits on DNS: a lookup that hangs for its whole timeout delays nothing but
//! the name it is for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

/// Most addresses taken from one answer: enough spares for a pool to replace bad members
/// without another lookup, small enough to bound memory for a hostile answer.
pub const MAX_ADDRESSES: usize = 16;
/// Lookups running at once; more wait in the queue.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// How long one lookup may take before it counts as failed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a name gave no addresses.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The resolver failed (no such name, no server reachable, ...).
    #[error("resolving {host}: {source}")]
    Lookup {
        /// The name.
        host: String,
        /// What the resolver said.
        #[source]
        source: std::io::Error,
    },
    /// The answer held no address.
    #[error("resolving {host}: no addresses")]
    Empty {
        /// The name.
        host: String,
    },
    /// An NTS upstream's key exchange failed; its NTP address stays unknown.
    #[error("NTS key exchange with {host}: {source}")]
    KeyExchange {
        /// The NTS-KE server.
        host: String,
        /// Why.
        #[source]
        source: crate::nts_ke::KeError,
    },
    /// No answer within the timeout.
    #[error("resolving {host}: no answer within {after:?}")]
    TimedOut {
        /// The name.
        host: String,
        /// The timeout.
        after: Duration,
    },
}

/// Turns a host name and port into addresses.
pub trait Resolver: Send + Sync + 'static {
    /// All addresses of `host` (deduplicated, resolver order, at most [`MAX_ADDRESSES`]).
    fn lookup(
        &self,
        host: String,
        port: u16,
    ) -> BoxFuture<'static, Result<Vec<SocketAddr>, ResolveError>>;
}

/// The host's resolver (getaddrinfo on a blocking thread, through tokio).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup(
        &self,
        host: String,
        port: u16,
    ) -> BoxFuture<'static, Result<Vec<SocketAddr>, ResolveError>> {
        Box::pin(async move {
            match crate::upstream::resolve(&host, port, MAX_ADDRESSES).await {
                Ok(addrs) if addrs.is_empty() => Err(ResolveError::Empty { host }),
                Ok(addrs) => Ok(addrs),
                Err(source) => Err(ResolveError::Lookup { host, source }),
            }
        })
    }
}

/// A lookup the loop asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupRequest {
    /// The upstream's key (`host:port`), echoed in the [`Resolution`].
    pub key: String,
    /// The name.
    pub host: String,
    /// The port the addresses get.
    pub port: u16,
    /// For an NTS upstream, the NTS-KE port: the "lookup" is then a key exchange, whose
    /// answer names the NTP address (the run loop routes it; [`serve`] never sees it).
    pub nts_port: Option<u16>,
}

/// The outcome of one lookup.
#[derive(Debug)]
pub struct Resolution {
    /// The request's key.
    pub key: String,
    /// The addresses, or why there are none.
    pub result: Result<Vec<SocketAddr>, ResolveError>,
}

/// Runs lookups from `requests` with at most `concurrency` at once, each bounded by
/// `timeout`, and sends each outcome to `results`. Ends when `results` closes, or when
/// `requests` closes and nothing is left running.
pub async fn serve(
    resolver: Arc<dyn Resolver>,
    mut requests: mpsc::UnboundedReceiver<LookupRequest>,
    results: mpsc::Sender<Resolution>,
    concurrency: usize,
    timeout: Duration,
) {
    let concurrency = concurrency.max(1);
    let mut running = FuturesUnordered::new();
    let mut accepting = true;
    loop {
        if !accepting && running.is_empty() {
            return;
        }
        tokio::select! {
            request = requests.recv(), if accepting && running.len() < concurrency => {
                let Some(request) = request else {
                    accepting = false;
                    continue;
                };
                let lookup = resolver.lookup(request.host.clone(), request.port);
                running.push(async move {
                    let result = match tokio::time::timeout(timeout, lookup).await {
                        Ok(result) => result,
                        Err(_) => Err(ResolveError::TimedOut { host: request.host, after: timeout }),
                    };
                    Resolution { key: request.key, result }
                });
            }
            Some(resolution) = running.next(), if !running.is_empty() => {
                if results.send(resolution).await.is_err() {
                    return;
                }
            }
            // The loop is gone: drop lookups still running (a hung one would keep this
            // task alive for ever).
            _ = results.closed() => return,
        }
    }
}

/// Spawns [`serve`] on the current runtime; returns the request sender and result receiver.
pub fn spawn(
    resolver: Arc<dyn Resolver>,
    concurrency: usize,
    timeout: Duration,
) -> (
    mpsc::UnboundedSender<LookupRequest>,
    mpsc::Receiver<Resolution>,
) {
    // Unbounded is bounded in practice: the driver keeps at most one lookup per name
    // outstanding, and the loop must never wait to ask.
    let (request_tx, request_rx) = mpsc::unbounded_channel();
    let (result_tx, result_rx) = mpsc::channel(64);
    tokio::spawn(serve(resolver, request_rx, result_tx, concurrency, timeout));
    (request_tx, result_rx)
}

/// Delay before retry number `failures` (1 for the first retry): 2 s doubling to
/// [`RETRY_CAP`], scaled by `jitter` in [0, 1) to ±20 % so agents restarted together do not
/// query in lockstep.
pub fn retry_delay(failures: u32, jitter: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    let base =
        (RETRY_FIRST.as_secs_f64() * f64::from(1u32 << exponent)).min(RETRY_CAP.as_secs_f64());
    let spread = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
    Duration::from_secs_f64(base * spread)
}

/// First retry after a failed lookup.
pub const RETRY_FIRST: Duration = Duration::from_secs(2);
/// Longest wait between retries: a name that comes back is used within five minutes.
pub const RETRY_CAP: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Answers `slow.example` after 30 s, everything else at once.
    struct Slow;
    impl Resolver for Slow {
        fn lookup(
            &self,
            host: String,
            port: u16,
        ) -> BoxFuture<'static, Result<Vec<SocketAddr>, ResolveError>> {
            Box::pin(async move {
                if host == "slow.example" {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                if host == "hangs.example" {
                    std::future::pending::<()>().await;
                }
                Ok(vec![SocketAddr::new([192, 0, 2, 1].into(), port)])
            })
        }
    }

    fn request(host: &str) -> LookupRequest {
        LookupRequest {
            key: format!("{host}:123"),
            host: host.into(),
            port: 123,
            nts_port: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_lookup_does_not_hold_up_others_and_a_hung_one_times_out() {
        let (tx, mut rx) = spawn(Arc::new(Slow), 2, Duration::from_secs(40));
        let start = tokio::time::Instant::now();
        tx.send(request("slow.example")).unwrap();
        tx.send(request("hangs.example")).unwrap();
        tx.send(request("fast.example")).unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let r = rx.recv().await.unwrap();
            seen.push((r.key, r.result.is_ok(), start.elapsed().as_secs()));
        }
        // Two run at once: the fast one waits for the slow one's slot (30 s), not the hung one.
        assert_eq!(
            seen,
            vec![
                ("slow.example:123".to_string(), true, 30),
                ("fast.example:123".to_string(), true, 30),
                ("hangs.example:123".to_string(), false, 40),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_ends_with_the_loop_even_with_a_lookup_hanging() {
        let (request_tx, request_rx) = mpsc::unbounded_channel();
        let (result_tx, result_rx) = mpsc::channel(1);
        let task = tokio::spawn(serve(
            Arc::new(Slow),
            request_rx,
            result_tx,
            2,
            Duration::from_secs(3600),
        ));
        request_tx.send(request("hangs.example")).unwrap();
        tokio::task::yield_now().await;
        drop(result_rx);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the task ended")
            .unwrap();
        drop(request_tx);
    }

    #[test]
    fn retries_double_from_two_seconds_to_five_minutes_with_jitter() {
        let mid: Vec<u64> = (1..=10).map(|n| retry_delay(n, 0.5).as_secs()).collect();
        assert_eq!(mid, vec![2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(retry_delay(1, 0.0), Duration::from_secs_f64(1.6));
        assert_eq!(retry_delay(u32::MAX, 1.0), Duration::from_secs(360));
    }
}
