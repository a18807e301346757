"""Tests for search/model.py: registries, padding invariance, margin heads, gradients, autocast."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torchaudio.models import Conformer
from torchaudio.models.conformer import ConformerLayer

from search import config
from search.config import ModelConfig
from search.errors import UserError
from search.model import (
    ENCODERS,
    HEADS,
    POOLINGS,
    AAMSoftmaxHead,
    AMSoftmaxHead,
    ConformerEncoder,
    LinearHead,
    MarginHead,
    MaskedConformerLayer,
    SpeakerNet,
    build_model,
    count_parameters,
    padding_mask,
)

N_MELS = 40
N_CLASSES = 7


def small_config(**changes: object) -> ModelConfig:
    """Tiny but complete model: 2 layers so padding leaks can spread through attention, kernel 7."""
    base: dict[str, object] = dict(d_model=32, heads=4, layers=2, ffn_dim=64, dropout=0.1, conv_kernel=7)
    base.update(changes)
    return ModelConfig(**base)  # type: ignore[arg-type]


def randomize_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial running statistics, so eval mode is not an identity."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)


def pad_to(x: Tensor, length: int, fill: str) -> Tensor:
    """(1, T, F) -> (1, length, F) with the tail filled by a constant, random junk, or nan."""
    extra = length - x.size(1)
    if fill == "junk":
        tail = torch.randn(1, extra, x.size(2)) * 50.0
    else:
        tail = torch.full((1, extra, x.size(2)), {"minus20": -20.0, "nan": math.nan}[fill])
    return torch.cat([x, tail], dim=1)


# -----------------------------------------------------------------------------
# registries and construction


def test_registry_names_match_config() -> None:
    assert tuple(ENCODERS) == config.ENCODERS
    assert tuple(POOLINGS) == config.POOLINGS
    assert tuple(HEADS) == config.HEADS
    # the heads whose logits scale with am_s (the divergence message names it for these)
    assert tuple(n for n, cls in HEADS.items() if issubclass(cls, MarginHead)) == config.MARGIN_HEADS


@pytest.mark.parametrize("encoder", config.ENCODERS)
@pytest.mark.parametrize("pooling", config.POOLINGS)
@pytest.mark.parametrize("head", config.HEADS)
def test_build_model_every_name(encoder: str, pooling: str, head: str) -> None:
    model = build_model(small_config(encoder=encoder, pooling=pooling, head=head), N_MELS, N_CLASSES)
    assert isinstance(model, SpeakerNet)
    assert count_parameters(model) > 0
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    x, lengths = torch.randn(3, 20, N_MELS), torch.tensor([20, 5, 12])
    assert model(x, lengths).shape == (3, N_CLASSES)
    assert model.embed(x, lengths).shape == (3, model.embed_dim)
    expected_dim = 64 if pooling == "attentive_stats" else 32
    assert model.embed_dim == expected_dim


@pytest.mark.parametrize("key", ["encoder", "pooling", "head"])
def test_unknown_name_is_a_user_error(key: str) -> None:
    with pytest.raises(UserError, match=f"unknown {key} 'nope'"):
        build_model(small_config(**{key: "nope"}), N_MELS, N_CLASSES)


def test_the_simple_baseline_is_the_course_sample_model() -> None:
    """spaces/baselines/simple.yaml builds the sample code's Classifier: the same parameters (125,896 at
    600 speakers) and, given its weights, the same logits (its own sequence-first layout, mean pooling
    and Linear-ReLU-Linear classifier)."""
    from search.config import find_config, load_config

    class Sample(nn.Module):  # the course's sample Classifier, as it is written there
        def __init__(self, d_model: int = 80, n_spks: int = 600) -> None:
            super().__init__()
            self.prenet = nn.Linear(40, d_model)
            self.encoder_layer = nn.TransformerEncoderLayer(d_model=d_model, dim_feedforward=256, nhead=2)
            self.pred_layer = nn.Sequential(
                nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, n_spks)
            )

        def forward(self, mels: Tensor) -> Tensor:
            out = self.prenet(mels).permute(1, 0, 2)
            out = self.encoder_layer(out).transpose(0, 1)
            result: Tensor = self.pred_layer(out.mean(dim=1))
            return result

    torch.manual_seed(0)
    sample = Sample().eval()
    ours = build_model(load_config(find_config("simple")).model, 40, 600).eval()
    assert count_parameters(ours) == count_parameters(sample) == 125_896
    with torch.no_grad():
        for mine, theirs in zip(ours.parameters(), sample.parameters(), strict=True):
            mine.copy_(theirs)
        x = torch.randn(3, 50, 40)
        assert torch.allclose(ours(x, torch.full((3,), 50)), sample(x), atol=1e-5)


def test_padding_mask() -> None:
    mask = padding_mask(torch.tensor([3, 1, 5]), 5)
    expected = torch.tensor(
        [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


# -----------------------------------------------------------------------------
# padding invariance


@pytest.mark.parametrize("encoder", config.ENCODERS)
@pytest.mark.parametrize("pooling", config.POOLINGS)
@pytest.mark.parametrize("head", config.HEADS)
def test_padding_does_not_change_logits(encoder: str, pooling: str, head: str) -> None:
    torch.manual_seed(0)
    cfg = small_config(encoder=encoder, pooling=pooling, head=head, head_bn=True)
    model = build_model(cfg, N_MELS, N_CLASSES).eval()
    randomize_batchnorm(model)
    short, long = torch.randn(1, 5, N_MELS), torch.randn(1, 23, N_MELS)
    with torch.no_grad():
        alone_short = model(short, torch.tensor([5]))
        alone_long = model(long, torch.tensor([23]))
        for fill in ("minus20", "junk", "nan"):
            # Padded to the longest utterance, and also past it (as a fixed-size batch would be).
            for total in (23, 30):
                batch = torch.cat([pad_to(short, total, fill), pad_to(long, total, fill)])
                logits = model(batch, torch.tensor([5, 23]))
                torch.testing.assert_close(logits[0:1], alone_short, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(logits[1:2], alone_long, atol=1e-4, rtol=1e-4)


def _stock_and_masked_conformer() -> tuple[Conformer, ConformerEncoder]:
    torch.manual_seed(0)
    masked = ConformerEncoder(small_config(encoder="conformer", layers=1)).eval()
    randomize_batchnorm(masked)
    stock = Conformer(input_dim=32, num_heads=4, ffn_dim=64, num_layers=1, depthwise_conv_kernel_size=7)
    stock.load_state_dict(masked.conformer.state_dict())  # same parameter layout
    return stock.eval(), masked


def test_stock_torchaudio_conformer_leaks_padding_and_masked_does_not() -> None:
    stock, masked = _stock_and_masked_conformer()
    short, long = torch.randn(1, 5, 32), torch.randn(1, 25, 32)
    junk = torch.randn(1, 20, 32) * 50.0
    batch = torch.cat([torch.cat([short, junk], dim=1), long])  # 5 valid frames + junk, then 25 valid
    lengths = torch.tensor([5, 25])
    with torch.no_grad():
        stock_alone, _ = stock(short, lengths[:1])
        stock_padded, _ = stock(batch, lengths)
        masked_alone = masked(short, padding_mask(lengths[:1], 5))
        masked_padded = masked(batch, padding_mask(lengths, 25))
    # Without the fix, the depthwise convolution mixes padded frames into the valid ones ...
    assert (stock_padded[:1, :5] - stock_alone).abs().max() > 1e-2
    # ... with it, the valid frames are untouched, and alone the two encoders agree exactly.
    torch.testing.assert_close(masked_padded[:1, :5], masked_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked_alone, stock_alone, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(masked_padded[1:], stock_padded[1:], atol=1e-6, rtol=1e-6)


def test_masked_conformer_keeps_torchaudio_layout() -> None:
    stock, masked = _stock_and_masked_conformer()
    assert list(stock.state_dict()) == list(masked.conformer.state_dict())
    for layer in masked.conformer.conformer_layers:
        assert isinstance(layer, MaskedConformerLayer)
        assert isinstance(layer, ConformerLayer)
    masked.conformer.load_state_dict(stock.state_dict())


# -----------------------------------------------------------------------------
# margin heads


def margin_head(kind: type[MarginHead]) -> MarginHead:
    torch.manual_seed(0)
    return kind(16, N_CLASSES, small_config(am_s=30.0, am_m=0.2))


def plain_cosine(head: MarginHead, emb: Tensor) -> Tensor:
    return nn.functional.normalize(emb, dim=1) @ nn.functional.normalize(head.weight, dim=1).T


def split_target(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(target logits (B,), non-target logits (B, C - 1))."""
    is_target = nn.functional.one_hot(labels, logits.size(1)).bool()
    return logits[is_target], logits[~is_target].view(logits.size(0), -1)


