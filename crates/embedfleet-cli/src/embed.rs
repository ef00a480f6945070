//! `embedfleet embed`: the in-process pipeline, no server, or with `--nats-url` a running fleet
//! (`embedfleet serve`) through `embedfleet-client`. Inputs come from the arguments (`--image`
//! files first, then the texts, then `--audio` files), or one per stdin line; each becomes one
//! JSON object on stdout, shaped like one `data` element of the wire reply, the same in both modes.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use embedfleet_client::{ClientError, EmbedClient};
use embedfleet_fleet::{Pipeline, PipelineRequest};
use embedfleet_models::{
    AudioLimits, DeviceName, EmbedOptions, ModelDtypes, ModelInput, ModelRegistry, WeightResolver,
};
use embedfleet_proto::{
    EmbedRequest, EmbeddingData, EncodingFormat, InputItem, InputType, OutputOptions,
};

use crate::security_args::NatsSecurityArgs;

/// The models `embed` runs in this process when `--models` is not given. With `--nats-url` the
/// fleet's own default set applies instead.
const DEFAULT_MODELS: [&str; 2] = ["minilm", "mpnet"];

#[derive(Args)]
pub struct EmbedArgs {
    /// Texts to embed; with none (and no --image or --audio), one input per stdin line.
    texts: Vec<String>,
    /// An audio file to embed (WAV, FLAC, MP3, Ogg Vorbis; whisper-large reads it); repeat the
    /// flag for several. Audio comes after the texts in the output. One file per flag, so that
    /// `--audio hello.wav "a cat"` leaves "a cat" a text.
    #[arg(long = "audio", value_name = "FILE")]
    audio: Vec<PathBuf>,
    /// Longest audio embedded in process, in seconds; longer is refused.
    #[arg(long, env = "EMBEDFLEET_MAX_AUDIO_SECONDS", default_value_t = 600.0)]
    max_audio_seconds: f64,
    /// An image file to embed (PNG, JPEG, WebP, GIF), sent as its bytes; repeat the flag for
    /// several. Images come before the texts in the output. Only models that take images
    /// (clip-vit-l) embed them; the others' slots are masked in the fused vector.
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<PathBuf>,
    #[command(flatten)]
    image_limits: crate::fleet_args::ImageLimitArgs,
    /// Models to run, comma-separated (`embedfleet models` lists them) [default: minilm,mpnet;
    /// with --nats-url, the fleet's default set].
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// Also print each model's own vector.
    #[arg(long)]
    partials: bool,
    /// Skip fusion: print the per-model vectors only.
    #[arg(long)]
    no_fuse: bool,
    /// Trained FuseMoE weights (safetensors); without it, the default layer: the shipped
    /// trained weights for minilm + mpnet, the seeded weights every node shares for other sets.
    #[arg(long, env = "EMBEDFLEET_FUSION_WEIGHTS")]
    fusion_weights: Option<PathBuf>,
    /// Directory with one checkpoint directory per model (`<dir>/minilm/config.json`, ...).
    #[arg(long, env = "EMBEDFLEET_MODELS_DIR")]
    model_dir: Option<PathBuf>,
    /// Where the models run: `cpu`, or `cuda:N` in a CUDA build (`--features cuda`).
    #[arg(long, env = "EMBEDFLEET_DEVICE", default_value = "cpu")]
    device: DeviceName,
    /// Weight dtype of every model (`q8_0`) or per model (`mpnet=q4k,minilm=f32`): f32, f16,
    /// bf16, q8_0, q4k [default: f32]. In-process only; a fleet's workers have their own.
    #[arg(long)]
    dtype: Option<ModelDtypes>,
    /// Reject input longer than a model's limit instead of truncating it.
    #[arg(long)]
    no_truncate: bool,
    /// Leave partial vectors at the scale the model produced.
    #[arg(long)]
    no_normalize: bool,
    /// Task instruction, for the models that read one (instructor-xl; e5-mistral for queries);
    /// the others ignore it (docs/protocol.md).
    #[arg(long)]
    instruction: Option<String>,
    /// Whether the inputs are search queries or documents; asymmetric models (bge-large,
    /// e5-mistral) embed queries differently, the others ignore it.
    #[arg(long, value_enum, default_value_t = InputTypeArg::Document)]
    input_type: InputTypeArg,
    /// Matryoshka: print the first N components of the fused vector, renormalised (1-1536).
    #[arg(long, value_name = "N")]
    dimensions: Option<usize>,
    /// How the fused vector is printed: float, base64 (little-endian f32), int8, uint8,
    /// binary or ubinary (packed sign bits); see docs/protocol.md for the int8 calibration.
    #[arg(long, default_value = "float", value_parser = parse_encoding_format)]
    encoding_format: EncodingFormat,
    /// Inputs embedded per pass when reading stdin; bounds memory on any input size. With
    /// --nats-url, inputs per request (arguments too); the fleet takes at most 256 by default.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=4096))]
    batch_size: u16,
    /// Send the inputs to the embedfleet service on this NATS server (`embedfleet serve`)
    /// instead of embedding in this process; --model-dir and --fusion-weights are then the
    /// fleet's business and ignored here.
    #[arg(long, value_name = "URL")]
    nats_url: Option<String>,
    /// Credentials and TLS for --nats-url.
    #[command(flatten)]
    nats_security: NatsSecurityArgs,
}

