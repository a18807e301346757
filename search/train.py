"""Train one configuration. Knows nothing about Optuna: the caller passes a ``report`` callback.

``report(step, metrics)`` is called every ``log_every`` steps and at every ``checkpoint_steps`` step (loss,
lr, steps/s), and after every validation (plus ``valid_acc``); returning ``"stop"`` ends training early
(how pruning works). The
best weights are copied (not aliased) whenever validation improves and written atomically to
``best.pt``; ``last.pt`` (every ``checkpoint_steps``) lets a killed run resume where it was.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from search.checkpoint import UnreadableCheckpoint, read_checkpoint, save_atomic
from search.config import MARGIN_HEADS, Config
from search.data import CropSampler, FeatureStore, PackedData, Split, make_split, restore_generator
from search.errors import UserError, first_line
from search.infer import accuracy, predict_logits
from search.model import SpeakerNet, build_model, count_parameters

Report = Callable[[int, dict[str, float]], "str | None"]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: this configuration cannot be trained as it stands."""


@dataclass
class TrainResult:
    best_accuracy: float
    best_step: int
    last_step: int
    stopped_early: bool
    parameters: int
    steps_per_s: float
    device: str
    checkpoint: Path | None
    resumed_from: int = 0
    step_mode: str = "eager"  # how the training step ran: eager, cuda graph, torch.compile (<mode>)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase (see PhaseClock)


