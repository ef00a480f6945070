//! Packed (padding-free) batches and the attention that runs over them.
//!
//! A padded batch spends most of its matrix products on padding when lengths vary, which they
//! always do in an embedding service. Here every token of every sequence is one row of a
//! `[total_tokens, hidden]` matrix: the linear layers (nearly all the FLOPs) run once over real
//! tokens only, and attention, the one place sequences must not mix, walks each sequence's own
//! rows. This is what text-embeddings-inference does on GPUs with varlen flash attention; on CPU
//! it is the difference between trailing PyTorch and passing it.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// Token ids of several sequences laid end to end, with where each sequence starts.
#[derive(Debug, Clone)]
pub struct PackedBatch {
    /// All token ids, sequence after sequence.
    pub ids: Vec<u32>,
    /// `offsets[s]..offsets[s + 1]` are sequence `s`'s rows; `offsets.len()` is sequences + 1.
    pub offsets: Vec<usize>,
}

impl PackedBatch {
    pub fn new<S: AsRef<[u32]>>(sequences: &[S]) -> Self {
        let mut offsets = Vec::with_capacity(sequences.len() + 1);
        offsets.push(0);
        let mut ids = Vec::with_capacity(sequences.iter().map(|s| s.as_ref().len()).sum());
        for sequence in sequences {
            ids.extend_from_slice(sequence.as_ref());
            offsets.push(ids.len());
        }
        Self { ids, offsets }
    }

    pub fn sequences(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    pub fn len_of(&self, sequence: usize) -> usize {
        self.offsets[sequence + 1] - self.offsets[sequence]
    }

    pub fn max_len(&self) -> usize {
        (0..self.sequences())
            .map(|s| self.len_of(s))
            .max()
            .unwrap_or(0)
    }

    /// Position of every token within its own sequence, plus `start` (RoBERTa-style checkpoints
    /// count positions from `padding_idx + 1`).
    pub fn positions(&self, start: u32) -> Vec<u32> {
        let mut positions = Vec::with_capacity(self.tokens());
        for s in 0..self.sequences() {
            positions.extend((0..self.len_of(s) as u32).map(|p| p + start));
        }
        positions
    }

    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_slice(&self.ids, self.tokens(), device)
    }

    /// `[sequences, tokens]` matrix whose product with the hidden states is each sequence's mean.
    pub fn mean_pooling_matrix(&self, device: &Device) -> Result<Tensor> {
        let (rows, cols) = (self.sequences(), self.tokens());
        let mut weights = vec![0f32; rows * cols];
        for s in 0..rows {
            let (start, end) = (self.offsets[s], self.offsets[s + 1]);
            let weight = 1.0 / (end - start) as f32;
            weights[s * cols + start..s * cols + end].fill(weight);
        }
        Tensor::from_vec(weights, (rows, cols), device)
    }

    /// Row index of each sequence's first token.
    pub fn first_rows(&self, device: &Device) -> Result<Tensor> {
        let rows: Vec<u32> = self.offsets[..self.sequences()]
            .iter()
            .map(|&o| o as u32)
            .collect();
        Tensor::from_vec(rows, self.sequences(), device)
    }

    /// For a `[sequences, max_len]` padded layout: the packed row each slot takes, or
    /// `pad_row` for slots past a sequence's end.
    pub fn padded_rows(&self, pad_row: u32) -> Vec<u32> {
        let len = self.max_len();
        let mut rows = vec![pad_row; self.sequences() * len];
        for s in 0..self.sequences() {
            for (p, row) in rows[s * len..][..self.len_of(s)].iter_mut().enumerate() {
                *row = (self.offsets[s] + p) as u32;
            }
        }
        rows
    }

    /// The inverse of [`Self::padded_rows`]: for each packed row, its slot in the padded layout.
    pub fn unpadded_slots(&self) -> Vec<u32> {
        let len = self.max_len();
        (0..self.sequences())
            .flat_map(|s| (0..self.len_of(s)).map(move |p| (s * len + p) as u32))
            .collect()
    }

    /// The sequences `range` as a batch of their own, for running a large batch in parts.
    pub fn slice(&self, range: std::ops::Range<usize>) -> PackedBatch {
        let (start, end) = (self.offsets[range.start], self.offsets[range.end]);
        PackedBatch {
            ids: self.ids[start..end].to_vec(),
            offsets: self.offsets[range.start..=range.end]
                .iter()
                .map(|o| o - start)
                .collect(),
        }
    }

