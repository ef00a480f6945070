//! Weight dtypes a model can be loaded at, what each costs per parameter, and the `--dtype`
//! flag that picks one per model.
//!
//! One type for the planner (`embedfleet plan`, which sizes models by dtype) and the runtime
//! (the registry, which loads them at it), so the two always agree on names and on what a model
//! may run at. How each architecture applies a dtype: `arch/projection.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::catalogue::{self, Architecture, ModelSpec};
use crate::error::ModelError;

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

    /// The float dtype the model's tensors (and so its activations) are loaded at: the dtype
    /// itself for f32/f16/bf16; f32 for the quantised ones, whose embeddings, norms and biases
    /// stay f32 and whose quantised matmul takes f32 input.
    pub fn activation_dtype(self) -> candle_core::DType {
        match self {
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
            Dtype::F32 | Dtype::Q8_0 | Dtype::Q4k => candle_core::DType::F32,
        }
    }

    /// Whether `spec` can run at this dtype: T5 overflows in f16 (its activations grow past
    /// 65,504 in the feed-forward blocks), so T5 encoders take bf16 instead.
    pub fn allowed_for(self, spec: &ModelSpec) -> bool {
        self.refusal_for(spec).is_none()
    }

    /// Why `spec` cannot run at this dtype, or `None` when it can.
    pub fn refusal_for(self, spec: &ModelSpec) -> Option<&'static str> {
        (self == Dtype::F16 && spec.architecture == Architecture::T5Encoder).then_some(
            "T5 activations grow past f16's range (65,504) in the feed-forward blocks; use bf16",
        )
    }

    /// [`Dtype::refusal_for`] as the typed error a load returns.
    pub fn check_for(self, spec: &ModelSpec) -> Result<(), ModelError> {
        match self.refusal_for(spec) {
            None => Ok(()),
            Some(reason) => Err(ModelError::UnsupportedDtype {
                model: spec.name.to_string(),
                dtype: self,
                reason: reason.to_string(),
            }),
        }
    }

    /// The revision a model loaded at this dtype reports, from its weights' revision. Cache keys
    /// carry the revision, so a q4k vector is never served under the f32 key. f32 keeps the bare
    /// revision: vectors cached before dtypes existed were f32 and stay valid.
    pub fn revision(self, weights_revision: &str) -> String {
        match self {
            Dtype::F32 => weights_revision.to_string(),
            other => format!("{weights_revision}+{other}"),
        }
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
    type Err = DtypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| DtypeError::UnknownDtype(s.to_string()))
    }
}

/// A `--dtype` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DtypeError {
    #[error("unknown dtype `{0}` (expected one of f32, f16, bf16, q8_0, q4k)")]
    UnknownDtype(String),
    #[error("unknown model `{name}` in --dtype (known: {known})")]
    UnknownModel { name: String, known: String },
    #[error("--dtype gives two defaults, `{0}` and `{1}`; name the models (`model=dtype`)")]
    TwoDefaults(Dtype, Dtype),
    #[error("--dtype names `{0}` twice")]
    Repeated(&'static str),
}

/// The dtype of each model a process loads: the `--dtype` flag. It is a comma-separated list
/// of `model=dtype` items and at most one bare `dtype`, the default for every model not named:
/// `q8_0`, `e5-mistral=q4k,sentence-t5-xxl=q8_0` (the form `embedfleet plan` prints and the
/// chart's `workerGroups[].dtype` passes), or both, `f32,e5-mistral=q4k`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelDtypes {
    /// For models not named; `None`: the device's default (see [`ModelDtypes::for_model`]).
    pub default: Option<Dtype>,
    pub per_model: BTreeMap<&'static str, Dtype>,
}

impl ModelDtypes {
    /// Every model at `dtype`.
    pub fn all(dtype: Dtype) -> Self {
        Self {
            default: Some(dtype),
            per_model: BTreeMap::new(),
        }
    }

    /// The dtype `spec` loads at: named, else the default, else the device's: f32 on a CPU (the
    /// packed f32 kernels), the plan's half precision (f16, T5 bf16) on a GPU.
    pub fn for_model(&self, spec: &ModelSpec, on_cpu: bool) -> Dtype {
        self.per_model
            .get(spec.name)
            .copied()
            .or(self.default)
            .unwrap_or(if on_cpu {
                Dtype::F32
            } else {
                Dtype::default_for(spec)
            })
    }
}