def test_amsoftmax_margin_only_on_target_in_training() -> None:
    head = margin_head(AMSoftmaxHead)
    emb, labels = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 4, 6])
    cos = plain_cosine(head, emb)
    cos_target, cos_other = split_target(cos, labels)

    head.train()
    target, other = split_target(head(emb, labels), labels)
    torch.testing.assert_close(target, 30.0 * (cos_target - 0.2))
    torch.testing.assert_close(other, 30.0 * cos_other)

    torch.testing.assert_close(head(emb), 30.0 * cos)  # training without labels: no margin
    head.eval()
    torch.testing.assert_close(head(emb, labels), 30.0 * cos)
    torch.testing.assert_close(head(emb), 30.0 * cos)


def test_margin_scale_warms_the_margin_up() -> None:
    head = margin_head(AMSoftmaxHead).train()
    emb, labels = torch.randn(4, 16), torch.tensor([3, 1, 0, 2])
    cos_target, _ = split_target(plain_cosine(head, emb), labels)
    head.set_margin_scale(0.0)
    torch.testing.assert_close(split_target(head(emb, labels), labels)[0], 30.0 * cos_target)
    head.set_margin_scale(0.5)
    torch.testing.assert_close(split_target(head(emb, labels), labels)[0], 30.0 * (cos_target - 0.1))
    with pytest.raises(ValueError):
        head.set_margin_scale(1.5)