    /// Consecutive runs of sequences whose padded score tensors (`heads × count × max_len²`)
    /// stay within `budget` elements; a sequence too long for the budget alone gets a run.
    pub fn groups_within(&self, heads: usize, budget: usize) -> Vec<std::ops::Range<usize>> {
        let mut groups = Vec::new();
        let (mut start, mut longest) = (0, 0);
        for s in 0..self.sequences() {
            let candidate = longest.max(self.len_of(s));
            if s > start && heads * (s + 1 - start) * candidate * candidate > budget {
                groups.push(start..s);
                start = s;
                longest = self.len_of(s);
            } else {
                longest = candidate;
            }
        }
        if start < self.sequences() {
            groups.push(start..self.sequences());
        }
        groups
    }

    /// Row index of each sequence's last token.
    pub fn last_rows(&self, device: &Device) -> Result<Tensor> {
        let rows: Vec<u32> = self.offsets[1..].iter().map(|&o| o as u32 - 1).collect();
        Tensor::from_vec(rows, self.sequences(), device)
    }
}

/// An additive attention bias that depends only on the key's offset from the query (MPNet's
/// bucketed relative positions). `values[bucket * heads + head]`.
pub struct RelativeBias<'a> {
    pub values: &'a [f32],
    pub heads: usize,
    /// Bucket of each relative offset `key - query`, indexed by `offset + max_offset`.
    pub bucket_of_offset: &'a [usize],
    pub max_offset: usize,
}

impl RelativeBias<'_> {
    #[inline]
    fn get(&self, head: usize, query: usize, key: usize) -> f32 {
        let offset = key + self.max_offset - query;
        self.values[self.bucket_of_offset[offset] * self.heads + head]
    }
}

/// Multi-head self-attention over a packed batch.
///
/// `qkv` is `[tokens, 3 * hidden]`: each row holds the query, key and value projections of one
/// token, heads side by side within each. Returns the context, `[tokens, hidden]`.
pub fn packed_attention(
    qkv: &Tensor,
    batch: &PackedBatch,
    heads: usize,
    bias: Option<&RelativeBias>,
) -> Result<Tensor> {
    match qkv.device() {
        Device::Cpu if qkv.dtype() == DType::F32 => packed_attention_cpu(qkv, batch, heads, bias),
        _ => packed_attention_tensor_ops(qkv, batch, heads, bias),
    }
}

/// The CPU kernel: one pass per output row, all heads, reading keys and values straight out of
/// the packed projection. No padding, no mask, no `[batch, heads, len, len]` tensor.
fn packed_attention_cpu(
    qkv: &Tensor,
    batch: &PackedBatch,
    heads: usize,
    bias: Option<&RelativeBias>,
) -> Result<Tensor> {
    let (tokens, width) = qkv.dims2()?;
    let values = qkv.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let context = packed_attention_f32(&values, width / 3, batch, heads, bias);
    Tensor::from_vec(context, (tokens, width / 3), &Device::Cpu)
}

/// The CPU kernel on plain slices: `qkv` is `[tokens, 3 * hidden]` row-major, the result
/// `[tokens, hidden]`. The CPU encoder layer calls this directly, with no tensor round trip.
pub fn packed_attention_f32(
    qkv: &[f32],
    hidden: usize,
    batch: &PackedBatch,
    heads: usize,
    bias: Option<&RelativeBias>,
) -> Vec<f32> {
    let tokens = batch.tokens();
    let width = 3 * hidden;
    let head_dim = hidden / heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut sequence_of_row = Vec::with_capacity(tokens);
    for s in 0..batch.sequences() {
        sequence_of_row.extend(std::iter::repeat_n(s, batch.len_of(s)));
    }
    let max_len = batch.max_len();
    let mut context = vec![0f32; tokens * hidden];
    context.par_chunks_mut(hidden).enumerate().for_each_init(
        || vec![0f32; max_len],
        |scores, (row, out)| {
            let sequence = sequence_of_row[row];
            let start = batch.offsets[sequence];
            let len = batch.len_of(sequence);
            let scores = &mut scores[..len];
            for head in 0..heads {
                let q = &qkv[row * width + head * head_dim..][..head_dim];
                let mut max = f32::NEG_INFINITY;
                for (j, score) in scores.iter_mut().enumerate() {
                    let k = &qkv[(start + j) * width + hidden + head * head_dim..][..head_dim];
                    let mut s = crate::cpu_kernels::dot(q, k) * scale;
                    if let Some(bias) = bias {
                        s += bias.get(head, row - start, j);
                    }
                    *score = s;
                    max = max.max(s);
                }
                let mut sum = 0.0;
                for score in scores.iter_mut() {
                    *score = crate::cpu_kernels::exp(*score - max);
                    sum += *score;
                }
                let out = &mut out[head * head_dim..][..head_dim];
                out.fill(0.0);
                for (j, &p) in scores.iter().enumerate() {
                    let v = &qkv[(start + j) * width + 2 * hidden + head * head_dim..][..head_dim];
                    let p = p / sum;
                    out.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
                }
            }
        },
    );
    context
}

