from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from search.checkpoint import load_model, save_atomic
from search.config import Config
from search.data import FeatureStore, PackedData, make_split, restore_generator
from search.infer import accuracy, predict_logits
from search.model import build_model
from search.train import (
    CaptureGate,
    TrainingDiverged,
    lr_factor,
    lr_in_tensor,
    make_optimizer,
    spec_augment,
    train,
)

SMALL = {
    "encoder": "transformer",
    "d_model": 32,
    "heads": 2,
    "layers": 1,
    "ffn_dim": 64,
    "dropout": 0.0,
    "steps": 150,
    "batch_size": 16,
    "segment_len": 64,
    "lr": 3e-3,
    "warmup_steps": 10,
    "valid_steps": 50,
    "valid_ratio": 0.25,
}


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor(s, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_short_run_beats_chance_and_checkpoint_reproduces(fake_data: PackedData, tmp_path: Path) -> None:
    config = Config.from_dict(SMALL)
    seen: list[tuple[int, dict[str, float]]] = []
    result = train(
        config, fake_data, "cpu", report=lambda s, m: seen.append((s, m)), out_dir=tmp_path, log_every=25
    )
    chance = 1.0 / fake_data.n_speakers
    assert result.best_accuracy > 2 * chance
    assert [s for s, m in seen if "valid_acc" in m] == [50, 100, 150]  # every valid_steps and at the end
    assert all(math.isfinite(m["loss"]) and m["lr"] >= 0 for _, m in seen)
    assert not (tmp_path / "last.pt").exists()  # a finished run leaves only best.pt
    model, loaded_config, ckpt = load_model(tmp_path / "best.pt")
    assert loaded_config == config
    assert ckpt["step"] == result.best_step and ckpt["speakers"] == fake_data.speakers
    split = make_split(fake_data, config.train.valid_ratio, config.train.split_seed)
    logits = predict_logits(model, FeatureStore(fake_data), split.valid)
    assert accuracy(logits, fake_data.labels[split.valid]) == pytest.approx(result.best_accuracy)
    assert ckpt["metrics"]["valid_acc"] == pytest.approx(result.best_accuracy)


def test_best_weights_are_a_copy_not_the_latest(fake_data: PackedData, tmp_path: Path) -> None:
    """The sample code's defect: its 'best' state_dict aliased the live weights."""
    # lr 5e-2 keeps the model at chance: every validation ties, and a tie keeps the first (step 20), so
    # 80 steps of training come after the best and the final weights differ from it.
    config = Config.from_dict(
        {**SMALL, "steps": 100, "valid_steps": 20, "checkpoint_steps": 20, "lr": 5e-2, "warmup_steps": 1}
    )
    result = train(config, fake_data, "cpu", out_dir=tmp_path, keep_last=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    final = torch.load(tmp_path / "last.pt", weights_only=True)
    assert best["step"] == result.best_step < final["step"] == 100
    assert any(not torch.equal(best["model"][k], final["model"][k]) for k in final["model"])
    model, _, _ = load_model(tmp_path / "best.pt")  # its weights score the best accuracy, whatever came after
    split = make_split(fake_data, config.train.valid_ratio, config.train.split_seed)
    acc = accuracy(predict_logits(model, FeatureStore(fake_data), split.valid), fake_data.labels[split.valid])
    assert acc == pytest.approx(result.best_accuracy)


def test_a_run_resumed_from_before_its_first_validation_and_stopped_still_validates(
    fake_data: PackedData, tmp_path: Path
) -> None:
    """last.pt written before the first validation held an empty "best model", which a resume took for
    "validated already": stopped before its next validation, the run returned best_accuracy -1.0."""
    config = Config.from_dict({**SMALL, "steps": 100, "valid_steps": 50, "checkpoint_steps": 5})

    def stop_at(step: int) -> Callable[[int, dict[str, float]], str | None]:
        return lambda s, m: "stop" if s >= step else None

    first = train(config, fake_data, "cpu", report=stop_at(5), out_dir=tmp_path, log_every=5)
    assert first.stopped_early and first.last_step == 5 and first.best_accuracy >= 0
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["step"] == 5 and last["best_accuracy"] == -1.0  # saved as step 5 ended, before validating
    assert "best_model" not in last  # best.pt holds the best weights; last.pt is not twice the model
    # The first run validated as it stopped, after its last.pt: a resume would take that best.pt (see
    # test_a_best_checkpoint_newer_than_last_is_the_resumed_runs_best). Killed outright, it left none:
    (tmp_path / "best.pt").unlink()
    second = train(config, fake_data, "cpu", report=stop_at(10), out_dir=tmp_path, log_every=5, resume=True)
    assert second.resumed_from == 5 and second.last_step == 10
    assert second.best_accuracy >= 0 and second.best_step == 10


def test_last_pt_is_written_at_every_checkpoint_step_whatever_log_every(
    fake_data: PackedData, tmp_path: Path
) -> None:
    """The save sat inside the report block: checkpoint_steps 30 with log_every 50 saved at 150 only."""
    config = Config.from_dict({**SMALL, "steps": 120, "valid_steps": 1000, "checkpoint_steps": 30})
    saved: list[int] = []

    def report(step: int, metrics: dict[str, float]) -> None:
        if (tmp_path / "last.pt").exists():
            saved.append(int(torch.load(tmp_path / "last.pt", weights_only=True)["step"]))

    train(config, fake_data, "cpu", report=report, out_dir=tmp_path, log_every=50, keep_last=True)
    assert sorted(set(saved)) == [30, 60, 90, 120]


def test_report_stop_ends_training(fake_data: PackedData) -> None:
    config = Config.from_dict({**SMALL, "steps": 1000, "valid_steps": 20})
    result = train(config, fake_data, "cpu", report=lambda s, m: "stop" if "valid_acc" in m else None)
    assert result.stopped_early and result.last_step == 20


def test_non_finite_loss_is_a_clear_error(fake_data: PackedData) -> None:
    config = Config.from_dict({**SMALL, "lr": 1.0, "grad_clip": 0.0, "warmup_steps": 0, "steps": 400})
    data = fake_data
    poisoned = PackedData(**{**data.__dict__, "features": np.full_like(np.asarray(data.features), np.inf)})
    with pytest.raises(
        TrainingDiverged,
        match=r"non-finite loss by step \d+ \(lr 1, grad_clip 0\); lower lr or turn grad_clip on$",
    ):
        train(config, poisoned, "cpu")
    # With clipping on, the advice was still "keep grad_clip on"; an AM-Softmax head's scale is named.
    clipped = Config.from_dict({**SMALL, "grad_clip": 5.0, "head": "amsoftmax", "am_s": 30.0, "steps": 40})
    with pytest.raises(TrainingDiverged, match=r"\(lr [\d.]+, grad_clip 5\); lower lr, or am_s \(30\)$"):
        train(clipped, poisoned, "cpu")


def test_phase_times_account_for_the_run(fake_data: PackedData, tmp_path: Path) -> None:
    """A run's wall time is split into set-up, steps, validation, checkpoints and report; the split adds up,
    and time the caller's callback takes is charged to it, not to the steps (nor to steps/s)."""
    config = Config.from_dict({**SMALL, "steps": 60, "valid_steps": 20, "checkpoint_steps": 20})
    calls = []

    def slow_report(step: int, metrics: dict[str, float]) -> None:
        calls.append(step)
        time.sleep(0.2)

    started = time.perf_counter()
    result = train(config, fake_data, "cpu", report=slow_report, out_dir=tmp_path, log_every=10)
    wall = time.perf_counter() - started
    seconds = result.seconds
    assert list(seconds) == ["setup", "steps", "validation", "checkpoints", "report"]
    assert all(value > 0 for value in seconds.values()), seconds
    assert len(calls) == 6 and seconds["report"] >= 6 * 0.2
    assert seconds["steps"] < wall - 6 * 0.2
    assert result.steps_per_s == pytest.approx(60 / seconds["steps"], rel=0.01)
    # nothing of note left out (a busy machine may stall between the phases), nothing counted twice
    assert wall - max(0.5, 0.2 * wall) <= sum(seconds.values()) <= wall


RESUMABLE = {**SMALL, "steps": 100, "valid_steps": 25, "checkpoint_steps": 25}


def interrupt_at(config: Config, data: PackedData, out_dir: Path, at: int) -> Path:
    """Train until step ``at``, then stop as Ctrl-C would; returns the ``last.pt`` left behind."""

    def stop(step: int, metrics: dict[str, float]) -> str | None:
        if step == at:
            raise KeyboardInterrupt
        return None

    with pytest.raises(KeyboardInterrupt):
        train(config, data, "cpu", report=stop, out_dir=out_dir)
    assert (out_dir / "last.pt").exists()
    return out_dir / "last.pt"


def test_resume_from_last_checkpoint(fake_data: PackedData, tmp_path: Path) -> None:
    """A run stopped at step 50 and resumed ends with the very weights of one never stopped (on CPU,
    without dropout): the model, optimizer, schedule and crops all go on from last.pt."""
    config = Config.from_dict(RESUMABLE)
    full = train(config, fake_data, "cpu", out_dir=tmp_path / "full", keep_last=True)
    interrupt_at(config, fake_data, tmp_path / "part", 50)
    resumed = train(config, fake_data, "cpu", out_dir=tmp_path / "part", keep_last=True)
    assert resumed.resumed_from == 50
    assert resumed.best_accuracy == pytest.approx(full.best_accuracy)
    ends = [torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("full", "part")]
    assert ends[0]["step"] == ends[1]["step"] == 100
    assert all(torch.equal(ends[0]["model"][k], ends[1]["model"][k]) for k in ends[0]["model"])


def test_a_checkpoint_with_another_devices_random_streams_resumes_with_fresh_ones(
    fake_data: PackedData, tmp_path: Path
) -> None:
    """A GPU run's last.pt holds CUDA generator states (16 bytes); a retry on a CPU worker (or on a GPU
    whose set stayed in host memory) raised on them, and the trial failed for good, its folder gone."""
    config = Config.from_dict(RESUMABLE)
    last = interrupt_at(config, fake_data, tmp_path, 50)
    state = torch.load(last, weights_only=True)
    cuda_state = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator's get_state() holds
    state["sampler"], state["rng"]["augment"] = cuda_state, cuda_state.clone()
    save_atomic(state, last)
    result = train(config, fake_data, "cpu", out_dir=tmp_path)
    assert result.resumed_from == 50 and result.last_step == config.train.steps and not result.stopped_early


def test_a_best_checkpoint_newer_than_last_is_the_resumed_runs_best(
    fake_data: PackedData, tmp_path: Path
) -> None:
    """A run killed between the best.pt and last.pt writes of one validation kept the newer best.pt; on a
    GPU the resumed run's validation at that step may fall short of it, and the trial then reported
    last.pt's older accuracy beside that best.pt (its recorded figure and its checkpoint disagreed)."""
    config = Config.from_dict(RESUMABLE)
    last = interrupt_at(config, fake_data, tmp_path, 50)
    state = torch.load(last, weights_only=True)
    assert state["best_step"] <= 50
    best = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "sampler", "rng")}
    # As the killed run wrote it at step 75 (its own accuracy; 2.0: no real validation can beat it).
    save_atomic({**best, "step": 75, "metrics": {"valid_acc": 2.0, "parameters": 1}}, tmp_path / "best.pt")
    result = train(config, fake_data, "cpu", out_dir=tmp_path)
    assert (result.resumed_from, result.best_accuracy, result.best_step) == (50, 2.0, 75)
    # One of another run (another seed) is not this run's: it is replaced, its figure not taken.
    other = Config.from_dict({**RESUMABLE, "seed": 9})
    last = interrupt_at(other, fake_data, tmp_path / "b", 50)
    save_atomic({**best, "step": 75, "metrics": {"valid_acc": 2.0, "parameters": 1}}, tmp_path / "b/best.pt")
    result = train(other, fake_data, "cpu", out_dir=tmp_path / "b")
    assert result.resumed_from == 50 and result.best_accuracy <= 1.0


