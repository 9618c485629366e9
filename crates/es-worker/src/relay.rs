//! Relaying θ: the `ThetaRelay` service a worker offers to other workers of its run, and the
//! fetch that uses another worker's.
//!
//! Why: every generation each worker needs θ (2.7 MB). Sent by the coordinator to each of
//! 1,000 workers, that is 2.7 GB per generation from one machine. A worker started with a
//! relay listener tells the coordinator its port in `JoinRequest`; the coordinator then sends
//! θ's bytes to a few workers only and tells the others, in `Generation.theta_source`, which
//! worker to fetch it from (a tree: each relaying worker hands it on to a few more). The
//! fetched bytes are checked against the digest the coordinator announced, so a relay cannot
//! pass off another θ; a fetch that fails for any reason falls back to a `ThetaRequest`, and
//! the coordinator sends the bytes itself.
//!
//! [`Board`] is what the session holds and the service reads: the θ the worker has, as its
//! wire bytes (a `Bytes` clone per fetch, no copy). A fetch of a θ the worker is still
//! receiving waits for it, up to [`RELAY_WAIT`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use es_proto::auth::{RequireToken, Token};
use es_proto::pb::theta_relay_client::ThetaRelayClient;
use es_proto::pb::theta_relay_server::{ThetaRelay, ThetaRelayServer};
use es_proto::pb::{self};
use es_proto::{Digest, MAX_MESSAGE_BYTES};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::error::WorkerError;
use crate::session::Auth;

/// How long a relay holds a fetch of a θ it does not have yet (it is receiving it from its
/// own source) before answering `DEADLINE_EXCEEDED`.
pub const RELAY_WAIT: Duration = Duration::from_secs(10);
/// How long a fetch may take in all, waiting at the relay included, before the worker asks
/// the coordinator instead. A little longer than [`RELAY_WAIT`] so that the relay's own
/// answer, when it gives up, arrives first.
const FETCH_TIMEOUT: Duration = Duration::from_secs(12);
/// Connecting to a relay: a worker that is gone should not hold its children for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Fetches one relay serves at once (its children; the coordinator gives each relay a
/// handful). More wait for a stream.
const MAX_CONCURRENT_FETCHES: u32 = 64;

/// Where a worker serves `ThetaRelay` to the other workers of its run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayOptions {
    /// The address to listen on, e.g. `0.0.0.0:50052`; port 0 picks a free one (what a load
    /// test's many connections in one process do).
    pub listen: SocketAddr,
    /// The host other workers reach the listener at; `None`: the address the coordinator
    /// sees this worker's connection come from.
    pub host: Option<String>,
}

impl RelayOptions {
    /// Relay options listening on `listen`, reached by other workers at `host` when given;
    /// refuses a host that is empty, too long for a DNS name or holds spaces, slashes or
    /// other characters no host name has.
    pub fn new(listen: SocketAddr, host: Option<String>) -> Result<RelayOptions, WorkerError> {
        if let Some(host) = &host
            && (host.is_empty() || !es_proto::plausible_host(host))
        {
            return Err(WorkerError::Relay(format!(
                "relay host {host:?}: expected a host name or an IP address of at most {} characters",
                es_proto::MAX_HOST_CHARS
            )));
        }
        Ok(RelayOptions { listen, host })
    }
}

/// A θ the worker holds, ready to hand on.
#[derive(Clone)]
struct Held {
    run_id: Arc<str>,
    digest: Digest,
    bytes: Bytes,
}

/// The θ this worker holds, for its relay service to hand on.
#[derive(Clone)]
pub(crate) struct Board(Arc<watch::Sender<Option<Held>>>);

impl Board {
    pub(crate) fn new() -> Board {
        Board(Arc::new(watch::Sender::new(None)))
    }

    /// From now on the worker holds θ `digest` of run `run_id`, whose wire bytes are `bytes`.
    pub(crate) fn publish(&self, run_id: &str, digest: Digest, bytes: Bytes) {
        self.0.send_replace(Some(Held {
            run_id: run_id.into(),
            digest,
            bytes,
        }));
    }