/// Most attention scores (`sequences × heads × max_len²`) one padded pass holds: 64 Mi elements,
/// 256 MiB in f32. Longer batches run in groups of sequences.
const PADDED_SCORES_BUDGET: usize = 64 << 20;

/// The device-generic path (GPU, or non-f32 dtypes): the sequences gathered into a padded
/// `[sequences, heads, max_len, head_dim]` layout, so each group of sequences is a handful of
/// batched products instead of a loop (kernel launches, not FLOPs, bound a GPU on short
/// inputs); padded keys are masked, padded query rows dropped on the way back.
fn packed_attention_tensor_ops(
    qkv: &Tensor,
    batch: &PackedBatch,
    heads: usize,
    bias: Option<&RelativeBias>,
) -> Result<Tensor> {
    in_padded_groups(qkv, batch, heads, PADDED_SCORES_BUDGET, |qkv, batch| {
        padded_attention(qkv, batch, heads, bias)
    })
}

/// Runs `attend` over groups of sequences whose padded scores stay within `budget` elements
/// ([`PackedBatch::groups_within`]) and joins the contexts back in packed order.
pub fn in_padded_groups(
    qkv: &Tensor,
    batch: &PackedBatch,
    heads: usize,
    budget: usize,
    attend: impl Fn(&Tensor, &PackedBatch) -> Result<Tensor>,
) -> Result<Tensor> {
    let groups = batch.groups_within(heads, budget);
    if groups.len() == 1 {
        return attend(qkv, batch);
    }
    let mut contexts = Vec::with_capacity(groups.len());
    for group in groups {
        let rows = batch.offsets[group.start]..batch.offsets[group.end];
        let part = qkv.narrow(0, rows.start, rows.len())?;
        contexts.push(attend(&part, &batch.slice(group))?);
    }
    Tensor::cat(&contexts, 0)
}

