//! θ as it travels (D little-endian f32 values, bit for bit) and the SHA-256 digests the
//! protocol uses to name θ, to prove logits and to check a worker's data.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::error::ConversionError;

/// Bytes in every digest of the protocol (SHA-256).
pub const DIGEST_LEN: usize = 32;

/// A SHA-256 digest.
pub type Digest = [u8; DIGEST_LEN];

/// A digest field from the wire, which must hold exactly [`DIGEST_LEN`] bytes.
pub fn digest_from_bytes(field: &'static str, bytes: &[u8]) -> Result<Digest, ConversionError> {
    bytes.try_into().map_err(|_| ConversionError::Length {
        field,
        got: bytes.len(),
        expected: DIGEST_LEN,
    })
}

/// θ encoded once for the wire: its bytes (shared, not copied, by every message that carries
/// them) and their digest, which names θ in `Generation.theta_digest`.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedTheta {
    bytes: Bytes,
    digest: Digest,
}

impl EncodedTheta {
    /// Encodes θ as little-endian f32 values, every bit preserved (−0.0, NaN payloads,
    /// denormals), and hashes the result.
    pub fn new(theta: &[f32]) -> Self {
        Self::shared(Arc::new(theta.to_vec()))
    }

    /// Encodes θ held in `theta` as [`EncodedTheta::new`] does, without copying it on a
    /// little-endian machine: the wire bytes are the values' own memory, kept alive by the
    /// `Arc` (a node that also keeps θ's values, to settle disputes, then holds one copy of
    /// θ instead of two, and a generation's start copies megabytes once, not twice).
    pub fn shared(theta: Arc<Vec<f32>>) -> Self {
        let bytes = le_bytes(theta);
        let digest = Sha256::digest(&bytes).into();
        EncodedTheta { bytes, digest }
    }

    /// SHA-256 of [`EncodedTheta::bytes`]; equal to [`theta_digest`] of the same θ.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The 4·D bytes, cheap to clone.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The number of parameters D.
    pub fn dim(&self) -> usize {
        self.bytes.len() / 4
    }
}

// θ is megabytes: show its size and name, not its bytes.
impl fmt::Debug for EncodedTheta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncodedTheta")
            .field("dim", &self.dim())
            .field("digest", &hex(&self.digest))
            .finish()
    }
}

/// θ from the wire: exactly `dim` little-endian f32 values, every bit preserved. Errors (for
/// field `theta`) if the length is not a multiple of 4 or not `4 · dim`.
pub fn theta_from_bytes(bytes: &[u8], dim: usize) -> Result<Vec<f32>, ConversionError> {
    f32s_from_bytes("theta", bytes, dim)
}

pub(crate) fn f32s_from_bytes(
    field: &'static str,
    bytes: &[u8],
    dim: usize,
) -> Result<Vec<f32>, ConversionError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(ConversionError::NotF32s {
            field,
            got: bytes.len(),
        });
    }
    let expected = dim.saturating_mul(4);
    if bytes.len() != expected {
        return Err(ConversionError::Length {
            field,
            got: bytes.len(),
            expected,
        });
    }
    Ok(f32s_from_le_bytes(bytes))
}

/// `values` as the wire's little-endian bytes, sharing their memory where the machine is
/// little-endian (the wire's order is then the memory's).
fn le_bytes(values: Arc<Vec<f32>>) -> Bytes {
    #[cfg(target_endian = "little")]
    {
        /// f32 values owned by [`Bytes`], seen as bytes.
        struct AsLeBytes(Arc<Vec<f32>>);
        impl AsRef<[u8]> for AsLeBytes {
            fn as_ref(&self) -> &[u8] {
                bytemuck::cast_slice(self.0.as_slice())
            }
        }
        Bytes::from_owner(AsLeBytes(values))
    }
    #[cfg(not(target_endian = "little"))]
    {
        f32s_to_le_bytes(&values)
    }
}

