//! Image input for CLIP: encoded bytes to the vision tower's pixel tensor, as transformers'
//! `CLIPImageProcessor` makes it from a PIL image.
//!
//! # Decoding
//! PNG, JPEG, WebP and GIF (its first frame), with the `image` crate; the format is sniffed from
//! the bytes (the wire's `format` hint is not trusted). The declared dimensions are read from the
//! header and checked against [`ImageLimits`] *before* any pixel is decoded, so a decompression
//! bomb costs a header read and answers 413; the decoder also runs under an allocation cap. EXIF
//! orientation is applied (as `transformers.image_utils.load_image` does with
//! `ImageOps.exif_transpose`). Only one decoded image is alive at a time per call
//! ([`ImagePreprocessor::pixels`] drops it before the next), so memory is bounded by the limits.
//!
//! # Preprocessing (`CLIPImageProcessor.preprocess`)
//! 1. `convert_rgb`: alpha composited over opaque white with PIL's integer `alpha_composite`,
//!    grayscale expanded to three equal channels.
//! 2. `resize`: shortest side to `size["shortest_edge"]` (long side `int(size * long / short)`),
//!    or to `size["height"] x size["width"]`, with PIL's `Image.resize(BICUBIC)` on 8-bit RGB:
//!    the same separable filter, the same fixed-point coefficients (22 fractional bits),
//!    horizontal pass first, each pass rounded and clipped to 8 bits. This is what makes our
//!    tensor equal transformers' rather than merely close: the output of a PIL resize is 8-bit,
//!    and one level off is 0.015 after normalisation.
//! 3. `center_crop` to `crop_size` (`top = (height - crop) // 2`, zero padding when smaller).
//! 4. `rescale` (`x * rescale_factor` in f64, then f32) and `normalize` (`(x - mean) / std` in f32).
//!
//! Only the crop window of the resized image is computed: columns and rows outside it never
//! reach the model, and the resize is separable, so skipping them changes nothing while keeping
//! the work and memory at the crop's size whatever the aspect ratio (a 2 x 8192 strip resized
//! by shortest side would otherwise be 224 x 917,504).
//!
//! Parameters come from the checkpoint's `preprocessor_config.json`, current
//! (`CLIPImageProcessor`: `size: {"shortest_edge": 224}`, `crop_size: {"height", "width"}`) or
//! legacy (`CLIPFeatureExtractor`: `size: 224`, `crop_size: 224`) schema, with CLIP's values for
//! anything missing. Resampling other than bicubic (`resample: 3`) is refused at load.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use serde::Deserialize;
use serde_json::Value;

use embedfleet_proto::ErrorKind;

/// CLIP's normalisation (OpenAI's training statistics), `CLIPImageProcessor`'s defaults.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Bounds on one image, checked on the declared dimensions before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Widest and tallest image accepted (413 past it). Default 8,192.
    pub max_side: u32,
    /// Most pixels (width x height) accepted (413 past it). Default 64 MP (64,000,000).
    pub max_pixels: u64,
    /// Shortest side accepted (422 below it). Default 2: a one-pixel line has no 2-D content for
    /// the patch grid, and transformers' own processor misreads an H x 1 x 3 array as
    /// channels-first, so there is no reference behaviour to match either.
    pub min_side: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_side: 8192,
            max_pixels: 64_000_000,
            min_side: 2,
        }
    }
}

impl ImageLimits {
    /// The decoder's allocation cap: the largest accepted image at 16 bits per RGBA channel.
    fn max_alloc(&self) -> u64 {
        self.max_pixels.saturating_mul(8)
    }

    fn check(&self, width: u32, height: u32) -> Result<(), ImageInputError> {
        let pixels = u64::from(width) * u64::from(height);
        if width > self.max_side || height > self.max_side || pixels > self.max_pixels {
            return Err(ImageInputError::TooLarge(format!(
                "the image declares {width} x {height} pixels; the limit is {side} x {side} and \
                 {} pixels",
                self.max_pixels,
                side = self.max_side,
            )));
        }
        if width.min(height) < self.min_side {
            return Err(ImageInputError::Unsupported(format!(
                "the image is {width} x {height} pixels; each side must be at least {}",
                self.min_side
            )));
        }
        Ok(())
    }
}

