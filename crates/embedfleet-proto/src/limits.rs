//! Request size limits, checked before any model work starts.

use serde::{Deserialize, Serialize};

use crate::ProtoError;

/// Bounds on one request. The coordinator checks them so that a single client cannot take a
/// worker down or monopolise a batch ("bounded everything" in the design).
///
/// Fill with `..Default::default()`; deserialises from a config file with missing fields
/// defaulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RequestLimits {
    /// Most inputs in one request. Every input becomes up to one job per model, so this bounds
    /// the fan-out of a single request. Default 256.
    pub max_inputs: usize,
    /// Most bytes in one input after base64 decoding (text and code count their UTF-8 bytes), and
    /// in the instruction. Keeps a single image or audio clip from starving a batch. Default 1 MiB.
    pub max_input_bytes: usize,
    /// Most bytes in one encoded request payload, checked before decoding so that a huge payload
    /// costs no parsing. The NATS server's `max_payload` must be at least this (its default is
    /// 1 MiB). Default 8 MiB.
    pub max_payload_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_inputs: 256,
            max_input_bytes: 1 << 20,
            max_payload_bytes: 8 << 20,
        }
    }
}

impl RequestLimits {
    /// Rejects a payload of `len` bytes over [`RequestLimits::max_payload_bytes`] with
    /// [`crate::ErrorKind::TooLarge`]. Call it on the raw message before decoding.
    pub fn check_payload_len(&self, len: usize) -> Result<(), ProtoError> {
        if len > self.max_payload_bytes {
            return Err(ProtoError::too_large(format!(
                "payload is {len} bytes, the limit is {}",
                self.max_payload_bytes
            )));
        }
        Ok(())
    }

    /// Rejects a request with `count` inputs over [`RequestLimits::max_inputs`].
    pub(crate) fn check_input_count(&self, count: usize) -> Result<(), ProtoError> {
        if count > self.max_inputs {
            return Err(ProtoError::too_large(format!(
                "{count} inputs, the limit is {}",
                self.max_inputs
            )));
        }
        Ok(())
    }

    /// Rejects one input (or the instruction) of `len` bytes over
    /// [`RequestLimits::max_input_bytes`]; `what` names it in the message.
    pub(crate) fn check_input_len(&self, what: &str, len: usize) -> Result<(), ProtoError> {
        if len > self.max_input_bytes {
            return Err(ProtoError::too_large(format!(
                "{what} is {len} bytes, the limit is {}",
                self.max_input_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn payload_limit_is_inclusive() {
        let limits = RequestLimits {
            max_payload_bytes: 10,
            ..Default::default()
        };
        assert!(limits.check_payload_len(10).is_ok());
        let err = limits.check_payload_len(11).expect_err("11 > 10");
        assert_eq!((err.kind, err.code()), (ErrorKind::TooLarge, 413));
    }

    #[test]
    fn missing_config_fields_take_defaults() {
        let limits: RequestLimits =
            serde_json::from_str(r#"{"max_inputs": 8}"#).expect("decode limits");
        assert_eq!(limits.max_inputs, 8);
        assert_eq!(
            limits.max_input_bytes,
            RequestLimits::default().max_input_bytes
        );
    }
}