/// `--input-type`: the wire's `input_type`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum InputTypeArg {
    Document,
    Query,
}

impl From<InputTypeArg> for InputType {
    fn from(arg: InputTypeArg) -> Self {
        match arg {
            InputTypeArg::Document => InputType::Document,
            InputTypeArg::Query => InputType::Query,
        }
    }
}

pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    output_options(&args)?;
    if let Some(url) = args.nats_url.clone() {
        return run_remote(&args, &url);
    }
    // Read the files before any model loads, so a wrong path fails at once.
    let inputs = argument_inputs(&args)?;
    let models: Vec<String> = match &args.models {
        Some(models) => models.clone(),
        None => DEFAULT_MODELS.map(String::from).to_vec(),
    };
    let resolver = WeightResolver::from_env(args.model_dir.clone());
    let registry = Arc::new(
        ModelRegistry::new(resolver, args.device.open()?)
            .with_dtypes(args.dtype.clone().unwrap_or_default())
            .with_audio_limits(AudioLimits {
                max_seconds: args.max_audio_seconds,
            })
            .with_image_limits(args.image_limits.limits()),
    );
    let pipeline = Pipeline::new(registry, &models, args.fusion_weights.as_deref())?;
    pipeline.warm_up()?;
    let request = PipelineRequest {
        options: EmbedOptions {
            truncate: !args.no_truncate,
            normalize: !args.no_normalize,
            // Blank is no instruction, as on the wire (EmbedRequest::effective_instruction).
            instruction: args
                .instruction
                .clone()
                .filter(|instruction| !instruction.trim().is_empty()),
            input_type: args.input_type.into(),
        },
        fuse: !args.no_fuse,
        return_partials: args.partials,
        output: output_options(&args)?,
    };

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if has_argument_inputs(&args) {
        emit(&pipeline, &inputs, &request, 0, &mut out)?;
        return Ok(out.flush()?);
    }
    for_each_stdin_chunk(usize::from(args.batch_size), |texts, first_index| {
        let inputs: Vec<ModelInput> = texts.into_iter().map(ModelInput::Text).collect();
        emit(&pipeline, &inputs, &request, first_index, &mut out)?;
        Ok(out.flush()?)
    })
}

/// Files larger than this are refused before they are read; the decoders' own limits (image
/// dimensions, audio duration) bound what a smaller file may expand to.
const MAX_MEDIA_FILE_BYTES: u64 = 256 << 20;

fn has_argument_inputs(args: &EmbedArgs) -> bool {
    !args.texts.is_empty() || !args.images.is_empty() || !args.audio.is_empty()
}

/// The inputs named on the command line: `--image` files, then the texts, then `--audio` files.
fn argument_inputs(args: &EmbedArgs) -> anyhow::Result<Vec<ModelInput>> {
    let mut inputs = Vec::new();
    for path in &args.images {
        let bytes = read_media_file(path, "--image")?;
        // The extension is only a hint: the decoder sniffs the bytes.
        let format = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        inputs.push(ModelInput::Image { bytes, format });
    }
    inputs.extend(args.texts.iter().cloned().map(ModelInput::Text));
    for path in &args.audio {
        // The container says its own sample rate.
        let bytes = read_media_file(path, "--audio")?;
        inputs.push(ModelInput::Audio {
            bytes,
            sample_rate: None,
        });
    }
    Ok(inputs)
}

