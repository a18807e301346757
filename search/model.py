"""Speaker-identification network: prenet -> encoder -> pooling -> head.

Each stage is picked by name from a registry (``ENCODERS``, ``POOLINGS``, ``HEADS``), so a search space
can name an architecture as plain strings and :func:`build_model` turns a :class:`ModelConfig` into a
module. Inputs are log-mel frames ``x`` of shape (B, T, n_mels), padded at the end of time, with
``lengths`` (B,) giving each utterance's valid frames.

Padding must never change an utterance's output: every stage masks padded frames, so an utterance
scored alone gives the same logits as in a padded batch (the tests check this for every combination).
One exception, in training only: the Conformer convolution's BatchNorm takes its batch statistics over
all time steps, as torchaudio's, ESPnet's and WeNet's do, so the padded frames of a crop from an
utterance shorter than ``segment_len`` count in them: 2 of HW4's 64,666 utterances at 128 frames, under
5% at the boss space's 300 (HW4's 5th percentile is 368 frames), more on short audio of one's own.
Masking them costs about a dozen more kernels per layer on every step; left as is until a GPU run
weighs the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchaudio.models import Conformer
from torchaudio.models.conformer import ConformerLayer

from search.config import ModelConfig
from search.errors import UserError

# -----------------------------------------------------------------------------
# registries


class Encoder(nn.Module):
    """Maps frames (B, T, d_model) to frames (B, T, d_model); padded frames' outputs are don't-care."""

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        raise NotImplementedError


class Pooling(nn.Module):
    """Maps frames (B, T, d) to one vector (B, out_dim) per utterance, ignoring padded frames."""

    out_dim: int

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        raise NotImplementedError


class Head(nn.Module):
    """Maps embeddings (B, in_dim) to class logits (B, n_classes)."""

    def forward(self, emb: Tensor, labels: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def set_margin_scale(self, scale: float) -> None:
        """Heads without a margin ignore the margin warm-up."""


ENCODERS: dict[str, type[Encoder]] = {}
POOLINGS: dict[str, type[Pooling]] = {}
HEADS: dict[str, type[Head]] = {}

_C = TypeVar("_C", bound=type)


def register(registry: dict[str, Any], name: str) -> Callable[[_C], _C]:
    """Class decorator: file ``cls`` under ``name`` so configs can pick it by string."""

    def add(cls: _C) -> _C:
        if name in registry:
            raise ValueError(f"'{name}' is registered twice")
        registry[name] = cls
        return cls

    return add


def padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B, max_len) bool, True at padded frames: the one mask every stage uses.

    Built from the tensor's own time size rather than ``lengths.max()``, so a batch padded past its
    longest utterance (e.g. to a fixed size) still lines up.
    """
    steps = torch.arange(max_len, device=lengths.device)
    return steps.unsqueeze(0) >= lengths.unsqueeze(1)


# -----------------------------------------------------------------------------
# encoders


