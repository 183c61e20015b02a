"""Subcommands of the `bitnet` command line. Each is a thin layer over a library function."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .args import LM_HEADS, arg, command, device as named_device, lm_head_arg
from .config import PRESETS, BitNetConfig
from .experiment import CompareArgs
from .runlock import RunLock
from .train.trainer import TrainConfig


@dataclass
class InfoArgs:
    model: str = arg(help=f"a preset ({', '.join(PRESETS)}) or a checkpoint folder", positional=True)


@command("info", InfoArgs)
def info(args: InfoArgs) -> None:
    """Parameter count and weight bytes, packed vs bf16, of a preset or a checkpoint folder."""
    from .report import human_bytes, size_rows, table

    if os.path.isdir(args.model):
        config, mode = BitNetConfig.load(os.path.join(args.model, "config.json"))
        where = f"folder {args.model}: linear {config.linear}" + (f", quantization_mode {mode}, linear_class {config.linear_class}" if mode else "")
    elif args.model in PRESETS:
        config = BitNetConfig.from_preset(args.model)
        where = f"preset {args.model}"
    else:
        raise ValueError(f"{args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a folder")
    c = config
    print(where)
    if os.path.isdir(args.model):
        from .checkpoint import folder_steps, step_mismatch

        steps = folder_steps(args.model)
        held = sorted({v for v in [steps["config"], *steps["weights"].values()] if v is not None})
        state = f", trainer state at step {steps['trainer_state']}" if steps["trainer_state"] is not None else ""
        print(f"step: {', '.join(map(str, held)) if held else 'not recorded'} (model files){state}")
        mismatch = step_mismatch(args.model, steps)
        if mismatch:
            print(f"warning: {mismatch}")
    print(f"model_type {c.model_type}, hidden {c.hidden_size}, intermediate {c.intermediate_size}, layers {c.num_hidden_layers}, "
          f"heads {c.num_attention_heads} ({c.num_key_value_heads} kv, dim {c.dim_head}), vocab {c.vocab_size}, "
          f"{'tied' if c.tie_word_embeddings else 'untied'} embeddings, act {c.hidden_act}")
    rows = size_rows(config)
    print(f"parameters: {rows[0]['parameters']:,}")
    for r in rows:
        r["linear_h"], r["other_h"], r["total_h"] = human_bytes(r["linear"]), human_bytes(r["other"]), human_bytes(r["total"])
    print(table(rows, [("format", "weights", ""), ("linear_h", "projections", ""), ("linear_vs_bf16", "x smaller", ".2f"),
                       ("other_h", "embeddings+norms", ""), ("total_h", "total", ""), ("total_vs_bf16", "x smaller", ".2f")]))
    print("(float tensors counted as bf16; projections = the 7 linear layers of every block, scales included)")
    import torch

    from .ops import describe_cpu_backend, describe_gpu_backend

    print(f"packed layers on this CPU: {describe_cpu_backend()}")
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        print(f"packed layers on {describe_gpu_backend(torch.device('cuda', index))}")


@dataclass
class ConvertArgs:
    src: str = arg(help="checkpoint folder or hub id (org/name): ours, transformers' bitnet, or a Llama-style model",
                   positional=True)
    dst: str = arg(help="output folder (a .gguf file with --to gguf)", positional=True)
    to: str = arg("packed", help="packed: offline packed weights for inference (2 bits; 1 bit for binary models, "
                  "which load here only); unpacked: offline W_q values as floats + weight_scale, which transformers "
                  "loads (the export of binary models for transformers); latent: online latent weights for (QAT) "
                  "training; gguf: one GGUF file for llama.cpp (or ik_llama.cpp: --gguf-type iq2_bn)",
                  choices=["packed", "unpacked", "latent", "gguf"])
    linear_class: str = arg("autobitlinear", help="weight_scale convention of packed weights",
                            choices=["autobitlinear", "bitlinear"])
    weight_bits: str = arg("ternary", help="for a float model: the BitLinear kind it converts to",
                           choices=["ternary", "binary"])
    gguf_type: str = arg("tq2_0", help="--to gguf: type of the projections: ternary blocks TQ2_0 (2.06 bits/weight) or "
                         "TQ1_0 (1.69) for llama.cpp, IQ2_BN (2 bits + a float32 scale a row) or IQ1_BN (1.625 + "
                         "an fp16 scale a row) for ik_llama.cpp, or F16 W_q (for runtimes that quantize with their "
                         "own tools)", choices=["tq2_0", "tq1_0", "iq2_bn", "iq1_bn", "f16"])
    gguf_arch: str | None = arg(None, help="--to gguf: GGUF architecture (default: llama or bitnet by model_type; "
                                "bitnet-b1.58, ik_llama.cpp's graph of the 2B-4T block, with iq2_bn / iq1_bn)",
                                choices=["llama", "bitnet", "bitnet-b1.58"])
    gguf_fallback: str = arg("q4_0", help="--to gguf: type of projections whose input width is not a multiple of 256 "
                             "(q4_0 and q8_0 hold ternary values exactly; error: refuse)",
                             choices=["q4_0", "q8_0", "f16", "error"])
    gguf_float: str = arg("f16", help="--to gguf: type of the embeddings and lm_head", choices=["f16", "f32"])
    gguf_scale: str | None = arg(None, help="--to gguf: per-matrix scale as an F32 .scale tensor (exact; the default "
                                 "for llama.cpp) or folded into the block scales (fp16; IQ2_BN's float32 row scale: "
                                 "exact; the default for ik_llama.cpp, which reads no .scale tensors)",
                                 choices=["tensor", "fold"])
    revision: str | None = arg(None, help="hub id: branch, tag or commit (default: main)")
    cache_dir: str | None = arg(None, help="hub id: huggingface_hub cache (default: $HF_HUB_CACHE)")
    local_files_only: bool = arg(False, help="hub id: the cache only, no network (as HF_HUB_OFFLINE=1)")


@command("convert", ConvertArgs)
def convert_cmd(args: ConvertArgs) -> None:
    """Convert a checkpoint folder: a float (Llama-style) model to BitLinear, latent <-> packed."""
    from .convert import convert, freeze, quantization_mode, unfreeze
    from .model import BitNetForCausalLM

    model = BitNetForCausalLM.from_pretrained(args.src, revision=args.revision, cache_dir=args.cache_dir,
                                              local_files_only=args.local_files_only)
    before = quantization_mode(model) or "float"
    if model.config.linear == "bf16":
        convert(model, weight_bits=args.weight_bits)
    if args.to == "gguf":
        from .gguf_export import export_gguf

        report = export_gguf(model, args.dst, args.gguf_type, args.gguf_fallback, args.gguf_float, args.gguf_scale,
                             architecture=args.gguf_arch)
        print(f"{args.src} ({before}) -> {report.summary()}")
        return
    if args.to == "latent":
        unfreeze(model, dtype=model.model.embed_tokens.weight.dtype)
    else:
        freeze(model)
    model.config.linear_class = args.linear_class
    with RunLock(args.dst):  # one writer per folder
        model.save_pretrained(args.dst, linear_class=args.linear_class, unpacked=args.to == "unpacked")
    print(f"{args.src} ({before}) -> {args.dst} ({quantization_mode(model)}, linear {model.config.linear})")


@command("train", TrainConfig)
def train_cmd(cfg: TrainConfig) -> None:
    """Train BitNet (or its bf16 twin) on a text corpus; works under torchrun (DDP / --fsdp)."""
    from .train.trainer import train

    row = train(cfg)
    if row and int(os.environ.get("RANK", "0")) == 0:
        val = f", val loss {row['val_loss']:.4f} (ppl {row['val_ppl']:.2f})" if "val_loss" in row else ""
        if "teacher_val_loss" in row:
            val += f", the teacher's {row['teacher_val_loss']:.4f}"
        kl = f", distill loss {row['distill_loss']:.4f}" if "distill_loss" in row else ""
        print(f"step {row['step']}: train loss {row['train_loss']:.4f}{kl}{val}; checkpoint in {cfg.out}, "
              f"packed export in {os.path.join(cfg.out, 'export')}")


@dataclass
class MemoryArgs:
    preset: str = arg(help="model shape", positional=True, choices=list(PRESETS))
    micro_batch: int = arg(8, help="sequences per forward, per rank")
    seq_len: int = arg(2048, help="tokens per sequence")
    dp: int = arg(1, help="data-parallel ranks (replicas of the model)")
    fsdp: bool = arg(False, help="FSDP2 / ZeRO-3: weights, gradients and optimizer states sharded over --dp ranks")
    tp: int = arg(1, help="tensor-parallel ranks per replica (world = dp x tp)")
    sequence_parallel: bool = arg(True, help="with --tp: norms and residual stream sharded along the sequence")
    linear: str = arg("bitnet", help="linear layers", choices=["bitnet", "bitnet1", "bf16"])
    bf16: bool = arg(True, help="bf16 autocast (fp32 master weights); --no-bf16 for fp32")
    activation_checkpointing: bool = arg(False, help="recompute blocks in the backward pass")
    teacher: str | None = arg(None, help="a distillation teacher of this preset's shape (a float model; "
                              "bitnet train --teacher): its weights and logits", choices=list(PRESETS))


@command("memory", MemoryArgs)
def memory_cmd(args: MemoryArgs) -> None:
    """Per-rank training memory: weights, gradients, AdamW states and activations."""
    from .report import human_bytes
    from .train.memory import estimate
    from .train.parallel import check_layout

    config = BitNetConfig.from_preset(args.preset, linear=args.linear)
    if args.tp > 1:
        check_layout(config, args.tp, args.tp, args.seq_len, args.sequence_parallel)
    teacher = None
    if args.teacher:
        teacher = BitNetConfig.from_preset(args.teacher, linear="bf16", vocab_size=config.vocab_size)
        if args.tp > 1:
            check_layout(teacher, args.tp, args.tp, args.seq_len, args.sequence_parallel)
    m = estimate(config, args.micro_batch, args.seq_len, args.dp, args.fsdp, args.bf16, args.activation_checkpointing,
                 args.tp, args.sequence_parallel, teacher)
    shard = f"sharded over {args.dp} ranks (FSDP2)" if args.fsdp else f"replicated on {args.dp} rank(s) (DDP)"
    tp = (f", tensor parallel over {args.tp} ranks ({'with' if args.sequence_parallel else 'without'} sequence "
          f"parallelism; world {args.dp * args.tp})" if args.tp > 1 else "")
    print(f"{args.preset} ({args.linear}), micro-batch {args.micro_batch} x seq_len {args.seq_len}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, states {shard}{tp}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}"
          f"{f', distilling from a {args.teacher} teacher' if teacher else ''}")
    for name in ("weights", "gradients", "optimizer", "activations", *(["teacher"] if teacher else []), "total"):
        value = getattr(m, name)
        print(f"  {name:<12} {human_bytes(value):>12}  ({value:,} bytes)")


@dataclass
class EvalArgs:
    task: str = arg(help="what to measure", positional=True, choices=["ppl"])
    model: str = arg(help="checkpoint folder or hub id (org/name): ours (any format) or any transformers causal LM",
                     positional=True)
    data: str = arg(help="text file to score (e.g. wikitext-2-raw/wiki.test.raw)")
    max_length: int | None = arg(None, help="tokens per window (default: min(1024, the model's context))")
    stride: int | None = arg(None, help="sliding protocol: tokens between window starts (default: max_length / 2)")
    protocol: str = arg("sliding", help="sliding (transformers' guide) or chunks (BOS-prefixed, non-overlapping)",
                        choices=["sliding", "chunks"])
    batch_size: int = arg(4, help="windows per forward pass")
    lm_head: str = lm_head_arg()
    device: str | None = arg(None, help="cpu, cuda, ... (default: cuda if available)")
    json: bool = arg(False, help="print one JSON object instead of text")
    progress: bool = arg(True, help="progress bar (stderr)")
    revision: str | None = arg(None, help="hub id: branch, tag or commit (default: main)")
    cache_dir: str | None = arg(None, help="hub id: huggingface_hub cache (default: $HF_HUB_CACHE)")
    local_files_only: bool = arg(False, help="hub id: the cache only, no network (as HF_HUB_OFFLINE=1)")


@command("eval", EvalArgs)
def eval_cmd(args: EvalArgs) -> None:
    """Perplexity of a checkpoint folder on a text file (sliding-window or BOS-chunk protocol)."""
    from .evaluate import evaluate_folder, result_json

    device = named_device(args.device)
    r = evaluate_folder(args.model, args.data, args.max_length, args.stride, args.protocol, args.batch_size, device,
                        progress=args.progress and not args.json, revision=args.revision, cache_dir=args.cache_dir,
                        local_files_only=args.local_files_only, lm_head_bits=LM_HEADS[args.lm_head])
    print(result_json(r) if args.json else f"{args.model} on {args.data}: {r.summary()}")


@command("compare", CompareArgs)
def compare_cmd(args: CompareArgs) -> None:
    """BitNet b1.58 vs binary BitNet vs the bf16 twin: train each, pick its LR on dev, test perplexity."""
    from .experiment import describe_sweeps, run_comparison

    corpus = args.data or "the docstrings of Python's standard library (embedded default)"
    print(f"bitnet compare: {', '.join(args.linears)} at {', '.join(args.presets)} on {corpus}; "
          f"{args.max_steps} steps x {args.micro_batch} x {args.seq_len} tokens per run; runs in {args.out}")
    for line in describe_sweeps(args):
        print(f"  sweep {line}")
    with RunLock(args.out):  # one writer per folder (each run under it locks its own)
        result = run_comparison(args)
    print()
    print(result["text"])
    print(f"\n(test perplexity, {result['setup']['test_protocol']}; learning rate chosen on the dev split; "
          f"{args.out}/compare.{{json,md,png}})")