def test_aamsoftmax_target_is_cos_theta_plus_m() -> None:
    head = margin_head(AAMSoftmaxHead).train()
    emb, labels = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 4, 6])
    cos = plain_cosine(head, emb)
    cos_target, cos_other = split_target(cos, labels)
    target, other = split_target(head(emb, labels), labels)
    torch.testing.assert_close(target, 30.0 * torch.cos(torch.acos(cos_target) + 0.2))
    torch.testing.assert_close(other, 30.0 * cos_other)

    head.set_margin_scale(0.0)
    torch.testing.assert_close(head(emb, labels), 30.0 * cos, atol=1e-4, rtol=1e-4)
    head.eval()
    head.set_margin_scale(1.0)
    torch.testing.assert_close(head(emb, labels), 30.0 * cos)


def test_aamsoftmax_falls_back_past_pi() -> None:
    """An embedding opposite its class (theta = pi) gets cos - m*sin(m), never cos(pi + m) > -1."""
    head = margin_head(AAMSoftmaxHead).train()
    labels = torch.tensor([2])
    emb = -head.weight[2:3].detach()
    target, _ = split_target(head(emb, labels), labels)
    torch.testing.assert_close(target, torch.tensor([30.0 * (-1.0 - 0.2 * math.sin(0.2))]))


def test_linear_head_ignores_labels_and_margin_scale() -> None:
    torch.manual_seed(0)
    head = LinearHead(16, N_CLASSES, small_config()).train()
    emb = torch.randn(4, 16)
    head.set_margin_scale(0.3)
    torch.testing.assert_close(head(emb, torch.tensor([0, 1, 2, 3])), head(emb))


def test_speakernet_set_margin_scale_reaches_head() -> None:
    model = build_model(small_config(head="amsoftmax"), N_MELS, N_CLASSES)
    model.set_margin_scale(0.25)
    assert isinstance(model.head, AMSoftmaxHead)
    assert float(model.head.margin_scale) == 0.25
    assert "head.margin_scale" not in model.state_dict()  # the trainer owns the schedule


# -----------------------------------------------------------------------------
# gradients and mixed precision


@pytest.mark.parametrize("encoder", config.ENCODERS)
@pytest.mark.parametrize("head", config.HEADS)
def test_gradients_flow(encoder: str, head: str) -> None:
    torch.manual_seed(0)
    cfg = small_config(encoder=encoder, pooling="attentive_stats", head=head, head_bn=True)
    model = build_model(cfg, N_MELS, N_CLASSES).train()
    x, lengths, labels = torch.randn(4, 18, N_MELS), torch.tensor([18, 3, 9, 12]), torch.tensor([0, 1, 2, 6])
    loss = nn.functional.cross_entropy(model(x, lengths, labels), labels)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert model.prenet.weight.grad is not None and model.prenet.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("encoder", config.ENCODERS)
@pytest.mark.parametrize("head", config.HEADS)
def test_bf16_autocast(encoder: str, head: str) -> None:
    """CPU bf16 autocast runs the same code paths as CUDA's: finite, close to fp32, margins in fp32."""
    torch.manual_seed(0)
    cfg = small_config(encoder=encoder, pooling="attentive_stats", head=head, head_bn=True)
    model = build_model(cfg, N_MELS, N_CLASSES).train()
    x, lengths, labels = torch.randn(4, 18, N_MELS), torch.tensor([18, 3, 9, 12]), torch.tensor([0, 1, 2, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x, lengths, labels)
        loss = nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    assert torch.isfinite(logits).all()
    margin = head in ("amsoftmax", "aamsoftmax")
    assert logits.dtype == torch.float32  # every head's logits: bf16 ones flipped and tied argmaxes
    model.eval()
    with torch.no_grad():
        reference = model(x, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, lengths).float()
    scale = 30.0 if margin else reference.abs().max().item()
    assert (low - reference).abs().max() < 0.1 * scale