def test_restore_generator_goes_on_where_it_can_and_seeds_anew_where_it_cannot() -> None:
    def draws(g: torch.Generator) -> list[float]:
        return torch.rand(4, generator=g).tolist()

    saved = torch.Generator().manual_seed(3)
    draws(saved)
    expected = draws(torch.Generator().set_state(saved.get_state()))
    g = torch.Generator()
    assert restore_generator(g, saved.get_state(), seed=1, step=50) and draws(g) == expected
    other = torch.zeros(16, dtype=torch.uint8)
    fresh = [torch.Generator(), torch.Generator()]
    assert not any(restore_generator(f, other, seed=1, step=50) for f in fresh)
    assert draws(fresh[0]) == draws(fresh[1])  # the same seed and step: the same stream
    assert draws(fresh[0]) != draws(torch.Generator().manual_seed(1))  # not the trial's first one


@pytest.mark.parametrize("noise", [{"dropout": 0.2}, {"spec_time_masks": 2, "spec_freq_masks": 2}])
def test_a_resumed_run_draws_the_same_dropout_and_masks_as_an_unbroken_one(
    fake_data: PackedData, tmp_path: Path, noise: dict[str, float]
) -> None:
    """last.pt kept the model, optimizer and crops but not dropout's or SpecAugment's random streams:
    every retried trial of the shipped spaces (dropout 0.1-0.2) trained on from another path."""
    config = Config.from_dict({**RESUMABLE, **noise, "steps": 60, "valid_steps": 20, "checkpoint_steps": 20})
    losses: dict[str, dict[int, float]] = {"full": {}, "part": {}}

    def keep(run: str) -> Callable[[int, dict[str, float]], None]:
        return lambda step, metrics: losses[run].update({step: metrics["loss"]} if step > 20 else {})

    train(config, fake_data, "cpu", out_dir=tmp_path / "full", report=keep("full"), log_every=5)
    interrupt_at(config, fake_data, tmp_path / "part", 20)
    resumed = train(config, fake_data, "cpu", out_dir=tmp_path / "part", report=keep("part"), log_every=5)
    assert resumed.resumed_from == 20
    assert sorted(losses["part"]) == [25, 30, 35, 40, 45, 50, 55, 60]
    assert losses["part"] == losses["full"]  # the same draws, so the same losses, to the last bit


