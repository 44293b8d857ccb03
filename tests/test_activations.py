"""The activation table (bnlab.nn.activations) against its users and against autograd."""

from typing import get_args

import pytest
import torch

from bnlab.models.spec import Activation
from bnlab.nn.activations import ACTIVATIONS, BY_NAME, PROBED


def test_the_spec_vocabulary_is_the_table():
    assert set(get_args(Activation)) == set(BY_NAME)


def test_native_codes_follow_the_cpp_enum_order():
    src = open("src/bnlab/train/native/activations.h").read()
    enum = src[src.index("enum Act :"):].split("{", 1)[1].split("}", 1)[0]
    names = [n.strip().split("=")[0].strip() for n in enum.split(",")]
    assert [n.lower() for n in names] == [a.name if a.name != "linear" else "identity"
                                          for a in sorted(ACTIVATIONS, key=lambda a: a.native)]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.name)
def test_each_backward_is_autograds(act):
    x = torch.randn(64, 7, dtype=torch.float64, requires_grad=True)
    m = act.make(0.3)
    out = m(x)
    dy = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, x, dy)
    got = act.backward(dy, m, (x if act.saves_input else out).detach())
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_probes_record_every_nonlinearity_and_not_the_identity():
    assert torch.nn.Identity not in PROBED and len(PROBED) == len(ACTIVATIONS) - 1