class PhaseClock:
    """Wall seconds a run spends in each phase, so a trial that is slower than its steps shows why.

    ``setup`` (model, optimizer, resuming), ``steps`` (training steps, graph warm-up and recording
    included), ``validation``, ``checkpoints`` (best.pt and last.pt) and ``report`` (the caller's
    callback: status files, pruning's storage calls). On a GPU each phase ends at a host sync (the
    loss read at a log point, a validation's accuracy, a checkpoint's copy), so kernels still queued
    are charged to the phase that queued them, not to the next.
    """

    PHASES = ("setup", "steps", "validation", "checkpoints", "report")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {phase: round(s, 3) for phase, s in self.seconds.items()}


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then half-cosine to 0 (the sample code's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def spec_augment(
    x: torch.Tensor, lengths: torch.Tensor, config: Config, generator: torch.Generator
) -> torch.Tensor:
    """Time and frequency masks, vectorised over the batch; masked cells take the utterance's mean."""
    t = config.train
    if not (t.spec_time_masks or t.spec_freq_masks):
        return x
    batch, frames, mels = x.shape
    dev = x.device
    valid = (torch.arange(frames, device=dev)[None, :] < lengths[:, None])[:, :, None]
    fill = (x * valid).sum(dim=(1, 2)) / (lengths * mels).clamp(min=1)
    mask = torch.zeros(batch, frames, mels, dtype=torch.bool, device=dev)

    def bands(count: int, width: int, size: int, limit: torch.Tensor) -> torch.Tensor:
        """``count`` masks of up to ``width`` cells within each row's first ``limit``; never all of them.

        Why: a mask as wide as the crop (or the mel bins), or masks that together covered it, replaced
        the whole crop with its mean (37% of crops at width 100 over 64 frames). A mask is kept one cell
        short of its row, and masks that still cover it all are dropped for that row; masks narrower
        than their row are drawn as before, from the same random numbers.
        """
        out = torch.zeros(batch, size, dtype=torch.bool, device=dev)
        pos = torch.arange(size, device=dev)[None, :]
        for _ in range(count):
            w = (torch.rand(batch, device=dev, generator=generator) * (width + 1)).long()
            w = torch.minimum(w, (limit - 1).clamp(min=0))
            start = (torch.rand(batch, device=dev, generator=generator) * (limit - w + 1).clamp(min=1)).long()
            out |= (pos >= start[:, None]) & (pos < (start + w)[:, None])
        covered = (out | (pos >= limit[:, None])).all(dim=1)
        return out & ~covered[:, None]

    if t.spec_freq_masks:
        mask |= bands(t.spec_freq_masks, t.spec_freq_width, mels, torch.full((batch,), mels, device=dev))[
            :, None, :
        ]
    if t.spec_time_masks:
        mask |= bands(t.spec_time_masks, t.spec_time_width, frames, lengths)[:, :, None]
    return torch.where(mask & valid, fill[:, None, None], x)


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CaptureGate:
    """Lets one trainer thread record a CUDA graph while every other trainer thread of the process waits.

    Why: trials that share a process (threads, so their kernels can overlap on one GPU) share the
    default CUDA generator, and a recording takes it over: another thread's dropout meanwhile fails
    ("Offset increment outside graph capture"). Work that may touch that generator (seeding, model
    set-up, steps, replays, validation) runs under :meth:`shared`, which any number of threads hold at
    once; a recording runs under :meth:`exclusive`, which waits until no one holds :meth:`shared` and
    keeps new holders out until it ends. Re-entering :meth:`shared` from the same thread is allowed.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holders = 0
        self._recording = False
        self._depth = threading.local()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            with self._cond:
                self._cond.wait_for(lambda: not self._recording)
                self._holders += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            if depth == 0:
                with self._cond:
                    self._holders -= 1
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        if getattr(self._depth, "n", 0):
            raise RuntimeError("CaptureGate.exclusive() inside shared() would wait for itself")
        with self._cond:
            self._cond.wait_for(lambda: not self._recording)
            self._recording = True  # from here no new holder gets in
            self._cond.wait_for(lambda: self._holders == 0)
        try:
            yield
        finally:
            with self._cond:
                self._recording = False
                self._cond.notify_all()


GATE = CaptureGate()


class EagerStep:
    """One training step run op by op: clear the gradients, then ``step`` (forward, backward, update)."""

    def __init__(self, step: StepFn, optimizer: torch.optim.Optimizer) -> None:
        self.step, self.optimizer = step, optimizer

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with GATE.shared():
            self.optimizer.zero_grad(set_to_none=True)
            return self.step(x, lengths, labels)


class CudaGraphStep:
    """The whole training step (forward, loss, backward, clipping, AdamW) recorded once, then replayed.

    Why: at batch 32 the strong model's step is well over a thousand small kernels, and launching them
    one by one from Python takes longer than the GPU takes to run them. A CUDA graph launches them all
    at once. The crops have a static shape, so one recording serves every step: each call copies the
    batch into fixed input buffers and replays. The first ``warmup`` calls are ordinary eager steps on a
    side stream (as PyTorch's graph recipe asks), so cuBLAS, autograd and AdamW create their state
    outside the graph; the next call records the graph, then replays it (recording runs nothing).
    The optimizer must be fused or capturable with its lr held in a device tensor
    (:func:`lr_in_tensor`), so the scheduler's updates reach the recorded kernels. Gradients live in
    the graph's memory from then on and are overwritten, not accumulated, by each replay.
    """

    def __init__(self, step: StepFn, optimizer: torch.optim.Optimizer, warmup: int = 3) -> None:
        self.step, self.optimizer, self.warmup = step, optimizer, warmup
        self.eager = EagerStep(step, optimizer)  # what runs if recording fails
        self.calls = 0
        self.inputs: tuple[torch.Tensor, ...] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.failed = ""  # why recording failed, if it did; the step then runs eagerly

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.eager(x, lengths, labels)
        if self.inputs is None:
            self.inputs = (x.clone(), lengths.clone(), labels.clone())
        else:
            for buffer, value in zip(self.inputs, (x, lengths, labels), strict=True):
                buffer.copy_(value)
        if self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "capturable=True but running without capture"
                loss = self.eager(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            try:
                # Alone in the process (see CaptureGate), and thread_local: other threads' CUDA work
                # can neither spoil the recording nor be recorded into it.
                with GATE.exclusive(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.loss = self.step(*self.inputs)
            except RuntimeError as exc:  # an op that cannot be recorded (a host sync, say): run eagerly
                self.failed = first_line(exc, 200)
                print(f"spkid-search: CUDA graph not used ({self.failed}); training eagerly", file=sys.stderr)
                torch.cuda.synchronize()
                return self.eager(x, lengths, labels)
            self.graph = graph
        with GATE.shared():  # a replay advances the shared generator too
            self.graph.replay()
        assert self.loss is not None
        return self.loss


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, fused: bool = False, decay_all: bool = False
) -> torch.optim.AdamW:
    """AdamW that decays weight matrices and kernels only (group 0), not biases, norms' scales or
    other 1-d parameters (group 1).

    Why: decay pulls a parameter toward zero, a sensible prior for a weight matrix but not for a
    LayerNorm or BatchNorm scale (whose neutral value is 1) or a bias (nanoGPT and timm split the same
    way). ``decay_all``: one group decaying everything, the rule before this one, kept so that a
    ``last.pt`` written under it resumes as the run it was. ``fused``: CUDA's fused kernel.
    """
    params = list(model.parameters())
    groups: list[dict[str, Any]] = (
        [{"params": params}]
        if decay_all
        else [
            {"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


def lr_in_tensor(optimizer: torch.optim.Optimizer, device: torch.device, graphed: bool) -> None:
    """Hold each group's lr in a device tensor (graphed) or a float (not), and set ``capturable``.

    A recorded graph reads the lr it was recorded with; only a tensor updated in place (LR schedulers
    ``fill_`` a tensor lr) lets the schedule go on. Called after building the scheduler (its base lrs
    stay floats, so its per-step update is a fill, not a host sync) and again after loading a
    checkpoint, whose groups carry whatever kind of lr the run that saved it used.
    """
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if graphed else lr
        group["capturable"] = graphed


def _same_config(saved: Any, config: Config) -> bool:
    """Whether a checkpoint was written for ``config``; keys added since it was saved take their defaults."""
    try:
        return Config.from_dict(saved, cross=False, stored=True).to_dict() == config.to_dict()
    except UserError:  # a key this version no longer knows, or a value it refuses
        return False


def _resumes(state: dict[str, Any], config: Config, data: PackedData) -> bool:
    """Whether a ``last.pt`` state was written by a run of ``config`` on ``data`` (so it may resume)."""
    return _same_config(state["config"], config) and state.get("fingerprint") == data.fingerprint


def _newer_best(
    best_path: Path, best_acc: float, best_step: int, config: Config, data: PackedData
) -> tuple[float, int]:
    """The best accuracy and step to resume with: ``best.pt``'s where it was written after the
    ``last.pt`` that recorded ``best_acc`` at ``best_step``, else those.

    Why: a run killed between the two writes of one validation kept the newer ``best.pt``. On a GPU
    the resumed run's validation at that step is not bitwise the same and may fall short of it, so
    ``best.pt`` stayed while the run reported last.pt's older accuracy: a trial's recorded figure and
    its uploaded checkpoint disagreed.
    """
    try:
        best = read_checkpoint(best_path)
    except UnreadableCheckpoint:  # none yet, or not this run's: the validations to come write it
        return best_acc, best_step
    acc, step = (best.get("metrics") or {}).get("valid_acc"), best.get("step")
    if not _resumes(best, config, data) or not isinstance(acc, float) or not isinstance(step, int):
        return best_acc, best_step
    return (acc, step) if step > best_step and acc > best_acc else (best_acc, best_step)


def start_step(out_dir: Path, config: Config, data: PackedData, force: bool) -> int:
    """The step ``spkid-search train`` into ``out_dir`` starts from: its interrupted run's, or 0 (with
    ``force``, whose earlier files are removed: it starts over, as asked). A ``last.pt`` that cannot be
    resumed (another config or data set, or cut short) is refused, never silently replaced."""
    best, last = out_dir / "best.pt", out_dir / "last.pt"
    if force:
        last.unlink(missing_ok=True)
        best.unlink(missing_ok=True)
        return 0
    if not last.exists():
        return 0
    try:
        step = resume_step(last, config, data)
    except UnreadableCheckpoint as exc:
        # A run killed as the disk filled: its own file, not one to "trust".
        raise UserError(
            f"{last}: the interrupted run's checkpoint cannot be resumed ({exc.what}); pass --force to "
            "start over"
        ) from None
    if step is None:
        raise UserError(
            f"{last}: an interrupted run of another config or data set; run the same config and "
            "--data (and --steps) to resume it, or pass --force to start over"
        )
    return step


def resume_step(last_path: Path, config: Config, data: PackedData) -> int | None:
    """The step an interrupted run saved in ``last_path`` resumes from, or None when it was a run of
    another config or data set (which :func:`train` would start over, replacing it)."""
    state = read_checkpoint(last_path)
    return int(state["step"]) if _resumes(state, config, data) else None


def _rng_state(aug_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The random streams a resumed run must continue: SpecAugment's generator, and on CPU the
    process's own, which dropout draws from.

    On CUDA, dropout draws from the device's generator, which the trials of one worker process share
    (``--per-gpu``) and a CUDA graph advances on its own: there a resumed run is a statistically
    equal continuation, not a bitwise one.
    """
    state = {"augment": aug_gen.get_state()}
    if device.type == "cpu":
        state["torch"] = torch.get_rng_state()
    return state


