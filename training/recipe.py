"""The crossbatch fine-tuning recipe (torchtune style): setup -> train -> cleanup.

    recipe = CrossbatchRecipe(TrainConfig.load("training/configs/smollm2_cpu.yaml"))
    recipe.setup()          # accelerator, model (frozen backbone + memory-layer adapters), data, resume
    recipe.train()          # optimizer steps; evaluation and checkpoints at intervals and at the end
    recipe.cleanup()

One optimizer step = `gradient_accumulation_steps` episodes; an episode = one batch of B documents
read window by window (`crossbatch.run_episode`), one backward per window (memory is detached, so
windows' graphs are independent). The loss is the mean over lanes of each lane's mean token
cross-entropy, so a synthetic sample whose only targets are its answer weighs as much as a text.

Devices: `accelerate` (single device; DDP via `accelerate launch` / `torchrun`), FSDP2 with
`train.fsdp=true` under the same launchers (`training/sharding.py`), bf16/fp16 autocast, gradient
checkpointing. A checkpoint (`output_dir/checkpoints/step_N/`) holds the adapter
(safetensors, what `from_pretrained(..., adapter=)` loads), optimizer, scheduler, RNG states and the
data position; resuming replays the data stream to it, so the run continues as if never stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memformer.fileio import hold_dir_lock, release_dir_lock
from memformer.training import sharding
from memformer.training.config import ConfigError, TrainConfig
from memformer.training.crossbatch import WindowLM, run_episode, scored_counts
from memformer.training.data import BatchStream, SampleStream, eval_batches
from memformer.training.evaluation import evaluate
from memformer.training.metrics import MetricsLogger, plot_metrics

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lr_lambda(step: int, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step `step`: linear warmup, then
    constant / linear / cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return min_ratio + (1.0 - min_ratio) * decay


class CrossbatchRecipe:
    """Fine-tune the memory layers of a frozen backbone with crossbatch (FoT) negatives.

    backbone / tokenizer: optional instances that replace `cfg.model.backbone` (tests build tiny
    models in code)."""

    def __init__(self, cfg: TrainConfig, *, backbone=None, tokenizer=None):
        self.cfg = cfg
        self._backbone, self._tokenizer = backbone, tokenizer
        self.step = 0
        self.out = Path(cfg.output_dir)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        # accelerate runs several CPU processes as DDP (gloo) only when told to use the CPU
        cpu = cfg.train.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
        # find_unused_parameters: a window whose lanes have no memory leaves the gates unused
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.train.mixed_precision, cpu=cpu,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        if acc.distributed_type == DistributedType.FSDP:
            raise ConfigError("this recipe does not use accelerate's FSDP plugin: launch with plain "
                              "`accelerate launch` / `torchrun` and set train.fsdp=true")
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            # one run per output folder: a second one would interleave checkpoints and metrics
            self._lock = hold_dir_lock(self.out)
        self.fsdp = cfg.train.fsdp and acc.num_processes > 1
        if cfg.train.fsdp and not self.fsdp:
            tqdm.write("train.fsdp=true with one process: nothing to shard, training unsharded")
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)            # negatives and choice schedules
        self.model = self._build_model(acc.device)
        lm = WindowLM(self.model)
        if self.fsdp:         # before the optimizer: sharding replaces the parameters by DTensors
            sharding.shard(lm, self.model)
        o = cfg.optim
        optimizer = torch.optim.AdamW(self._param_groups(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay)
        if self.fsdp:
            self.lm, self.optimizer = lm, acc.prepare(optimizer)
        else:
            self.lm, self.optimizer = acc.prepare(lm, optimizer)
        # stepped once per optimizer step by the recipe itself (accelerate's wrapper would step it
        # once per process)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer,
            lambda s: lr_lambda(s, o.warmup_steps, cfg.train.max_steps, o.scheduler, o.min_lr_ratio))
        self.d_schedule, self.w_schedule = cfg.d_schedule(), cfg.w_schedule()
        self._setup_data()
        self.metrics = MetricsLogger(self.out, enabled=acc.is_main_process)
        if acc.is_main_process:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        ckpt = self._resume_path()
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        else:      # starting over: rows of an earlier run that left no checkpoint belong to nothing
            self.metrics.truncate_after(-1)

    def _param_groups(self) -> list[dict]:
        """LoRA weights at optim.lr; memory gates at optim.gate_lr without weight decay (a bias)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable memory-layer parameters")
        o = self.cfg.optim
        gates = [p for n, p in named if n.endswith("memory_gate")]
        groups = [{"params": [p for n, p in named if not n.endswith("memory_gate")]},
                  {"params": gates, "lr": o.gate_lr or o.lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def _build_model(self, device):
        from memformer import MemformerForCausalLM
        from memformer.loading import load_backbone
        dtype = _DTYPES[self.cfg.model.dtype]
        src = self._backbone if self._backbone is not None else self.cfg.model.backbone
        backbone, tok = load_backbone(src, torch_dtype=dtype, tokenizer=self._tokenizer)
        # on its device before the memory layers are built: they cache RoPE tables there
        model = MemformerForCausalLM(backbone.to(device), tok, self.cfg.memory)
        model.add_lora(self.cfg.adapter)             # LoRA + memory gates: the trainable part
        if self.cfg.model.init_adapter:              # continue from trained weights (same rank)
            # an adapter of fewer memory layers starts those layers; the others start fresh
            fresh = model.load_adapter(self.cfg.model.init_adapter, partial=True)
            if fresh:
                layers = sorted({int(m.group(1)) for n in fresh if (m := re.search(r"\.(\d+)\.", n))})
                tqdm.write(f"init_adapter holds no weights for {len(fresh)} tensors (layers {layers}): "
                           f"they start fresh")
        if tok is None:
            raise ValueError("training needs a tokenizer (pass tokenizer= with a backbone instance)")
        if self.cfg.train.gradient_checkpointing:
            enable = getattr(backbone, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()        # HF layers checkpoint only in train mode; the memory layers have no dropout
        return model

    def _setup_data(self) -> None:
        cfg, d, m = self.cfg, self.cfg.data, self.cfg.memory
        tok = self.model.tokenizer
        common = dict(seq_len=d.seq_len, min_tokens=d.min_doc_tokens, eval_fraction=d.eval_fraction, seed=cfg.seed)
        train = SampleStream(d.sources, tok, split="train", shuffle_buffer=d.shuffle_buffer,
                             synthetic_rate=d.synthetic_rate, synthetic_tasks=d.synthetic_tasks,
                             synthetic_answer_only=d.synthetic_loss == "answer", local=m.window, **common)
        pad = self.model.pad_token_id
        acc = self.accelerator
        self.batches = BatchStream(train, cfg.crossbatch.batch_size, pad, acc.process_index, acc.num_processes)
        held = SampleStream(d.sources, tok, split="eval", per_doc=cfg.eval.per_doc, **common)
        self.eval_set = eval_batches(held, cfg.eval.batch_size, cfg.eval.batches, pad)

    # ------------------------------------------------------------------ training
    def train(self) -> dict:
        """Run to `train.max_steps`; returns the last evaluation's metrics."""
        cfg, acc = self.cfg, self.accelerator
        last_eval = {}
        if self.step == 0 and cfg.eval.at_start:
            last_eval = self.evaluate()
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not acc.is_local_main_process)
        while self.step < cfg.train.max_steps:
            stats = self._train_step()
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", d=stats["d"])
            if self.step % cfg.train.log_every == 0:
                self.metrics.log(self.step, stats, "train")
            done = self.step == cfg.train.max_steps
            if (cfg.eval.every and self.step % cfg.eval.every == 0) or (done and cfg.eval.at_end):
                last_eval = self.evaluate()
            if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or done:
                self.save_checkpoint()
        bar.close()
        self._write_adapter(self.out / "adapter")
        if acc.is_main_process and self.metrics.path.exists():
            plot_metrics(self.metrics.path, self.out / "metrics.png")
        acc.wait_for_everyone()
        return last_eval

    def _train_step(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        t0 = time.perf_counter()
        d = self.d_schedule.at(self.step, self.rng)
        w = self.w_schedule.at(self.step, self.rng)
        accum = cfg.train.gradient_accumulation_steps
        lane_losses, token_loss, tokens = [], 0.0, 0
        for a in range(accum):
            batch = next(self.batches)
            norm = scored_counts(self.model, batch, cfg.crossbatch.first_loss_window).to(acc.device)
            lanes = max(1, int((norm > 0).sum()))

            def backward(loss, count, t, last):
                # mean over lanes of each lane's mean token loss, averaged over accumulated episodes
                obj = (loss / norm.clamp(min=1)).sum() / lanes / accum
                if obj.requires_grad:          # False only when no lane has a target in this window
                    acc.backward(obj)

            def window_context(t, last, final=a == accum - 1):
                if self.fsdp:
                    sync = sharding.gradient_sync(self.lm, last and final)
                else:
                    sync = contextlib.nullcontext() if (last and final) else acc.no_sync(self.lm)
                return _both(sync, acc.autocast())

            res = run_episode(self.model, batch, d=d, w=w, top_k=cfg.crossbatch.top_k, generator=self.rng,
                              first_loss_window=cfg.crossbatch.first_loss_window, lm=self.lm,
                              backward=backward, window_context=window_context)
            per_lane = torch.stack(res.loss).sum(0) / norm.cpu().clamp(min=1)
            lane_losses.append(float(per_lane[norm.cpu() > 0].mean()))
            s, n = res.total()
            token_loss, tokens = token_loss + s, tokens + n
        grad_norm = None
        if cfg.optim.max_grad_norm:
            grad_norm = acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                            cfg.optim.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]          # the LoRA group's (the gates' scales alike)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = acc.reduce(torch.tensor(sum(lane_losses) / accum, device=acc.device), "mean")
        stats = {"loss": float(loss), "token_loss": token_loss / max(1, tokens), "tokens": tokens, "lr": lr,
                 "d": d, "w": 0 if w is None else w, "seconds": time.perf_counter() - t0,
                 "gate_mean": float(torch.stack([sharding.full(m.memory_gate.detach()).float().mean()
                                                 for m in self._gates()]).mean())}
        if grad_norm is not None:
            stats["grad_norm"] = float(sharding.full(grad_norm))
        return stats

    def _gates(self):
        return [m for m in self.model.modules() if hasattr(m, "memory_gate")]

    def evaluate(self) -> dict:
        """The evaluation hook: held-out loss with/without memory, passkey accuracy; logged."""
        e = self.cfg.eval
        t0 = time.perf_counter()
        # under FSDP passkey generation calls the model directly: keep the root unit gathered there
        direct = (lambda: sharding.unsharded_root(self.lm)) if self.fsdp else contextlib.nullcontext
        with self.accelerator.autocast():
            out = evaluate(self.model, self.eval_set, e.passkey_lengths, e.passkey_trials, e.passkey_seed,
                           lm=self.lm, direct_calls=direct)
        out["seconds"] = time.perf_counter() - t0
        self.metrics.log(self.step, out, "eval")
        if self.accelerator.is_main_process:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
            tqdm.write(f"[eval step {self.step}] {shown}")
        return out

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def _resume_path(self) -> Path | None:
        r = self.cfg.checkpoint.resume
        if r is False:
            return None
        if isinstance(r, str) and r != "auto":
            if not (Path(r) / "trainer_state.json").is_file():
                raise FileNotFoundError(f"checkpoint.resume: {r} is not a checkpoint (no trainer_state.json)")
            return Path(r)
        found = self._checkpoints()
        if not found and r is True:
            raise FileNotFoundError(f"checkpoint.resume=true but no checkpoint under {self._ckpt_root()}")
        return found[-1] if found else None

    def _write_adapter(self, path: Path) -> None:
        """The adapter as `save_pretrained` writes it (every process calls this: under FSDP the
        shards are gathered first)."""
        from memformer.persistence import save_adapter
        state = sharding.gather_trainable(self.model) if self.fsdp else None
        if self.accelerator.is_main_process:
            save_adapter(self.model, path, state=state)

    def save_checkpoint(self) -> Path:
        """Adapter + optimizer + scheduler + RNG + data position, written atomically (a temporary
        folder renamed into place, memformer/fileio.py); the newest `checkpoint.keep` are kept, the
        older ones renamed away before they are deleted (never a half-deleted `step_*`)."""
        from memformer.fileio import atomic_dir, lock_path, remove_dir
        from memformer.persistence import save_adapter
        acc = self.accelerator
        path = self._ckpt_root() / f"step_{self.step:07d}"
        acc.wait_for_everyone()
        # every process takes part in gathering FSDP shards; the main process writes
        adapter = sharding.gather_trainable(self.model) if self.fsdp else None
        opt = sharding.optimizer_state(self.lm, self.optimizer.optimizer) if self.fsdp else None
        if acc.is_main_process:
            opt = opt if self.fsdp else self.optimizer.state_dict()
            state = {"step": self.step, "data_position": self.batches.next_global,
                     "rng": _rng_to_json(self.rng.getstate()), "world_size": acc.num_processes,
                     "fsdp": self.fsdp, "config": self.cfg.to_dict()}

            def fill(tmp: Path) -> None:
                save_adapter(self.model, tmp / "adapter", state=adapter)
                torch.save({"optimizer": opt, "scheduler": self.scheduler.state_dict(),
                            "torch_rng": torch.get_rng_state(),
                            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                           tmp / "training_state.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))

            atomic_dir(path, fill)
            for old in self._checkpoints()[:-self.cfg.checkpoint.keep]:
                remove_dir(old)
                # and its lock file: this run holds the output folder's lock, nobody else writes here
                lock_path(old).unlink(missing_ok=True)
        acc.wait_for_everyone()
        return path

    def _checkpoints(self) -> list[Path]:
        """Complete checkpoints under output_dir/checkpoints, oldest first."""
        root = self._ckpt_root()
        found = sorted(root.glob("step_*")) if root.is_dir() else []
        return [p for p in found if all((p / f).is_file() for f in _CHECKPOINT_FILES)]

    def load_checkpoint(self, path) -> None:
        """Continue the run saved at `path` (same config and number of processes)."""
        from memformer.fileio import read_json
        path = Path(path)
        state = read_json(path / "trainer_state.json", error=ConfigError)
        ints = ("step", "data_position", "world_size")
        if not all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool) for k in ints) \
                or not isinstance(state.get("rng"), list) or len(state["rng"]) != 3:
            raise ConfigError(f"{path / 'trainer_state.json'} is corrupt: expected integers {', '.join(ints)} and "
                              f"the rng state")
        if state["world_size"] != self.accelerator.num_processes:
            raise ValueError(f"{path} was saved with {state['world_size']} process(es), this run has "
                             f"{self.accelerator.num_processes}: the data stream would not continue")
        if bool(state.get("fsdp", False)) != self.fsdp:
            raise ValueError(f"{path} was saved {'with' if state.get('fsdp') else 'without'} FSDP, this run is "
                             f"{'sharded' if self.fsdp else 'unsharded'}: the optimizer states differ in layout")
        ts = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        if self.fsdp:
            from safetensors.torch import load_file
            from memformer.persistence import ADAPTER_FILE
            sharding.load_trainable(self.lm, load_file(str(path / "adapter" / ADAPTER_FILE)))
            sharding.load_optimizer_state(self.lm, self.optimizer.optimizer, ts["optimizer"])
        else:
            self.model.load_adapter(path / "adapter")
            self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        torch.set_rng_state(ts["torch_rng"])
        if ts["cuda_rng"]:
            torch.cuda.set_rng_state_all(ts["cuda_rng"])
        self.rng.setstate(_rng_from_json(state["rng"]))
        self.step = int(state["step"])
        self.batches.skip(int(state["data_position"]) - self.batches.position)
        self.metrics.truncate_after(self.step)
        if self.accelerator.is_main_process:
            tqdm.write(f"resumed from {path} at step {self.step}")

    def cleanup(self) -> None:
        self.metrics.close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every process must be past its last collective before the group is torn down: a
            # process that closes its gloo connections while a peer's send to it is still in
            # flight can abort at exit ("terminate called without an active exception")
            torch.distributed.barrier()
        self.accelerator.end_training()
        release_dir_lock(getattr(self, "_lock", None))
        self._lock = None


_CHECKPOINT_FILES = ("trainer_state.json", "training_state.pt", "adapter/adapter.safetensors")


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


def _rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data) -> tuple:
    return (data[0], tuple(data[1]), data[2])
