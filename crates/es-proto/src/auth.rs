//! The cluster's shared [`Token`] and the [`RequireToken`] interceptor that checks it on every
//! call of a service: the coordinator's, and the `ThetaRelay` a worker offers to others.
//!
//! The token travels as gRPC metadata, `authorization: Bearer <token>` ([`AUTHORIZATION_KEY`]).
//! It is compared in constant time, as SHA-256 digests, so that neither its bytes nor its
//! length leak through timing. A call without it or with another one gets `UNAUTHENTICATED`
//! before its body is read, and the attempt is logged with the peer's address; the token
//! itself is never logged (its `Debug` is redacted).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
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
                "missing token: this service requires the cluster's shared token as \
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
    }

    #[test]
    fn tokens_are_visible_ascii() {
        assert!(matches!(Token::new(""), Err(TokenError::Empty)));
        assert!(matches!(Token::new("a b"), Err(TokenError::Invalid)));
        assert!(matches!(Token::new("é"), Err(TokenError::Invalid)));
        let dir = std::env::temp_dir().join(format!("es-proto-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "from-a-secret\n").unwrap();
        assert_eq!(Token::from_file(&path).unwrap().expose(), "from-a-secret");
        assert!(matches!(
            Token::from_file(&dir.join("missing")),
            Err(TokenError::File { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