def _set_rng_state(
    state: dict[str, torch.Tensor] | None,
    aug_gen: torch.Generator,
    device: torch.device,
    seed: int,
    step: int,
) -> None:
    """Continue the streams :func:`_rng_state` saved (a last.pt from before they were saved has none;
    one saved on another kind of device gets fresh streams, see :func:`search.data.restore_generator`).
    ``seed`` is the trial's: SpecAugment's stream is seeded from ``seed + 1``, dropout's ``seed + 2``."""
    if not state:
        return
    restore_generator(aug_gen, state["augment"], seed + 1, step)
    if device.type == "cpu":  # a GPU run's last.pt has no CPU stream: dropout must not replay its first draws
        restore_generator(torch.default_generator, state.get("torch"), seed + 2, step)


def _checkpoint_meta(config: Config, data: PackedData, split: Split) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "n_mels": data.n_mels,
        "speakers": list(data.speakers),
        "fingerprint": data.fingerprint,
        "split_id": split.split_id,
    }


def train(
    config: Config,
    data: PackedData,
    device: torch.device | str = "cpu",
    report: Report | None = None,
    out_dir: Path | None = None,
    split: Split | None = None,
    log_every: int = 50,
    resume: bool = True,
    store: FeatureStore | None = None,
    keep_last: bool = False,
) -> TrainResult:
    """Train ``config`` on ``data`` and return the best whole-utterance validation accuracy.

    ``store``: ``data``'s features already on ``device`` (a worker running several trials at once on
    one GPU shares one copy); by default each call makes its own. A finished run removes its
    ``last.pt`` unless ``keep_last``: a trial keeps it until its result is recorded, since a stop in
    between retries the trial, which must resume rather than start over.
    """
    device = torch.device(device)
    clock = PhaseClock()
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            # Streams and the CUDA graph belong to the current device: make it the one trained on (a
            # worker on cuda:1 would otherwise record its step on GPU 0's stream). And a stream of its
            # own: trials run as threads of one process (--per-gpu K) overlap their kernels only on
            # separate streams, and every thread starts on the same default stream.
            stack.enter_context(torch.cuda.device(device))
            stack.enter_context(torch.cuda.stream(torch.cuda.Stream(device)))
        if store is None:
            with clock("setup"):
                store = FeatureStore(data, device)
        elif store.data is not data or store.device != FeatureStore.resolve(device):
            raise ValueError(f"the feature store holds other data or lives on {store.device}, not {device}")
        return _train(
            config, data, device, report, out_dir, split, log_every, resume, store, clock, keep_last
        )