def test_resume_on_cpu_from_a_graphed_gpu_runs_older_checkpoint(
    fake_data: PackedData, tmp_path: Path
) -> None:
    """A CUDA-graph run saves its optimizer with a tensor lr and capturable=True; a CPU run resumes it."""
    config = Config.from_dict(RESUMABLE)
    full = train(config, fake_data, "cpu", out_dir=tmp_path / "full")
    last = interrupt_at(config, fake_data, tmp_path / "part", 50)
    state = torch.load(last, weights_only=True)
    for group in state["optimizer"]["param_groups"]:  # what a graphed run's checkpoint holds
        group["lr"], group["capturable"] = torch.tensor(float(group["lr"])), True
    del state["config"]["cuda_graph"]  # and one written before that key existed resumes as well
    save_atomic(state, last)
    seen: dict[int, float] = {}
    resumed = train(
        config, fake_data, "cpu", out_dir=tmp_path / "part", report=lambda s, m: seen.update({s: m["lr"]})
    )
    assert resumed.resumed_from == 50 and resumed.step_mode == "eager"
    assert resumed.best_accuracy == pytest.approx(full.best_accuracy)
    assert isinstance(seen[75], float) and seen[75] == pytest.approx(lr_factor(75, 10, 100) * 3e-3)


def test_weight_decay_spares_biases_and_norm_scales() -> None:
    """Decay pulls toward zero: right for weight matrices, wrong for a norm's scale (neutral at 1)."""
    config = Config.from_dict({"encoder": "conformer", "pooling": "attentive_stats", "head": "amsoftmax"})
    model = build_model(config.model, 40, 10)
    decayed, spared = make_optimizer(model, 1e-3, 0.05).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.05 and spared["weight_decay"] == 0.0
    assert sorted(names[id(p)] for g in (decayed, spared) for p in g["params"]) == sorted(names.values())
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in spared["params"])
    spared_names = {names[id(p)] for p in spared["params"]}
    assert any("norm" in n for n in spared_names) and any(n.endswith(".bias") for n in spared_names)
    assert "head.weight" in {names[id(p)] for p in decayed["params"]}
    (legacy,) = make_optimizer(model, 1e-3, 0.05, decay_all=True).param_groups
    assert legacy["weight_decay"] == 0.05 and len(legacy["params"]) == len(names)


