"""Quantization-aware training of BitNet (or its bf16 twin) on one process or under torchrun.

    bitnet train --data corpus.txt --preset small --max-steps 2000 --out runs/small
    torchrun --nproc-per-node 8 -m bitnet train --data ... --out ...          # DDP
    torchrun --nproc-per-node 8 -m bitnet train --data ... --out ... --fsdp   # FSDP2 (fully_shard)
    torchrun --nproc-per-node 8 -m bitnet train ... --tp 4 --fsdp           # 2-D: TP 4 x FSDP2 over dp 2

Memory and throughput: fp32 master weights with bf16 autocast (on CUDA by default), gradient
accumulation, activation checkpointing, gradient clipping, optional torch.compile. Distribution is
torch's own (DDP, FSDP2, and DTensor tensor/sequence parallelism, bitnet.train.parallel, on a
(dp, tp) mesh); there is no collective code here beyond averaging the logged loss. Under --tp the
ranks of one TP group read the same micro-batches: the data is sharded over dp = world / tp.

The output folder is always loadable with BitNetForCausalLM.from_pretrained (config.json +
model.safetensors with the latent weights, online mode, + tokenizer.json). Beside it,
trainer_state.safetensors holds everything a resume needs (weights, optimizer, step, data
position, RNG) in ONE file, replaced atomically; so a kill at any moment, even mid-write, leaves a
consistent last checkpoint, and --resume continues the uninterrupted run exactly. At the end,
export/ holds the packed (offline) model, or the bf16 cast of the twin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from ..args import arg, device as named_device
from ..atomic import SaveError, atomic_save_safetensors, atomic_write_bytes, free_bytes, human
from ..config import PRESETS, BitNetConfig
from ..convert import add_sub_norms, bitlinears, convert, freeze, quantization_mode, set_quant_strength, unfreeze
from ..hub import resolve
from ..model import BitNetForCausalLM
from ..plots import plot_metrics, read_jsonl
from ..quant import quantize_weight
from ..runlock import RunLock, RunLockError
from . import data as D
from .distill import captured, distill_loss, relation_heads, relation_loss, teacher_layer
from .recipes import Recipe, default_recipe
from .schedule import SCHEDULES, Schedule

STATE = "trainer_state.safetensors"
METRICS = "metrics.jsonl"

RECIPE = "recipe.json"
# The flags that override a field of the default recipe (bitnet.train.recipes) when given.
RECIPE_FLAGS = ("lr", "schedule", "weight_decay", "weight_decay_stage2", "stage2_ratio", "min_lr_ratio", "beta1",
                "beta2")
# Fields a resumed run may change: they do not change what is computed.
FREE_ON_RESUME = {"out", "resume", "eval_every", "log_every", "save_every", "progress", "compile",
                  "activation_checkpointing", "device", "threads", "cache_dir", "eval_windows",
                  "micro_batch", "grad_accum", "fsdp", "hub_cache_dir", "local_files_only", "tp",
                  "sequence_parallel", "stop_at"}
# What a resume compares instead of the layout: the global batch (micro-batch x accumulation x dp).
LAYOUT = {"world_size", "dp_size"}


class TrainingError(RuntimeError):
    """A run that cannot start or continue (bad corpus, mismatched resume, diverged loss)."""


@dataclass
class TrainConfig:
    data: str = arg(help="training corpus: a text file or a folder of text files")
    out: str = arg(help="output folder (checkpoint, metrics.jsonl, loss.png, export/)")
    preset: str = arg("tiny", help="model shape", choices=list(PRESETS))
    linear: str = arg("bitnet", help="bitnet (b1.58 ternary), bitnet1 (binary) or bf16 (the twin)",
                      choices=["bitnet", "bitnet1", "bf16"])
    max_steps: int = arg(1000, help="optimizer steps")
    seq_len: int = arg(256, help="tokens per sequence")
    micro_batch: int = arg(8, help="sequences per forward, per process")
    grad_accum: int = arg(1, help="micro-batches per optimizer step")
    # None: the default recipe of this system at this size (bitnet.train.recipes; printed at the start
    # and written to recipe.json in --out)
    lr: float | None = arg(None, help="peak learning rate (default: the size's recipe, bitnet.train.recipes)")
    schedule: str | None = arg(None, help="LR schedule (default: two-stage for bitnet/bitnet1, cosine for bf16)",
                               choices=list(SCHEDULES))
    warmup_steps: int | None = arg(None, help="linear warm-up steps (default: the recipe's, e.g. 40%% of max_steps at tiny)")
    min_lr_ratio: float | None = arg(None, help="final LR as a fraction of the peak (default 0.1)")
    stage2_ratio: float | None = arg(None, help="two-stage: peak LR of the second half, as a fraction of the first "
                                     "(default: the recipe's, 0.4 for the small presets)")
    weight_decay: float | None = arg(None, help="AdamW weight decay on matrices, first stage (default 0.1)")
    weight_decay_stage2: float | None = arg(None, help="two-stage: weight decay of the second half (default 0; the "
                                            "twin: 0.1)")
    beta1: float | None = arg(None, help="AdamW beta1 (default 0.9)")
    beta2: float | None = arg(None, help="AdamW beta2 (default 0.95)")
    grad_clip: float = arg(1.0, help="gradient-norm clipping (0: off)")
    val_data: str | None = arg(None, help="held-out corpus (default: the last --val-fraction of --data)")
    val_fraction: float = arg(0.1, help="held-out fraction of --data when --val-data is not given")
    tokenizer: str | None = arg(None, help="tokenizer.json (or a folder with one); default: train a byte-level BPE")
    vocab_size: int | None = arg(None, help="BPE vocabulary when training one (default: the preset's)")
    init: str | None = arg(None, help="start from this checkpoint folder or hub id (ours, or a Llama-style model to "
                           "convert)")
    init_revision: str | None = arg(None, help="--init hub id: branch, tag or commit (default: main)")
    hub_cache_dir: str | None = arg(None, help="--init hub id: huggingface_hub cache (default: $HF_HUB_CACHE)")
    local_files_only: bool = arg(False, help="--init hub id: the cache only, no network (as HF_HUB_OFFLINE=1)")
    quant_warmup_steps: int = arg(0, help="quantization warm-up: lambda rises from 0 to 1 over these steps")
    sub_norms: bool = arg(False, help="--init of a Llama-style model: insert BitNet's sub-norms (an RMSNorm before "
                          "o_proj and before down_proj, weight 1; BitNet Distillation's SubLN) before training; the "
                          "run then saves model_type bitnet")
    teacher: str | None = arg(None, help="distill from this frozen model (a folder or hub id with the same tokenizer; "
                              "e.g. the float model given to --init): loss = CE + --distill-weight x T^2 x "
                              "KL(teacher || student)")
    teacher_revision: str | None = arg(None, help="--teacher hub id: branch, tag or commit (default: main)")
    distill_weight: float | None = arg(None, help="--teacher: weight of the KL term (default 1)")
    distill_temperature: float | None = arg(None, help="--teacher: softmax temperature T of both distributions "
                                            "(default 1)")
    distill_attention_weight: float | None = arg(None, help="--teacher: weight of the attention-relation term (MiniLM "
                                                 "v2's q/k/v relations at one layer, as BitNet Distillation; default: "
                                                 "off)")
    distill_attention_layer: int | None = arg(None, help="--distill-attention-weight: the student's layer (default: "
                                              "the last; negative counts from the end); the teacher's at the same "
                                              "relative depth")
    distill_attention_heads: int | None = arg(None, help="--distill-attention-weight: relation heads (default: the "
                                              "KV heads the two models share)")
    eval_every: int = arg(100, help="validate every N steps (and at the end)")
    eval_windows: int = arg(64, help="validation windows per evaluation (0: the whole held-out split)")
    save_every: int | None = arg(None, help="checkpoint every N steps (default: eval_every; always at the end)")
    log_every: int = arg(10, help="weight statistics (zeros, scales) every N steps")
    seed: int = arg(0, help="seed of the initialization and of the data order")
    dtype: str = arg("auto", help="autocast: bf16 (fp32 master weights) or fp32; auto = bf16 on CUDA, fp32 on CPU",
                     choices=["auto", "bf16", "fp32"])
    activation_checkpointing: bool = arg(False, help="recompute each block in the backward pass")
    compile: bool = arg(False, help="torch.compile the model")
    fsdp: bool = arg(False, help="under torchrun: FSDP2 (fully_shard) instead of DDP; with --tp, over the dp dimension")
    tp: int = arg(1, help="under torchrun: tensor-parallel ranks per model replica (Megatron-style, DTensor); the "
                  "data is sharded over dp = world / tp")
    sequence_parallel: bool = arg(True, help="with --tp: shard the norms and residual adds along the sequence "
                                  "(--no-sequence-parallel keeps them replicated)")
    stop_at: int | None = arg(None, help="checkpoint and stop after this step (a job's time limit); --resume continues")
    device: str | None = arg(None, help="cuda, cpu, ... (default: cuda if available)")
    threads: int | None = arg(None, help="torch CPU threads")
    cache_dir: str | None = arg(None, help="token cache (default: $BITNET_CACHE or ~/.cache/bitnet)")
    resume: bool = arg(False, help="continue the run in --out")
    progress: bool = arg(True, help="progress bar")

    def resolve_recipe(self, config: BitNetConfig | str | None = None) -> Recipe:
        """The default recipe of --linear for `config` (default: --preset), with the flags given here on top."""
        base = default_recipe(self.linear, config if config is not None else self.preset)
        given = {k: getattr(self, k) for k in RECIPE_FLAGS if getattr(self, k) is not None}
        if not given:
            return base
        return base.replace(**given, source=f"{base.source}; set by flags: {', '.join(sorted(given))}")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    tp: int = 1  # tensor-parallel ranks per replica; the (dp, tp) mesh puts a TP group on consecutive ranks

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t / self.world
        return t


def _setup_distributed(cfg: TrainConfig) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = _training_device(cfg.device, world, local)
    if world == 1:
        return Dist(tp=cfg.tp), want
    cuda = want.type == "cuda"
    if cuda:
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local, cfg.tp), want


def _training_device(name: str | None, world: int, local: int) -> torch.device:
    """The device a (rank's) run trains on: --device, checked (bitnet.args.device: default CUDA where
    torch sees a GPU); under torchrun a CUDA run puts local rank i on GPU i, and a node with fewer
    GPUs than ranks is a clear error at the start, not a CUDA error at the first tensor."""
    try:
        device = named_device(name)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if world == 1:
        return device
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise TrainingError(f"--device {name}: under torchrun a run trains on CUDA (nccl) or the CPU (gloo)")
    count = torch.cuda.device_count()
    if local >= count:
        raise TrainingError(f"torchrun started local rank {local} but this node has {count} CUDA device(s): a CUDA "
                            f"run takes one GPU a process (--nproc-per-node {count} or fewer), or train on the CPU "
                            "with --device cpu (gloo)")
    return torch.device("cuda", local)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run; returns the final metrics record."""
    d, device = _setup_distributed(cfg)
    lock = RunLock(cfg.out)
    finished = False
    try:
        _lock_run(lock, d, device)
        result = Trainer(cfg, d, device).run()
        finished = True
        return result
    finally:
        lock.release()
        if d.world > 1 and dist.is_initialized():
            # A run's model outlives it in a reference cycle (torch.distributed.checkpoint's
            # state-dict walk leaves one), and under FSDP2 its parameters hold the device mesh and
            # with it the process group: collected now, while the group is registered and the
            # interpreter whole, not in the interpreter's teardown (where a process group or a
            # tensor freed late can abort the process; a rank of a DDP run still did so once after
            # the barrier below, "terminate called without an active exception").
            gc.collect()
            if finished:
                # Every rank reaches the teardown together: a rank that tore gloo down while rank 0
                # was still writing the export aborted now and then ("terminate called without an
                # active exception", SIGABRT at exit; seen in test_tp under load).
                dist.barrier()
            dist.destroy_process_group()


