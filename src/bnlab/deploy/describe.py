"""Turn a built ``nn.Sequential`` back into an explicit ``layers`` spec, so that transformed models
(a folded one, say) are saved and rebuilt like any other bnlab model."""

from __future__ import annotations

from torch import nn

from bnlab.models.build import GlobalAvgPool
from bnlab.models.spec import LayerDef, LayersSpec, NormSettings
from bnlab.nn.activations import ACTIVATIONS
from bnlab.nn import (BatchNorm, BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm, LayerNorm, SyncBatchNorm,
                      WeightNorm)

_ACT = {a.module: a.name for a in ACTIVATIONS}


def describe(model: nn.Sequential, *, input_shape, num_classes: int) -> LayersSpec:
    layers, slope, norm = [], 0.3, None
    for name, m in model.named_children():
        wn = isinstance(m, WeightNorm)
        if wn:
            m = m.layer
        t = type(m)
        if t is nn.Flatten:
            layers.append(LayerDef(type="flatten"))
        elif t is nn.Linear:
            layers.append(LayerDef(type="dense", units=m.out_features, use_bias=m.bias is not None, weight_norm=wn))
        elif t is nn.Conv2d:
            k = m.kernel_size[0]
            if m.padding not in ((k // 2, k // 2), (0, 0)) or m.kernel_size != (k, k) or m.stride != (1, 1):
                raise ValueError(f"{name}: only square stride-1 convolutions with 'same' or 'valid' padding "
                                 "can be described as a bnlab spec")
            layers.append(LayerDef(type="conv2d", filters=m.out_channels, kernel_size=k,
                                   padding="same" if m.padding[0] == k // 2 and k > 1 else "valid",
                                   use_bias=m.bias is not None, weight_norm=wn))
        elif isinstance(m, BatchNorm):
            extra = ({"r_max": m.r_max, "d_max": m.d_max, "warmup_steps": m.warmup_steps}
                     if isinstance(m, BatchRenorm) else {})
            norm = NormSettings(convention=m.convention, eps=m.eps, momentum=m.momentum, **extra)
            kind = ("renorm" if isinstance(m, BatchRenorm) else f"ghost:{m.ghost_size}"
                    if isinstance(m, GhostBatchNorm) else "syncbatch" if isinstance(m, SyncBatchNorm) else "batch")
            layers.append(LayerDef(type="batchnorm") if kind == "batch" else LayerDef(type="norm", kind=kind))
        elif isinstance(m, (LayerNorm, GroupNorm)):
            kind = ("instance" if isinstance(m, InstanceNorm) else "layer" if isinstance(m, LayerNorm)
                    or m.num_groups == 1 else f"group:{m.num_groups}")
            norm = norm or NormSettings(eps=m.eps)
            layers.append(LayerDef(type="norm", kind=kind))
        elif t in _ACT:
            if t is nn.LeakyReLU:
                slope = m.negative_slope
            layers.append(LayerDef(type="activation", activation=_ACT[t]))
        elif t is nn.MaxPool2d:
            layers.append(LayerDef(type="maxpool", pool_size=m.kernel_size if isinstance(m.kernel_size, int)
                                   else m.kernel_size[0]))
        elif t is nn.Dropout:
            layers.append(LayerDef(type="dropout", rate=m.p))
        elif t is GlobalAvgPool:
            layers.append(LayerDef(type="gap"))
        else:
            raise ValueError(f"{name}: {t.__name__} has no bnlab layer spec")
    return LayersSpec(input_shape=tuple(input_shape), num_classes=num_classes, layers=layers,
                      init="torch_default", leaky_relu_slope=slope, norm_options=norm or NormSettings())
