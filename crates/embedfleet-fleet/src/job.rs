//! What the roles say to each other: a [`ModelJob`] (coordinator → JetStream → model worker) and
//! a [`PartialResult`] (model worker → the job's partial subject → coordinator).
//!
//! Both travel as MessagePack with named fields. They are internal to a fleet, but a rolling
//! upgrade runs old and new processes side by side, so fields are only ever added, with serde
//! defaults, never renamed or repurposed; an incompatible change gets new subjects (`v2`).

use serde::{Deserialize, Serialize};

use embedfleet_proto::{ErrorKind, Input, InputType, ProtoError};

/// Prefix of the subjects partials come back on: `embedfleet.v1.partial.<coordinator>.<job>`.
/// A coordinator subscribes once to its own `embedfleet.v1.partial.<coordinator>.>` and routes by
/// job id, rather than one subscription per job.
pub const PARTIAL_SUBJECT_PREFIX: &str = "embedfleet.v1.partial";

/// The subject a coordinator instance subscribes to for all of its jobs' partials.
pub fn partial_wildcard(coordinator_id: &str) -> String {
    format!("{PARTIAL_SUBJECT_PREFIX}.{coordinator_id}.>")
}

/// The partial subject of one job.
pub fn partial_subject(coordinator_id: &str, job_id: u64) -> String {
    format!("{PARTIAL_SUBJECT_PREFIX}.{coordinator_id}.{job_id}")
}

/// Whether `subject` is a partial subject a worker may publish to:
/// `embedfleet.v1.partial.<coordinator>.<job>`, two plain tokens after the fleet's prefix. A job
/// naming anything else is refused, so a job published by anyone who can write to the job
/// stream cannot make workers publish onto arbitrary subjects (another service's, `$JS.API...`).
pub fn is_partial_subject(subject: &str) -> bool {
    let Some(rest) = subject
        .strip_prefix(PARTIAL_SUBJECT_PREFIX)
        .and_then(|rest| rest.strip_prefix('.'))
    else {
        return false;
    };
    let tokens: Vec<&str> = rest.split('.').collect();
    tokens.len() == 2
        && tokens.iter().all(|token| {
            !token.is_empty()
                && !token.contains(['*', '>'])
                && !token.chars().any(char::is_whitespace)
        })
}

/// One model's share of one request: the inputs the cache could not answer for this model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelJob {
    /// Unique within the coordinator that published it; echoed in the partial.
    pub job_id: u64,
    /// Catalogue name; also the last token of the subject the job was published on.
    pub model: String,
    /// The inputs, in the order the partial answers them.
    pub inputs: Vec<Input>,
    /// The instruction as this model reads it: blank mapped to `None`, and `None` for models
    /// that ignore instructions (`Prompting::effective`), so their jobs batch together.
    #[serde(default)]
    pub instruction: Option<String>,
    /// Query or document, as this model reads it (`document` for models that ignore it).
    /// Defaulted so that jobs from a coordinator older than the field still decode.
    #[serde(default)]
    pub input_type: InputType,
    /// Cut over-long text (true) or fail the job with `input_too_long` (false).
    pub truncate: bool,
    /// Where the worker publishes the [`PartialResult`].
    pub reply_to: String,
    /// Unix time in milliseconds after which nobody waits for the answer. A worker acks such a
    /// job without running it, so a backlog left by a dead fleet never costs compute.
    pub deadline_unix_ms: u64,
}

/// A worker's answer to a [`ModelJob`].
///
/// Vectors are the model's raw pooled output, never normalised: the coordinator normalises per
/// request, so one cached partial serves both `normalize: true` and `false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialResult {
    pub job_id: u64,
    pub model: String,
    /// The weights that produced the vectors (part of every cache key).
    pub revision: String,
    pub outcome: PartialOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PartialOutcome {
    /// One entry per job input, in job order.
    Vectors(Vec<PartialVector>),
    /// The job failed for good (bad input, or retries exhausted); the request gets this error.
    Failed(JobFailure),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialVector {
    /// Sent as one MessagePack bin of little-endian f32s: a copy each way, where an array costs
    /// a tagged element per float to write and to parse (a partial carries inputs × width of them).
    #[serde(with = "f32_le_bytes")]
    pub vector: Vec<f32>,
    /// Tokens the model read (feeds `usage`).
    pub tokens: u32,
}

/// A wire error carried from a worker back to the request it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFailure {
    /// [`ErrorKind::code`]-style kind name (`input_too_long`, `internal`, ...).
    pub kind: ErrorKind,
    pub message: String,
    /// Index of the failing input within the job, when one input is to blame.
    #[serde(default)]
    pub input: Option<usize>,
}