/// Why an image cannot be embedded; [`ImageInputError::kind`] is its wire error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageInputError {
    /// Not a valid file of its format: corrupt, truncated (400).
    #[error("invalid image: {0}")]
    Invalid(String),
    /// A format this build does not decode, or content it cannot embed (422).
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// Over the configured dimensions or the decoder's memory cap (413).
    #[error("image too large: {0}")]
    TooLarge(String),
}

impl ImageInputError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) => ErrorKind::InvalidMedia,
            Self::Unsupported(_) => ErrorKind::UnsupportedMedia,
            Self::TooLarge(_) => ErrorKind::TooLarge,
        }
    }

    fn from_image(error: image::ImageError) -> Self {
        use image::ImageError as E;
        match error {
            E::Limits(e) => Self::TooLarge(e.to_string()),
            E::Unsupported(e) => Self::Unsupported(e.to_string()),
            E::Decoding(e) => Self::Invalid(e.to_string()),
            E::IoError(e) => Self::Invalid(e.to_string()),
            other => Self::Invalid(other.to_string()),
        }
    }
}

/// A decoded image after `convert_rgb`: 8-bit RGB, or 8-bit gray that stands for three equal
/// channels (resampled once, read three times).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// 1 (gray) or 3 (RGB) bytes per pixel, row-major.
    pub channels: usize,
    pub data: Vec<u8>,
}

/// Decodes `bytes` under `limits`, applies EXIF orientation and converts to RGB.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, ImageInputError> {
    let format = match image::guess_format(bytes) {
        Ok(
            format @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif),
        ) => format,
        Ok(other) => {
            return Err(ImageInputError::Unsupported(format!(
                "{other:?} is not decoded here (PNG, JPEG, WebP and GIF are)"
            )))
        }
        Err(_) => {
            return Err(ImageInputError::Unsupported(
                "not a PNG, JPEG, WebP or GIF file (unrecognised signature)".into(),
            ))
        }
    };
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(ImageInputError::Invalid(
            "the JPEG is truncated (no end-of-image marker after its last scan)".into(),
        ));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // The allocation cap only: the dimensions are checked below, where the error can name them.
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_alloc());
    reader.limits(decoder_limits);
    // Reads the header only: the dimensions are checked before any pixel is decoded.
    let mut decoder = reader.into_decoder().map_err(ImageInputError::from_image)?;
    let (width, height) = decoder.dimensions();
    limits.check(width, height)?;
    // A malformed EXIF block is not worth refusing the picture for: it is then shown as stored.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(ImageInputError::from_image)?;
    image.apply_orientation(orientation);
    Ok(to_rgb(image))
}

/// Whether a JPEG's last scan is followed by its end-of-image marker. zune-jpeg decodes a
/// truncated file without complaint (the missing blocks come out grey), where libjpeg, and so
/// PIL, refuses it; so the check is ours. Inside entropy-coded data a 0xFF byte is always
/// followed by 0x00 or a restart marker, so neither marker can appear there by accident; bytes
/// after the end marker (camera trailers) are allowed, as PIL allows them.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    const SOS: [u8; 2] = [0xFF, 0xDA];
    const EOI: [u8; 2] = [0xFF, 0xD9];
    match bytes.windows(2).rposition(|w| w == SOS) {
        Some(last_scan) => bytes[last_scan..].windows(2).any(|w| w == EOI),
        // No scan at all: the decoder says what is wrong.
        None => true,
    }
}

/// `convert_rgb` of transformers: RGB as it is, gray as gray, alpha composited over white.
fn to_rgb(image: DynamicImage) -> RgbImage {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let (channels, data) = match image {
        DynamicImage::ImageRgb8(buffer) => (3, buffer.into_raw()),
        DynamicImage::ImageLuma8(buffer) => (1, buffer.into_raw()),
        DynamicImage::ImageRgba8(buffer) => (3, composite_over_white(&buffer.into_raw(), 3)),
        DynamicImage::ImageLumaA8(buffer) => (1, composite_over_white(&buffer.into_raw(), 1)),
        // 16-bit PNGs: PIL keeps the high byte of each sample ("RGB;16B" raw modes).
        DynamicImage::ImageRgb16(buffer) => (3, high_bytes(buffer.as_raw())),
        DynamicImage::ImageLuma16(buffer) => (1, high_bytes(buffer.as_raw())),
        DynamicImage::ImageRgba16(buffer) => {
            (3, composite_over_white(&high_bytes(buffer.as_raw()), 3))
        }
        DynamicImage::ImageLumaA16(buffer) => {
            (1, composite_over_white(&high_bytes(buffer.as_raw()), 1))
        }
        // Float images come only from decoders this build leaves out (HDR, EXR).
        other => (3, composite_over_white(&other.to_rgba8().into_raw(), 3)),
    };
    RgbImage {
        width,
        height,
        channels,
        data,
    }
}

