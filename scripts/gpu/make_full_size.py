#!/usr/bin/env python3
"""Full-size checkpoints with random weights, for timing the models on a GPU machine that cannot
download the real ones.

Each checkpoint has the real model's config (layers, widths, heads, vocabulary), tensor names and
sentence-transformers module folders, so it loads through embedfleet's normal path and runs at the
real model's speed; its vectors mean nothing. The non-weight files (tokenizer, module configs)
come from a template folder: the committed fixture checkpoint of the same architecture, or the
real minilm / mpnet tokenizer files for the BERT family.

    python3 scripts/gpu/make_full_size.py --out /tmp/full --templates DIR --models minilm,e5-mistral

DIR holds one template folder per model name. Needs torch, transformers and safetensors (all on
the GPU machines' image). Weights are made on the GPU when there is one (seconds for a 7B model)
and written as bf16 safetensors; progress goes to stderr, a JSON summary to stdout.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# The real models' shapes (from their config.json on the hub). Every size field the templates
# set is overridden here: a template's own (tiny) value left in place makes a different model.
BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, vocab_size=30522, max_position_embeddings=512,
                  type_vocab_size=2)
SHAPES = {
    "minilm": ("bert", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, vocab_size=30522,
                            max_position_embeddings=512, type_vocab_size=2)),
    "bge-large": ("bert", BERT_LARGE),
    "gte-large": ("bert", BERT_LARGE),
    "mpnet": ("mpnet", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, vocab_size=30527,
                            max_position_embeddings=514)),
    "instructor-xl": ("t5", dict(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
                                 vocab_size=32128, feed_forward_proj="gated-gelu",
                                 relative_attention_num_buckets=32,
                                 relative_attention_max_distance=128)),
    "sentence-t5-xxl": ("t5", dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
                                   num_layers=24, vocab_size=32128,
                                   feed_forward_proj="gated-gelu",
                                   relative_attention_num_buckets=32,
                                   relative_attention_max_distance=128)),
    "e5-mistral": ("mistral", dict(hidden_size=4096, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8,
                                   head_dim=128, intermediate_size=14336, vocab_size=32000,
                                   max_position_embeddings=32768, rope_theta=10000.0,
                                   rms_norm_eps=1e-5, sliding_window=4096)),
}
# The sentence-transformers Dense head of the T5 models maps to this width.
DENSE_OUT = 768


def log(message):
    print(f"make_full_size: {message}", file=sys.stderr, flush=True)


def model_class(kind):
    import transformers
    return {
        "bert": transformers.BertModel,
        "mpnet": transformers.MPNetModel,
        "t5": transformers.T5EncoderModel,
        "mistral": transformers.MistralModel,
    }[kind]


def config_for(kind, template, shape):
    import transformers
    base = json.loads((template / "config.json").read_text()) if (template / "config.json").exists() else {}
    base.update(shape)
    config_class = {
        "bert": transformers.BertConfig,
        "mpnet": transformers.MPNetConfig,
        "t5": transformers.T5Config,
        "mistral": transformers.MistralConfig,
    }[kind]
    known = {k: v for k, v in base.items() if k not in ("architectures", "transformers_version")}
    return config_class(**known)


def copy_template(template, out):
    """Every file of the template but its weights and config (made here)."""
    for path in template.rglob("*"):
        relative = path.relative_to(template)
        if path.is_dir() or path.name in ("config.json",) and path.parent == template:
            continue
        if path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"):
            continue
        if path.name == "reference.json" or path.name.endswith(".reference.json"):
            continue
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def dense_heads(template, out, width, device):
    """The T5 models' `Dense` module folders, resized to the real width → DENSE_OUT."""
    for dense in sorted(template.glob("*_Dense")):
        config = json.loads((dense / "config.json").read_text())
        config.update(in_features=width, out_features=DENSE_OUT)
        target = out / dense.name
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text(json.dumps(config, indent=2))
        weight = torch.randn(DENSE_OUT, width, device=device) / width ** 0.5
        tensors = {"linear.weight": weight.to(torch.bfloat16).cpu().contiguous()}
        if config.get("bias"):
            tensors["linear.bias"] = torch.zeros(DENSE_OUT, dtype=torch.bfloat16)
        save_file(tensors, str(target / "model.safetensors"))


def make(name, templates, out_root, device):
    kind, shape = SHAPES[name]
    template = templates / name
    if not template.is_dir():
        raise SystemExit(f"make_full_size: no template folder {template}")
    out = out_root / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.time()
    config = config_for(kind, template, shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(kind)(config).to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"{name}: {parameters / 1e9:.2f} B parameters made in {time.time() - started:.1f} s")
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="4GB")
    copy_template(template, out)
    width = shape.get("d_model") or shape["hidden_size"]
    for pooling in out.glob("*_Pooling/config.json"):
        config = json.loads(pooling.read_text())
        # Both the classic and the newer sentence-transformers key.
        for key in ("word_embedding_dimension", "embedding_dimension"):
            if key in config or key == "word_embedding_dimension":
                config[key] = width
        pooling.write_text(json.dumps(config, indent=2))
    if kind == "t5":
        dense_heads(template, out, width, device)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    seconds = time.time() - started
    log(f"{name}: written to {out} in {seconds:.1f} s")
    return {"model": name, "parameters": parameters, "seconds": round(seconds, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--templates", type=Path, required=True)
    parser.add_argument("--models", required=True, help="comma-separated catalogue names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    made = [make(name.strip(), args.templates, args.out, args.device)
            for name in args.models.split(",") if name.strip()]
    print(json.dumps(made))


if __name__ == "__main__":
    main()