def test_a_last_checkpoint_of_the_decay_everything_rule_resumes_as_that_run(
    fake_data: PackedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A last.pt from before the split holds one optimizer group; loading it into two groups fails
    (and a one-group LR schedule would drive only the first): it resumes under the rule it ran with."""
    config = Config.from_dict({**RESUMABLE, "weight_decay": 0.5, "steps": 60, "valid_steps": 20})
    losses: dict[str, dict[int, float]] = {"full": {}, "part": {}, "new": {}}

    def keep(run: str) -> Callable[[int, dict[str, float]], None]:
        return lambda step, metrics: losses[run].update({step: metrics["loss"]} if step > 20 else {})

    def old_rule(
        model: torch.nn.Module, lr: float, wd: float, fused: bool = False, decay_all: bool = False
    ) -> torch.optim.AdamW:
        return make_optimizer(model, lr, wd, fused, decay_all=True)

    with monkeypatch.context() as m:
        m.setattr("search.train.make_optimizer", old_rule)
        train(config, fake_data, "cpu", out_dir=tmp_path / "full", report=keep("full"), log_every=5)
        last = interrupt_at(config, fake_data, tmp_path / "part", 20)
    assert len(torch.load(last, weights_only=True)["optimizer"]["param_groups"]) == 1
    resumed = train(config, fake_data, "cpu", out_dir=tmp_path / "part", report=keep("part"), log_every=5)
    assert resumed.resumed_from == 20 and sorted(losses["part"]) == [25, 30, 35, 40, 45, 50, 55, 60]
    assert losses["part"] == losses["full"]
    fresh = train(config, fake_data, "cpu", out_dir=tmp_path / "new", report=keep("new"), log_every=5)
    assert fresh.resumed_from == 0 and losses["new"] != losses["full"]  # the new rule trains otherwise


def test_last_checkpoint_of_another_config_is_not_resumed(fake_data: PackedData, tmp_path: Path) -> None:
    config = Config.from_dict(RESUMABLE)
    interrupt_at(config, fake_data, tmp_path, 50)
    other = train(config.replace(lr=1e-3), fake_data, "cpu", out_dir=tmp_path)
    assert other.resumed_from == 0 and other.last_step == 100


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_tensor_lr_follows_the_schedule_in_place() -> None:
    """The CUDA graph reads the lr tensor it was recorded with: schedulers must update it in place."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 4, 20))
    lr_in_tensor(optimizer, torch.device("cpu"), graphed=True)
    recorded = optimizer.param_groups[0]["lr"]
    assert isinstance(recorded, torch.Tensor) and optimizer.param_groups[0]["capturable"]
    for step in range(1, 8):
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] is recorded
        assert float(recorded) == pytest.approx(1e-3 * lr_factor(step, 4, 20))
    lr_in_tensor(optimizer, torch.device("cpu"), graphed=False)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(float(recorded))
    assert not optimizer.param_groups[0]["capturable"]