/// `values` copied into the wire's little-endian bytes.
pub(crate) fn f32s_to_le_bytes(values: &[f32]) -> Bytes {
    if cfg!(target_endian = "little") {
        // One copy of memory whose order is already the wire's.
        Bytes::copy_from_slice(bytemuck::cast_slice(values))
    } else {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// Little-endian f32 values from `bytes` (a multiple of 4 long, checked by the caller).
fn f32s_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    debug_assert!(bytes.len().is_multiple_of(4));
    if cfg!(target_endian = "little") {
        // One copy into fresh, aligned f32s (the wire's bytes need not be aligned).
        let mut values = vec![0f32; bytes.len() / 4];
        bytemuck::cast_slice_mut::<f32, u8>(&mut values).copy_from_slice(bytes);
        values
    } else {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
}

/// SHA-256 of θ's wire bytes (the little-endian f32 values), without building them: the
/// digest `Generation.theta_digest` names θ by.
pub fn theta_digest(theta: &[f32]) -> Digest {
    hash_f32s(theta, |v| v)
}

/// SHA-256 of logits as `GoldenEval.logits_digest` defines it: sample after sample, each f32
/// as 4 little-endian bytes, with −0.0 written as +0.0 and every NaN as `0x7FC0_0000`. Kernels
/// that skip zero inputs may differ in the sign of a zero (DESIGN.md §1) and NaN payloads
/// depend on operand order; nothing else may differ.
pub fn logits_digest(logits: &[f32]) -> Digest {
    hash_f32s(logits, |v| {
        if v == 0.0 {
            0.0
        } else if v.is_nan() {
            f32::from_bits(0x7FC0_0000)
        } else {
            v
        }
    })
}

fn hash_f32s(values: &[f32], canonical: impl Fn(f32) -> f32) -> Digest {
    const BLOCK: usize = 1024;
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 4 * BLOCK];
    for block in values.chunks(BLOCK) {
        for (out, &v) in buf.chunks_exact_mut(4).zip(block) {
            out.copy_from_slice(&canonical(v).to_bits().to_le_bytes());
        }
        hasher.update(&buf[..4 * block.len()]);
    }
    hasher.finalize().into()
}

/// A digest as 64 lower-case hex digits, for messages and logs.
pub(crate) fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values whose bits a careless conversion would lose: signed zeros, NaNs with payloads
    /// and signs, denormals, infinities, extremes.
    fn tricky() -> Vec<f32> {
        vec![
            0.0,
            -0.0,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7FC0_1234),  // quiet NaN with a payload
            f32::from_bits(0x7F80_0001),  // signalling NaN
            f32::from_bits(0xFFBF_FFFF),  // negative NaN, all payload bits
            f32::from_bits(1),            // smallest denormal
            -f32::from_bits(0x007F_FFFF), // largest negative denormal
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.0,
            -0.1,
            2f32.powi(-125),
        ]
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn theta_round_trips_every_bit() {
        let theta = tricky();
        let encoded = EncodedTheta::new(&theta);
        assert_eq!(encoded.dim(), theta.len());
        assert_eq!(encoded.bytes().len(), 4 * theta.len());
        let back = theta_from_bytes(encoded.bytes(), theta.len()).unwrap();
        assert_eq!(bits(&back), bits(&theta));
    }

    #[test]
    fn theta_is_little_endian() {
        let encoded = EncodedTheta::new(&[1.0, -0.0]);
        assert_eq!(&encoded.bytes()[..], &[0, 0, 0x80, 0x3F, 0, 0, 0, 0x80]);
    }

    #[test]
    fn empty_theta_round_trips() {
        let encoded = EncodedTheta::new(&[]);
        assert!(theta_from_bytes(encoded.bytes(), 0).unwrap().is_empty());
    }

    #[test]
    fn theta_length_errors() {
        let bytes = EncodedTheta::new(&[1.0, 2.0, 3.0]).bytes().clone();
        let e = theta_from_bytes(&bytes[..11], 3).unwrap_err();
        assert!(
            matches!(
                e,
                ConversionError::NotF32s {
                    field: "theta",
                    got: 11
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "theta has 11 bytes: expected a multiple of 4 (little-endian f32 values)"
        );
        let e = theta_from_bytes(&bytes, 4).unwrap_err();
        assert!(
            matches!(
                e,
                ConversionError::Length {
                    field: "theta",
                    got: 12,
                    expected: 16
                }
            ),
            "{e}"
        );
        assert!(theta_from_bytes(&bytes, 2).is_err());
    }

    #[test]
    fn theta_digest_is_sha256_of_the_wire_bytes() {
        // Longer than one hashing block, and not a multiple of it.
        let theta: Vec<f32> = (0..2500).map(|i| i as f32 * -0.37).collect();
        let encoded = EncodedTheta::new(&theta);
        let direct: Digest = Sha256::digest(encoded.bytes()).into();
        assert_eq!(*encoded.digest(), direct);
        assert_eq!(theta_digest(&theta), direct);
        // The digest of no values is SHA-256 of nothing.
        assert_eq!(
            hex(&theta_digest(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn theta_digest_sees_the_sign_of_zero() {
        assert_ne!(theta_digest(&[0.0]), theta_digest(&[-0.0]));
    }

    #[test]
    fn logits_digest_equates_signed_zeros_and_nans_only() {
        let a = [0.0, 1.5, f32::NAN, -2.0];
        let b = [-0.0, 1.5, f32::from_bits(0xFFC0_0001), -2.0];
        assert_eq!(logits_digest(&a), logits_digest(&b));
        assert_ne!(logits_digest(&a), logits_digest(&[0.0, 1.5, f32::NAN, 2.0]));
        // A denormal is not a zero.
        assert_ne!(logits_digest(&[0.0]), logits_digest(&[f32::from_bits(1)]));
        // Finite values hash exactly like θ.
        assert_eq!(logits_digest(&[1.5, -2.0]), theta_digest(&[1.5, -2.0]));
    }

    #[test]
    fn digests_round_trip_and_check_their_length() {
        let d = theta_digest(&[3.0]);
        assert_eq!(digest_from_bytes("theta_digest", &d).unwrap(), d);
        let e = digest_from_bytes("data_digest", &d[..31]).unwrap_err();
        assert!(
            matches!(
                e,
                ConversionError::Length {
                    field: "data_digest",
                    got: 31,
                    expected: 32
                }
            ),
            "{e}"
        );
        assert!(digest_from_bytes("data_digest", &[0; 33]).is_err());
        assert!(digest_from_bytes("data_digest", &[]).is_err());
    }

    #[test]
    fn debug_shows_the_name_not_the_bytes() {
        let text = format!("{:?}", EncodedTheta::new(&[0.0; 1000]));
        assert!(
            text.starts_with("EncodedTheta { dim: 1000, digest: \""),
            "{text}"
        );
        assert!(text.len() < 150, "{text}");
    }
}