fn high_bytes(samples: &[u16]) -> Vec<u8> {
    samples.iter().map(|&v| (v >> 8) as u8).collect()
}

/// Colour samples of `color` channels each followed by an alpha byte, composited over opaque
/// white exactly as PIL's `Image.alpha_composite(white, image)` (`AlphaComposite.c`: 7 extra
/// bits of precision, divisions by 255 by shifts, rounded).
fn composite_over_white(pixels: &[u8], color: usize) -> Vec<u8> {
    const PRECISION_BITS: u32 = 7;
    let div255 = |a: u32| ((a >> 8) + a) >> 8;
    let mut out = Vec::with_capacity(pixels.len() / (color + 1) * color);
    for pixel in pixels.chunks_exact(color + 1) {
        let alpha = u32::from(pixel[color]);
        for &sample in &pixel[..color] {
            out.push(if alpha == 0 {
                255
            } else {
                // With an opaque destination PIL's `outa255` is 255 * 255, so its `coef1` is
                // `alpha << 7` exactly.
                let coef1 = alpha << PRECISION_BITS;
                let coef2 = (255 << PRECISION_BITS) - coef1;
                let blended = u32::from(sample) * coef1 + 255 * coef2;
                (div255(blended + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
            });
        }
    }
    out
}

/// `size` of `CLIPImageProcessor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// Shortest side to this, aspect kept (`{"shortest_edge": n}`, or a bare `n` in the legacy
    /// schema).
    ShortestEdge(usize),
    /// Exactly this, aspect not kept (`{"height": h, "width": w}`).
    Exact { height: usize, width: usize },
}

/// `preprocessor_config.json` of a CLIP checkpoint, resolved to what the pipeline does.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePreprocessor {
    pub resize: Option<ResizeTo>,
    /// `(height, width)` of the centre crop.
    pub crop: Option<(usize, usize)>,
    pub rescale: Option<f64>,
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl Default for ImagePreprocessor {
    /// CLIP's own values: shortest side 224, crop 224 x 224, 1/255, OpenAI's mean and std.
    fn default() -> Self {
        Self {
            resize: Some(ResizeTo::ShortestEdge(224)),
            crop: Some((224, 224)),
            rescale: Some(1.0 / 255.0),
            normalize: Some((CLIP_MEAN, CLIP_STD)),
        }
    }
}

/// The fields of both schemas; each missing one takes CLIP's value.
#[derive(Deserialize)]
struct RawConfig {
    do_resize: Option<bool>,
    size: Option<Value>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
    crop_size: Option<Value>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Value>,
    image_std: Option<Value>,
}

/// PIL's `Image.Resampling.BICUBIC`, the only filter implemented.
const PIL_BICUBIC: u32 = 3;

impl ImagePreprocessor {
    /// Parses `preprocessor_config.json`; the error says which field is unusable.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let defaults = Self::default();
        if let Some(resample) = raw.resample.filter(|&r| r != PIL_BICUBIC) {
            return Err(format!(
                "resample {resample} is not implemented (only 3, PIL's bicubic, as CLIP uses)"
            ));
        }
        let resize = match (raw.do_resize.unwrap_or(true), &raw.size) {
            (false, _) => None,
            (true, None) => defaults.resize,
            (true, Some(size)) => Some(parse_size(size)?),
        };
        let crop = match (raw.do_center_crop.unwrap_or(true), &raw.crop_size) {
            (false, _) => None,
            (true, None) => defaults.crop,
            (true, Some(size)) => Some(parse_crop(size)?),
        };
        let rescale = raw
            .do_rescale
            .unwrap_or(true)
            .then(|| raw.rescale_factor.unwrap_or(1.0 / 255.0));
        let normalize = if raw.do_normalize.unwrap_or(true) {
            let mean = parse_triple(raw.image_mean.as_ref(), CLIP_MEAN, "image_mean")?;
            let std = parse_triple(raw.image_std.as_ref(), CLIP_STD, "image_std")?;
            if std.contains(&0.0) {
                return Err("image_std has a zero".into());
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Self {
            resize,
            crop,
            rescale,
            normalize,
        })
    }

    /// `(height, width)` of the tensor for an image of the given size.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        self.crop
            .unwrap_or_else(|| self.resized_size(height, width))
    }

    /// The size after `resize`, before the crop.
    fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.resize {
            None => (height, width),
            Some(ResizeTo::Exact { height, width }) => (height, width),
            // transformers' `get_resize_output_image_size(default_to_square=False)`.
            Some(ResizeTo::ShortestEdge(short)) => {
                let long = |long: usize, short_side: usize| {
                    ((short * long) as f64 / short_side as f64) as usize
                };
                if width <= height {
                    (long(height, width), short)
                } else {
                    (short, long(width, height))
                }
            }
        }
    }

    /// The pixel tensor `[3, height, width]` (channels first, row-major) of a decoded image.
    pub fn pixels(&self, image: &RgbImage) -> Vec<f32> {
        let (resized_h, resized_w) = self.resized_size(image.height, image.width);
        let (out_h, out_w) = self.output_size(image.height, image.width);
        // Crop origin in the resized image; negative when the crop pads (Python's `//` floors).
        let (top, left) = match self.crop {
            Some((crop_h, crop_w)) => (
                (resized_h as i64 - crop_h as i64).div_euclid(2),
                (resized_w as i64 - crop_w as i64).div_euclid(2),
            ),
            None => (0, 0),
        };
        let rows = window(top, out_h, resized_h);
        let cols = window(left, out_w, resized_w);
        let window_pixels = resample_window(image, (resized_h, resized_w), &rows, &cols);

        let plane = out_h * out_w;
        let mut tensor = vec![0f32; 3 * plane];
        for y in 0..out_h {
            for x in 0..out_w {
                // Outside the resized image the crop pads with zeros (before the rescale).
                let sample = |c: usize| -> u8 {
                    match (
                        rows.index_of(top + y as i64),
                        cols.index_of(left + x as i64),
                    ) {
                        (Some(r), Some(col)) => {
                            let channel = if image.channels == 1 { 0 } else { c };
                            window_pixels[(r * cols.len() + col) * image.channels + channel]
                        }
                        _ => 0,
                    }
                };
                for c in 0..3 {
                    tensor[c * plane + y * out_w + x] = self.value(sample(c), c);
                }
            }
        }
        tensor
    }

    /// One 8-bit sample after `rescale` and `normalize`, in transformers' precisions.
    fn value(&self, sample: u8, channel: usize) -> f32 {
        let scaled = match self.rescale {
            Some(factor) => (f64::from(sample) * factor) as f32,
            None => f32::from(sample),
        };
        match self.normalize {
            Some((mean, std)) => (scaled - mean[channel]) / std[channel],
            None => scaled,
        }
    }
}

