//! CLIP: a ViT image tower and a causal text tower, each projected into one shared space.
//!
//! Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
//! Supervision". Upstream: `transformers/models/clip/modeling_clip.py` (`CLIPModel`), whose
//! tensor names the loads below follow (`vision_model.encoder.layers.N.self_attn.q_proj`, ...),
//! so that an upstream checkpoint (openai/clip-vit-large-patch14) loads as it is.
//!
//! Both towers are pre-LN transformers (`x + attn(ln1(x))`, `x + mlp(ln2(x))`) with CLIP's
//! quick-GELU (`x * sigmoid(1.702 x)`). The vision tower embeds non-overlapping patches
//! (a stride-`patch` convolution without bias, run here as one matrix product over unfolded
//! patches), prepends the class embedding, adds learned positions and LayerNorms once more
//! before the layers (`pre_layrnorm`, sic); its output is the class token after
//! `post_layernorm`, through `visual_projection`. The text tower runs under a causal mask, takes
//! `final_layer_norm` and pools at the end-of-text token, through `text_projection`.
//!
//! Sizes come from `config.json` (`text_config`, `vision_config`, `projection_dim`), with
//! transformers' defaults for missing fields; nothing is a preset. candle-transformers has a CLIP,
//! but only with its own fixed configurations.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, Module, VarBuilder};
use serde::Deserialize;

use super::projection::{Projection, Projections};

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}

/// `text_config` of a `CLIPModel` checkpoint; defaults are `CLIPTextConfig`'s.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "text_vocab")]
    pub vocab_size: usize,
    #[serde(default = "text_hidden")]
    pub hidden_size: usize,
    #[serde(default = "text_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "twelve")]
    pub num_hidden_layers: usize,
    #[serde(default = "text_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "text_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// 2 in configs written before transformers PR #24773 (openai/clip-vit-large-patch14's
    /// among them): the pooled token is then the one with the highest id, as OpenAI's code did.
    #[serde(default = "text_eos")]
    pub eos_token_id: u32,
}

fn text_vocab() -> usize {
    49_408
}
fn text_hidden() -> usize {
    512
}
fn text_intermediate() -> usize {
    2048
}
fn twelve() -> usize {
    12
}
fn text_heads() -> usize {
    8
}
fn text_positions() -> usize {
    77
}
fn text_eos() -> u32 {
    49_407
}

/// `vision_config` of a `CLIPModel` checkpoint; defaults are `CLIPVisionConfig`'s.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "vision_hidden")]
    pub hidden_size: usize,
    #[serde(default = "vision_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "twelve")]
    pub num_hidden_layers: usize,
    #[serde(default = "twelve")]
    pub num_attention_heads: usize,
    #[serde(default = "three")]
    pub num_channels: usize,
    #[serde(default = "vision_image")]
    pub image_size: usize,
    #[serde(default = "vision_patch")]
    pub patch_size: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

fn vision_hidden() -> usize {
    768
}
fn vision_intermediate() -> usize {
    3072
}
fn three() -> usize {
    3
}
fn vision_image() -> usize {
    224
}
fn vision_patch() -> usize {
    32
}

/// `config.json` of a `CLIPModel` checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    #[serde(default = "projection")]
    pub projection_dim: usize,
}

fn projection() -> usize {
    512
}

impl ClipConfig {
    /// Rejects what this implementation does not run, naming it.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (t, v) = (&self.text_config, &self.vision_config);
        for (tower, act) in [("text", &t.hidden_act), ("vision", &v.hidden_act)] {
            activation(act).map_err(|e| format!("{tower}_config: {e}"))?;
        }
        for (tower, hidden, heads) in [
            ("text", t.hidden_size, t.num_attention_heads),
            ("vision", v.hidden_size, v.num_attention_heads),
        ] {
            if heads == 0 || hidden % heads != 0 {
                return Err(format!(
                    "{tower}_config: hidden_size {hidden} is not a multiple of {heads} heads"
                ));
            }
        }
        if v.num_channels != 3 {
            return Err(format!(
                "vision_config.num_channels is {}; images are RGB",
                v.num_channels
            ));
        }
        if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
            return Err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        Ok(())
    }
}

/// The activations CLIP checkpoints use.
#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

fn activation(name: &str) -> std::result::Result<Activation, String> {
    match name {
        "quick_gelu" => Ok(Activation::QuickGelu),
        "gelu" => Ok(Activation::Gelu),
        other => Err(format!(
            "hidden_act `{other}` is not supported (quick_gelu, gelu)"
        )),
    }
}

impl Activation {
    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
        }
    }
}

/// `CLIPAttention` + `CLIPMLP` with their two LayerNorms (`CLIPEncoderLayer`).
struct EncoderLayer {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    out_proj: Projection,
    layer_norm1: LayerNorm,
    fc1: Projection,
    fc2: Projection,
    layer_norm2: LayerNorm,
    heads: usize,
    act: Activation,
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize, p: &Projections) -> Result<Projection> {
    super::layers::linear(in_dim, out_dim, vb, p)
}