fn read_media_file(path: &std::path::Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {flag} {}", path.display()))?
        .len();
    if size > MAX_MEDIA_FILE_BYTES {
        bail!(
            "{flag} {} is {size} bytes, over {MAX_MEDIA_FILE_BYTES}",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
}

fn parse_encoding_format(text: &str) -> Result<EncodingFormat, String> {
    text.parse::<EncodingFormat>().map_err(|e| e.message)
}

/// `--dimensions` and `--encoding-format`, checked like the fleet checks them.
fn output_options(args: &EmbedArgs) -> anyhow::Result<OutputOptions> {
    let request = EmbedRequest {
        fuse: !args.no_fuse,
        dimensions: args.dimensions,
        encoding_format: args.encoding_format,
        ..EmbedRequest::default()
    };
    request
        .output_options()
        .map_err(|e| anyhow::anyhow!("{}", e.message))
}

/// Reads stdin in chunks of up to `batch_size` lines and hands each to `embed` with the index
/// of its first input, showing progress on a terminal. Fails when stdin has no line at all.
fn for_each_stdin_chunk(
    batch_size: usize,
    mut embed: impl FnMut(Vec<String>, usize) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let progress = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut lines = std::io::stdin().lock().split(b'\n');
    let mut done = 0usize;
    loop {
        let chunk = read_chunk(&mut lines, batch_size, done)?;
        if chunk.is_empty() {
            break;
        }
        let len = chunk.len();
        embed(chunk, done)?;
        done += len;
        if progress {
            eprint!(
                "\rembedded {done} inputs ({:.1}/s)",
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    if progress && done > 0 {
        eprintln!();
    }
    if done == 0 {
        bail!("no input: pass TEXT arguments or one input per stdin line");
    }
    Ok(())
}

/// Reads up to `max` lines; `first_line` is the 0-based number of the first, for messages.
fn read_chunk(
    lines: &mut impl Iterator<Item = std::io::Result<Vec<u8>>>,
    max: usize,
    first_line: usize,
) -> anyhow::Result<Vec<String>> {
    let mut chunk = Vec::with_capacity(max);
    for line in lines.by_ref().take(max) {
        let number = first_line + chunk.len() + 1;
        let mut bytes = line.context("reading stdin")?;
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| anyhow::anyhow!("stdin line {number} is not valid UTF-8 ({e})"))?;
        chunk.push(text);
    }
    Ok(chunk)
}

fn emit(
    pipeline: &Pipeline,
    inputs: &[ModelInput],
    request: &PipelineRequest,
    first_index: usize,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let output = pipeline.embed(inputs, request, first_index)?;
    for element in &output.data {
        serde_json::to_writer(&mut *out, element)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// `--nats-url`: the same inputs and flags, sent to the fleet as one embed.v1 request per
/// `--batch-size` inputs, one at a time so that output order is input order.
fn run_remote(args: &EmbedArgs, url: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let security = args.nats_security.security()?;
    let client = runtime
        .block_on(EmbedClient::connect_with(url, &security))
        .map_err(|e| remote_error(e, url))?;
    let batch_size = usize::from(args.batch_size);

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut embed = |items: Vec<InputItem>, first_index: usize| -> anyhow::Result<()> {
        let expected = items.len();
        let reply = runtime
            .block_on(client.embed(&remote_request(args, items)))
            .map_err(|e| remote_error(e, url))?;
        emit_reply(reply.data, expected, first_index, &mut out)?;
        Ok(out.flush()?)
    };
    if has_argument_inputs(args) {
        let items: Vec<InputItem> = argument_inputs(args)?
            .iter()
            .map(ModelInput::to_item)
            .collect();
        for (n, chunk) in items.chunks(batch_size).enumerate() {
            embed(chunk.to_vec(), n * batch_size)?;
        }
        return Ok(());
    }
    for_each_stdin_chunk(batch_size, |texts, first_index| {
        embed(
            texts.into_iter().map(InputItem::text).collect(),
            first_index,
        )
    })
}

/// The embed.v1 request for `items` under the command's flags. Without `--models` it names
/// none, so the fleet runs its own default set. Plain texts travel as `input` (what every
/// fleet version reads); a batch with media as `inputs` items.
fn remote_request(args: &EmbedArgs, items: Vec<InputItem>) -> EmbedRequest {
    let plain_text = |item: &InputItem| {
        item.text.is_some() && *item == InputItem::text(item.text.clone().unwrap_or_default())
    };
    let request = if items.iter().all(plain_text) {
        EmbedRequest::texts(items.into_iter().filter_map(|item| item.text))
    } else {
        EmbedRequest::items(items)
    };
    let mut request = request
        .with_fuse(!args.no_fuse)
        .with_partials(args.partials)
        .with_normalize(!args.no_normalize)
        .with_truncate(!args.no_truncate)
        .with_input_type(args.input_type.into())
        .with_encoding_format(args.encoding_format);
    request.dimensions = args.dimensions;
    if let Some(models) = &args.models {
        request = request.with_models(models.iter().cloned());
    }
    if let Some(instruction) = &args.instruction {
        request = request.with_instruction(instruction.clone());
    }
    request
}

/// Prints a reply's elements in input order, numbered from `first_index` like the in-process
/// path numbers them across stdin chunks.
fn emit_reply(
    mut data: Vec<EmbeddingData>,
    expected: usize,
    first_index: usize,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    data.sort_by_key(|element| element.index);
    let in_order = data
        .iter()
        .enumerate()
        .all(|(i, element)| element.index == i);
    if data.len() != expected || !in_order {
        bail!(
            "the fleet's reply does not match the request: {} elements for {expected} inputs",
            data.len()
        );
    }
    for mut element in data {
        element.index += first_index;
        serde_json::to_writer(&mut *out, &element)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// One line that says what to do, for the failures a user can act on.
fn remote_error(error: ClientError, url: &str) -> anyhow::Error {
    match error {
        ClientError::NoResponders => anyhow::anyhow!(
            "no embedfleet service answers on {url}: start one with `embedfleet serve`"
        ),
        ClientError::Connect { source, .. } => anyhow::anyhow!(
            "cannot connect to NATS at {url} ({source}): {}",
            match crate::security_args::connect_hint(&source) {
                crate::security_args::UNREACHABLE_HINT =>
                    "check the URL (`embedfleet serve` prints the one it listens on)",
                hint => hint,
            }
        ),
        ClientError::Timeout(waited) => anyhow::anyhow!(
            "the embedfleet service on {url} did not answer within {}s",
            waited.as_secs()
        ),
        other => anyhow::Error::new(other),
    }
}