impl FromStr for ModelDtypes {
    type Err = DtypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut dtypes = ModelDtypes::default();
        for item in s.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            let Some((name, value)) = item.split_once('=') else {
                let dtype = item.parse()?;
                if let Some(first) = dtypes.default.replace(dtype) {
                    return Err(DtypeError::TwoDefaults(first, dtype));
                }
                continue;
            };
            let spec = catalogue::find(name.trim()).ok_or_else(|| DtypeError::UnknownModel {
                name: name.trim().to_string(),
                known: catalogue::names().collect::<Vec<_>>().join(", "),
            })?;
            if dtypes.per_model.insert(spec.name, value.parse()?).is_some() {
                return Err(DtypeError::Repeated(spec.name));
            }
        }
        Ok(dtypes)
    }
}

impl fmt::Display for ModelDtypes {
    /// The flag's own syntax, so a parsed value prints as it can be passed again.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .default
            .iter()
            .map(Dtype::to_string)
            .chain(self.per_model.iter().map(|(m, d)| format!("{m}={d}")))
            .collect();
        f.write_str(&items.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_an_error() {
        for dtype in Dtype::ALL {
            assert_eq!(dtype.as_str().parse::<Dtype>(), Ok(dtype));
        }
        assert_eq!(
            "int3".parse::<Dtype>(),
            Err(DtypeError::UnknownDtype("int3".into()))
        );
    }

    #[test]
    fn the_flag_takes_a_default_per_model_dtypes_or_both() {
        let mistral = catalogue::find("e5-mistral").unwrap();
        let minilm = catalogue::find("minilm").unwrap();
        let t5 = catalogue::find("sentence-t5-xxl").unwrap();

        let plain: ModelDtypes = "q8_0".parse().unwrap();
        assert_eq!(plain, ModelDtypes::all(Dtype::Q8_0));
        assert_eq!(plain.for_model(minilm, true), Dtype::Q8_0);

        // Exactly what the chart passes for a worker group (`--dtype=<group dtype>`).
        let chart: ModelDtypes = "e5-mistral=q4k,sentence-t5-xxl=q8_0".parse().unwrap();
        assert_eq!(chart.default, None);
        assert_eq!(chart.for_model(mistral, true), Dtype::Q4k);
        assert_eq!(chart.for_model(t5, false), Dtype::Q8_0);
        assert_eq!(chart.for_model(minilm, true), Dtype::F32);
        assert_eq!(chart.for_model(minilm, false), Dtype::F16);
        assert_eq!(chart.to_string().parse::<ModelDtypes>(), Ok(chart));

        let both: ModelDtypes = " f32 , e5-mistral=Q4K".parse().unwrap();
        assert_eq!(both.for_model(mistral, true), Dtype::Q4k);
        assert_eq!(both.for_model(minilm, false), Dtype::F32);
        assert_eq!("".parse::<ModelDtypes>(), Ok(ModelDtypes::default()));
    }

    #[test]
    fn bad_flags_are_typed_errors() {
        assert_eq!(
            "minilm=q2".parse::<ModelDtypes>(),
            Err(DtypeError::UnknownDtype("q2".into()))
        );
        assert!(matches!(
            "minilmm=q8_0".parse::<ModelDtypes>(),
            Err(DtypeError::UnknownModel { name, .. }) if name == "minilmm"
        ));
        assert_eq!(
            "f16,q8_0".parse::<ModelDtypes>(),
            Err(DtypeError::TwoDefaults(Dtype::F16, Dtype::Q8_0))
        );
        assert_eq!(
            "minilm=f16,minilm=q8_0".parse::<ModelDtypes>(),
            Err(DtypeError::Repeated("minilm"))
        );
    }

    #[test]
    fn only_f32_keeps_the_weights_revision() {
        assert_eq!(Dtype::F32.revision("local-ab12"), "local-ab12");
        let revisions: std::collections::HashSet<String> = Dtype::ALL
            .iter()
            .map(|d| d.revision("local-ab12"))
            .collect();
        assert_eq!(revisions.len(), Dtype::ALL.len());
        assert_eq!(Dtype::Q4k.revision("local-ab12"), "local-ab12+q4k");
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
