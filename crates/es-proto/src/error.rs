//! The one error of the conversions from the wire: which field, and what was expected.

use es_core::train::TrainError;
use es_kernel::ConfigError;

/// A message that does not convert into the core's types. `field` is the field's path in the
/// message as the `.proto` names it (e.g. `spec.net.hidden`), so a peer can be told exactly what
/// it got wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConversionError {
    #[error("{field} is missing: expected {expected}")]
    Missing {
        field: &'static str,
        expected: &'static str,
    },
    #[error("{field} has {got} bytes: expected {expected}")]
    Length {
        field: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{field} has {got} bytes: expected a multiple of 4 (little-endian f32 values)")]
    NotF32s { field: &'static str, got: usize },
    #[error("{field} is {value}: expected {expected}")]
    Value {
        field: &'static str,
        value: String,
        expected: String,
    },
    #[error("{field} has digest {announced}, but its bytes hash to {computed}: expected equal")]
    DigestMismatch {
        field: &'static str,
        announced: String,
        computed: String,
    },
    #[error("{field} does not describe a network: {source}")]
    Net {
        field: &'static str,
        #[source]
        source: ConfigError,
    },
    #[error("{field} is not a valid ES configuration: {source}")]
    Es {
        field: &'static str,
        #[source]
        source: TrainError,
    },
}

impl ConversionError {
    /// The path of the offending field.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Missing { field, .. }
            | Self::Length { field, .. }
            | Self::NotF32s { field, .. }
            | Self::Value { field, .. }
            | Self::DigestMismatch { field, .. }
            | Self::Net { field, .. }
            | Self::Es { field, .. } => field,
        }
    }

    pub(crate) fn value(
        field: &'static str,
        value: impl ToString,
        expected: impl Into<String>,
    ) -> Self {
        Self::Value {
            field,
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// A malformed message is the peer's fault: `INVALID_ARGUMENT`, with the message in words.
impl From<ConversionError> for tonic::Status {
    fn from(e: ConversionError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// A `u64` size from the wire as a `usize` (it may not fit on a 32-bit host).
pub(crate) fn to_usize(field: &'static str, value: u64) -> Result<usize, ConversionError> {
    usize::try_from(value).map_err(|_| ConversionError::value(field, value, "a size of this host"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_field() {
        let e = ConversionError::Length {
            field: "data_digest",
            got: 31,
            expected: 32,
        };
        assert_eq!(e.to_string(), "data_digest has 31 bytes: expected 32");
        assert_eq!(e.field(), "data_digest");
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "data_digest has 31 bytes: expected 32");
    }
}