fn parse_size(size: &Value) -> Result<ResizeTo, String> {
    if let Some(n) = size.as_u64() {
        return Ok(ResizeTo::ShortestEdge(positive(n, "size")?));
    }
    let field = |name: &str| size.get(name).and_then(Value::as_u64);
    match (field("shortest_edge"), field("height"), field("width")) {
        (Some(n), _, _) => Ok(ResizeTo::ShortestEdge(positive(n, "size.shortest_edge")?)),
        (None, Some(h), Some(w)) => Ok(ResizeTo::Exact {
            height: positive(h, "size.height")?,
            width: positive(w, "size.width")?,
        }),
        _ => Err(format!(
            "size {size} has neither shortest_edge nor height and width"
        )),
    }
}

fn parse_crop(size: &Value) -> Result<(usize, usize), String> {
    if let Some(n) = size.as_u64() {
        let n = positive(n, "crop_size")?;
        return Ok((n, n));
    }
    let field = |name: &str| size.get(name).and_then(Value::as_u64);
    match (field("height"), field("width")) {
        (Some(h), Some(w)) => Ok((
            positive(h, "crop_size.height")?,
            positive(w, "crop_size.width")?,
        )),
        _ => Err(format!("crop_size {size} has no height and width")),
    }
}

fn positive(n: u64, what: &str) -> Result<usize, String> {
    match usize::try_from(n) {
        Ok(n) if (1..=4096).contains(&n) => Ok(n),
        _ => Err(format!("{what} is {n}, outside 1..=4096")),
    }
}

