"""One program per network, one support check: what each engine is told it cannot run."""

import pytest
import torch
from torch import nn

from bnlab.models import build_model
from bnlab.nn import BatchNorm
from bnlab.train.program import program_of

CNN = {"kind": "cnn", "input_shape": [3, 8, 8], "num_classes": 4, "blocks": [4], "final_block": 4, "bn": "before",
       "dropout": 0.2}
MLP = {"hidden": [8], "input_shape": [6], "num_classes": 3, "bn": "before", "dropout": 0.3}


def test_a_cnn_is_fused_and_stacked_not_native_and_the_native_step_says_why():
    prog = program_of(build_model(CNN, seed=0))
    assert [op.kind for op in prog.ops][:4] == ["conv2d", "batchnorm", "activation", "conv2d"]
    assert not prog.is_mlp and prog.unsupported("fused") == [] and prog.unsupported("stacked") == []
    assert any("the native step is for MLPs" in r for r in prog.unsupported("native"))


def test_an_mlp_runs_everywhere_except_native_with_dropout_on_a_gpu_or_frozen():
    model = build_model(MLP, seed=0)
    prog = program_of(model)
    assert prog.is_mlp and prog.unsupported("stacked") == [] and prog.unsupported("fused") == []
    bad = prog.unsupported("native", torch.device("cuda"), torch.float16, model)
    assert any("Dropout" in r for r in bad) and "device cuda" in bad and "dtype torch.float16" in bad
    next(model.parameters()).requires_grad_(False)
    assert "frozen parameters" in prog.unsupported("native", model=model)
    assert "frozen parameters" in prog.unsupported("stacked", model=model)
    assert prog.unsupported("fused", model=model) == []  # the fused step skips frozen tensors


def test_what_no_engine_builds_is_named_once_for_all():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), BatchNorm(4, axis=1), nn.GELU(), nn.Linear(4, 2), nn.Flatten())
    prog = program_of(model)
    assert prog.reasons == ["3 (GELU)", "5 (Flatten)", "the last layer is not Linear"]
    for engine in ("fused", "native", "stacked"):
        assert prog.unsupported(engine)[:3] == prog.reasons
    assert program_of(nn.Linear(2, 2)).reasons == ["Linear is not an nn.Sequential"]
    with pytest.raises(ValueError, match="unknown engine"):
        prog.unsupported("turbo")
