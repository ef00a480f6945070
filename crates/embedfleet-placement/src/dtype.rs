//! Weight dtypes a worker can load a model at, and what each costs per parameter.

use std::fmt;
use std::str::FromStr;

use embedfleet_models::catalogue::{Architecture, ModelSpec};
use serde::{Deserialize, Serialize};

/// How a model's weights are held on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    /// GGML Q8_0: blocks of 32 weights, one f16 scale each (34 bytes / 32 weights).
    Q8_0,
    /// GGML Q4_K: super-blocks of 256 weights (144 bytes / 256 weights).
    Q4k,
}

impl Dtype {
    pub const ALL: [Dtype; 5] = [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::Q8_0, Dtype::Q4k];

    /// Bytes per weight of a quantised or plain linear layer.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Dtype::F32 => 4.0,
            Dtype::F16 | Dtype::Bf16 => 2.0,
            Dtype::Q8_0 => 34.0 / 32.0,
            Dtype::Q4k => 144.0 / 256.0,
        }
    }

    /// Bytes per activation value while this model runs: half-precision models compute in half
    /// precision; f32 and quantised ones (candle's quantised matmul takes f32 activations) in f32.
    pub fn activation_bytes(self) -> u64 {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 | Dtype::Q8_0 | Dtype::Q4k => 4,
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, Dtype::Q8_0 | Dtype::Q4k)
    }

    /// Whether `spec` can run at this dtype: T5 overflows in f16 (its activations grow past
    /// 65,504 in the feed-forward blocks), so T5 encoders take bf16 instead.
    pub fn allowed_for(self, spec: &ModelSpec) -> bool {
        !(self == Dtype::F16 && spec.architecture == Architecture::T5Encoder)
    }

    /// The half-precision dtype a model runs at by default: f16, or bf16 where f16 is refused.
    pub fn default_for(spec: &ModelSpec) -> Dtype {
        if Dtype::F16.allowed_for(spec) {
            Dtype::F16
        } else {
            Dtype::Bf16
        }
    }

    /// The next smaller dtype to try when a plan does not fit: half → q8_0 → q4k.
    pub fn smaller(self) -> Option<Dtype> {
        match self {
            Dtype::F32 => Some(Dtype::F16),
            Dtype::F16 | Dtype::Bf16 => Some(Dtype::Q8_0),
            Dtype::Q8_0 => Some(Dtype::Q4k),
            Dtype::Q4k => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::Q8_0 => "q8_0",
            Dtype::Q4k => "q4k",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown dtype `{s}` (expected one of f32, f16, bf16, q8_0, q4k)")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedfleet_models::catalogue;

    #[test]
    fn names_round_trip_and_unknown_is_an_error() {
        for dtype in Dtype::ALL {
            assert_eq!(dtype.as_str().parse::<Dtype>(), Ok(dtype));
        }
        assert!("int3".parse::<Dtype>().unwrap_err().contains("int3"));
    }

    #[test]
    fn t5_runs_in_bf16_not_f16() {
        let t5 = catalogue::find("sentence-t5-xxl").unwrap();
        let bert = catalogue::find("bge-large").unwrap();
        assert!(!Dtype::F16.allowed_for(t5));
        assert_eq!(Dtype::default_for(t5), Dtype::Bf16);
        assert_eq!(Dtype::default_for(bert), Dtype::F16);
    }

    #[test]
    fn the_ladder_only_goes_down() {
        let mut dtype = Dtype::F32;
        let mut seen = vec![dtype];
        while let Some(next) = dtype.smaller() {
            assert!(next.bytes_per_weight() < dtype.bytes_per_weight());
            dtype = next;
            seen.push(dtype);
        }
        assert_eq!(seen, [Dtype::F32, Dtype::F16, Dtype::Q8_0, Dtype::Q4k]);
    }
}
