"""Models from short specs, Keras-style summaries, and the seed notebooks' networks as presets."""

from bnlab.models.build import SpecModel, build_model, expand
from bnlab.models.presets import MODEL_PRESETS, list_model_presets, load_model_spec
from bnlab.models.spec import CNNSpec, LayerDef, LayersSpec, MLPSpec, NormSettings, parse_model_spec
from bnlab.models.summary import Summary, summarize


def summary(spec_or_model, name: str | None = None) -> Summary:
    """Keras-style summary of a spec, a preset name, or a built SpecModel."""
    model = spec_or_model if isinstance(spec_or_model, SpecModel) else build_model(
        load_model_spec(spec_or_model) if isinstance(spec_or_model, str) else spec_or_model)
    label = name or (spec_or_model if isinstance(spec_or_model, str) else "model")
    return summarize(model, tuple(model.spec.input_shape), label)


__all__ = ["CNNSpec", "LayerDef", "LayersSpec", "MLPSpec", "MODEL_PRESETS", "NormSettings", "SpecModel",
           "Summary", "build_model", "expand", "list_model_presets", "load_model_spec", "parse_model_spec",
           "summarize", "summary"]