@register(ENCODERS, "transformer")
class TransformerEncoder(Encoder):
    """Plain post-norm Transformer; padding is excluded from attention via the key padding mask."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.ffn_dim, cfg.dropout, batch_first=True)
        # No nested-tensor fast path: training and evaluation then run the same dense computation.
        self.encoder = nn.TransformerEncoder(layer, num_layers=cfg.layers, enable_nested_tensor=False)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        out: Tensor = self.encoder(x, src_key_padding_mask=pad_mask)
        return out


class MaskedConformerLayer(ConformerLayer):
    """torchaudio's ConformerLayer, with padded frames zeroed right before the depthwise convolution.

    torchaudio masks padding only inside self-attention. Its depthwise convolution (kernel k) then mixes
    up to k // 2 padded frames into the last valid frames, so an utterance's output depends on what it
    was padded with. ESPnet and WeNet zero padded frames after the GLU, just before the depthwise
    convolution; this layer does the same. Submodules and parameter names are the parent's, so
    state_dicts load both ways; only ``forward`` differs (the parent's, with the mask passed on).
    """

    def _apply_convolution(self, input: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        conv = self.conv_module  # torchaudio's _ConvolutionModule, run step by step
        pointwise, glu, depthwise_and_rest = conv.sequential[0], conv.sequential[1], conv.sequential[2:]
        x = conv.layer_norm(input.transpose(0, 1)).transpose(1, 2)  # (T, B, D) -> (B, D, T)
        x = glu(pointwise(x))
        if pad_mask is not None:
            x = x.masked_fill(pad_mask.unsqueeze(1), 0.0)
        x = depthwise_and_rest(x)
        return input + x.permute(2, 0, 1)  # back to (T, B, D), plus the residual

    def forward(self, input: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """input (T, B, D); key_padding_mask (B, T), True at padded frames."""
        residual = input
        x = self.ffn1(input)
        x = x * 0.5 + residual

        if self.convolution_first:
            x = self._apply_convolution(x, key_padding_mask)

        residual = x
        x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=key_padding_mask, need_weights=False)
        x = self.self_attn_dropout(x)
        x = x + residual

        if not self.convolution_first:
            x = self._apply_convolution(x, key_padding_mask)

        residual = x
        x = self.ffn2(x)
        x = x * 0.5 + residual
        out: Tensor = self.final_layer_norm(x)
        return out


@register(ENCODERS, "conformer")
class ConformerEncoder(Encoder):
    """torchaudio's Conformer with padding-safe convolutions (see :class:`MaskedConformerLayer`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.conformer = Conformer(
            input_dim=cfg.d_model,
            num_heads=cfg.heads,
            ffn_dim=cfg.ffn_dim,
            num_layers=cfg.layers,
            depthwise_conv_kernel_size=cfg.conv_kernel,
            dropout=cfg.dropout,
        )
        # The subclass adds no state, only a forward that passes the mask to the convolution, so
        # re-classing the built layers keeps torchaudio's construction and parameter layout exactly.
        for layer in self.conformer.conformer_layers:
            layer.__class__ = MaskedConformerLayer

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        # Conformer.forward rebuilds the mask from lengths.max(), which breaks when a batch is padded
        # past its longest utterance; run the layers with our mask instead.
        h = x.transpose(0, 1)
        for layer in self.conformer.conformer_layers:
            h = layer(h, pad_mask)
        return h.transpose(0, 1)


# -----------------------------------------------------------------------------
# poolings (statistics in float32: bf16 sums over hundreds of frames lose too much)


def _masked_softmax(scores: Tensor, pad_mask: Tensor) -> Tensor:
    """Softmax over time (dim 1) of (B, T) scores, giving padded frames exactly zero weight."""
    return torch.softmax(scores.float().masked_fill(pad_mask, float("-inf")), dim=1)


def _zero_padding(x: Tensor, pad_mask: Tensor) -> Tensor:
    """Float32 copy with padded frames set to 0, so even inf/nan padding cannot reach a sum."""
    return x.float().masked_fill(pad_mask.unsqueeze(-1), 0.0)


@register(POOLINGS, "mean")
class MeanPooling(Pooling):
    """Average of the valid frames."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.out_dim = in_dim

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        n_valid = (~pad_mask).sum(dim=1, keepdim=True).clamp_min(1)
        return _zero_padding(x, pad_mask).sum(dim=1) / n_valid


@register(POOLINGS, "attention")
class AttentionPooling(Pooling):
    """Self-attention pooling: a learned score per frame, softmax over valid frames, weighted sum."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.out_dim = in_dim
        self.score = nn.Linear(in_dim, 1)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        weights = _masked_softmax(self.score(x).squeeze(-1), pad_mask)  # (B, T)
        return (weights.unsqueeze(-1) * _zero_padding(x, pad_mask)).sum(dim=1)