fn padded_attention(
    qkv: &Tensor,
    batch: &PackedBatch,
    heads: usize,
    bias: Option<&RelativeBias>,
) -> Result<Tensor> {
    let (tokens, width) = qkv.dims2()?;
    let (hidden, device) = (width / 3, qkv.device());
    let head_dim = hidden / heads;
    let (sequences, len) = (batch.sequences(), batch.max_len());
    // Padding slots gather an all-zero row appended after the real ones.
    let source = Tensor::cat(&[qkv, &Tensor::zeros((1, width), qkv.dtype(), device)?], 0)?;
    let gather = Tensor::from_vec(batch.padded_rows(tokens as u32), sequences * len, device)?;
    let padded = source
        .index_select(&gather, 0)?
        .reshape((sequences, len, width))?;
    let split = |part: usize| -> Result<Tensor> {
        padded
            .narrow(2, part * hidden, hidden)?
            .reshape((sequences, len, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(bias) = bias {
        let mut values = vec![0f32; heads * len * len];
        for head in 0..heads {
            for i in 0..len {
                for j in 0..len {
                    values[(head * len + i) * len + j] = bias.get(head, i, j);
                }
            }
        }
        let bias =
            Tensor::from_vec(values, (1, heads, len, len), device)?.to_dtype(scores.dtype())?;
        scores = scores.broadcast_add(&bias)?;
    }
    // Keys past a sequence's end get -inf; every query row keeps at least its first key.
    let mut mask = vec![0f32; sequences * len];
    for s in 0..sequences {
        mask[s * len + batch.len_of(s)..(s + 1) * len].fill(f32::NEG_INFINITY);
    }
    let mask = Tensor::from_vec(mask, (sequences, 1, 1, len), device)?.to_dtype(scores.dtype())?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
    let context = probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((sequences * len, hidden))?;
    let keep = Tensor::from_vec(batch.unpadded_slots(), tokens, device)?;
    context.index_select(&keep, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u32) -> Vec<f32> {
        // A tiny LCG keeps the test free of an RNG dependency; the values only need to vary.
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn cpu_kernel_matches_tensor_ops_with_and_without_bias() -> Result<()> {
        let batch = PackedBatch::new(&[vec![1; 5], vec![2; 1], vec![3; 9]]);
        let (heads, hidden) = (4, 32);
        let qkv = Tensor::from_vec(
            random(batch.tokens() * 3 * hidden, 7),
            (batch.tokens(), 3 * hidden),
            &Device::Cpu,
        )?;
        let values = random(8 * heads, 11);
        let max_offset = 8;
        let bucket_of_offset: Vec<usize> = (0..2 * max_offset + 1).map(|o| o % 8).collect();
        let bias = RelativeBias {
            values: &values,
            heads,
            bucket_of_offset: &bucket_of_offset,
            max_offset,
        };
        for bias in [None, Some(&bias)] {
            let fast = packed_attention_cpu(&qkv, &batch, heads, bias)?.to_vec2::<f32>()?;
            let reference =
                packed_attention_tensor_ops(&qkv, &batch, heads, bias)?.to_vec2::<f32>()?;
            for (a, b) in fast.iter().flatten().zip(reference.iter().flatten()) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn padded_groups_match_one_pass_and_cover_every_sequence() -> Result<()> {
        let batch = PackedBatch::new(&[vec![1; 9], vec![2; 6], vec![3; 6], vec![4; 2], vec![5; 1]]);
        let groups = batch.groups_within(2, 2 * 2 * 9 * 9);
        assert_eq!(groups, vec![0..2, 2..5]);
        assert_eq!(batch.slice(2..5).offsets, [0, 6, 8, 9]);
        let (heads, hidden) = (2, 16);
        let qkv = Tensor::from_vec(
            random(batch.tokens() * 3 * hidden, 5),
            (batch.tokens(), 3 * hidden),
            &Device::Cpu,
        )?;
        let whole = padded_attention(&qkv, &batch, heads, None)?.to_vec2::<f32>()?;
        let parts = [0..2, 2..5]
            .into_iter()
            .map(|group| {
                let rows = batch.offsets[group.start]..batch.offsets[group.end];
                padded_attention(
                    &qkv.narrow(0, rows.start, rows.len())?,
                    &batch.slice(group),
                    heads,
                    None,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let parts = Tensor::cat(&parts, 0)?.to_vec2::<f32>()?;
        for (a, b) in whole.iter().flatten().zip(parts.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn a_sequence_only_attends_to_itself() -> Result<()> {
        // Same sequence alone and packed next to another: its context rows must not change.
        let (heads, hidden) = (2, 8);
        let data = random(12 * 3 * hidden, 3);
        let both = Tensor::from_vec(data.clone(), (12, 3 * hidden), &Device::Cpu)?;
        let alone = Tensor::from_vec(
            data[..4 * 3 * hidden].to_vec(),
            (4, 3 * hidden),
            &Device::Cpu,
        )?;
        let packed = packed_attention(
            &both,
            &PackedBatch::new(&[vec![0; 4], vec![0; 8]]),
            heads,
            None,
        )?;
        let single = packed_attention(&alone, &PackedBatch::new(&[vec![0; 4]]), heads, None)?;
        let packed = packed.narrow(0, 0, 4)?.to_vec2::<f32>()?;
        assert_eq!(packed, single.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn pooling_helpers_locate_sequences() -> Result<()> {
        let batch = PackedBatch::new(&[vec![1, 2], vec![3, 4, 5]]);
        assert_eq!(batch.positions(2), [2, 3, 2, 3, 4]);
        assert_eq!(batch.first_rows(&Device::Cpu)?.to_vec1::<u32>()?, [0, 2]);
        assert_eq!(batch.last_rows(&Device::Cpu)?.to_vec1::<u32>()?, [1, 4]);
        let mean = batch.mean_pooling_matrix(&Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(mean[0][..2], [0.5, 0.5]);
        assert!((mean[1][2..].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        Ok(())
    }
}