    /// The bytes of θ `digest` of run `run_id`, as soon as the worker holds them.
    async fn wait_for(&self, run_id: &str, digest: &Digest) -> Bytes {
        let mut held = self.0.subscribe();
        loop {
            if let Some(h) = &*held.borrow_and_update()
                && &*h.run_id == run_id
                && h.digest == *digest
            {
                return h.bytes.clone();
            }
            if held.changed().await.is_err() {
                // The sender lives in `self`: this cannot happen while we wait.
                std::future::pending::<()>().await;
            }
        }
    }
}

struct RelayService {
    board: Board,
}

#[tonic::async_trait]
impl ThetaRelay for RelayService {
    async fn fetch_theta(
        &self,
        request: Request<pb::FetchThetaRequest>,
    ) -> Result<Response<pb::FetchThetaReply>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        let digest = request
            .checked_theta_digest()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        match tokio::time::timeout(RELAY_WAIT, self.board.wait_for(&request.run_id, &digest)).await
        {
            Ok(bytes) => {
                debug!(?peer, "relayed theta");
                Ok(Response::new(pb::FetchThetaReply { theta: bytes }))
            }
            Err(_) => Err(Status::deadline_exceeded(format!(
                "this worker did not get the theta asked for within {RELAY_WAIT:?}: it serves \
                 another run or generation, or its own source is slow"
            ))),
        }
    }
}

/// Binds the relay listener: the port to announce when joining, and the server to run.
pub(crate) async fn bind(
    options: &RelayOptions,
    token: Option<&str>,
    board: Board,
) -> Result<(u16, impl Future<Output = ()> + use<>), WorkerError> {
    // As on the coordinator: a listener other machines can reach must ask for the token.
    if token.is_none() && !options.listen.ip().is_loopback() {
        return Err(WorkerError::Relay(format!(
            "relay listener {} is reachable from other machines without a token: give the \
             cluster's token (--token, --token-file or UNDERFLOW_TOKEN) or listen on loopback",
            options.listen
        )));
    }
    let token = token
        .map(Token::new)
        .transpose()
        .map_err(|_| WorkerError::InvalidToken)?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| WorkerError::Relay(format!("cannot listen on {}: {e}", options.listen)))?;
    let port = listener
        .local_addr()
        .map_err(|e| WorkerError::Relay(format!("relay listener address: {e}")))?
        .port();
    info!(listen = %options.listen, port, "relaying theta to other workers");
    let service = InterceptedService::new(
        ThetaRelayServer::new(RelayService { board }).max_encoding_message_size(MAX_MESSAGE_BYTES),
        RequireToken::new(token.as_ref()),
    );
    let server = async move {
        let served = Server::builder()
            .max_concurrent_streams(Some(MAX_CONCURRENT_FETCHES))
            .initial_stream_window_size(Some(crate::session::HTTP2_WINDOW))
            .initial_connection_window_size(Some(crate::session::HTTP2_WINDOW))
            .max_frame_size(Some(es_proto::HTTP2_MAX_FRAME_BYTES))
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the relay server stopped");
        }
    };
    Ok((port, server))
}