/// `image_mean` / `image_std`: three numbers, one for all channels, or absent (CLIP's).
fn parse_triple(value: Option<&Value>, default: [f32; 3], what: &str) -> Result<[f32; 3], String> {
    match value {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
        Some(Value::Array(values)) if values.len() == 3 => {
            let mut out = [0f32; 3];
            for (slot, value) in out.iter_mut().zip(values) {
                *slot = value.as_f64().ok_or(format!("{what} has a non-number"))? as f32;
            }
            Ok(out)
        }
        Some(other) => Err(format!("{what} is {other}, not three numbers")),
    }
}

/// The rows (or columns) of the resized image a crop of `len` from `start` reads: those inside
/// `0..size`.
#[derive(Debug, Clone, Copy)]
struct Window {
    first: usize,
    end: usize,
}

fn window(start: i64, len: usize, size: usize) -> Window {
    let first = start.clamp(0, size as i64) as usize;
    let end = (start + len as i64).clamp(0, size as i64) as usize;
    Window { first, end }
}

impl Window {
    fn len(&self) -> usize {
        self.end - self.first
    }

    fn range(&self) -> std::ops::Range<usize> {
        self.first..self.end
    }

    /// Position within the window of resized index `i`, if it is inside.
    fn index_of(&self, i: i64) -> Option<usize> {
        (i >= self.first as i64 && i < self.end as i64).then(|| i as usize - self.first)
    }
}

/// PIL's `PRECISION_BITS` for 8-bit resampling (`Resample.c`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's bicubic kernel (`a = -0.5`), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of one output sample: the first input index and its fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for the outputs `outputs` of a resize of
/// `in_size` samples to `out_size`.
fn taps(in_size: usize, out_size: usize, outputs: std::ops::Range<usize>) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    // PIL multiplies by the reciprocal (`ss`); dividing could differ in the last bit.
    let inverse_scale = 1.0 / filter_scale;
    outputs
        .map(|out| {
            let center = (out as f64 + 0.5) * scale;
            // C's `(int)` truncates; below zero it is clamped anyway.
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (first..end)
                .map(|i| bicubic((i as f64 - center + 0.5) * inverse_scale))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let fixed = w * f64::from(1u32 << PRECISION_BITS);
                    // `(int)(x ± 0.5)`: rounding half away from zero.
                    (if w < 0.0 { fixed - 0.5 } else { fixed + 0.5 }) as i32
                })
                .collect();
            Taps { first, weights }
        })
        .collect()
}

