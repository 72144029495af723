"""A clap-train run: the model, data, checkpoints and the epoch loop (clap_model.main parses the command line)."""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from clap_model import checkpoint as ckpt
from clap_model import distributed, files
from clap_model.clap import CLAP
from clap_model.cli_common import Stop
from clap_model.config import get_preset
from clap_model.data import (DataError, LoaderConfig, ShardDataset, ShardSet, batches_per_worker, make_loader,
                             steps_per_epoch)
from clap_model.evaluate import audio_spec, check_eval_args, run_evaluations
from clap_model.loss import ClipLoss
from clap_model.metrics import format_metrics
from clap_model.text import Tokenize
from clap_model.train import EpochContext, TrainState, build_optimizer, train_one_epoch


# Options that leave the trained weights alone: where to log, evaluate and save, when to stop.
NO_EFFECT_ON_TRAINING = {"resume", "out", "log_every", "val_data", "val_frequency", "zeroshot_data",
                         "zeroshot_label_field", "zeroshot_classes", "zeroshot_template", "save_frequency",
                         "save_every_steps", "max_steps", "compile", "device"}


def changed_options(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`--name old -> new` for each option that shapes training and differs from the checkpoint's."""
    return [f"--{name.replace('_', '-')} {ckpt.shown(saved[name])} -> {value!r}" for name, value in now.items()
            if name in saved and name not in NO_EFFECT_ON_TRAINING and saved[name] != value]


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """load_state_dict checks the groups, not the tensors: a moment of another shape would fail the
    first step with a traceback, so each must be a scalar (`step`) or of its parameter's shape."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor) or (value.dim() and value.shape != param.shape):
                    raise ValueError(f"its {name!s:.40} is not a tensor of its parameter's shape")


class Run:
    """Everything one process of a training run holds. `stop` holds a SIGINT / SIGTERM that arrives
    while training: the step in progress finishes, OUT/latest.pt is saved, then it is raised."""

    def __init__(self, args: argparse.Namespace, info: distributed.DistInfo, stop: Stop | None = None) -> None:
        self.args, self.info = args, info
        self.stop = stop or Stop()
        self.out = Path(args.out)
        self.saved_step: int | None = None  # the step OUT/latest.pt holds, once this run saved it
        files.check_out(self.out, args.resume)
        distributed.barrier(info)  # every rank has looked before rank 0 creates OUT
        self.precision = args.precision or ("bf16" if info.device.type == "cuda" else "fp32")
        if info.device.type == "cuda":  # fp32 work outside autocast (mel features) may use TF32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        cfg = get_preset(args.model, args.text_model)
        # The data arguments are checked before the (possibly downloaded) model is built.
        self.spec = audio_spec(cfg, args.data_truncating, args.data_filling, args.max_fusion_seconds)
        check_eval_args(args)
        if args.train_data_weights and args.no_resample:
            raise DataError("--train-data-weights weights resampled shard draws; drop --no-resample")
        self.shards = ShardSet.from_spec(args.train_data, args.train_data_weights, train=True)
        num_samples = args.train_num_samples or self.shards.num_samples
        if not num_samples:
            raise DataError("epoch length unknown: no sizes.json covers every shard; pass --train-num-samples")
        self.steps = steps_per_epoch(num_samples, args.batch_size, info.world_size)
        # The checkpoint files next, then the tokenizer: their mistakes are found before any download.
        self.resumed = self._read_resume() if args.resume else None
        pretrained = ckpt.read(args.pretrained, args.max_checkpoint_bytes) if args.pretrained is not None else None
        self.tokenize = Tokenize(cfg.text)
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        # A checkpoint supplies the text weights: the tower is built from its known config, offline.
        self.model = CLAP(cfg, pretrained_text=pretrained is None and self.resumed is None, mlp_loss=args.mlp_loss)
        if pretrained is not None:
            ckpt.load_weights(self.model, pretrained)
        del pretrained
        self.model.to(info.device)
        compile_audio = args.compile if args.compile is not None else info.device.type == "cuda"
        if compile_audio and hasattr(self.model.audio_branch, "compile_features") and not cfg.enable_fusion:
            self.model.audio_branch.compile_features()
        self.ddp = (DistributedDataParallel(self.model, device_ids=[info.device.index] if info.device.type == "cuda"
                                            else None) if info.distributed else self.model)
        torch.manual_seed(args.seed + info.rank)  # each rank its own dropout / SpecAugment stream
        random.seed(args.seed + info.rank)
        self.optimizer = build_optimizer(self.model, args.lr, args.wd, (args.beta1, args.beta2), args.eps)
        self.state = TrainState()
        # Only now that model and data are ready: a run that cannot start leaves no --out behind.
        files.make_folder(self.out)
        self.writer = self._tensorboard() if info.is_master else None

    def _resume_path(self) -> str:
        return str(self.out / "latest.pt") if self.args.resume == "latest" else self.args.resume

    def _read_resume(self) -> dict[str, Any]:
        saved = ckpt.read(self._resume_path(), self.args.max_checkpoint_bytes)
        if "optimizer" not in saved or "step" not in saved:
            raise ckpt.CheckpointError(f"{self._resume_path()} holds weights only; use --pretrained to start from it")
        counters_ok = all(type(saved.get(k)) is int and saved[k] >= 0 for k in ("step", "epoch", "step_in_epoch"))
        if not (counters_ok and isinstance(saved.get("rng"), list) and all(isinstance(r, dict) for r in saved["rng"])
                and isinstance(saved["optimizer"], dict) and isinstance(saved.get("args", {}), dict)):
            raise ckpt.CheckpointError(f"{self._resume_path()}: its training state (step, epoch, step_in_epoch, "
                                       "rng, optimizer, args) is missing or of other types; cannot resume from it")
        return saved

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        files.make_folder(self.out / "tensorboard")  # its event files' names are its own; its folder is not a link
        return SummaryWriter(str(self.out / "tensorboard"))

    def log(self, message: str) -> None:
        if self.info.is_master:
            print(message, flush=True)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    # ---- checkpoints ----

    def rng_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.info.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.info.device)
        return rng

    def save(self, epoch_file: bool) -> None:
        """Called on every rank (their RNG states are gathered); rank 0 writes. A signal waits for
        the write to end."""
        with self.stop.deferred():
            rngs = distributed.gather_objects(self.info, self.rng_state())
            if not self.info.is_master:
                return
            state = {"config": self.model.cfg.to_dict(), "state_dict": self.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "step": self.state.step, "epoch": self.state.epoch,
                     "step_in_epoch": self.state.step_in_epoch, "rng": rngs, "args": vars(self.args)}
            if epoch_file:
                ckpt.save_atomic(state, self.out / f"epoch_{self.state.epoch}.pt",
                                 also=self.out / "latest.pt")
            else:
                ckpt.save_atomic(state, self.out / "latest.pt")
            self.saved_step = self.state.step

    def interrupted_line(self) -> str:
        """What an interrupted run leaves, for clap-train's one line."""
        if self.saved_step is None:
            return "no checkpoint saved yet"
        return (f"{self.out / 'latest.pt'} holds step {self.saved_step}: continue with the same command "
                "and --resume latest")

    def resume(self) -> None:
        path, saved = self._resume_path(), self.resumed
        self.resumed = None  # the weights move into the model; the file's copy is not kept
        ckpt.load_weights(self.model, saved)
        self.state = TrainState(saved["step"], saved["epoch"], saved["step_in_epoch"])
        rngs = saved["rng"]
        try:  # torch and random check these values themselves; a damaged file is one line
            self.optimizer.load_state_dict(saved["optimizer"])
            _check_optimizer_state(self.optimizer)
            if len(rngs) == self.info.world_size:  # same world size: every rank continues its own stream
                rng = rngs[self.info.rank]
                torch.set_rng_state(rng["torch"])
                random.setstate(rng["python"])
                if "cuda" in rng and self.info.device.type == "cuda":
                    torch.cuda.set_rng_state(rng["cuda"], self.info.device)
        except (ValueError, TypeError, RuntimeError, KeyError, IndexError) as exc:
            raise ckpt.CheckpointError(f"{path}: its optimizer or random state does not fit this run "
                                       f"({ckpt.one_line(exc)})") from None
        if len(rngs) != self.info.world_size:
            self.log(f"note: saved with {len(rngs)} ranks, resumed on {self.info.world_size}: "
                     "the random streams restart from the seed")
        self.log(f"resumed from {path}: epoch {self.state.epoch}, step {self.state.step}")
        changed = changed_options(saved.get("args", {}), vars(self.args))
        if changed:
            self.log("note: resumed with options other than the checkpoint's (" + ", ".join(changed)
                     + "): the run will not be the one an uninterrupted run gives")

    # ---- data ----

    def train_batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        args = self.args
        cfg = LoaderConfig(batch_size=args.batch_size, audio=self.spec,
                           caption_fields=tuple(f.strip() for f in args.caption_fields.split(",") if f.strip()),
                           train=True, resampled=not args.no_resample, shuffle_buffer=args.shuffle_buffer,
                           seed=args.seed, batches_per_worker=batches_per_worker(self.steps, args.workers))
        dataset = ShardDataset(self.shards, cfg, self.tokenize, self.info.rank, self.info.world_size, epoch)
        batches = iter(make_loader(dataset, args.workers))
        for _ in range(self.state.step_in_epoch):  # mid-epoch resume: replay the consumed batches
            next(batches)
        return batches

    # ---- the loop ----

    def evaluate(self) -> None:
        if not (self.args.val_data or self.args.zeroshot_data):
            return
        if self.info.is_master:
            started = time.perf_counter()
            metrics = run_evaluations(self.model, self.args, self.spec, self.tokenize, self.info.device,
                                      self.precision)
            self.log(f"eval epoch {self.state.epoch}: {format_metrics(metrics)} "
                     f"({time.perf_counter() - started:.1f}s)")
            for name, value in metrics.items():
                self.scalar(f"val/{name}", value, self.state.step)
            files.append_line(self.out / "results.jsonl",
                              json.dumps({"epoch": self.state.epoch, "step": self.state.step, **metrics}))
        distributed.barrier(self.info)

    def _missed_evaluation(self) -> bool:
        """Whether the run was stopped after an epoch's checkpoint but before its evaluation: the
        resumed run then evaluates that epoch first, so results.jsonl is an uninterrupted run's."""
        epoch, args = self.state.epoch, self.args
        if self.state.step_in_epoch or not epoch or not (args.val_data or args.zeroshot_data) \
                or not (epoch % args.val_frequency == 0 or epoch == args.epochs):
            return False
        if self.info.world_size > 1:  # every rank must agree before the barrier: left to the next epoch
            return False
        try:
            with open(self.out / "results.jsonl", "rb") as handle:
                rows = handle.read(64 << 20).splitlines()  # our own one-line rows; a bound all the same
        except FileNotFoundError:
            return True
        return not any(row.startswith(b'{"epoch": %d,' % epoch) for row in rows)

    def on_step(self, state: TrainState) -> None:
        # At an epoch's last step the stop waits for fit's epoch checkpoint.
        if state.step_in_epoch < self.steps and self.stop_requested():
            self.save(epoch_file=False)
            self.stop_now()
        every = self.args.save_every_steps
        if every and state.step % every == 0 and state.step_in_epoch < self.steps:
            self.save(epoch_file=False)

    def stop_requested(self, now: bool = False) -> bool:
        """A pending SIGINT / SIGTERM, on any rank. Ranks agree (a collective) at log steps and
        when `now`: each agreement waits for the device, which the host otherwise runs ahead of."""
        if not self.info.distributed:
            return self.stop.signum is not None
        if self.state.step % self.args.log_every and not now:
            return False
        flag = torch.tensor([0 if self.stop.signum is None else 1], device=self.info.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def stop_now(self) -> None:
        self.stop.check()
        raise KeyboardInterrupt  # another rank was signalled: this one stops with it

    def train_epoch(self, ctx: EpochContext) -> None:
        """One epoch (or its rest); a signal is acted on at the next step's end. A loader whose
        workers took the terminal's Ctrl-C too fails: with a signal pending, that is the signal."""
        with self.stop.deferred():
            try:
                train_one_epoch(ctx, self.train_batches(self.state.epoch), self.state)
            except Exception:
                if self.stop.signum is None:
                    raise
                self.save(epoch_file=False)
                self.stop.check()

    def fit(self) -> None:
        args = self.args
        total = self.steps * args.epochs  # --max-steps interrupts the run; it does not reshape the schedule
        self.log(f"clap-train: model {args.model}, {sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M "
                 f"params, {len(self.shards.urls)} shards, {self.steps} steps/epoch x {args.epochs} epochs, "
                 f"batch {args.batch_size} x {self.info.world_size} ranks, {self.precision}, {self.info.device}")
        ctx = EpochContext(self.ddp, self.model, self.optimizer, ClipLoss(args.local_loss), self.info.device,
                           self.precision, args.lr, args.warmup, total, self.steps,
                           args.batch_size * self.info.world_size, args.grad_clip_norm, args.log_every,
                           args.max_steps, self.log, self.scalar, self.on_step)
        try:
            if args.resume and self._missed_evaluation():
                self.evaluate()
            while self.state.epoch < args.epochs:
                if args.max_steps is not None and self.state.step >= args.max_steps:
                    break
                self.train_epoch(ctx)
                if self.state.step_in_epoch < self.steps:  # stopped by --max-steps mid-epoch
                    self.save(epoch_file=False)
                    break
                self.state.epoch += 1
                self.state.step_in_epoch = 0
                # Saved before evaluating (which uses no random stream): a failing evaluation loses no training.
                self.save(epoch_file=self.state.epoch % args.save_frequency == 0 or self.state.epoch == args.epochs)
                if self.stop_requested(now=True):
                    self.stop_now()
                if self.state.epoch % args.val_frequency == 0 or self.state.epoch == args.epochs:
                    self.evaluate()
        finally:  # an interrupted run keeps its logs too
            if self.writer is not None:
                self.writer.close()
        self.stop.check()  # a signal during the last step: the run is complete and saved, but was stopped