def test_spec_augment_masks_only_valid_frames() -> None:
    config = Config.from_dict(
        {"spec_time_masks": 2, "spec_time_width": 5, "spec_freq_masks": 2, "spec_freq_width": 4}
    )
    x = torch.randn(8, 40, 40)
    lengths = torch.tensor([40, 30, 20, 10, 40, 30, 20, 10])
    x[torch.arange(40)[None, :] >= lengths[:, None]] = -20.0
    g = torch.Generator().manual_seed(0)
    y = spec_augment(x, lengths, config, g)
    assert y.shape == x.shape and not torch.equal(x, y)
    padded = torch.arange(40)[None, :] >= lengths[:, None]
    assert torch.equal(y[padded], x[padded])
    off = Config.from_dict({})
    assert torch.equal(spec_augment(x, lengths, off, g), x)


def test_masks_never_blank_a_whole_crop() -> None:
    """A mask as wide as the crop or the mel bins, or masks that together covered it, replaced whole
    crops with their mean (37% of crops at width 100 over 64 frames); now each row keeps a cell."""
    config = Config.from_dict(
        {"spec_time_masks": 3, "spec_time_width": 500, "spec_freq_masks": 3, "spec_freq_width": 100}
    )
    x = torch.randn(64, 40, 40)
    lengths = torch.randint(1, 41, (64,))
    y = spec_augment(x, lengths, config, torch.Generator().manual_seed(0))
    valid = (torch.arange(40)[None, :] < lengths[:, None])[:, :, None].expand_as(x)
    kept = ((y == x) & valid).flatten(1).any(dim=1)
    assert kept.all(), f"{int((~kept).sum())} of 64 crops blanked"
    assert not torch.equal(x, y)  # and it still masks
    # A mask narrower than its row is drawn as before: from the same numbers, to the same cells.
    narrow = Config.from_dict({"spec_time_masks": 1, "spec_time_width": 5})
    full = torch.full((64,), 40)
    a = spec_augment(x, full, narrow, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    w = (torch.rand(64, generator=g) * 6).long()
    start = (torch.rand(64, generator=g) * (40 - w + 1)).long()
    pos = torch.arange(40)[None, :]
    band = (pos >= start[:, None]) & (pos < (start + w)[:, None])
    assert torch.equal((a != x).any(dim=2), band)


def test_capture_gate_lets_a_recording_run_alone() -> None:
    """A recording waits for every shared holder to leave and keeps new ones out until it ends."""
    gate = CaptureGate()
    events: list[str] = []
    holding, release = threading.Event(), threading.Event()
    recording, finish = threading.Event(), threading.Event()

    def holder() -> None:
        with gate.shared(), gate.shared():  # re-entering from one thread is allowed
            holding.set()
            release.wait(5)
            events.append("holder leaves")

    def recorder() -> None:
        with gate.exclusive():
            events.append("recording")
            recording.set()
            finish.wait(5)
            events.append("recording ends")

    def late() -> None:
        with gate.shared():
            events.append("late holder enters")

    first = threading.Thread(target=holder)
    first.start()
    holding.wait(5)
    rec = threading.Thread(target=recorder)
    rec.start()
    assert not recording.wait(0.2)  # the recording waits for the holder
    release.set()
    assert recording.wait(5)
    new = threading.Thread(target=late)
    new.start()
    time.sleep(0.1)  # time for a wrong gate to let it in (a slow machine only makes this check weaker)
    finish.set()
    for th in (first, rec, new):
        th.join(5)
    assert events == ["holder leaves", "recording", "recording ends", "late holder enters"]
    with gate.shared(), pytest.raises(RuntimeError, match="wait for itself"), gate.exclusive():
        pass


def test_trainings_can_share_one_feature_store(fake_data: PackedData) -> None:
    config = Config.from_dict({**SMALL, "steps": 20, "valid_steps": 20})
    store = FeatureStore(fake_data, "cpu")
    losses: list[list[float]] = []

    def run(shared: FeatureStore | None) -> float:
        losses.append([])
        report = lambda step, metrics: losses[-1].append(metrics["loss"])  # noqa: E731
        return train(config, fake_data, "cpu", store=shared, log_every=5, report=report).best_accuracy

    accuracies = [run(store), run(store), run(None)]  # the store is only read: all three train alike
    assert len(set(accuracies)) == 1 and losses[0] == losses[1] == losses[2] and len(losses[0]) == 4
    other = PackedData(**{**vars(fake_data)})
    with pytest.raises(ValueError, match="other data"):
        train(config, other, "cpu", store=store)
