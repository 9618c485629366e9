//! Who may talk to the coordinator: the cluster's shared [`Token`], required on every call of
//! the `Coordinator` service by the [`RequireToken`] interceptor; TLS ([`ServerTls`]),
//! optionally mutual; and the rule that a coordinator reachable from other machines does not
//! start without one of the two ([`check_exposure`]).
//!
//! The token travels as gRPC metadata, `authorization: Bearer <token>` (what
//! `es_worker::AUTHORIZATION_KEY` sends). It is compared in constant time, as SHA-256
//! digests, so that neither its bytes nor its length leak through timing. A call without it
//! or with another one gets `UNAUTHENTICATED` before its body is read, and the attempt is
//! logged with the peer's address; the token itself is never logged (its `Debug` is
//! redacted).
//!
//! The `grpc.health.v1` service is not behind the token: it says only whether the coordinator
//! serves, and Kubernetes probes cannot present a token.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The metadata key that carries the token; its value is `Bearer <token>`.
pub const AUTHORIZATION_KEY: &str = "authorization";

/// The cluster's shared secret. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is empty: expected at least one character")]
    Empty,
    #[error(
        "the token has a character that cannot travel as gRPC metadata: expected visible ASCII characters without spaces"
    )]
    Invalid,
    #[error("cannot read the token file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Token {
    /// The token `secret`: visible ASCII without spaces, as gRPC metadata requires.
    pub fn new(secret: &str) -> Result<Token, TokenError> {
        if secret.is_empty() {
            return Err(TokenError::Empty);
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Invalid);
        }
        Ok(Token(secret.into()))
    }

    /// The token in the file at `path` (a mounted secret), without surrounding whitespace.
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::File {
            path: path.to_path_buf(),
            source,
        })?;
        Token::new(text.trim())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Token {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Token, TokenError> {
        Token::new(s)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The interceptor in front of the `Coordinator` service: with a token, every call must carry
/// it; without one, every call passes.
#[derive(Clone)]
pub struct RequireToken {
    /// SHA-256 of the expected metadata value, `Bearer <token>`.
    expected: Option<[u8; 32]>,
}

impl RequireToken {
    pub fn new(token: Option<&Token>) -> RequireToken {
        RequireToken {
            expected: token.map(|t| digest(format!("Bearer {}", t.expose()).as_bytes())),
        }
    }
}

impl fmt::Debug for RequireToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireToken")
            .field("enabled", &self.expected.is_some())
            .finish()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let presented = request.metadata().get(AUTHORIZATION_KEY);
        let matches =
            presented.is_some_and(|value| bool::from(digest(value.as_bytes()).ct_eq(expected)));
        if matches {
            return Ok(request);
        }
        let peer = request.remote_addr();
        let (credential, message) = match presented {
            None => (
                "missing",
                "missing token: this coordinator requires the cluster's shared token as \
                 `authorization: Bearer <token>` metadata (worker --token, --token-file or \
                 UNDERFLOW_TOKEN)",
            ),
            Some(_) => (
                "wrong",
                "wrong token: the `authorization` metadata does not hold the cluster's shared \
                 token; give the worker the coordinator's token (worker --token, --token-file or \
                 UNDERFLOW_TOKEN)",
            ),
        };
        tracing::warn!(?peer, credential, "refused an unauthenticated call");
        Err(Status::unauthenticated(message))
    }
}

/// The coordinator's TLS identity (PEM certificate chain and private key) and, for mutual
/// TLS, the CA that signs the workers' certificates. Its `Debug` leaves out the key.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// With a client CA, every connection must present a certificate it signed.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl ServerTls {
    /// Reads the PEM files; `client_ca` enables mutual TLS.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> std::io::Result<ServerTls> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
            })
        };
        Ok(ServerTls {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: client_ca.map(read).transpose()?,
        })
    }

    /// tonic's configuration of this identity, with a deadline on each handshake so that a
    /// connection that never finishes one holds nothing for long.
    pub fn config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(std::time::Duration::from_secs(10));
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }

    pub fn mutual(&self) -> bool {
        self.client_ca_pem.is_some()
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_pem_bytes", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .field("mutual", &self.mutual())
            .finish()
    }
}

/// Refuses to serve on `addr` unauthenticated: an address other than loopback needs a token
/// or mutual TLS, unless the operator said `insecure` (e.g. a private network of its own).
pub fn check_exposure(
    addr: SocketAddr,
    token: bool,
    mutual_tls: bool,
    insecure: bool,
) -> Result<(), String> {
    if addr.ip().is_loopback() || token || mutual_tls || insecure {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {addr} without authentication: anyone who reaches it could read \
         the parameters and steer the run; give the cluster a shared token (--token, \
         --token-file or UNDERFLOW_TOKEN) or mutual TLS (--tls-client-ca), or --insecure to \
         serve unauthenticated anyway"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn call(interceptor: &mut RequireToken, header: Option<&str>) -> Result<(), Status> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert(AUTHORIZATION_KEY, MetadataValue::try_from(h).unwrap());
        }
        interceptor.call(request).map(drop)
    }

    #[test]
    fn the_interceptor_lets_only_the_right_token_through() {
        let token = Token::new("s3cret-Token").unwrap();
        let mut require = RequireToken::new(Some(&token));
        assert!(call(&mut require, Some("Bearer s3cret-Token")).is_ok());
        let missing = call(&mut require, None).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().starts_with("missing token"), "{missing}");
        for wrong in [
            "Bearer s3cret-Toke",
            "Bearer s3cret-Token2",
            "bearer s3cret-Token",
            "s3cret-Token",
            "",
        ] {
            let e = call(&mut require, Some(wrong)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{wrong:?}");
            assert!(e.message().starts_with("wrong token"), "{e}");
        }
        let mut open = RequireToken::new(None);
        assert!(call(&mut open, None).is_ok());
        assert!(call(&mut open, Some("Bearer anything")).is_ok());
    }

    #[test]
    fn tokens_never_show_in_debug_output() {
        let token = Token::new("hunter2").unwrap();
        let shown = format!("{token:?} {:?}", RequireToken::new(Some(&token)));
        assert!(!shown.contains("hunter2"), "{shown}");
        let tls = ServerTls {
            cert_pem: b"CERT".to_vec(),
            key_pem: b"PRIVATE KEY hunter2".to_vec(),
            client_ca_pem: None,
        };
        assert!(!format!("{tls:?}").contains("hunter2"));
    }

    #[test]
    fn tokens_are_visible_ascii() {
        assert!(matches!(Token::new(""), Err(TokenError::Empty)));
        assert!(matches!(Token::new("a b"), Err(TokenError::Invalid)));
        assert!(matches!(Token::new("é"), Err(TokenError::Invalid)));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-a-secret\n").unwrap();
        assert_eq!(Token::from_file(&path).unwrap().expose(), "from-a-secret");
        assert!(matches!(
            Token::from_file(&dir.path().join("missing")),
            Err(TokenError::File { .. })
        ));
    }

    #[test]
    fn only_loopback_may_serve_unauthenticated() {
        let public: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let e = check_exposure(public, false, false, false).unwrap_err();
        assert!(e.contains("--insecure"), "{e}");
        assert!(check_exposure(public, true, false, false).is_ok());
        assert!(check_exposure(public, false, true, false).is_ok());
        assert!(check_exposure(public, false, false, true).is_ok());
        for local in ["127.0.0.1:1", "[::1]:1"] {
            assert!(check_exposure(local.parse().unwrap(), false, false, false).is_ok());
        }
    }
}