impl EncoderLayer {
    fn load(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        heads: usize,
        eps: f64,
        act: Activation,
        p: &Projections,
    ) -> Result<Self> {
        let attn = vb.pp("self_attn");
        Ok(Self {
            q_proj: linear(attn.pp("q_proj"), hidden, hidden, p)?,
            k_proj: linear(attn.pp("k_proj"), hidden, hidden, p)?,
            v_proj: linear(attn.pp("v_proj"), hidden, hidden, p)?,
            out_proj: linear(attn.pp("out_proj"), hidden, hidden, p)?,
            layer_norm1: layer_norm(hidden, eps, vb.pp("layer_norm1"))?,
            fc1: linear(vb.pp("mlp.fc1"), hidden, intermediate, p)?,
            fc2: linear(vb.pp("mlp.fc2"), intermediate, hidden, p)?,
            layer_norm2: layer_norm(hidden, eps, vb.pp("layer_norm2"))?,
            heads,
            act,
        })
    }

    /// `xs` is `[batch, seq, hidden]`; `mask` an additive `[seq, seq]` mask or none.
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (batch, seq, hidden) = xs.dims3()?;
        let head_dim = hidden / self.heads;
        let rows = xs.reshape((batch * seq, hidden))?;

        let normed = self.layer_norm1.forward(&rows)?;
        let split = |t: Tensor| {
            t.reshape((batch, seq, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(&normed)?)?;
        let k = split(self.k_proj.forward(&normed)?)?;
        let v = split(self.v_proj.forward(&normed)?)?;
        let mut scores = (q.matmul(&k.t()?)? * (head_dim as f64).powf(-0.5))?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch * seq, hidden))?;
        let rows = (rows + self.out_proj.forward(&context)?)?;

        let normed = self.layer_norm2.forward(&rows)?;
        let mlp = self
            .fc2
            .forward(&self.act.apply(&self.fc1.forward(&normed)?)?)?;
        (rows + mlp)?.reshape((batch, seq, hidden))
    }
}

fn encoder_layers(
    vb: VarBuilder,
    layers: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    eps: f64,
    act: &str,
    p: &Projections,
) -> Result<Vec<EncoderLayer>> {
    let act = activation(act).map_err(candle_core::Error::msg)?;
    (0..layers)
        .map(|i| {
            EncoderLayer::load(
                vb.pp(format!("encoder.layers.{i}")),
                hidden,
                intermediate,
                heads,
                eps,
                act,
                p,
            )
        })
        .collect()
}

/// `CLIPVisionTransformer` + `visual_projection`.
pub struct ClipVisionTower {
    patch_embedding: Projection,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Projection,
    image_size: usize,
    patch_size: usize,
    hidden: usize,
}

impl ClipVisionTower {
    /// `vb` is the checkpoint's root (`vision_model.*` and `visual_projection` under it).
    pub fn load(vb: VarBuilder, config: &ClipConfig, p: &Projections) -> Result<Self> {
        let c = &config.vision_config;
        let model = vb.pp("vision_model");
        let embeddings = model.pp("embeddings");
        let patch_len = c.num_channels * c.patch_size * c.patch_size;
        // The convolution's `[hidden, channels, patch, patch]` kernel as a `[hidden, patch_len]`
        // matrix: the unfolded patches below are flattened in the same (c, y, x) order.
        let kernel = embeddings
            .get(
                (c.hidden_size, c.num_channels, c.patch_size, c.patch_size),
                "patch_embedding.weight",
            )?
            .reshape((c.hidden_size, patch_len))?;
        let patches = (c.image_size / c.patch_size).pow(2);
        Ok(Self {
            patch_embedding: p.build(kernel, None)?,
            class_embedding: embeddings.get(c.hidden_size, "class_embedding")?,
            position_embedding: embeddings
                .get((patches + 1, c.hidden_size), "position_embedding.weight")?,
            pre_layrnorm: layer_norm(c.hidden_size, c.layer_norm_eps, model.pp("pre_layrnorm"))?,
            layers: encoder_layers(
                model.clone(),
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                &c.hidden_act,
                p,
            )?,
            post_layernorm: layer_norm(
                c.hidden_size,
                c.layer_norm_eps,
                model.pp("post_layernorm"),
            )?,
            visual_projection: p.build(
                vb.get(
                    (config.projection_dim, c.hidden_size),
                    "visual_projection.weight",
                )?,
                None,
            )?,
            image_size: c.image_size,
            patch_size: c.patch_size,
            hidden: c.hidden_size,
        })
    }

    /// The side of the square pixel tensor the tower takes.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Tokens per image: the patches and the class token.
    pub fn sequence_len(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }

