"""Spec -> explicit layer list -> ``nn.Sequential`` with Keras-style layer names.

Every kind of spec is first expanded to a list of ``LayerDef`` (the ``layers`` kind is already
one), so there is a single builder and a single place where bias / BN placement rules live.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import math
import torch
from torch import nn

from bnlab.models.init import initialise
from bnlab.models.spec import CNNSpec, LayerDef, LayersSpec, MLPSpec, parse_model_spec
from bnlab.nn import BatchNorm, BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm, LayerNorm, WeightNorm

# norms that subtract a per-channel mean over the batch (or over each sample's positions): a bias
# right before them is removed by that subtraction
_MEAN_REMOVING = ("batch", "renorm", "instance")


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


def make_norm(kind: str, shape: tuple[int, ...], options) -> nn.Module:
    """The normalization module ``kind`` for features of ``shape`` ((F,) or (C, H, W))."""
    bn_opts = {"convention": options.convention, "eps": options.eps, "momentum": options.momentum}
    eps = options.eps if options.eps is not None else 1e-5
    c = shape[0]
    if kind == "batch":
        return BatchNorm(c, **bn_opts)
    if kind == "renorm":
        return BatchRenorm(c, r_max=options.r_max, d_max=options.d_max, warmup_steps=options.warmup_steps, **bn_opts)
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


def activation_module(name: str, slope: float) -> nn.Module:
    return {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "selu": nn.SELU,
            "linear": nn.Identity, "leaky_relu": lambda: nn.LeakyReLU(slope)}[name]()


_KERAS_NAMES = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "re_lu", "leaky_relu": "leaky_re_lu",
                "elu": "elu", "selu": "selu", "linear": "linear"}


class SpecModel(nn.Sequential):
    """An ``nn.Sequential`` that remembers the spec it was built from (for checkpoints)."""

    def __init__(self, layers: "OrderedDict[str, nn.Module]", spec) -> None:
        super().__init__(layers)
        self.spec = spec


def build_model(spec, *, seed: int | None = None) -> SpecModel:
    """Build the model of ``spec`` (a spec object or dict). ``seed`` makes the initial weights
    reproducible without touching torch's global RNG."""
    spec = parse_model_spec(spec)
    if spec.kind == "factory":
        from bnlab.models.factory import build_factory_model

        return build_factory_model(spec, seed=seed)
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
            pad = ld.kernel_size // 2 if ld.padding == "same" else 0
            conv = nn.Conv2d(shape[0], ld.filters, ld.kernel_size, padding=pad, bias=ld.use_bias)
            initialise(conv, ld.init or spec.init, std=spec.init_std, generator=gen)
            add("conv2d", WeightNorm(conv) if ld.weight_norm else conv)
            shrink = 0 if ld.padding == "same" else ld.kernel_size - 1
            shape = (ld.filters, shape[1] - shrink, shape[2] - shrink)
            if ld.activation:
                add(_KERAS_NAMES[ld.activation], activation_module(ld.activation, slope))
        elif ld.type == "batchnorm":
            add("batch_normalization", make_norm("batch", shape, options))
        elif ld.type == "norm":
            kind = ld.kind or "batch"
            try:
                module = make_norm(kind, shape, options)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            add({"layer": "layer_normalization", "instance": "instance_normalization", "renorm": "batch_renormalization"}
                .get(kind, "group_normalization" if kind.startswith("group:") else "ghost_batch_normalization"
                     if kind.startswith("ghost:") else "batch_normalization"), module)
        elif ld.type == "activation":
            if not ld.activation:
                raise ValueError(f"{where}: an activation layer needs 'activation'")
            add(_KERAS_NAMES[ld.activation], activation_module(ld.activation, slope))
        elif ld.type == "maxpool":
            if len(shape) != 3:
                raise ValueError(f"{where}: maxpool needs (C, H, W) input (got shape {shape})")
            add("max_pooling2d", nn.MaxPool2d(ld.pool_size))
            shape = (shape[0], shape[1] // ld.pool_size, shape[2] // ld.pool_size)
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
