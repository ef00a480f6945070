//! `embedfleet embed`: the in-process pipeline, no server. Inputs come from the arguments, or one
//! per stdin line; each becomes one JSON object on stdout, shaped like one `data` element of the
//! wire reply.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use embedfleet_fleet::{Pipeline, PipelineRequest};
use embedfleet_models::{Device, EmbedOptions, ModelInput, ModelRegistry, WeightResolver};

#[derive(Args)]
pub struct EmbedArgs {
    /// Texts to embed; with none, one input per stdin line.
    texts: Vec<String>,
    /// Models to run, comma-separated (`embedfleet models` lists them).
    #[arg(long, value_delimiter = ',', default_value = "minilm,mpnet")]
    models: Vec<String>,
    /// Also print each model's own vector.
    #[arg(long)]
    partials: bool,
    /// Skip fusion: print the per-model vectors only.
    #[arg(long)]
    no_fuse: bool,
    /// Trained FuseMoE weights (safetensors); without it, the seeded weights every node shares.
    #[arg(long, env = "EMBEDFLEET_FUSION_WEIGHTS")]
    fusion_weights: Option<PathBuf>,
    /// Directory with one checkpoint directory per model (`<dir>/minilm/config.json`, ...).
    #[arg(long, env = "EMBEDFLEET_MODELS_DIR")]
    model_dir: Option<PathBuf>,
    /// Reject input longer than a model's limit instead of truncating it.
    #[arg(long)]
    no_truncate: bool,
    /// Leave partial vectors at the scale the model produced.
    #[arg(long)]
    no_normalize: bool,
    /// Task instruction, for instruction-tuned models.
    #[arg(long)]
    instruction: Option<String>,
    /// Inputs embedded per pass when reading stdin; bounds memory on any input size.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=4096))]
    batch_size: u16,
}

pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    let resolver = WeightResolver::from_env(args.model_dir.clone());
    let registry = Arc::new(ModelRegistry::new(resolver, Device::Cpu));
    let pipeline = Pipeline::new(registry, &args.models, args.fusion_weights.as_deref())?;
    pipeline.warm_up()?;
    let request = PipelineRequest {
        options: EmbedOptions {
            truncate: !args.no_truncate,
            normalize: !args.no_normalize,
            instruction: args.instruction.clone(),
        },
        fuse: !args.no_fuse,
        return_partials: args.partials,
    };

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if !args.texts.is_empty() {
        let inputs: Vec<ModelInput> = args.texts.iter().cloned().map(ModelInput::Text).collect();
        emit(&pipeline, &inputs, &request, 0, &mut out)?;
        return Ok(out.flush()?);
    }

    let progress = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut lines = std::io::stdin().lock().split(b'\n');
    let mut done = 0usize;
    loop {
        let chunk = read_chunk(&mut lines, usize::from(args.batch_size), done)?;
        if chunk.is_empty() {
            break;
        }
        emit(&pipeline, &chunk, &request, done, &mut out)?;
        done += chunk.len();
        out.flush()?;
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
) -> anyhow::Result<Vec<ModelInput>> {
    let mut chunk = Vec::with_capacity(max);
    for line in lines.by_ref().take(max) {
        let number = first_line + chunk.len() + 1;
        let mut bytes = line.context("reading stdin")?;
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| anyhow::anyhow!("stdin line {number} is not valid UTF-8 ({e})"))?;
        chunk.push(ModelInput::Text(text));
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