@register(POOLINGS, "attentive_stats")
class AttentiveStatsPooling(Pooling):
    """Attentive statistics pooling (Okabe et al., 2018): attention-weighted mean and std, concatenated.

    The std adds how a speaker's frames spread, which a mean alone cannot carry.
    """

    hidden_dim = 128
    min_var = 1e-5  # keeps sqrt and its gradient finite for (near-)constant channels

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.out_dim = 2 * in_dim
        self.attention = nn.Sequential(
            nn.Linear(in_dim, self.hidden_dim), nn.Tanh(), nn.Linear(self.hidden_dim, 1)
        )

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        weights = _masked_softmax(self.attention(x).squeeze(-1), pad_mask).unsqueeze(-1)  # (B, T, 1)
        xf = _zero_padding(x, pad_mask)
        mean = (weights * xf).sum(dim=1)
        var = (weights * (xf - mean.unsqueeze(1)).square()).sum(dim=1)  # two-pass: no cancellation
        return torch.cat([mean, var.clamp_min(self.min_var).sqrt()], dim=1)


# -----------------------------------------------------------------------------
# heads


@register(HEADS, "linear")
class LinearHead(Head):
    """Plain softmax classifier (optionally batch-normalising the embedding first)."""

    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim) if cfg.head_bn else nn.Identity()
        self.fc = nn.Linear(in_dim, n_classes)

    def forward(self, emb: Tensor, labels: Tensor | None = None) -> Tensor:
        return _float32_logits(self.fc, self.bn(emb))


@register(HEADS, "mlp")
class MLPHead(Head):
    """The course sample code's classifier: Linear(d, d) -> ReLU -> Linear(d, classes), so the Simple
    baseline is the sample model itself (optionally batch-normalising the embedding first)."""

    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim) if cfg.head_bn else nn.Identity()
        self.hidden = nn.Linear(in_dim, in_dim)
        self.fc = nn.Linear(in_dim, n_classes)

    def forward(self, emb: Tensor, labels: Tensor | None = None) -> Tensor:
        return _float32_logits(self.fc, torch.relu(self.hidden(self.bn(emb))))


def _float32_logits(fc: nn.Linear, x: Tensor) -> Tensor:
    """``fc(x)`` in float32, autocast off (the margin heads' cosines are too).

    Why: bf16 logits of 600 speakers near 16-32 are 0.125 apart; an audit's simulation flipped about
    1% of argmaxes and tied 2% of top-2 pairs (the tie then goes to the lower speaker id): noise in
    every trial's validation accuracy and in the ensemble's temperatures. The layer is one small matmul.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        out: Tensor = fc(x.float())
        return out


class MarginHead(Head):
    """Cosine classifier: logits = s * cos(embedding, class weight), with a margin on the target class.

    The margin (applied only in training, when labels are given) makes the target win by a gap, which
    tightens each speaker's cluster; at evaluation the logits are plain ``s * cos``. The margin math runs
    in float32 with autocast off, since bf16 cosines (8 bits of mantissa) are coarser than the margin.
    """

    margin_scale: Tensor

    def __init__(self, in_dim: int, n_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.s = cfg.am_s
        self.m = cfg.am_m
        self.bn = nn.BatchNorm1d(in_dim) if cfg.head_bn else nn.Identity()
        self.weight = nn.Parameter(torch.empty(n_classes, in_dim))
        nn.init.xavier_normal_(self.weight)
        # A buffer, not a Python float: changing it every warm-up step must not recompile torch.compile.
        # Not persistent: the trainer owns the schedule and sets it after loading a checkpoint.
        self.register_buffer("margin_scale", torch.tensor(1.0), persistent=False)

    def set_margin_scale(self, scale: float) -> None:
        """Fraction (0..1) of the full margin ``am_m`` to apply; the trainer ramps it up."""
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"margin scale must be in [0, 1], got {scale}")
        self.margin_scale.fill_(scale)

    def cosine(self, emb: Tensor) -> Tensor:
        """(B, n_classes) float32 cosines between embeddings and class weights."""
        with torch.autocast(device_type=emb.device.type, enabled=False):
            emb = self.bn(emb.float())
            return F.linear(F.normalize(emb, dim=1), F.normalize(self.weight.float(), dim=1))

    def target_logit(self, cos_target: Tensor, m: Tensor) -> Tensor:
        """The margin-adjusted cosine of the target class, given its cosine and the current margin."""
        raise NotImplementedError

    def forward(self, emb: Tensor, labels: Tensor | None = None) -> Tensor:
        cos = self.cosine(emb)
        if labels is not None and self.training:
            with torch.autocast(device_type=cos.device.type, enabled=False):
                target = labels.long().unsqueeze(1)
                m = self.m * self.margin_scale.float()
                cos = cos.scatter(1, target, self.target_logit(cos.gather(1, target), m))
        return self.s * cos


@register(HEADS, "amsoftmax")
class AMSoftmaxHead(MarginHead):
    """Additive margin softmax (CosFace): the target's cosine is lowered to ``cos - m``."""

    def target_logit(self, cos_target: Tensor, m: Tensor) -> Tensor:
        return cos_target - m


