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
use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

pub use es_proto::auth::{AUTHORIZATION_KEY, RequireToken, Token, TokenError};

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

    #[test]
    fn tls_keys_never_show_in_debug_output() {
        let tls = ServerTls {
            cert_pem: b"CERT".to_vec(),
            key_pem: b"PRIVATE KEY hunter2".to_vec(),
            client_ca_pem: None,
        };
        assert!(!format!("{tls:?}").contains("hunter2"));
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
