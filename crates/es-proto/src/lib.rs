//! The coordinator ↔ worker gRPC protocol of Underflow: the code generated from
//! `proto/es/v1/es.proto` its conversions to and from the core's types, and the shared token that guards both services.
//!
//! - [`pb`]: the generated messages, the `Coordinator` client (`pb::coordinator_client`) and
//!   server (`pb::coordinator_server`), and the `ThetaRelay` a worker offers other workers
//!   (`pb::theta_relay_client`, `pb::theta_relay_server`). Read the `.proto` for what each
//!   message means.
//! - [`auth`]: the cluster's shared [`auth::Token`] and the interceptor that requires it on
//!   every call of both services.
//! - [`spec`]: the run as it travels in `JoinAccepted` ([`RunSpec`]): `NetConfig`, the part
//!   of `EsConfig` evaluations depend on, `Schedule`, the noise source.
//! - [`theta`]: θ as little-endian bytes ([`EncodedTheta`], [`theta_from_bytes`]), SHA-256
//!   digests of θ and of logits, digest fields of fixed length.
//! - [`work`]: the `Work` stream: pair results, the golden proof, `Generation`, refusals, and
//!   wrapping each message into `WorkerMessage` / `CoordinatorMessage`.
//! - [`error`]: [`ConversionError`], which names the field and what was expected.
//!
//! Wire types stay at the edge: a handler converts a message in its first lines, and the core
//! (`es-kernel`, `es-core`) never sees prost or tonic. Conversions from the wire validate
//! everything the core would otherwise have to trust: lengths, ranges, missing fields, NaN.
//!
//! The build compiles the `.proto` with `protox` (pure Rust): no system `protoc` is needed.

pub mod auth;
pub mod error;
pub mod spec;
pub mod theta;
pub mod work;

/// The code generated from `proto/es/v1/es.proto` (package `underflow.es.v1`).
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("underflow.es.v1");
}

pub use error::ConversionError;
pub use spec::{NoiseSpec, RunSpec};
pub use theta::{
    DIGEST_LEN, Digest, EncodedTheta, digest_from_bytes, logits_digest, theta_digest,
    theta_from_bytes,
};
pub use work::{GoldenEval, GoldenProof};

/// Re-exported for the coordinator's `grpc.health.v1` service, so that its version always
/// matches the `tonic` of the generated code.
pub use tonic_health;

/// The version of the protocol this code speaks; every `JoinRequest` and `Prove` carries it,
/// and peers with another version refuse each other (`VERSION_MISMATCH`). Bump it (and the
/// package to `v2`) for any change an older peer would misread.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest message a server or client encodes or decodes (apply it with
/// `max_decoding_message_size` and `max_encoding_message_size` on both sides). θ of the
/// default network is 2.7 MB; 8 MiB leaves room for networks three times as large.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// The largest HTTP/2 DATA frame a server or client of the cluster accepts (apply it with
/// `max_frame_size` on both sides; the sender cuts its data to the receiver's setting).
/// HTTP/2's default, 16 KiB, cuts θ into 170 frames, each parsed, flow-controlled and
/// written on its own: at a root serving many hubs that framing, not the bytes, was most
/// of the cost of sending θ and receiving noise sums. 1 MiB makes it three.
pub const HTTP2_MAX_FRAME_BYTES: u32 = 1 << 20;

/// The longest host name a relay may be announced at (a DNS name's limit).
pub const MAX_HOST_CHARS: usize = 253;

/// Whether `host` could be a host name or an IP address to reach a relay at: at most
/// [`MAX_HOST_CHARS`] characters, none of them whitespace, control characters or the
/// `/@?#` that would turn "host:port" into something else. The empty string passes (callers
/// that need a host refuse it themselves).
pub fn plausible_host(host: &str) -> bool {
    host.len() <= MAX_HOST_CHARS
        && !host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/@?#".contains(c))
}

/// The most parameters a network of the cluster may have: θ travels in one `Generation`
/// message, which needs a few bytes besides θ's 4·D. [`RunSpec`]'s conversion from the wire
/// refuses larger networks; a coordinator can check its own spec by converting it there and
/// back.
pub const MAX_THETA_DIM: usize = (MAX_MESSAGE_BYTES - 4096) / 4;

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn default_theta_fits_the_message_limit() {
        let dim = es_kernel::ParamLayout::new(&es_kernel::NetConfig::default()).len();
        let theta = vec![-1.5f32; dim];
        let msg =
            pb::CoordinatorMessage::from(pb::Generation::with_theta(7, &EncodedTheta::new(&theta)));
        let len = msg.encoded_len();
        assert!(len > 4 * dim, "{len}");
        assert!(len < MAX_MESSAGE_BYTES / 2, "{len}");
    }

    #[test]
    fn the_service_has_its_package_name() {
        use pb::coordinator_server::SERVICE_NAME;
        assert_eq!(SERVICE_NAME, "underflow.es.v1.Coordinator");
    }
}