/// θ `digest` of run `run_id` fetched from the relay at `source` ("host:port"): its wire
/// bytes and its values, checked to be `dim` values with that digest.
pub(crate) async fn fetch(
    source: &str,
    token: Option<AsciiMetadataValue>,
    run_id: &str,
    digest: &Digest,
    dim: usize,
) -> Result<(Bytes, Vec<f32>), String> {
    let fetch = async {
        let channel = Endpoint::from_shared(format!("http://{source}"))
            .map_err(|e| format!("relay address {source:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(crate::session::HTTP2_WINDOW)
            .initial_connection_window_size(crate::session::HTTP2_WINDOW)
            .max_frame_size(es_proto::HTTP2_MAX_FRAME_BYTES)
            .connect()
            .await
            .map_err(|e| format!("connecting to relay {source}: {e}"))?;
        let mut client = ThetaRelayClient::with_interceptor(channel, Auth(token))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let reply = client
            .fetch_theta(pb::FetchThetaRequest::new(run_id, digest))
            .await
            .map_err(|status| format!("relay {source}: {}", status.message()))?
            .into_inner();
        let theta = reply
            .checked_theta(dim, digest)
            .map_err(|e| format!("relay {source} sent a bad theta: {e}"))?;
        Ok((reply.theta, theta))
    };
    tokio::time::timeout(FETCH_TIMEOUT, fetch)
        .await
        .map_err(|_| format!("relay {source}: no theta within {FETCH_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_proto::EncodedTheta;

    #[test]
    fn relay_options_take_host_names_and_addresses_and_refuse_what_no_host_is() {
        let listen: SocketAddr = "0.0.0.0:50052".parse().unwrap();
        for host in ["relay-3.cluster.local", "10.0.0.7", "::1"] {
            let options = RelayOptions::new(listen, Some(host.into())).unwrap();
            assert_eq!(options.host.as_deref(), Some(host));
        }
        assert_eq!(RelayOptions::new(listen, None).unwrap().host, None);
        for host in ["", "a b", "host/path", "user@host", "x\n", &"h".repeat(254)] {
            let error = RelayOptions::new(listen, Some(host.into())).unwrap_err();
            assert!(
                error.to_string().contains("expected a host name"),
                "{host:?}: {error}"
            );
        }
    }

    fn metadata(token: &str) -> Option<AsciiMetadataValue> {
        Some(format!("Bearer {token}").parse().unwrap())
    }

    /// A relay on loopback with `token`: its address and its board.
    async fn relay(token: &str) -> (String, Board) {
        let board = Board::new();
        let options = RelayOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            host: None,
        };
        let (port, server) = bind(&options, Some(token), board.clone()).await.unwrap();
        tokio::spawn(server);
        (format!("127.0.0.1:{port}"), board)
    }

    #[tokio::test]
    async fn a_fetch_waits_for_the_theta_asked_for_and_checks_it() {
        let (address, board) = relay("tok").await;
        let theta: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let encoded = EncodedTheta::new(&theta);
        let digest = *encoded.digest();

        // Asked before the relay holds it: the fetch waits until it does.
        let pending = tokio::spawn({
            let address = address.clone();
            async move { fetch(&address, metadata("tok"), "run-a", &digest, 1000).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!pending.is_finished(), "answered before holding θ");
        board.publish("run-a", digest, encoded.bytes().clone());
        let (bytes, fetched) = pending.await.unwrap().unwrap();
        assert_eq!(fetched, theta);
        assert_eq!(&bytes, encoded.bytes());

        // The wrong token, or the wrong length for the run's network: an error to fall back on.
        let e = fetch(&address, metadata("other"), "run-a", &digest, 1000)
            .await
            .unwrap_err();
        assert!(e.contains("wrong token"), "{e}");
        let e = fetch(&address, metadata("tok"), "run-a", &digest, 999)
            .await
            .unwrap_err();
        assert!(e.contains("bad theta"), "{e}");

        // A relay that holds other bytes under the digest cannot pass them off.
        let other = EncodedTheta::new(&vec![1.0; 1000]);
        board.publish("run-a", digest, other.bytes().clone());
        let e = fetch(&address, metadata("tok"), "run-a", &digest, 1000)
            .await
            .unwrap_err();
        assert!(e.contains("bad theta") && e.contains("digest"), "{e}");
    }

    #[tokio::test]
    async fn a_relay_that_is_gone_fails_fast_and_a_public_one_needs_a_token() {
        // Nothing listens on loopback port 1.
        let started = std::time::Instant::now();
        let e = fetch("127.0.0.1:1", None, "run", &[0; 32], 10)
            .await
            .unwrap_err();
        assert!(e.contains("connecting to relay"), "{e}");
        assert!(started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(1));

        let public = RelayOptions {
            listen: "0.0.0.0:0".parse().unwrap(),
            host: None,
        };
        let Err(e) = bind(&public, None, Board::new()).await else {
            panic!("a relay reachable from other machines started without a token");
        };
        assert!(e.to_string().contains("without a token"), "{e}");
    }
}
