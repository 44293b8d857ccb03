"""Spec -> explicit layer list -> ``nn.Sequential`` with Keras-style layer names.

Every kind of spec is first expanded to a list of ``LayerDef`` (the ``layers`` kind is already
one), so there is a single builder and a single place where bias / BN placement rules live.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable

import math
import torch
from torch import nn

from bnlab.nn.activations import ACTIVATIONS, activation_module

from bnlab.models.init import initialise
from bnlab.models.spec import CNNSpec, LayerDef, LayersSpec, MLPSpec, parse_model_spec
from bnlab.nn import (BatchNorm, BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm, LayerNorm, SyncBatchNorm,
                      WeightNorm)

# norms that subtract a per-channel mean over the batch (or over each sample's positions): a bias
# right before them is removed by that subtraction
_MEAN_REMOVING = ("batch", "syncbatch", "renorm", "instance")


def _norm_layer(norm: str) -> list[LayerDef]:
    if norm in ("none", "weight"):
        return []
    return [LayerDef(type="batchnorm")] if norm == "batch" else [LayerDef(type="norm", kind=norm)]


def _use_bias(bias: str, bn: str, norm: str) -> bool:
    # "auto": a batch-statistics norm directly after the Linear/Conv subtracts the mean: a dead bias
    removes_mean = norm in _MEAN_REMOVING or norm.startswith("ghost:")
    return bias == "on" or (bias == "auto" and not (bn == "before" and removes_mean))


def _hidden(kind: str, width: int, spec) -> list[LayerDef]:
    """One hidden unit of an MLP or CNN: weight layer, then the norm / activation in the spec's order."""
    weight = LayerDef(type=kind, **({"units": width} if kind == "dense" else
                                    {"filters": width, "kernel_size": spec.kernel_size}),
                      use_bias=_use_bias(spec.bias, spec.bn, spec.norm),
                      weight_norm=spec.norm == "weight" and spec.bn != "none")
    act = LayerDef(type="activation", activation=spec.activation)
    norm = _norm_layer(spec.norm) if spec.bn != "none" else []
    return [weight, *(norm + [act] if spec.bn == "before" else [act] + norm)]


def _layer_options(ld: LayerDef, options):
    """The model's norm settings with this layer's own eps / momentum over them."""
    own = {k: v for k, v in (("eps", ld.eps), ("momentum", ld.momentum)) if v is not None}
    return options.model_copy(update=own) if own else options


