//! The worker's one error type: every way a worker stops other than by finishing or being
//! told to shut down, each message naming the thing and what was expected.

use std::path::PathBuf;
use std::time::Duration;

use es_proto::pb::RefusalReason;

/// Why a worker stopped with an error. Everything here is final: transient failures
/// (transport errors, a coordinator that restarts) are retried inside [`crate::run`] and only
/// surface as [`WorkerError::GaveUp`] once the reconnect policy says so.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The coordinator refused the worker for a reason other than `RUN_MISMATCH` (which makes
    /// the worker join afresh): it must change before it can take part.
    #[error("coordinator refused this worker ({}): {message}", reason.as_str_name())]
    Refused {
        reason: RefusalReason,
        message: String,
    },
    /// The coordinator rejected a call with a status that retrying cannot fix (a wrong
    /// token, a server that is not a coordinator, a request it calls malformed).
    #[error("coordinator rejected the {call} call with status {:?}: {}", .status.code(), .status.message())]
    Rejected {
        call: &'static str,
        status: tonic::Status,
    },
    /// The endpoint is not a URI tonic can connect to.
    #[error("endpoint {endpoint:?} is not a valid address: expected a URI like http://host:port")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The TLS settings cannot be used (e.g. a PEM file that holds no certificate, or an
    /// endpoint that is not `https://`).
    #[error("cannot set up TLS to {endpoint}: {reason}")]
    Tls { endpoint: String, reason: String },
    /// The relay listener (`--relay-listen`) cannot be set up.
    #[error("cannot relay theta: {0}")]
    Relay(String),
    /// The shared token cannot travel as gRPC metadata.
    #[error("the token is not a valid header value: expected visible ASCII characters")]
    InvalidToken,
    /// The MNIST files could not be loaded.
    #[error(
        "cannot load mnist from {dir} (the worker downloads missing files only with --mirror URL): {source}"
    )]
    Data {
        dir: PathBuf,
        #[source]
        source: es_data::mnist::MnistError,
    },
    /// The run the coordinator described cannot be evaluated by this worker.
    #[error("coordinator sent a run this worker cannot evaluate: {0}")]
    Spec(#[source] es_proto::ConversionError),
    /// The worker's training data does not fit the run's network (e.g. other image sizes).
    #[error("the worker's training data does not fit the run's network: {0}")]
    Dataset(#[source] es_core::train::TrainError),
    /// The run's noise table could not be opened or created in the cache directory.
    #[error("cannot open the noise table in {dir}: {source}")]
    NoiseFile {
        dir: PathBuf,
        #[source]
        source: es_data::noise_file::NoiseFileError,
    },
    /// The evaluators could not be built (e.g. the kernel is not supported by this CPU).
    #[error("cannot build the evaluators: {0}")]
    Evaluators(#[source] es_kernel::ConfigError),
    /// The golden task could not be evaluated.
    #[error("cannot evaluate the golden task: {0}")]
    Golden(#[source] es_core::train::TrainError),
    /// A message from the coordinator does not convert: the coordinator broke the protocol.
    #[error("coordinator sent a malformed {message}: {source}")]
    Malformed {
        message: &'static str,
        #[source]
        source: es_proto::ConversionError,
    },
    /// The coordinator did something the protocol does not allow.
    #[error("coordinator broke the protocol: {0}")]
    Protocol(String),
    /// The compute thread failed (an evaluation error or a panic).
    #[error("the compute thread failed: {0}")]
    Compute(String),
    /// The work this worker hands on (a hub's, see `crate::delegate`) cannot go on.
    #[error("the hub behind this worker failed: {0}")]
    Delegate(String),
    /// A blocking task of the worker panicked or was cancelled.
    #[error("the worker's {what} task failed: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The coordinator stayed unreachable for longer than the reconnect policy allows.
    #[error(
        "gave up reconnecting to {endpoint} after {attempts} failed attempts over {:.1} s: expected it back within {:.1} s; last error: {last_error}. Is the coordinator running, and does --connect name its --listen address (and port) as reachable from here?",
        .elapsed.as_secs_f64(),
        .limit.as_secs_f64()
    )]
    GaveUp {
        endpoint: String,
        attempts: u32,
        elapsed: Duration,
        limit: Duration,
        last_error: String,
    },
}

impl WorkerError {
    /// True for a refusal by the coordinator (the binary exits with code 2 for these).
    pub fn is_refusal(&self) -> bool {
        matches!(self, WorkerError::Refused { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_its_reason_and_the_coordinators_words() {
        let e = WorkerError::Refused {
            reason: RefusalReason::DataMismatch,
            message: "data digest 3f2a differs from the coordinator's 9bc0".into(),
        };
        assert!(e.is_refusal());
        assert_eq!(
            e.to_string(),
            "coordinator refused this worker (REFUSAL_REASON_DATA_MISMATCH): \
             data digest 3f2a differs from the coordinator's 9bc0"
        );
    }

    #[test]
    fn giving_up_says_how_long_was_tried() {
        let e = WorkerError::GaveUp {
            endpoint: "http://127.0.0.1:1".into(),
            attempts: 3,
            elapsed: Duration::from_millis(1500),
            limit: Duration::from_secs(1),
            last_error: "connection refused".into(),
        };
        assert!(!e.is_refusal());
        let text = e.to_string();
        assert!(text.contains("http://127.0.0.1:1"), "{text}");
        assert!(text.contains("3 failed attempts over 1.5 s"), "{text}");
        assert!(text.contains("connection refused"), "{text}");
    }
}
