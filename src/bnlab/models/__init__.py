"""Models from short specs, Keras-style summaries, and the seed notebooks' networks as presets."""

from torch import nn

from bnlab.models.build import SpecModel, build_model, expand
from bnlab.models.presets import MODEL_PRESETS, list_model_presets, load_model_spec
from bnlab.models.spec import CNNSpec, LayerDef, LayersSpec, MLPSpec, NormSettings, parse_model_spec
from bnlab.models.summary import Summary, summarize


def summary(spec_or_model, name: str | None = None, *, input_shape: tuple[int, ...] | None = None) -> Summary:
    """Keras-style summary of a spec, a preset name, a built SpecModel, or any ``nn.Module`` (then
    ``input_shape``, one sample's shape, is needed unless the module has a ``spec``)."""
    if isinstance(spec_or_model, nn.Module):
        model = spec_or_model
        shape = input_shape or getattr(getattr(model, "spec", None), "input_shape", None)
        if shape is None:
            raise ValueError(f"summary of a {type(model).__name__} needs input_shape, the shape of one sample "
                             "(e.g. (3, 32, 32))")
    else:
        model = build_model(load_model_spec(spec_or_model) if isinstance(spec_or_model, str) else spec_or_model)
        shape = input_shape or model.spec.input_shape
    label = name or (spec_or_model if isinstance(spec_or_model, str) else "model")
    return summarize(model, tuple(shape), label)


__all__ = ["CNNSpec", "LayerDef", "LayersSpec", "MLPSpec", "MODEL_PRESETS", "NormSettings", "SpecModel",
           "Summary", "build_model", "expand", "list_model_presets", "load_model_spec", "parse_model_spec",
           "summarize", "summary"]