impl JobFailure {
    pub fn into_proto(self) -> ProtoError {
        ProtoError::new(self.kind, self.message)
    }
}

/// Serde adapter: a `Vec<f32>` as bytes, little-endian.
mod f32_le_bytes {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(vector: &[f32], serializer: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
        serializer.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f32>, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        if bytes.len() % 4 != 0 {
            return Err(D::Error::custom(format!(
                "a vector of {} bytes is not whole f32s",
                bytes.len()
            )));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

/// Encodes a role-to-role message. MessagePack with field names (`to_vec_named`), so fields can
/// be added without breaking older readers.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("fleet messages always serialise")
}

/// Decodes a role-to-role message.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// Milliseconds since the Unix epoch, the unit of [`ModelJob::deadline_unix_ms`].
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_and_partial_round_trip() {
        let job = ModelJob {
            job_id: 7,
            model: "minilm".into(),
            inputs: vec![Input::Text("hello".into())],
            instruction: None,
            input_type: InputType::Query,
            truncate: true,
            reply_to: partial_subject("c1", 7),
            deadline_unix_ms: 1,
        };
        assert_eq!(decode::<ModelJob>(&encode(&job)).unwrap(), job);
        let partial = PartialResult {
            job_id: 7,
            model: "minilm".into(),
            revision: "abc".into(),
            outcome: PartialOutcome::Failed(JobFailure {
                kind: ErrorKind::InputTooLong,
                message: "too long".into(),
                input: Some(0),
            }),
        };
        assert_eq!(decode::<PartialResult>(&encode(&partial)).unwrap(), partial);
        assert!(partial_subject("c1", 7).starts_with(partial_wildcard("c1").trim_end_matches('>')));
    }

    #[test]
    fn only_partial_subjects_are_reply_subjects() {
        assert!(is_partial_subject(&partial_subject("123-abc", 7)));
        for bad in [
            "embedfleet.v1.embed",
            "$JS.API.STREAM.DELETE.EMBEDFLEET_JOBS",
            "embedfleet.v1.partial",
            "embedfleet.v1.partial.c1",
            "embedfleet.v1.partial.c1.7.extra",
            "embedfleet.v1.partial.c1.*",
            "embedfleet.v1.partial.>",
            "embedfleet.v1.partialx.c1.7",
            "embedfleet.v1.partial..7",
        ] {
            assert!(!is_partial_subject(bad), "{bad}");
        }
    }

    #[test]
    fn partial_vectors_travel_as_exact_little_endian_bytes() {
        let vector = vec![1.0f32, -0.0, f32::MIN_POSITIVE, 3.25e-7, f32::MAX];
        let partial = PartialResult {
            job_id: 1,
            model: "mpnet".into(),
            revision: "r".into(),
            outcome: PartialOutcome::Vectors(vec![PartialVector {
                vector: vector.clone(),
                tokens: 5,
            }]),
        };
        let bytes = encode(&partial);
        let le: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
        // One bin of 20 bytes: 0xc4, length, the floats' bytes.
        let bin: Vec<u8> = [0xc4, 20].into_iter().chain(le).collect();
        assert!(bytes.windows(bin.len()).any(|w| w == bin), "{bytes:x?}");
        let back: PartialResult = decode(&bytes).unwrap();
        let PartialOutcome::Vectors(vectors) = back.outcome else {
            panic!("{:?}", back.outcome);
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&vectors[0].vector), bits(&vector));
    }

    #[test]
    fn a_vector_of_partial_floats_is_refused() {
        #[derive(Serialize)]
        struct Odd {
            #[serde(with = "serde_bytes")]
            vector: Vec<u8>,
            tokens: u32,
        }
        let bytes = encode(&Odd {
            vector: vec![0; 6],
            tokens: 1,
        });
        let error = decode::<PartialVector>(&bytes).unwrap_err().to_string();
        assert!(error.contains("not whole f32s"), "{error}");
    }
}
