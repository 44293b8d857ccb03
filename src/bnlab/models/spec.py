"""Typed model specs. Three kinds, all expanded to one explicit layer list before building:

* ``mlp``: Flatten, [input BN], hidden Dense layers with BN none / before / after the activation.
* ``cnn``: blocks of 3x3 convolutions (+ BN + activation), max-pooling and dropout; a final block
  without pooling; flatten or global average pooling; a dense head.
* ``layers``: a Keras-like explicit list, for anything else.

Errors name the key, the bad value and what is allowed (pydantic's messages).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, TypeAdapter, model_validator

Activation = Literal["sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "linear"]
Placement = Literal["none", "before", "after"]
Init = Literal["he_normal", "glorot_uniform", "normal", "torch_default"]
Bias = Literal["auto", "on", "off"]


# bounds that keep a spec buildable: a typo such as 10**9 units is refused here, not by an
# out-of-memory crash or a build that never ends
MAX_WIDTH = 65536  # units of a dense layer, filters of a conv, classes
MAX_LAYERS = 256  # entries of a list of layers, blocks or widths
MAX_SIDE = 4096  # each dimension of the input shape
MAX_KERNEL = 64  # kernel and pool sizes
# numbers are strict (as in bnlab.train.config): a boolean is not an integer (units = true), a string not a
# number, a float not an integer (hidden = [8.0]); an integer is a float (eps = 1)
Width = Annotated[StrictInt, Field(ge=1, le=MAX_WIDTH)]
Shape = Annotated[tuple[Annotated[StrictInt, Field(ge=1, le=MAX_SIDE)], ...], Field(min_length=1, max_length=3)]
Kernel = Annotated[StrictInt, Field(ge=1, le=MAX_KERNEL)]


FOLDED_HELP = "BN folded away (bnlab fold): the model is built, folded, and a checkpoint's weights loaded into it"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# G groups: at most 5 digits (channels are at most MAX_WIDTH); S images per ghost batch: at most 7 digits (a batch
# is at most 2^20), so an absurd size is refused by the spec, not met at run time
NORM_PATTERN = r"^(batch|syncbatch|layer|instance|renorm|weight|none|group:[1-9][0-9]{0,4}|ghost:[1-9][0-9]{0,6})$"
Norm = Annotated[str, Field(pattern=NORM_PATTERN, description=(
    "batch | syncbatch | layer | group:G (G < 100,000) | instance | renorm | ghost:S (S < 10,000,000) | weight | none"))]


class NormSettings(_Spec):
    """How each normalization layer of a model is made. convention / momentum: batch-statistics norms
    (batch, syncbatch, renorm, ghost); eps: all (default: the BN convention's, 1e-5 for layer/group/instance)."""

    convention: Literal["torch", "keras"] = "torch"
    eps: StrictFloat | None = Field(None, gt=0)
    momentum: Annotated[StrictFloat, Field(ge=0, le=1)] | None | Literal["default"] = "default"
    r_max: StrictFloat = Field(3.0, ge=1, description="batch renorm")
    d_max: StrictFloat = Field(5.0, ge=0, description="batch renorm")
    warmup_steps: StrictInt = Field(0, ge=0, le=10**9, description="batch renorm: steps over which r_max, d_max grow from 1, 0")
    warmup_fraction: StrictFloat | None = Field(None, gt=0, le=1, description="batch renorm: the warm-up as this share of "
                                          "the run's planned updates (fit sets it; replaces warmup_steps)")

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_fraction is not None and self.warmup_steps:
            raise ValueError(f"give batch renorm's warm-up once: warmup_steps ({self.warmup_steps}) or warmup_fraction "
                             f"({self.warmup_fraction}), not both")
        return self


# norm settings added after specs were stored: left out of a spec's dict while at their default, so the
# fingerprints of runs stored before they existed do not change
LATER_NORM_DEFAULTS = {"warmup_fraction": None}


class _Common(_Spec):
    input_shape: Shape = (1, 28, 28)
    num_classes: StrictInt = Field(10, ge=2, le=MAX_WIDTH)
    activation: Activation = "relu"
    leaky_relu_slope: StrictFloat = Field(0.3, ge=0, description="Keras's LeakyReLU default 0.3 (torch's is 0.01)")
    bn: Placement = "none"  # where the normalization layer goes: none | before | after the activation
    norm: Norm = "batch"  # which normalization
    bias: Bias = "auto"
    init: Init = "glorot_uniform"
    init_std: StrictFloat = Field(0.01, gt=0, description="std of the 'normal' initialiser")
    dropout: StrictFloat = Field(0.0, ge=0, lt=1)
    norm_options: NormSettings = NormSettings()
    folded: StrictBool = Field(False, description=FOLDED_HELP)


class MLPSpec(_Common):
    kind: Literal["mlp"] = "mlp"
    hidden: Annotated[list[Width], Field(max_length=MAX_LAYERS)] = [300, 100]
    input_bn: StrictBool = False


class CNNSpec(_Common):
    kind: Literal["cnn"] = "cnn"
    input_shape: Shape = (3, 32, 32)
    blocks: Annotated[list[Width], Field(max_length=MAX_LAYERS)] = [60, 60, 60, 60]  # filters of each pooled block
    final_block: Width | None = 100  # filters of the last block (no pooling)
    convs_per_block: StrictInt = Field(2, ge=1, le=16)
    kernel_size: Kernel = 3
    pool_size: Kernel = 2
    head: Literal["flatten", "gap"] = "flatten"
    dense: Annotated[list[Width], Field(max_length=MAX_LAYERS)] = []  # hidden dense layers of the head


class LayerDef(_Spec):
    """One layer of an explicit list. ``type`` picks the layer; the other keys configure it."""

    type: Literal["flatten", "dense", "conv2d", "batchnorm", "norm", "activation", "maxpool", "avgpool", "dropout",
                  "gap"]
    kind: Norm | None = None  # norm: which one (batchnorm = kind "batch")
    weight_norm: StrictBool = False  # dense / conv2d
    units: Width | None = None  # dense
    filters: Width | None = None  # conv2d
    kernel_size: Kernel = 3
    padding: Literal["same", "valid"] = "same"  # conv2d (Keras's rule, asymmetric where Keras pads so); pools: valid
    strides: Kernel | None = Field(None, description="conv2d: 1; pools: pool_size")
    activation: Activation | None = None  # dense / conv2d fused activation, or the activation layer's
    use_bias: StrictBool = True
    init: Init | None = None  # None = the model's
    pool_size: Kernel = 2
    rate: StrictFloat = Field(0.0, ge=0, lt=1)  # dropout
    slope: StrictFloat | None = Field(None, ge=0, description="leaky_relu: this layer's slope (None: the model's)")
    # batchnorm / norm: this layer's own settings over the model's norm_options (a Keras file's layers)
    eps: StrictFloat | None = Field(None, gt=0)
    momentum: Annotated[StrictFloat, Field(ge=0, le=1)] | None = None
    center: StrictBool = True  # beta
    scale: StrictBool = True  # gamma


class LayersSpec(_Spec):
    kind: Literal["layers"] = "layers"
    input_shape: Shape = (1, 28, 28)
    # channels_last: image inputs arrive as Keras has them, (H, W, C); the model moves C first itself
    input_layout: Literal["channels_first", "channels_last"] = "channels_first"
    num_classes: StrictInt = Field(10, ge=2, le=MAX_WIDTH)
    layers: Annotated[list[LayerDef], Field(max_length=MAX_LAYERS)]
    init: Init = "glorot_uniform"
    init_std: StrictFloat = Field(0.01, gt=0)
    leaky_relu_slope: StrictFloat = Field(0.3, ge=0)
    norm_options: NormSettings = NormSettings()
    folded: StrictBool = Field(False, description=FOLDED_HELP)


FACTORY_PATTERN = r"^([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*|[^:]+\.py):[A-Za-z_][A-Za-z0-9_]*$"
KwargValue = Union[bool, int, float, str, list[Union[bool, int, float, str]]]


class FactorySpec(_Spec):
    """Your own network: ``factory`` names a function returning an nn.Module, as
    ``package.module:function`` (importable) or ``path/to/file.py:function`` (relative to the working
    directory). It is called with ``kwargs``, plus ``num_classes`` when it takes that argument and
    ``kwargs`` does not set it, under ``torch.manual_seed(seed)`` (global RNG restored afterwards).
    ``norm``: convert its normalization layers (``bnlab.convert``) — ``keep`` leaves them as built."""

    kind: Literal["factory"] = "factory"
    factory: str = Field(..., pattern=FACTORY_PATTERN, max_length=500)
    kwargs: dict[str, KwargValue] = Field(default_factory=dict, max_length=64)
    input_shape: Shape = (3, 32, 32)
    num_classes: StrictInt = Field(10, ge=2, le=MAX_WIDTH)
    norm: Union[Literal["keep"], Norm] = "keep"
    norm_options: NormSettings = NormSettings()
    folded: StrictBool = Field(False, description=FOLDED_HELP)


ModelSpec = Annotated[Union[MLPSpec, CNNSpec, LayersSpec, FactorySpec], Field(discriminator="kind")]
_ADAPTER = TypeAdapter(ModelSpec)


def parse_model_spec(data: dict | BaseModel) -> MLPSpec | CNNSpec | LayersSpec:
    """Validate a dict (from TOML / JSON / Python) into a spec; ``kind`` defaults to ``mlp``."""
    if isinstance(data, BaseModel):
        return data
    data = dict(data)
    data.setdefault("kind", "factory" if "factory" in data else "mlp")
    return _ADAPTER.validate_python(data)


def spec_to_dict(spec) -> dict:
    d = spec.model_dump(mode="json")
    options = d.get("norm_options")
    if isinstance(options, dict):
        for k, v in LATER_NORM_DEFAULTS.items():
            if k in options and options[k] == v:
                del options[k]
    return d
