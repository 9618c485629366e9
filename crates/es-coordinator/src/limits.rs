//! What one client may cost the coordinator: a cap on open connections ([`Incoming`]), a
//! token bucket for the messages of one stream ([`TokenBucket`]), and the size of the largest
//! message a worker may send ([`inbound_message_limit`]).
//!
//! Together with the tonic server's settings (in `cluster`: header-list size, streams per
//! connection, flow-control windows, keep-alive, a deadline on unary calls and on TLS
//! handshakes) they bound the memory and time that clients, authenticated or not, can take.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A token bucket: `burst` tokens, refilled at `rate` per second. Each message takes one;
/// one that finds the bucket empty is over the limit.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. A `rate` that is not positive (or not finite) never refills, and a
    /// burst below 1 counts as 1.
    pub fn new(rate: f64, burst: u32, now: Instant) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: if rate.is_finite() && rate > 0.0 {
                rate
            } else {
                0.0
            },
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token at `now`: false when none is left.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The largest message the coordinator decodes from a worker of a run with `population`
/// pairs: one `Results` message holds at most a whole generation (each pair is under 64
/// bytes on the wire), one `NoiseSums` at most [`crate::sums::MAX_RANGE_LEN`] f32 values,
/// every other message is far smaller. At least 64 KiB more than either, at most
/// [`es_proto::MAX_MESSAGE_BYTES`].
pub fn inbound_message_limit(population: usize) -> usize {
    population
        .saturating_mul(64)
        .max(4 * crate::sums::MAX_RANGE_LEN)
        .saturating_add(64 << 10)
        .min(es_proto::MAX_MESSAGE_BYTES)
}

/// Accepted TCP connections, at most `max` open at once: a connection beyond that is closed
/// at once (and logged), so that a client opening connections in a loop holds neither memory
/// nor file descriptors beyond the cap. Accept errors (e.g. out of file descriptors) are
/// logged and retried after a pause instead of ending the server.
pub struct Incoming {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    max: usize,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Incoming {
    pub fn new(listener: TcpListener, max: usize) -> Incoming {
        let max = max.max(1);
        Incoming {
            listener,
            permits: Arc::new(Semaphore::new(max)),
            max,
            pause: None,
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                std::task::ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match std::task::ready!(self.listener.poll_accept(cx)) {
                Ok((stream, peer)) => match Arc::clone(&self.permits).try_acquire_owned() {
                    Ok(permit) => {
                        // Results are small and frequent: do not let Nagle hold them back.
                        let _ = stream.set_nodelay(true);
                        return Poll::Ready(Some(Ok(Connection {
                            stream,
                            _permit: permit,
                        })));
                    }
                    Err(_) => {
                        tracing::warn!(%peer, max = self.max, "refused a connection: too many open");
                        drop(stream);
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed: retrying shortly");
                    self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                }
            }
        }
    }
}

/// An accepted connection; it frees its place under the cap when dropped.
pub struct Connection {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 5, t0);
        assert_eq!((0..8).filter(|_| bucket.take(t0)).count(), 5);
        // 0.25 s refill 2.5 tokens: two messages pass.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!((0..8).filter(|_| bucket.take(t1)).count(), 2);
        // A long pause refills no more than the burst.
        let t2 = t1 + Duration::from_secs(100);
        assert_eq!((0..100).filter(|_| bucket.take(t2)).count(), 5);
        // Time going backwards refills nothing.
        assert!(!bucket.take(t0));
    }

    #[test]
    fn a_bucket_without_a_rate_allows_its_burst_once() {
        let t0 = Instant::now();
        for rate in [0.0, -1.0, f64::NAN] {
            let mut bucket = TokenBucket::new(rate, 0, t0);
            assert!(bucket.take(t0));
            assert!(!bucket.take(t0 + Duration::from_secs(1000)));
        }
    }

    #[test]
    fn the_inbound_limit_fits_a_generation_of_results_and_a_range_of_noise_sums() {
        let sums =
            es_proto::pb::NoiseSums::new(u32::MAX, usize::MAX, &[1.0; crate::sums::MAX_RANGE_LEN]);
        let sums_len = prost::Message::encoded_len(&sums);
        assert!(
            inbound_message_limit(0) > sums_len,
            "{sums_len} bytes of sums"
        );
        assert_eq!(
            inbound_message_limit(0),
            4 * crate::sums::MAX_RANGE_LEN + (64 << 10)
        );
        assert!(inbound_message_limit(10_000) >= 10_000 * 64);
        assert_eq!(
            inbound_message_limit(usize::MAX),
            es_proto::MAX_MESSAGE_BYTES
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed() {
        use tokio::io::AsyncReadExt;
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Incoming::new(listener, 2);
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let first = incoming.next().await.unwrap().unwrap();
        let _second = incoming.next().await.unwrap().unwrap();
        // The third is accepted and closed while the stream waits for a fourth.
        let _ = tokio::time::timeout(Duration::from_millis(200), incoming.next()).await;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), clients[2].read(&mut byte))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // Closing one frees its place.
        drop(first);
        let late = TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert_eq!(
            accepted.connect_info().remote_addr,
            Some(late.local_addr().unwrap())
        );
    }
}