    /// Image vectors `[images, projection_dim]` (f32) from pixel tensors, each
    /// `[3, image_size, image_size]` channels first, concatenated.
    pub fn forward(&self, pixels: &[f32], device: &Device, dtype: DType) -> Result<Tensor> {
        let (side, patch) = (self.image_size, self.patch_size);
        let plane = side * side;
        let images = pixels.len() / (3 * plane);
        let grid = side / patch;
        // Unfold into `[images * patches, 3 * patch * patch]`, rows in raster order of the grid.
        let mut unfolded = Vec::with_capacity(pixels.len());
        for image in pixels.chunks_exact(3 * plane) {
            for gy in 0..grid {
                for gx in 0..grid {
                    for c in 0..3 {
                        for py in 0..patch {
                            let row = c * plane + (gy * patch + py) * side + gx * patch;
                            unfolded.extend_from_slice(&image[row..row + patch]);
                        }
                    }
                }
            }
        }
        let unfolded =
            Tensor::from_vec(unfolded, (images * grid * grid, 3 * patch * patch), device)?
                .to_dtype(dtype)?;
        let patches =
            self.patch_embedding
                .forward(&unfolded)?
                .reshape((images, grid * grid, self.hidden))?;
        let class = self
            .class_embedding
            .reshape((1, 1, self.hidden))?
            .broadcast_as((images, 1, self.hidden))?;
        let mut xs =
            Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        xs = self.pre_layrnorm.forward(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, None)?;
        }
        let pooled = self
            .post_layernorm
            .forward(&xs.narrow(1, 0, 1)?.squeeze(1)?)?;
        self.visual_projection
            .forward(&pooled)?
            .to_dtype(DType::F32)
    }
}

/// `CLIPTextTransformer` + `text_projection`.
pub struct ClipTextTower {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Projection,
    eos_token_id: u32,
    max_positions: usize,
}

impl ClipTextTower {
    /// `vb` is the checkpoint's root (`text_model.*` and `text_projection` under it).
    pub fn load(vb: VarBuilder, config: &ClipConfig, p: &Projections) -> Result<Self> {
        let c = &config.text_config;
        let model = vb.pp("text_model");
        let embeddings = model.pp("embeddings");
        Ok(Self {
            token_embedding: embedding(
                c.vocab_size,
                c.hidden_size,
                embeddings.pp("token_embedding"),
            )?,
            position_embedding: embeddings.get(
                (c.max_position_embeddings, c.hidden_size),
                "position_embedding.weight",
            )?,
            layers: encoder_layers(
                model.clone(),
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                &c.hidden_act,
                p,
            )?,
            final_layer_norm: layer_norm(
                c.hidden_size,
                c.layer_norm_eps,
                model.pp("final_layer_norm"),
            )?,
            text_projection: p.build(
                vb.get(
                    (config.projection_dim, c.hidden_size),
                    "text_projection.weight",
                )?,
                None,
            )?,
            eos_token_id: c.eos_token_id,
            max_positions: c.max_position_embeddings,
        })
    }

    /// The longest sequence the position table holds.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The position a sequence is pooled at (`CLIPTextTransformer.forward`): the first
    /// end-of-text token, or with a pre-#24773 config (`eos_token_id == 2`) the first highest id.
    fn pool_position(&self, ids: &[u32]) -> usize {
        let first_max = |ids: &[u32]| {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&id| id == max).unwrap_or(0)
        };
        if self.eos_token_id == 2 {
            first_max(ids)
        } else {
            // transformers' argmax over `ids == eos` is 0 when there is none.
            ids.iter()
                .position(|&id| id == self.eos_token_id)
                .unwrap_or(0)
        }
    }

    /// Text vectors `[sequences, projection_dim]` (f32). Sequences are padded at the end to the
    /// longest: under the causal mask no position reads a later one, so padding never reaches
    /// the pooled token.
    pub fn forward(&self, sequences: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let batch = sequences.len();
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let padded: Vec<u32> = sequences
            .iter()
            .flat_map(|ids| {
                ids.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, seq - ids.len()))
            })
            .collect();
        let ids = Tensor::from_vec(padded, (batch, seq), device)?;
        let mut xs = self
            .token_embedding
            .forward(&ids)?
            .broadcast_add(&self.position_embedding.narrow(0, 0, seq)?)?;
        let dtype = xs.dtype();
        let causal: Vec<f32> = (0..seq)
            .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(causal, (seq, seq), device)?.to_dtype(dtype)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, Some(&mask))?;
        }
        let positions: Vec<u32> = sequences
            .iter()
            .enumerate()
            .map(|(i, ids)| (i * seq + self.pool_position(ids)) as u32)
            .collect();
        let hidden = xs.dim(D::Minus1)?;
        let pooled = xs
            .reshape((batch * seq, hidden))?
            .index_select(&Tensor::new(positions, device)?, 0)?;
        let pooled = self.final_layer_norm.forward(&pooled)?;
        self.text_projection.forward(&pooled)?.to_dtype(DType::F32)
    }
}