def _train(
    config: Config,
    data: PackedData,
    device: torch.device,
    report: Report | None,
    out_dir: Path | None,
    split: Split | None,
    log_every: int,
    resume: bool,
    store: FeatureStore,
    clock: PhaseClock,
    keep_last: bool,
) -> TrainResult:
    setup_started = time.perf_counter()
    t = config.train
    split = split if split is not None else make_split(data, t.valid_ratio, t.split_seed)
    with GATE.shared():  # seeding resets the generator a recording in another thread holds
        torch.manual_seed(t.seed)
        model: SpeakerNet = build_model(config.model, data.n_mels, data.n_speakers).to(device)
    sampler = CropSampler(store, split.train, t.batch_size, t.segment_len, seed=t.seed)
    aug_gen = torch.Generator(device=device)
    aug_gen.manual_seed(t.seed + 1)
    cuda = device.type == "cuda"
    graphed = cuda and t.cuda_graph and not t.compile
    last_path = out_dir / "last.pt" if out_dir is not None else None
    best_path = out_dir / "best.pt" if out_dir is not None else None
    state = read_checkpoint(last_path) if resume and last_path is not None and last_path.exists() else None
    if state is not None and not _resumes(state, config, data):
        state = None
    # A last.pt written before weight decay skipped 1-d parameters holds one group: it resumes under its rule.
    decay_all = state is not None and len(state["optimizer"]["param_groups"]) == 1
    optimizer = make_optimizer(model, t.lr, t.weight_decay, fused=cuda, decay_all=decay_all)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps))
    lr_in_tensor(optimizer, device, graphed)
    # Compiled for the fixed-shape training crops only; validation's varying lengths run eagerly.
    step_fn = torch.compile(model, mode=t.compile_mode) if (t.compile and cuda) else model
    meta = _checkpoint_meta(config, data, split)
    valid_labels = data.labels[split.valid]

    best_acc, best_step, start_step = -1.0, 0, 0  # best_acc < 0: not validated yet
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_in_tensor(optimizer, device, graphed)
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        sampler.set_state(state["sampler"], start_step)
        _set_rng_state(state.get("rng"), aug_gen, device, t.seed, start_step)
        best_acc, best_step = float(state["best_accuracy"]), int(state["best_step"])
        if best_path is not None:
            best_acc, best_step = _newer_best(best_path, best_acc, best_step, config, data)
        del state  # the saved tensors are loaded; do not hold a second copy for the whole run

    def validate(step: int) -> float:
        nonlocal best_acc, best_step
        with clock("validation"), GATE.shared():
            logits = predict_logits(model, store, split.valid, t.eval_frame_budget)
            acc = accuracy(logits, valid_labels)
        if acc > best_acc:
            best_acc, best_step = acc, step
            if best_path is not None:  # written now, a copy of these weights (the sample code aliased them)
                with clock("checkpoints"):
                    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                    metrics = {"valid_acc": acc, "parameters": count_parameters(model)}
                    save_atomic({**meta, "model": weights, "step": step, "metrics": metrics}, best_path)
        return acc

    def save_last(step: int) -> None:
        if last_path is None:
            return
        with clock("checkpoints"):
            state = {
                **meta,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": sampler.state(),
                "rng": _rng_state(aug_gen, device),
                "step": step,
                "best_accuracy": best_acc,
                "best_step": best_step,
            }
            save_atomic(state, last_path)

    def train_step(x: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Autocast's weight cache must be off while a graph records (PyTorch's rule for graphs + AMP).
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda, cache_enabled=not graphed):
            logits = step_fn(x, lengths, labels)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=t.label_smoothing)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        return loss.detach()

    run_step: StepFn = CudaGraphStep(train_step, optimizer) if graphed else EagerStep(train_step, optimizer)

    model.train()
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    window_start = time.perf_counter()
    clock.seconds["setup"] += window_start - setup_started
    stopped = False
    step = start_step
    while step < t.steps:
        if config.model.margin_warmup_steps:
            model.set_margin_scale(min(1.0, step / config.model.margin_warmup_steps))
        x, lengths, labels = sampler.next()
        x = spec_augment(x, lengths, config, aug_gen)
        loss = run_step(x, lengths, labels)
        scheduler.step()
        loss_sum += loss
        loss_count += 1
        step += 1

        is_valid = step % t.valid_steps == 0 or step == t.steps
        # A checkpoint step is a report step too: inside this block only, checkpoint_steps 30 with the
        # default log_every 50 saved every 150 steps.
        is_checkpoint = bool(t.checkpoint_steps) and step % t.checkpoint_steps == 0
        if step % log_every == 0 or is_valid or is_checkpoint:
            mean_loss = float(loss_sum) / loss_count  # the only host sync, once per log interval
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(
                    f"non-finite loss by step {step} (lr {t.lr:g}, grad_clip {t.grad_clip:g}); lower lr"
                    + ("" if t.grad_clip else " or turn grad_clip on")
                    + (f", or am_s ({config.model.am_s:g})" if config.model.head in MARGIN_HEADS else "")
                )
            clock.seconds["steps"] += time.perf_counter() - window_start
            metrics: dict[str, float] = {
                "loss": mean_loss,
                "lr": float(scheduler.get_last_lr()[0]),
                "steps_per_s": (step - start_step) / max(clock.seconds["steps"], 1e-9),
            }
            loss_sum.zero_()
            loss_count = 0
            if is_valid:
                metrics["valid_acc"] = validate(step)
                metrics["best_acc"] = best_acc
            if t.checkpoint_steps and (is_checkpoint or is_valid):
                save_last(step)
            if report is not None:
                with clock("report"):
                    verdict = report(step, metrics)
                if verdict == "stop":
                    stopped = True
                    break
            window_start = time.perf_counter()

    if best_acc < 0:  # stopped before any validation (in this run or the one it resumes): validate now
        validate(step)
    if last_path is not None and last_path.exists() and not stopped and not keep_last:
        last_path.unlink()
    return TrainResult(
        best_accuracy=best_acc,
        best_step=best_step,
        last_step=step,
        stopped_early=stopped,
        parameters=count_parameters(model),
        steps_per_s=(step - start_step) / max(clock.seconds["steps"], 1e-9),
        device=str(device),
        checkpoint=best_path if best_path is not None and best_path.exists() else None,
        resumed_from=start_step,
        step_mode=_step_mode(run_step, t.compile and cuda, t.compile_mode),
        seconds=clock.rounded(),
    )


def _step_mode(run_step: StepFn, compiled: bool, compile_mode: str) -> str:
    if compiled:
        return f"torch.compile ({compile_mode})"
    if isinstance(run_step, CudaGraphStep):
        return f"eager (CUDA graph failed: {run_step.failed})" if run_step.failed else "cuda graph"
    return "eager"