/// PIL's `clip8`: the rounded fixed-point sum to 0..=255.
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The `rows x cols` window of `image` resized to `resized` (`(height, width)`), as PIL's
/// two-pass resize computes it, `image.channels` bytes per pixel.
fn resample_window(
    image: &RgbImage,
    resized: (usize, usize),
    rows: &Window,
    cols: &Window,
) -> Vec<u8> {
    let channels = image.channels;
    let (resized_h, resized_w) = resized;
    let horizontal = (resized_w != image.width).then(|| taps(image.width, resized_w, cols.range()));
    let vertical = (resized_h != image.height).then(|| taps(image.height, resized_h, rows.range()));
    // Input rows the vertical pass reads (all of the window's rows when it is the identity).
    let (in_first, in_end) = match &vertical {
        Some(taps) if !taps.is_empty() => (
            taps.iter().map(|t| t.first).min().unwrap_or(0),
            taps.iter()
                .map(|t| t.first + t.weights.len())
                .max()
                .unwrap_or(0),
        ),
        Some(_) => (0, 0),
        None => (rows.first, rows.end),
    };

    // Horizontal pass over the rows needed, the window's columns only.
    let width = cols.len();
    let mut temp = vec![0u8; (in_end - in_first) * width * channels];
    for y in in_first..in_end {
        let source = &image.data[y * image.width * channels..(y + 1) * image.width * channels];
        let target = &mut temp[(y - in_first) * width * channels..][..width * channels];
        for x in 0..width {
            for c in 0..channels {
                target[x * channels + c] = match &horizontal {
                    Some(taps) => {
                        let tap = &taps[x];
                        let mut sum = 1i64 << (PRECISION_BITS - 1);
                        for (k, &w) in tap.weights.iter().enumerate() {
                            sum += i64::from(source[(tap.first + k) * channels + c]) * i64::from(w);
                        }
                        clip8(sum)
                    }
                    None => source[(cols.first + x) * channels + c],
                };
            }
        }
    }

    // Vertical pass.
    let Some(vertical) = vertical else {
        return temp;
    };
    let mut out = vec![0u8; rows.len() * width * channels];
    for (r, tap) in vertical.iter().enumerate() {
        for i in 0..width * channels {
            let mut sum = 1i64 << (PRECISION_BITS - 1);
            for (k, &w) in tap.weights.iter().enumerate() {
                let row = tap.first + k - in_first;
                sum += i64::from(temp[row * width * channels + i]) * i64::from(w);
            }
            out[r * width * channels + i] = clip8(sum);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_schemas_parse_to_clips_values() {
        let current = r#"{"crop_size": {"height": 224, "width": 224}, "do_center_crop": true,
            "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}"#;
        let legacy = r#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true,
            "do_resize": true, "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}"#;
        let defaults = ImagePreprocessor::default();
        assert_eq!(ImagePreprocessor::from_json(current).unwrap(), defaults);
        assert_eq!(ImagePreprocessor::from_json(legacy).unwrap(), defaults);
        assert_eq!(ImagePreprocessor::from_json("{}").unwrap(), defaults);
        let bilinear = ImagePreprocessor::from_json(r#"{"resample": 2}"#).unwrap_err();
        assert!(bilinear.contains("resample 2"), "{bilinear}");
        let exact = ImagePreprocessor::from_json(r#"{"size": {"height": 30, "width": 40}}"#);
        assert_eq!(
            exact.unwrap().resize,
            Some(ResizeTo::Exact {
                height: 30,
                width: 40
            })
        );
        assert!(ImagePreprocessor::from_json(r#"{"size": {"longest_edge": 3}}"#).is_err());
    }

    #[test]
    fn shortest_side_resize_truncates_the_long_side_like_python() {
        let p = ImagePreprocessor::default();
        // int(224 * 333 / 250) = int(298.368) = 298.
        assert_eq!(p.resized_size(250, 333), (224, 298));
        assert_eq!(p.resized_size(333, 250), (298, 224));
        assert_eq!(p.output_size(333, 250), (224, 224));
    }

    #[test]
    fn compositing_over_white_keeps_opaque_and_whitens_transparent() {
        let out = composite_over_white(&[10, 20, 30, 255, 10, 20, 30, 0, 0, 0, 0, 128], 3);
        assert_eq!(&out[..6], &[10, 20, 30, 255, 255, 255]);
        // Half-transparent black over white is mid-grey.
        assert!(out[6..].iter().all(|&v| v == 127), "{out:?}");
    }

    #[test]
    fn identity_resize_and_crop_read_the_pixels_unchanged() {
        let image = RgbImage {
            width: 4,
            height: 4,
            channels: 1,
            data: (0..16).collect(),
        };
        let p = ImagePreprocessor {
            resize: Some(ResizeTo::ShortestEdge(4)),
            crop: Some((2, 2)),
            rescale: None,
            normalize: None,
        };
        // The centre 2 x 2 of 0..16 in rows of four, each value in all three channels.
        assert_eq!(p.pixels(&image), [5.0, 6.0, 9.0, 10.0].repeat(3));
    }

    #[test]
    fn a_crop_larger_than_the_image_pads_with_zeros() {
        let image = RgbImage {
            width: 2,
            height: 2,
            channels: 1,
            data: vec![9; 4],
        };
        let p = ImagePreprocessor {
            resize: None,
            crop: Some((4, 4)),
            rescale: None,
            normalize: None,
        };
        let plane: Vec<f32> = p.pixels(&image)[..16].to_vec();
        let expected = [
            0., 0., 0., 0., 0., 9., 9., 0., 0., 9., 9., 0., 0., 0., 0., 0.,
        ];
        assert_eq!(plane, expected);
    }

    #[test]
    fn limits_refuse_by_side_pixels_and_minimum() {
        let limits = ImageLimits::default();
        assert!(limits.check(8192, 7000).is_ok());
        assert_eq!(
            limits.check(8193, 10).unwrap_err().kind(),
            ErrorKind::TooLarge
        );
        // 8192 x 8192 is 67 MP, over the 64 MP default.
        assert_eq!(
            limits.check(8192, 8192).unwrap_err().kind(),
            ErrorKind::TooLarge
        );
        assert_eq!(
            limits.check(1, 1).unwrap_err().kind(),
            ErrorKind::UnsupportedMedia
        );
    }
}
