//! The four kinds of input the fleet embeds.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ProtoError;

/// The kind of an input. Models declare which modalities they take; fusion zero-fills and masks
/// the partials of models that do not take an input's modality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    /// Natural-language text.
    Text,
    /// Source code, optionally with its language.
    Code,
    /// An encoded image (png, jpeg, ...).
    Image,
    /// Audio samples or an encoded audio file.
    Audio,
}

impl Modality {
    /// Every modality, in declaration order.
    pub const ALL: [Modality; 4] = [
        Modality::Text,
        Modality::Code,
        Modality::Image,
        Modality::Audio,
    ];

    /// The wire name, identical to the serde form.
    pub const fn as_str(self) -> &'static str {
        match self {
            Modality::Text => "text",
            Modality::Code => "code",
            Modality::Image => "image",
            Modality::Audio => "audio",
        }
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Modality {
    type Err = ProtoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Modality::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| ProtoError::bad_request(format!("unknown modality `{s}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_display_and_fromstr() {
        for m in Modality::ALL {
            let json = serde_json::to_string(&m).expect("serialise modality");
            assert_eq!(json, format!("\"{m}\""));
            assert_eq!(serde_json::from_str::<Modality>(&json).ok(), Some(m));
            assert_eq!(m.to_string().parse::<Modality>(), Ok(m));
        }
        assert!("video".parse::<Modality>().is_err());
    }
}