def make_norm(kind: str, shape: tuple[int, ...], options, layer: LayerDef | None = None) -> nn.Module:
    """The normalization module ``kind`` for features of ``shape`` ((F,) or (C, H, W)); ``layer``'s
    center / scale switch a batch norm's beta / gamma off (Keras's switches)."""
    bn_opts = {"convention": options.convention, "eps": options.eps, "momentum": options.momentum}
    if layer is not None and not (layer.center and layer.scale):
        if kind not in ("batch", "syncbatch"):
            raise ValueError(f"center / scale off is supported for batch norm only (got {kind})")
        bn_opts.update(center=layer.center, scale=layer.scale)
    eps = options.eps if options.eps is not None else 1e-5
    c = shape[0]
    if kind == "batch":
        return BatchNorm(c, **bn_opts)
    if kind == "syncbatch":  # BatchNorm in one process; the global batch's statistics across DDP ranks
        return SyncBatchNorm(c, **bn_opts)
    if kind == "renorm":
        return BatchRenorm(c, r_max=options.r_max, d_max=options.d_max, warmup_steps=options.warmup_steps,
                           warmup_fraction=options.warmup_fraction, **bn_opts)
    if kind.startswith("ghost:"):
        return GhostBatchNorm(c, ghost_size=int(kind.split(":")[1]), **bn_opts)
    if kind == "layer":
        # over all features of a sample; for conv maps with a per-channel affine (GroupNorm with 1 group)
        return LayerNorm(c, eps=eps) if len(shape) == 1 else GroupNorm(1, c, eps=eps)
    if kind.startswith("group:"):
        return GroupNorm(int(kind.split(":")[1]), c, eps=eps)
    if kind == "instance":
        if len(shape) == 1:
            raise ValueError("instance norm needs spatial axes (conv feature maps); for dense features use "
                             "layer or batch norm")
        return InstanceNorm(c, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


def expand(spec) -> list[LayerDef]:
    """The explicit layer list of any spec (the output layer gives logits: no softmax)."""
    spec = parse_model_spec(spec)
    if isinstance(spec, LayersSpec):
        return list(spec.layers)
    drop = [LayerDef(type="dropout", rate=spec.dropout)] if spec.dropout else []
    out = [LayerDef(type="dense", units=spec.num_classes)]
    if isinstance(spec, MLPSpec):
        layers = [LayerDef(type="flatten")] + (_norm_layer(spec.norm) if spec.input_bn else [])
        for h in spec.hidden:
            layers += _hidden("dense", h, spec) + drop
        return layers + out
    assert isinstance(spec, CNNSpec)
    layers = []
    for filters in spec.blocks:
        for _ in range(spec.convs_per_block):
            layers += _hidden("conv2d", filters, spec)
        layers += [LayerDef(type="maxpool", pool_size=spec.pool_size)] + drop
    if spec.final_block:
        for _ in range(spec.convs_per_block):
            layers += _hidden("conv2d", spec.final_block, spec)
    layers.append(LayerDef(type="gap" if spec.head == "gap" else "flatten"))
    for h in spec.dense:
        layers += _hidden("dense", h, spec) + drop
    return layers + out


class GlobalAvgPool(nn.Module):
    """(N, C, H, W) -> (N, C), Keras's GlobalAveragePooling2D."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


_KERAS_NAMES = {a.name: a.keras_layer for a in ACTIVATIONS}


class SpecModel(nn.Sequential):
    """An ``nn.Sequential`` that remembers the spec it was built from (for checkpoints)."""

    def __init__(self, layers: "OrderedDict[str, nn.Module]", spec) -> None:
        super().__init__(layers)
        self.spec = spec


def build_model(spec, *, seed: int | None = None, trust_factory: bool | Iterable[str] = False) -> nn.Module:
    """Build the model of ``spec`` (a spec object or dict): a SpecModel, or a factory's own module.
    ``seed`` makes the initial weights reproducible without touching torch's global RNG. A spec marked
    ``folded`` gives the folded model (``bnlab.deploy.fold``), ready for a folded checkpoint's weights.
    A factory spec runs code: only a registered factory, or with ``trust_factory`` (``bnlab.models.factory``)."""
    spec = parse_model_spec(spec)
    if spec.kind == "factory":
        from bnlab.models.factory import build_factory_model, trusting

        with trusting(trust_factory):
            model = build_factory_model(spec, seed=seed)
    else:
        model = _build_layers(spec, seed)
    if spec.folded:  # the structure bnlab fold made: same rule, same layers, same names
        from bnlab.deploy.fold import fold

        model = fold(model.eval())[0]
        model.spec = spec
    return model


class ToChannelsFirst(nn.Module):
    """(N, H, W, C) -> (N, C, H, W): a Keras model's image input, for torch's channel-first layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def keras_padding(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int, int]:
    """(pad before, pad after, output size) of one spatial axis, by Keras's rule: "valid" pads
    nothing; "same" gives ceil(size / stride) outputs, padding the extra row at the END when the total
    is odd (TensorFlow's convention, which torch's symmetric padding cannot express)."""
    if padding == "valid":
        return 0, 0, (size - kernel) // stride + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def _build_layers(spec, seed: int | None) -> SpecModel:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    shape = tuple(spec.input_shape)
    names: Counter = Counter()
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    slope = spec.leaky_relu_slope
    options = spec.norm_options

    def add(base: str, module: nn.Module) -> None:
        names[base] += 1
        modules[base if names[base] == 1 else f"{base}_{names[base] - 1}"] = module

    layer_defs = expand(spec)
    if getattr(spec, "input_layout", "channels_first") == "channels_last" and len(shape) == 3:
        add("to_channels_first", ToChannelsFirst())
        shape = (shape[2], shape[0], shape[1])
    for i, ld in enumerate(layer_defs):
        where = f"layer {i} ({ld.type})"
        if ld.type == "flatten":
            add("flatten", nn.Flatten())
            shape = (math.prod(shape),)
        elif ld.type == "dense":
            if len(shape) != 1:
                raise ValueError(f"{where}: dense needs a flat input (got shape {shape}); add a flatten layer")
            units = ld.units if ld.units else None
            if units is None:
                raise ValueError(f"{where}: dense needs 'units'")
            lin = nn.Linear(shape[0], units, bias=ld.use_bias)
            initialise(lin, ld.init or spec.init, std=spec.init_std, generator=gen)
            add("dense", WeightNorm(lin) if ld.weight_norm else lin)
            shape = (units,)
            if ld.activation:
                add(_KERAS_NAMES[ld.activation], activation_module(ld.activation, slope))
        elif ld.type == "conv2d":
            if len(shape) != 3 or not ld.filters:
                raise ValueError(f"{where}: conv2d needs (C, H, W) input and 'filters' (got shape {shape})")
            k, stride = ld.kernel_size, ld.strides or 1
            (t, b, h), (left, right, w) = (keras_padding(shape[1], k, stride, ld.padding),
                                           keras_padding(shape[2], k, stride, ld.padding))
            symmetric = t == b and left == right
            if not symmetric:
                add("zero_padding2d", nn.ZeroPad2d((left, right, t, b)))
            conv = nn.Conv2d(shape[0], ld.filters, k, stride=stride, padding=(t, left) if symmetric else 0,
                             bias=ld.use_bias)
            initialise(conv, ld.init or spec.init, std=spec.init_std, generator=gen)
            add("conv2d", WeightNorm(conv) if ld.weight_norm else conv)
            shape = (ld.filters, h, w)
            if ld.activation:
                add(_KERAS_NAMES[ld.activation], activation_module(ld.activation, slope))
        elif ld.type == "batchnorm":
            add("batch_normalization", make_norm("batch", shape, _layer_options(ld, options), ld))
        elif ld.type == "norm":
            kind = ld.kind or "batch"
            try:
                module = make_norm(kind, shape, _layer_options(ld, options), ld)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            add({"layer": "layer_normalization", "instance": "instance_normalization", "renorm": "batch_renormalization",
                 "syncbatch": "sync_batch_normalization"}
                .get(kind, "group_normalization" if kind.startswith("group:") else "ghost_batch_normalization"
                     if kind.startswith("ghost:") else "batch_normalization"), module)
        elif ld.type == "activation":
            if not ld.activation:
                raise ValueError(f"{where}: an activation layer needs 'activation'")
            add(_KERAS_NAMES[ld.activation], activation_module(ld.activation, slope if ld.slope is None else ld.slope))
        elif ld.type in ("maxpool", "avgpool"):
            if len(shape) != 3:
                raise ValueError(f"{where}: {ld.type} needs (C, H, W) input (got shape {shape})")
            p, stride = ld.pool_size, ld.strides or ld.pool_size
            pool = nn.MaxPool2d(p, stride) if ld.type == "maxpool" else nn.AvgPool2d(p, stride)
            add("max_pooling2d" if ld.type == "maxpool" else "average_pooling2d", pool)
            shape = (shape[0], keras_padding(shape[1], p, stride, "valid")[2], keras_padding(shape[2], p, stride, "valid")[2])
        elif ld.type == "dropout":
            add("dropout", nn.Dropout(ld.rate))
        elif ld.type == "gap":
            if len(shape) != 3:
                raise ValueError(f"{where}: global average pooling needs (C, H, W) input (got shape {shape})")
            add("global_average_pooling2d", GlobalAvgPool())
            shape = (shape[0],)
        if 0 in shape or any(s < 0 for s in shape):
            raise ValueError(f"{where}: the feature map shrank to {shape}; use fewer pooling blocks")
    if shape != (spec.num_classes,):
        raise ValueError(f"the model's output shape is {shape} but num_classes is {spec.num_classes}: "
                         "end the layer list with a dense layer of num_classes units")
    return SpecModel(modules, spec)