def _lock_run(lock: RunLock, d: Dist, device: torch.device) -> None:
    """Rank 0 takes the run folder's lock for the whole run (one writer per folder); under torchrun the
    other ranks learn whether it got it, so none of them waits on a rank that has stopped."""
    err = None
    if d.main:
        try:
            lock.acquire()
        except RunLockError as e:
            err = e
    if d.world > 1:
        flag = torch.tensor([0 if err is None else 1], device=device)
        dist.broadcast(flag, 0)
        if err is None and int(flag.item()):
            raise RunLockError(f"rank 0 could not lock {lock.folder}; see its error")
    if err is not None:
        raise err


class Trainer:
    def __init__(self, cfg: TrainConfig, d: Dist, device: torch.device):
        self.cfg, self.d, self.device = cfg, d, device
        self._check_args()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.state_path = os.path.join(cfg.out, STATE)
        self.metrics_path = os.path.join(cfg.out, METRICS)
        saved = self._check_resume()
        os.makedirs(cfg.out, exist_ok=True)
        self.bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
        self.global_batch = cfg.micro_batch * cfg.grad_accum * d.dp

        self.init_dir = self._resolve(cfg.init, cfg.init_revision)
        self.teacher_dir = self._resolve(cfg.teacher, cfg.teacher_revision)
        self.tokenizer, train_tokens, val_tokens = self._prepare_data(resuming=saved is not None)
        self.model = self._build_model()
        self.config: BitNetConfig = self.model.config
        self.teacher = self._build_teacher()
        self.distill_weight = 1.0 if cfg.distill_weight is None else cfg.distill_weight
        self.distill_temperature = 1.0 if cfg.distill_temperature is None else cfg.distill_temperature
        self.relations = self._relations()  # (student layer, teacher layer, heads) of the attention term, or None
        if cfg.tp > 1:
            from .parallel import ParallelError, check_layout

            try:
                check_layout(self.config, cfg.tp, d.world, cfg.seq_len, cfg.sequence_parallel)
            except ParallelError as e:
                raise TrainingError(str(e)) from None
        if cfg.seq_len > self.config.max_position_embeddings:
            raise TrainingError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                                f"({self.config.max_position_embeddings})")
        self.sampler = D.WindowSampler(train_tokens, cfg.seq_len, cfg.seed)
        if self.sampler.windows_per_epoch < self.global_batch:
            raise TrainingError(
                f"the training split holds {self.sampler.windows_per_epoch} windows of {cfg.seq_len} tokens, fewer "
                f"than one global batch of {self.global_batch} (micro-batch {cfg.micro_batch} x accumulation "
                f"{cfg.grad_accum} x {self._dp_words()}); use a larger corpus or a smaller batch / --seq-len")
        val = D.eval_windows(val_tokens, cfg.seq_len, cfg.eval_windows or None)
        self.val = val[: (len(val) // d.dp) * d.dp] if len(val) >= d.dp else val
        self.recipe = r = cfg.resolve_recipe(self.config)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else r.warmup_for(cfg.max_steps)
        self.schedule = Schedule(r.schedule, r.lr, cfg.max_steps, warmup, r.min_lr_ratio, r.stage2_ratio,
                                 r.weight_decay, r.weight_decay_stage2)

        self.model.to(device)
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        if self.teacher is not None:
            self.teacher.to(device)
        self.engine = self._wrap()
        self.teacher_val_loss: float | None = None
        self.optimizer = self._optimizer()
        self.step, self.position = 0, 0
        if saved is not None:
            self._check_resumed_recipe(saved)
            self._load_state(saved)
        elif d.main:  # a run that died before its first checkpoint leaves rows no resume can continue
            atomic_write_bytes(self.metrics_path, b"")

    # ------------------------------------------------------------------ recipe
    def recipe_record(self) -> dict:
        """Everything the optimizer follows, as printed at the start and written to recipe.json."""
        r, sch, cfg = self.recipe, self.schedule, self.cfg
        rec = {"linear": cfg.linear, "preset": cfg.preset, "hidden_size": self.config.hidden_size,
               "num_hidden_layers": self.config.num_hidden_layers, "lr": r.lr, "schedule": r.schedule,
               "warmup_steps": sch.warmup, "max_steps": cfg.max_steps, "min_lr_ratio": r.min_lr_ratio}
        if r.schedule == "two-stage":
            rec.update(stage2_ratio=r.stage2_ratio, stage2_from_step=sch.midpoint)
        rec.update(weight_decay=r.weight_decay,
                   weight_decay_stage2=r.weight_decay_stage2 if r.schedule == "two-stage" else r.weight_decay,
                   beta1=r.beta1, beta2=r.beta2, eps=1e-8, grad_clip=cfg.grad_clip,
                   batch_sequences=self.global_batch, seq_len=cfg.seq_len,
                   batch_tokens=self.global_batch * cfg.seq_len, source=r.source)
        if self.teacher is not None:
            rec.update(teacher=cfg.teacher, distill_weight=self.distill_weight,
                       distill_temperature=self.distill_temperature)
        if self.relations is not None:
            rec.update(distill_attention_weight=cfg.distill_attention_weight, distill_attention_layers=
                       list(self.relations[:2]), distill_attention_heads=self.relations[2])
        return rec

    def _recipe_line(self) -> str:
        r = self.recipe_record()
        stages = (f"two-stage (lr x{r['stage2_ratio']:.3g} at step {r['stage2_from_step']}), weight decay "
                  f"{r['weight_decay']:g} then {r['weight_decay_stage2']:g}" if r["schedule"] == "two-stage"
                  else f"{r['schedule']}, weight decay {r['weight_decay']:g}")
        return (f"recipe: lr {r['lr']:g}, {stages}, warm-up {r['warmup_steps']} steps, final lr x{r['min_lr_ratio']:g}, "
                f"AdamW betas ({r['beta1']:g}, {r['beta2']:g}), grad clip {r['grad_clip']:g}, batch "
                f"{r['batch_tokens']:,} tokens ({r['batch_sequences']} x {r['seq_len']}); from: {r['source']}")

    def _check_resumed_recipe(self, meta: dict) -> None:
        """A resume follows the recipe it started with: refuse when the defaults have changed since."""
        before = meta.get("recipe")
        if before is None:  # a checkpoint from before recipes were recorded
            return
        now = dataclasses.asdict(self.recipe)
        diff = [f"{k}={before.get(k)!r} there, {now[k]!r} here" for k in now if k != "source" and before.get(k) != now[k]]
        if diff:
            raise TrainingError(f"--resume: {self.cfg.out} was trained with another recipe: " + "; ".join(diff) +
                                " (the default recipes changed since; give the old values as flags)")

    # ------------------------------------------------------------------ setup
    def _check_args(self) -> None:
        c = self.cfg
        for name in ("max_steps", "seq_len", "micro_batch", "grad_accum", "eval_every", "log_every"):
            if getattr(c, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(c, name)}")
        if c.lr is not None and not c.lr > 0:
            raise TrainingError(f"--lr must be positive, got {c.lr}")
        if c.stop_at is not None and c.stop_at < 1:
            raise TrainingError(f"--stop-at must be at least 1, got {c.stop_at}")
        if c.sub_norms and not c.init:
            raise TrainingError("--sub-norms inserts sub-norms into a Llama-style --init model; a model trained from "
                                "a preset has them already (model_type bitnet)")
        if not c.teacher:
            given = [f"--{n.replace('_', '-')}" for n in ("teacher_revision", "distill_weight", "distill_temperature",
                                                          "distill_attention_weight", "distill_attention_layer",
                                                          "distill_attention_heads") if getattr(c, n) is not None]
            if given:
                raise TrainingError(f"{', '.join(given)} without --teacher: name the model to distill from")
        if c.distill_weight is not None and not c.distill_weight >= 0:
            raise TrainingError(f"--distill-weight must be 0 or more, got {c.distill_weight}")
        if c.distill_temperature is not None and not c.distill_temperature > 0:
            raise TrainingError(f"--distill-temperature must be positive, got {c.distill_temperature}")
        if c.distill_attention_weight is not None and not c.distill_attention_weight >= 0:
            raise TrainingError(f"--distill-attention-weight must be 0 or more, got {c.distill_attention_weight}")
        if not c.distill_attention_weight:
            given = [f"--{n.replace('_', '-')}" for n in ("distill_attention_layer", "distill_attention_heads")
                     if getattr(c, n) is not None]
            if given:
                raise TrainingError(f"{', '.join(given)} without --distill-attention-weight: the attention term is off")
        elif c.tp > 1:
            raise TrainingError("--distill-attention-weight under --tp: the attention relations of a tensor-parallel "
                                "layer (its heads split over the ranks) are not implemented; distill the logits alone")
        w = self.d.world
        if c.tp < 1 or c.tp > w or w % c.tp:
            why = ("must be at least 1" if c.tp < 1 else f"is larger than the world size {w}" if c.tp > w
                   else f"does not divide the world size {w} (the (dp, tp) mesh needs dp x tp = world)")
            raise TrainingError(f"--tp {c.tp} {why}; tensor parallelism splits each layer over --tp processes of one "
                                f"torchrun (e.g. torchrun --nproc-per-node {max(c.tp, 1)} ... --tp {max(c.tp, 1)})")
        if c.tp > 1 and w // c.tp > 1 and not c.fsdp:
            raise TrainingError(f"--tp {c.tp} on {w} processes leaves a data-parallel dimension of {w // c.tp}: add "
                                "--fsdp (FSDP2 over the dp dimension of the (dp, tp) mesh, the 2-D layout); DDP over "
                                "tensor-parallel (DTensor) parameters is not supported here")

    def _dp_words(self) -> str:
        d = self.d
        return f"world {d.world}" if d.tp == 1 else f"dp {d.dp} (world {d.world} / tp {d.tp})"

    def _resolve(self, source: str | None, revision: str | None) -> str | None:
        """--init / --teacher as a local folder: itself, or its hub snapshot (rank 0 fetches, the others
        then read the cache)."""
        c = self.cfg
        if not source:
            return None
        get = lambda: resolve(source, revision, c.hub_cache_dir, c.local_files_only)  # noqa: E731
        folder = get() if self.d.main else None
        self.d.barrier()
        return folder if folder is not None else get()

    def _comparable(self, cfg: dict) -> dict:
        """The fields a resume must keep. The layout (world size, dp, tp, FSDP) may change: checkpoints
        hold full tensors, which load into any mesh; the global batch, and so the data order, may not."""
        out = {k: v for k, v in cfg.items() if k not in FREE_ON_RESUME | LAYOUT}
        out["global_batch"] = cfg["micro_batch"] * cfg["grad_accum"] * cfg.get("dp_size", cfg.get("world_size", 1))
        return out

    def _check_resume(self) -> dict | None:
        exists = os.path.isfile(self.state_path)
        if not self.cfg.resume:
            if exists:
                raise TrainingError(f"{self.cfg.out} already holds a training run ({STATE}); pass --resume to "
                                    "continue it, or choose another --out")
            return None
        if not exists:
            raise TrainingError(f"--resume: no {STATE} in {self.cfg.out}")
        with safe_open(self.state_path, framework="pt") as f:
            meta = json.loads(f.metadata()["bitnet_trainer"])
        # A field an older checkpoint does not name (added since) had its default then.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
        before = self._comparable({**defaults, **meta["config"]})
        now = self._comparable({**dataclasses.asdict(self.cfg), "world_size": self.d.world, "dp_size": self.d.dp})
        diff = [f"{k}={before.get(k)!r} there, {now.get(k)!r} here" for k in sorted(set(before) | set(now))
                if before.get(k) != now.get(k)]
        if diff:
            raise TrainingError(f"--resume: {self.cfg.out} was trained with another configuration: " + "; ".join(diff))
        return meta

    def _prepare_data(self, resuming: bool):
        """Tokenizer and token ids; rank 0 trains/encodes first, the others then read its files."""
        cfg, d = self.cfg, self.d
        cache = cfg.cache_dir or os.environ.get("BITNET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bitnet")
        docs = D.read_corpus(cfg.data)
        if cfg.val_data:
            train_docs, val_docs = docs, D.read_corpus(cfg.val_data)
        else:
            train_docs, val_docs = D.split_tail(docs, cfg.val_fraction)
        tok_path = os.path.join(cfg.out, "tokenizer.json")

        def prepare(first: bool):
            if resuming or not first:
                tok = D.load_tokenizer(tok_path)
            elif cfg.tokenizer:
                tok = D.load_tokenizer(cfg.tokenizer)
            elif self.init_dir and os.path.isfile(os.path.join(self.init_dir, "tokenizer.json")):
                tok = D.load_tokenizer(self.init_dir)
            else:
                tok = D.train_tokenizer(train_docs, cfg.vocab_size or PRESETS[cfg.preset]["vocab_size"])
            if first and not resuming:
                atomic_write_bytes(tok_path, tok.to_str().encode())
            eos = tok.token_to_id("</s>")
            return tok, D.encode(train_docs, tok, eos, cache), D.encode(val_docs, tok, eos, cache)

        # Rank 0 trains the tokenizer and fills the token cache; the others then read them.
        if d.main:
            tok, train_tokens, val_tokens = prepare(first=True)
        d.barrier()
        if not d.main:
            tok, train_tokens, val_tokens = prepare(first=False)
        if len(train_tokens) < 2 * cfg.seq_len:
            raise TrainingError(f"corpus {cfg.data} is too short: {len(train_tokens)} training tokens, fewer than two "
                                f"windows of --seq-len {cfg.seq_len}")
        if len(val_tokens) < cfg.seq_len:
            raise TrainingError(f"the held-out split has {len(val_tokens)} tokens, fewer than one window of --seq-len "
                                f"{cfg.seq_len}; give a larger --val-fraction or --val-data")
        return tok, train_tokens, val_tokens

    def _build_model(self) -> BitNetForCausalLM:
        cfg, tok = self.cfg, self.tokenizer
        vocab = tok.get_vocab_size()
        if cfg.init:
            model = BitNetForCausalLM.from_pretrained(self.init_dir, dtype=torch.float32)
            if vocab > model.config.vocab_size:
                raise TrainingError(f"the tokenizer has {vocab} tokens, more than the vocabulary of {cfg.init} "
                                    f"({model.config.vocab_size})")
            if model.config.linear == "bf16" and cfg.linear != "bf16":
                convert(model, weight_bits="ternary" if cfg.linear == "bitnet" else "binary")
            elif model.config.linear != cfg.linear:
                raise TrainingError(f"--init {cfg.init} is a {model.config.linear} model; it cannot train as {cfg.linear}")
            if cfg.sub_norms:
                if model.config.model_type != "llama":
                    raise TrainingError(f"--sub-norms: --init {cfg.init} is model_type {model.config.model_type!r}, "
                                        "whose blocks have their sub-norms already; it applies to a Llama-style model")
                add_sub_norms(model)
            unfreeze(model)  # packed checkpoints continue from their dequantized weights
        else:
            ids = {name: tok.token_to_id(t) for name, t in (("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>"))}
            config = BitNetConfig.from_preset(cfg.preset, linear=cfg.linear, vocab_size=vocab,
                                              bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
            torch.manual_seed(cfg.seed)
            model = BitNetForCausalLM(config)
        model.tokenizer_files = {"tokenizer.json": tok.to_str().encode(),
                                 "tokenizer_config.json": D.tokenizer_config_json(tok)}
        if cfg.quant_warmup_steps and cfg.linear != "bf16":
            set_quant_strength(model, 0.0)
        return model.float()

    def _build_teacher(self) -> BitNetForCausalLM | None:
        """--teacher, frozen in eval mode (bf16 where the run autocasts to bf16); its vocabulary must
        cover the student's and its tokenizer give the student's tokens the same ids."""
        cfg = self.cfg
        if not self.teacher_dir:
            return None
        teacher = BitNetForCausalLM.from_pretrained(self.teacher_dir,
                                                    dtype=torch.bfloat16 if self.bf16 else torch.float32)
        ours, theirs = self.config.vocab_size, teacher.config.vocab_size
        if theirs < ours or (cfg.tp > 1 and theirs != ours):
            need = "the same vocabulary size (under --tp both are sharded over it)" if cfg.tp > 1 else \
                "at least the student's vocabulary"
            raise TrainingError(f"--teacher {cfg.teacher} has {theirs} tokens in its vocabulary, the student {ours}: "
                                f"distillation needs {need}")
        if os.path.isfile(os.path.join(self.teacher_dir, "tokenizer.json")):
            their_ids = D.load_tokenizer(self.teacher_dir).get_vocab()
            differ = sorted(t for t, i in self.tokenizer.get_vocab().items() if their_ids.get(t) != i)
            if differ:
                raise TrainingError(
                    f"--teacher {cfg.teacher}: its tokenizer differs from the student's ({len(differ)} of "
                    f"{self.tokenizer.get_vocab_size()} tokens have another id or none there, e.g. {differ[:3]}); "
                    "distillation compares distributions over the same token ids: train with --tokenizer "
                    f"{cfg.teacher} (or --init from a model with that tokenizer)")
        elif self.d.main:
            print(f"warning: --teacher {cfg.teacher} has no tokenizer.json: whether it numbers the tokens as the "
                  "student does is not checked", file=sys.stderr, flush=True)
        if cfg.tp > 1 and quantization_mode(teacher) == "offline":
            raise TrainingError(f"--teacher {cfg.teacher} is packed (offline BitLinear weights); under --tp the teacher "
                                "is sharded as the student is, which needs its latent weights: give its online "
                                "checkpoint (bitnet convert SRC DST --to latent)")
        teacher.requires_grad_(False)
        return teacher.eval()

    def _relations(self) -> tuple[int, int, int] | None:
        """--distill-attention-*: the layers and relation heads, checked against both models."""
        cfg = self.cfg
        if not cfg.distill_attention_weight:
            return None
        s, t = self.config, self.teacher.config
        layer = -1 if cfg.distill_attention_layer is None else cfg.distill_attention_layer
        if not -s.num_hidden_layers <= layer < s.num_hidden_layers:
            raise TrainingError(f"--distill-attention-layer {layer}: the student has {s.num_hidden_layers} layers")
        layer %= s.num_hidden_layers
        heads = cfg.distill_attention_heads or relation_heads(s, t)
        widths = {"the student's keys": s.num_key_value_heads * s.dim_head, "the student's queries":
                  s.num_attention_heads * s.dim_head, "the teacher's keys": t.num_key_value_heads * t.dim_head,
                  "the teacher's queries": t.num_attention_heads * t.dim_head}
        bad = [f"{name} ({w})" for name, w in widths.items() if heads < 1 or w % heads]
        if bad:
            raise TrainingError(f"--distill-attention-heads {heads} does not divide the width of {', '.join(bad)}")
        return layer, teacher_layer(layer, s.num_hidden_layers, t.num_hidden_layers), heads

    def _wrap(self):
        cfg, d, model, teacher = self.cfg, self.d, self.model, self.teacher
        engine = model
        if cfg.tp > 1:  # TP inside a replica, then FSDP2 over the replicas: the 2-D (dp, tp) mesh
            from .parallel import ParallelError, check_layout, device_mesh, tensor_parallel

            mesh = device_mesh(self.device.type, d.world, cfg.tp)
            tensor_parallel(model, mesh["tp"], cfg.sequence_parallel, loss_parallel=True)
            if teacher is not None:  # sharded alike: its logits then split over the vocabulary as the student's
                try:
                    check_layout(teacher.config, cfg.tp, d.world, cfg.seq_len, cfg.sequence_parallel)
                except ParallelError as e:
                    raise TrainingError(f"--teacher {cfg.teacher}: {e}") from None
                tensor_parallel(teacher, mesh["tp"], cfg.sequence_parallel, loss_parallel=True)
            if d.dp > 1:
                self._fully_shard(mesh["dp"], model)
                if teacher is not None:
                    self._fully_shard(mesh["dp"], teacher)
        elif d.world > 1 and cfg.fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (d.world,))
            self._fully_shard(mesh, model)
            # A packed teacher (2 bits a weight, uint8 buffers) stays whole on every rank.
            if teacher is not None and quantization_mode(teacher) != "offline":
                self._fully_shard(mesh, teacher)
        elif d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            engine = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            engine = torch.compile(engine)
        return engine

    def _fully_shard(self, mesh, model: BitNetForCausalLM) -> None:
        """FSDP2 per block and at the root over a 1-D mesh (all ranks, or the dp dimension under TP)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)

    def _optimizer(self) -> torch.optim.Optimizer:
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.schedule.weight_decay, "decay": True},
                  {"params": rest, "weight_decay": 0.0, "decay": False}]
        return torch.optim.AdamW(groups, lr=self.schedule.lr, betas=(self.recipe.beta1, self.recipe.beta2),
                                 eps=1e-8)

    # ------------------------------------------------------------------ state
    def _full_state(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(self.model, self.optimizer, options=opts)

    def save(self) -> None:
        """trainer_state.safetensors first (what --resume reads), then the loadable model folder."""
        model_sd, optim_sd = self._full_state()  # collective under FSDP
        if self.d.main:
            tensors = {f"model.{k}": v.contiguous() for k, v in model_sd.items()
                       if not (k == "lm_head.weight" and self.config.tie_word_embeddings)}
            for fqn, st in optim_sd["state"].items():
                for key, v in st.items():
                    tensors[f"optim.{fqn}.{key}"] = torch.as_tensor(v).contiguous()
            tensors["rng.cpu"] = torch.get_rng_state()
            if torch.cuda.is_available():
                tensors["rng.cuda"] = torch.cuda.get_rng_state()
            meta = {"step": self.step, "position": self.position, "world_size": self.d.world,
                    "config": {**dataclasses.asdict(self.cfg), "world_size": self.d.world, "dp_size": self.d.dp},
                    "param_groups": optim_sd["param_groups"], "recipe": dataclasses.asdict(self.recipe)}
            before = self._last_saved()
            try:
                atomic_save_safetensors(tensors, self.state_path, {"bitnet_trainer": json.dumps(meta)})
            except SaveError as e:
                kept = (f"the checkpoint of step {before} in {self.cfg.out} is intact (model and trainer state); "
                        "--resume continues from it" if before is not None else "no checkpoint had been written yet")
                raise TrainingError(f"step {self.step}: saving the checkpoint failed: {e}; {kept}") from e
            try:
                self.model.save_pretrained(self.cfg.out, state_dict={k: v for k, v in model_sd.items()}, step=self.step)
            except SaveError as e:
                raise TrainingError(
                    f"step {self.step}: saving the model files failed: {e}; {STATE} holds step {self.step} (complete: "
                    f"--resume continues from it exactly), the model files of {self.cfg.out} may still be those of step "
                    f"{before} (loading the folder warns with both steps until the next save)") from e
            plot_metrics(self.metrics_path, os.path.join(self.cfg.out, "loss.png"), self._title())
        self.d.barrier()

    def _warn_low_space(self, need: int) -> None:
        """Before the first save: warn when the folder's disk has less free space than a checkpoint needs."""
        free = free_bytes(self.cfg.out)
        if free is not None and free < need:
            msg = (f"{self.cfg.out}: {human(free)} free, but a checkpoint (trainer state + model files) needs about "
                   f"{human(need)}; saves will fail with a disk-full error")
            warnings.warn(msg, stacklevel=2)
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def _load_state(self, meta: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        tensors = load_file(self.state_path)
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        if self.config.tie_word_embeddings:
            model_sd["lm_head.weight"] = model_sd["model.embed_tokens.weight"]
        state: dict[str, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                fqn, key = k[len("optim."):].rsplit(".", 1)
                state.setdefault(fqn, {})[key] = v
        optim_sd = {"state": state, "param_groups": meta["param_groups"]}
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.step, self.position = meta["step"], meta["position"]
        if self.d.main:  # forget what a killed run logged after its last checkpoint
            rows = [r for r in read_jsonl(self.metrics_path) if r["step"] <= self.step]
            atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    # ------------------------------------------------------------------ loop
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _loss_parallel(self):
        """Under --tp the logits are sharded over the vocabulary: torch's vocab-parallel cross-entropy,
        for the forward and the backward (bitnet.train.parallel)."""
        if self.cfg.tp == 1:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    @staticmethod
    def _plain(loss: torch.Tensor) -> torch.Tensor:
        """The loss as a plain tensor (under --tp a replicated 0-dim DTensor, the same on every rank)."""
        return loss.full_tensor() if hasattr(loss, "full_tensor") else loss

    @torch.no_grad()
    def evaluate(self, model: BitNetForCausalLM | None = None) -> float:
        """Mean next-token loss of the model (default: the student) over the held-out windows (sharded
        over the dp ranks; a TP group reads the same windows, and the all-reduce then counts each of
        them tp times, above and below the line)."""
        model, d, mb = self.model if model is None else model, self.d, self.cfg.micro_batch
        was_training = model.training
        model.eval()
        mine = self.val[d.dp_rank::d.dp]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(0, len(mine), mb):
            x = mine[i:i + mb].to(self.device)
            with self._autocast(), self._loss_parallel():
                loss = self._plain(model(x, labels=x).loss)
            n = x.shape[0] * (x.shape[1] - 1)
            total += torch.tensor([loss.double().item() * n, n], dtype=torch.float64, device=self.device)
        if d.world > 1:
            dist.all_reduce(total)
        model.train(was_training)
        return (total[0] / total[1]).item()

    @torch.no_grad()
    def weight_stats(self) -> dict:
        """Fraction of zero ternary weights and mean absmean scale over the BitLinear layers."""
        zeros = count = 0
        scales = []
        for _, m in bitlinears(self.model):
            w = m.weight
            if hasattr(w, "full_tensor"):
                w = w.full_tensor()  # FSDP2: gather the shards (a collective, on every rank)
            w_q, s = quantize_weight(w, m.weight_bits)
            zeros += int((w_q == 0).sum())
            count += w_q.numel()
            scales.append(float(s))
        if not count:
            return {}
        return {"zero_fraction": zeros / count, "mean_weight_scale": sum(scales) / len(scales)}

    def _log(self, row: dict) -> None:
        if self.d.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _title(self) -> str:
        c = self.config
        return f"{self.cfg.linear} {self.cfg.preset}: {c.hidden_size}x{c.num_hidden_layers}, lr {self.schedule.lr:g}"

    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg, d, model = self.cfg, self.d, self.model
        if d.main:
            n = model.num_parameters()
            print(f"bitnet train: {cfg.linear} {cfg.preset} ({n:,} parameters), seq_len {cfg.seq_len}, global batch "
                  f"{self.global_batch} = micro-batch {cfg.micro_batch} x accumulation {cfg.grad_accum} x "
                  f"{self._dp_words()} ({self.global_batch * cfg.seq_len:,} tokens/step), {self.schedule.kind} schedule, "
                  f"peak lr {self.schedule.lr:g}, {'bf16 autocast' if self.bf16 else 'fp32'}, "
                  f"{'resuming at step ' + str(self.step) if self.step else 'from scratch' if not cfg.init else 'from ' + cfg.init}",
                  flush=True)
            print(self._recipe_line(), flush=True)
        if self.teacher is not None:  # every rank: a sharded teacher's forward is a collective
            self.teacher_val_loss = self.evaluate(self.teacher)
            if d.main:
                print(f"distilling from {cfg.teacher} ({self.teacher.num_parameters():,} parameters, held-out loss "
                      f"{self.teacher_val_loss:.4f}, ppl {math.exp(min(self.teacher_val_loss, 50)):.2f}): loss = CE + "
                      f"{self.distill_weight:g} x T^2 x KL(teacher || student), T = {self.distill_temperature:g}"
                      + (f" + {cfg.distill_attention_weight:g} x attention relations (q, k, v of layer "
                         f"{self.relations[0]}, the teacher's {self.relations[1]}, {self.relations[2]} relation heads)"
                         if self.relations else ""), flush=True)
        if d.main:
            atomic_write_bytes(os.path.join(cfg.out, RECIPE), (json.dumps(self.recipe_record(), indent=2) + "\n").encode())
            # A checkpoint: the trainer state (weights + two AdamW moments, float32) and the model files.
            per = sum(p.numel() for p in self.model.parameters()) * 4
            self._warn_low_space(4 * per)
        model.train()
        save_every = cfg.save_every or cfg.eval_every
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (d.main and cfg.progress), dynamic_ncols=True)
        last: dict = {}
        ddp = hasattr(self.engine, "no_sync")
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            step = self.step
            lr, wd = self.schedule.lr_at(step), self.schedule.wd_at(step)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
                if g["decay"]:
                    g["weight_decay"] = wd
            lam = None
            if cfg.quant_warmup_steps and cfg.linear != "bf16":
                lam = min(1.0, step / cfg.quant_warmup_steps)
                set_quant_strength(model, lam)
            loss_sum = torch.zeros((), device=self.device)
            kl_sum = torch.zeros((), device=self.device)
            rel_sum = torch.zeros((), device=self.device)
            for j in range(cfg.grad_accum):
                start = self.position + (j * d.dp + d.dp_rank) * cfg.micro_batch
                x = self.sampler.batch(start, cfg.micro_batch).to(self.device)
                sync = contextlib.nullcontext() if (not ddp or j == cfg.grad_accum - 1) else self.engine.no_sync()
                with sync, self._loss_parallel():
                    with self._autocast(), contextlib.ExitStack() as capture:
                        if self.relations is not None:
                            ours = capture.enter_context(captured(self.model, self.relations[0]))
                            theirs = capture.enter_context(captured(self.teacher, self.relations[1]))
                        out = self.engine(x, labels=x)
                        loss = objective = out.loss
                        if self.teacher is not None:
                            with torch.no_grad():
                                target = self.teacher(x).logits
                            kl = distill_loss(out.logits, target, self.distill_temperature)
                            objective = loss + self.distill_weight * kl
                            kl_sum += self._plain(kl.detach().float())
                        if self.relations is not None:
                            rel = relation_loss(ours[0], theirs[0], self.relations[2])
                            objective = objective + cfg.distill_attention_weight * rel
                            rel_sum += rel.detach().float()
                    (objective / cfg.grad_accum).backward()
                loss_sum += self._plain(loss.detach().float())
            train_loss = d.mean(loss_sum / cfg.grad_accum).item()
            distill = d.mean(kl_sum / cfg.grad_accum).item() if self.teacher is not None else None
            relation = d.mean(rel_sum / cfg.grad_accum).item() if self.relations is not None else None
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            if not all(math.isfinite(v) for v in (train_loss, distill, relation, grad_norm) if v is not None):
                self.optimizer.zero_grad(set_to_none=True)
                saved = self._last_saved()
                kept = (f"the last good checkpoint (step {saved}) is kept in {cfg.out}" if saved is not None
                        else "no checkpoint had been written yet")
                raise TrainingError(f"loss {train_loss} (gradient norm {grad_norm}) at step {step + 1}: the run "
                                    f"diverged and stops here; {kept}. Try a lower --lr or more --warmup-steps.")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.position += self.global_batch
            dt = time.perf_counter() - t0
            row = {"step": self.step, "lr": lr, "wd": wd, "train_loss": train_loss,
                   "tokens_per_s": self.global_batch * cfg.seq_len / dt, "step_time_s": dt}
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            if distill is not None:
                row["distill_loss"] = distill
            if relation is not None:
                row["distill_attention_loss"] = relation
            if lam is not None:
                row["quant_strength"] = lam
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                row.update(self.weight_stats())
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                row["val_loss"] = self.evaluate()
                row["val_ppl"] = math.exp(min(row["val_loss"], 50))
                if self.teacher_val_loss is not None:
                    row["teacher_val_loss"] = self.teacher_val_loss
                bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{row['val_loss']:.3f}")
            else:
                bar.set_postfix(loss=f"{train_loss:.3f}")
            self._log(row)
            last = row
            bar.update(1)
            stop = cfg.stop_at is not None and self.step >= cfg.stop_at
            if self.step % save_every == 0 or self.step == cfg.max_steps or stop:
                self.save()
            if stop:
                break
        bar.close()
        if d.main and cfg.max_steps and self.step == cfg.max_steps:
            self.export()
        d.barrier()
        return last

    def _last_saved(self) -> int | None:
        if not os.path.isfile(self.state_path):
            return None
        with safe_open(self.state_path, framework="pt") as f:
            return json.loads(f.metadata()["bitnet_trainer"])["step"]

    def export(self) -> str:
        """export/: the packed offline model (bitnet, bitnet1) or the bf16 twin, from the latent weights."""
        path = os.path.join(self.cfg.out, "export")
        model = BitNetForCausalLM.from_pretrained(self.cfg.out)
        if model.config.linear == "bf16":
            model.to(torch.bfloat16)
        else:
            freeze(model)
        model.save_pretrained(path)
        return path