@register(HEADS, "aamsoftmax")
class AAMSoftmaxHead(MarginHead):
    """Additive angular margin softmax (ArcFace): the target's angle is widened to ``cos(theta + m)``.

    ``cos(theta + m)`` stops decreasing once ``theta + m > pi``, which would reward moving away from the
    class; past that point the target falls back to the CosFace-like ``cos - m * sin(m)`` (ArcFace's
    reference threshold).
    """

    def target_logit(self, cos_target: Tensor, m: Tensor) -> Tensor:
        cos = cos_target.clamp(-1.0, 1.0)
        # Clamped away from 0 so sqrt's gradient stays finite at cos = +-1.
        sin = (1.0 - cos.square()).clamp_min(1e-7).sqrt()
        cos_theta_plus_m = cos * torch.cos(m) - sin * torch.sin(m)
        threshold = torch.cos(math.pi - m)  # cos past which theta + m > pi
        return torch.where(cos > threshold, cos_theta_plus_m, cos - m * torch.sin(m))


# -----------------------------------------------------------------------------
# the network


def _pick(registry: dict[str, Any], kind: str, name: str) -> Any:
    if name not in registry:
        raise UserError(f"unknown {kind} '{name}' (known: {', '.join(registry)})")
    return registry[name]


class SpeakerNet(nn.Module):
    """prenet (n_mels -> d_model) -> encoder -> pooling -> head."""

    def __init__(self, cfg: ModelConfig, n_mels: int, n_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.prenet = nn.Linear(n_mels, cfg.d_model)
        self.encoder: Encoder = _pick(ENCODERS, "encoder", cfg.encoder)(cfg)
        self.pooling: Pooling = _pick(POOLINGS, "pooling", cfg.pooling)(cfg.d_model)
        self.head: Head = _pick(HEADS, "head", cfg.head)(self.pooling.out_dim, n_classes, cfg)

    @property
    def embed_dim(self) -> int:
        """Size of :meth:`embed`'s output (the pooled vector)."""
        return self.pooling.out_dim

    def embed(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Pooled utterance embeddings (B, embed_dim) from frames (B, T, n_mels) and lengths (B,)."""
        pad_mask = padding_mask(lengths, x.size(1))
        # Zero padded input so that even non-finite padding cannot turn into nan (0 * inf) downstream.
        x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0)
        h = self.encoder(self.prenet(x), pad_mask)
        out: Tensor = self.pooling(h, pad_mask)
        return out

    def forward(self, x: Tensor, lengths: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits (B, n_classes); ``labels`` turn on the head's margin in training mode."""
        out: Tensor = self.head(self.embed(x, lengths), labels)
        return out

    def set_margin_scale(self, scale: float) -> None:
        """Fraction (0..1) of the margin to use now (margin warm-up); a no-op for the linear head."""
        self.head.set_margin_scale(scale)


def build_model(cfg: ModelConfig, n_mels: int, n_classes: int) -> SpeakerNet:
    """The network a config describes; unknown stage names raise :class:`UserError`."""
    return SpeakerNet(cfg, n_mels, n_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (all of them, trainable or not)."""
    return sum(p.numel() for p in model.parameters())
