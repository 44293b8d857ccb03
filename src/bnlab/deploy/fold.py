"""Fold BN into the neighbouring Linear / Conv for inference (eval mode only), in ANY nn.Module.

With s = γ / sqrt(running_var + eps) and t = β - running_mean·s, an eval-mode BN is y = s·x + t:

* BN after a Linear/Conv (x = W·h + b):  W' = s·W (per output unit),  b' = s·(b - mean) + β;
* BN before a Linear (the input BN, BN after an activation feeding the next Dense):
  W' = W·diag(s),  b' = b + W·t;
* BN before an unpadded Conv: W'[o,c] = W[o,c]·s[c],  b' = b + Σ_{c,k...} W[o,c,k...]·t[c].

Which layer feeds a BN and which one it feeds is read off the model's data flow: the torch.fx graph
where the model traces (a ResNet's residual adds and shortcuts included), else, for models fx cannot
trace, the order of the layers inside each ``nn.Sequential`` (where order is the data flow). Module
registration order is never trusted: in a ResNet ``downsample`` is registered after ``bn2``.

Batch norms folded: bnlab's ``BatchNorm`` (both conventions; Batch Renorm and Ghost BN are BN in eval
mode) and torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``. Weight-normalised layers are
materialised (w = g·v/||v|| becomes a plain weight). LayerNorm, GroupNorm and InstanceNorm (bnlab's
and torch's) normalise each sample with its own statistics, which no fixed linear layer can absorb:
they stay.

Refused, with the reason in the fold report:
* the layer feeding the BN also feeds something else, or is called more than once (changing its
  weights would change that other use too: the silent bug of pytorch issue 197539);
* BN before a zero-padded convolution (the padding zeros would need to be t/s, not 0, so the borders
  would differ), a grouped or strided-transposed one, or BN with a non-linearity on both sides.
Dropout and Identity between BN and the layer are skipped (identities in eval mode).
The input model is never modified; dtypes are kept. An ``nn.Sequential`` of plain layers comes back as
an ``nn.Sequential`` (bnlab's models, which ``describe`` turns back into a spec); any other model as a
``torch.fx.GraphModule`` (or, untraceable, a copy with its Sequential containers folded).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.nn import BatchNorm, GroupNorm, LayerNorm, WeightNorm

_IDENTITY_AT_EVAL = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_BATCH_NORMS = (BatchNorm, _BatchNorm)  # running-statistics norms: an affine map in eval mode
_PER_SAMPLE_NORMS = (LayerNorm, GroupNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # W·h + b with output channels on dim 0 of W


@dataclass(frozen=True)
class FoldEntry:
    bn: str
    folded_into: str | None  # the layer that absorbed it, None if it stays
    how: str  # "output side", "input side", or the reason it was not folded


@dataclass
class FoldReport:
    entries: list[FoldEntry]
    method: str = "graph"  # "graph" (torch.fx data flow) or "sequential" (layer order in nn.Sequential)

    @property
    def folded(self) -> int:
        return sum(e.folded_into is not None for e in self.entries)

    def to_text(self) -> str:
        lines = [f"{self.folded} of {len(self.entries)} normalization layers folded ({self.method} data flow)"]
        for e in self.entries:
            lines.append(f"  {e.bn}: " + (f"folded into {e.folded_into} ({e.how})" if e.folded_into
                                          else f"kept: {e.how}"))
        return "\n".join(lines)


def _channels(bn: nn.Module) -> int:
    return bn.num_features


def _scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None:
        raise ValueError("cannot fold a BN without running statistics (track_running_stats=False)")
    var, mean = bn.running_var.double(), bn.running_mean.double()
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.double()
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias.double()
    return s, t  # float64: folding rounds once, at the end


def _fold_output_side(layer: nn.Module, bn: nn.Module) -> None:
    s, t = _scale_shift(bn)
    w = layer.weight.double()
    shape = (-1,) + (1,) * (w.dim() - 1)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(s)
    _assign(layer, w * s.view(shape), b * s + t)


def _fold_input_side(layer: nn.Module, bn: nn.Module) -> None:
    s, t = _scale_shift(bn)
    w = layer.weight.double()
    b = layer.bias.double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                       device=w.device)
    shape = (1, -1) + (1,) * (w.dim() - 2)  # Linear (out, in); Conv (out, in, k...)
    # an unpadded conv's every kernel tap sees t[c]; a Linear's one input sees it once
    _assign(layer, w * s.view(shape), b + (w * t.view(shape)).sum(dim=tuple(range(1, w.dim()))))


def _assign(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write float64 folded values back in the layer's own dtype; a layer without bias gains one."""
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(layer.weight.dtype))
        else:
            layer.bias.copy_(bias.to(layer.bias.dtype))


# ---- the one rule: given what feeds a BN and what it feeds, where (if anywhere) it folds

@dataclass(frozen=True)
class _Side:
    """A neighbour of a BN in the data flow: its name, the module (None: not a layer), and why it may
    not be changed (it has other users, or is called twice), if so."""
    name: str | None
    module: nn.Module | None
    shared: str | None = None
    why_not: str | None = None  # another reason it cannot absorb the BN (read off the traced shapes)


def _channels_axis_ok(bn: nn.Module, layer: nn.Module) -> bool:
    # bnlab's BN may normalise axis -1 (channels last): only the same thing as axis 1 on (N, C) data
    axis = getattr(bn, "axis", 1)
    return axis == 1 or (axis == -1 and isinstance(layer, nn.Linear))


def _decide(bn: nn.Module, prev: _Side, nxt: _Side) -> tuple[str, _Side | None]:
    """(how, the side that absorbs the BN) or (why it stays, None)."""
    if bn.running_mean is None:
        return "no running statistics (track_running_stats=False): it always uses batch statistics", None
    c = _channels(bn)
    free = lambda side: side.shared is None and side.why_not is None  # noqa: E731
    if (isinstance(prev.module, _LINEAR) and free(prev) and _out_channels(prev.module) == c
            and _channels_axis_ok(bn, prev.module)):
        return "output side", prev
    if isinstance(nxt.module, nn.Linear) and free(nxt) and nxt.module.in_features == c:
        return "input side", nxt
    if isinstance(nxt.module, _LINEAR) and free(nxt) and _in_channels(nxt.module) == c:
        conv = nxt.module
        if conv.groups != 1:
            return f"it feeds the grouped convolution {nxt.name}", None
        pad = conv.padding
        unpadded = pad == "valid" or (not isinstance(pad, str) and all(p == 0 for p in pad))
        if conv.padding_mode != "zeros" or not unpadded:
            return (f"it feeds the padded convolution {nxt.name} ({conv.padding_mode} padding): folding would "
                    "change the border "
                    "outputs"), None
        return "input side of an unpadded conv", nxt
    reasons = [f"{side.name} {side.shared}" for side in (prev, nxt) if side.shared]
    if reasons:
        return "; ".join(reasons) + " (pytorch issue 197539): folding would change that other use", None
    reasons = [f"{side.name} {side.why_not}" for side in (prev, nxt) if side.why_not]
    if reasons:
        return "; ".join(reasons), None
    return f"no Linear/Conv directly before it ({_what(prev)}) or after it ({_what(nxt)})", None


def _what(side: _Side) -> str:
    if side.module is not None:
        return f"{side.name}: {type(side.module).__name__}"
    return "the model's input or output, or several" if side.name is None else f"{side.name}, not a layer"


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _in_channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _apply(bn_name: str, bn: nn.Module, prev: _Side, nxt: _Side) -> FoldEntry:
    how, side = _decide(bn, prev, nxt)
    if side is None:
        return FoldEntry(bn_name, None, how)
    (_fold_output_side if side is prev else _fold_input_side)(side.module, bn)
    return FoldEntry(bn_name, side.name, how)


def _per_sample_entry(name: str, m: nn.Module) -> FoldEntry:
    return FoldEntry(name, None, f"{type(m).__name__} normalises each sample with its own statistics; "
                                 "no fixed layer can absorb it")


def _materialise_weight_norms(model: nn.Module) -> list[FoldEntry]:
    entries = []
    for name, m in list(model.named_modules()):
        if isinstance(m, WeightNorm):
            layer = m.layer
            with torch.no_grad():
                layer.weight = nn.Parameter(m.weight.detach().clone())
            _set_submodule(model, name, layer)
            entries.append(FoldEntry(name, name, "weight norm materialised into a plain weight"))
    return entries


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _call_counts(model: nn.Module) -> dict[int, int]:
    """How many places each module object is registered at (a module shared by two parents counts 2)."""
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


# ---- data flow from torch.fx

class _LeafTracer(torch.fx.Tracer):
    """Normalization and bnlab layers stay single call_module nodes (their forwards branch on
    ``self.training`` and check their inputs, which symbolic tracing cannot follow)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (*_BATCH_NORMS, *_PER_SAMPLE_NORMS))
                or type(m).__module__.startswith("bnlab.") or super().is_leaf_module(m, qualname))


def _trace(model: nn.Module) -> torch.fx.GraphModule | None:
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: use the Sequential order instead
        return None
    return torch.fx.GraphModule(model, graph)


def _graph_side(gm: torch.fx.GraphModule, node: torch.fx.Node, upstream: bool, calls: dict[str, int],
                shared_ids: dict[int, int]) -> tuple[_Side, torch.fx.Node | None]:
    """The layer node feeding (upstream) or fed by a BN node, skipping identities at eval time."""
    cur = node
    while True:
        if upstream:
            args = [a for a in cur.args if isinstance(a, torch.fx.Node)]
            if len(args) != 1 or cur.kwargs:
                return _Side(None, None), None
            nbr = args[0]
            if len(nbr.users) != 1:
                others = ", ".join(sorted(u.name for u in nbr.users if u is not cur))
                side_shared = f"also feeds {others}"
            else:
                side_shared = None
        else:
            if len(cur.users) != 1:
                return _Side(None, None, None), None
            nbr = next(iter(cur.users))
            side_shared = None
        if nbr.op != "call_module":
            return _Side(nbr.name, None, side_shared), None
        mod = gm.get_submodule(nbr.target)
        if isinstance(mod, _IDENTITY_AT_EVAL) and side_shared is None:
            cur = nbr
            continue
        if side_shared is None and (calls[nbr.target] > 1 or shared_ids.get(id(mod), 1) > 1):
            side_shared = "is called more than once"
        return _Side(nbr.target, mod, side_shared), nbr


def _fold_graph(gm: torch.fx.GraphModule, ranks: dict[int, int] | None) -> list[FoldEntry]:
    entries = []
    shared_ids = _call_counts(gm)
    calls: dict[str, int] = {}  # call sites of each module in the graph
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    reported: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, _PER_SAMPLE_NORMS):
            if node.target not in reported:
                entries.append(_per_sample_entry(node.target, m))
                reported.add(node.target)
            continue
        if not isinstance(m, _BATCH_NORMS):
            continue
        if calls[node.target] > 1 or shared_ids.get(id(m), 1) > 1:
            if node.target not in reported:  # one entry per BN, however often it is called
                entries.append(FoldEntry(node.target, None, "the BN itself is called more than once"))
                reported.add(node.target)
            continue
        prev, _ = _graph_side(gm, node, True, calls, shared_ids)
        nxt, _ = _graph_side(gm, node, False, calls, shared_ids)
        prev, nxt = _check_linear_axes(m, prev, ranks), _check_linear_axes(m, nxt, ranks)
        entry = _apply(node.target, m, prev, nxt)
        entries.append(entry)
        if entry.folded_into is not None:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return entries


def _check_linear_axes(bn: nn.Module, side: _Side, ranks: dict[int, int] | None) -> _Side:
    """A Linear acts on the LAST axis of its input; a BN normalises its channel axis (1, or bnlab's
    ``axis``). They meet on the same axis only when that axis is the last one of the BN's input: with
    the ranks seen on an example input that is checked; without them a Linear neighbour is refused
    (a BatchNorm1d over (N, C, L) after a Linear of equal size would otherwise be folded along the
    wrong axis, silently)."""
    if not isinstance(side.module, nn.Linear) or side.shared or side.why_not:
        return side
    if getattr(bn, "axis", 1) == -1:
        return side
    rank = None if ranks is None else ranks.get(id(bn))
    if rank is None:
        return replace(side, why_not="is a Linear, and without an example input the rank of the BN's input is "
                                     "unknown (pass example_input to fold(); bnlab models use their spec)")
    if rank != 2:
        return replace(side, why_not=f"acts on the last axis of the {rank}-D input, the BN on axis 1")
    return side


def _bn_ranks(model: nn.Module, example: torch.Tensor | None) -> dict[int, int] | None:
    """The rank of each batch norm's input in one eval forward of ``example`` (None without one)."""
    if example is None:
        return None
    ranks: dict[int, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: ranks.__setitem__(id(mod), inp[0].dim()))
             for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:  # noqa: BLE001 - the user's input does not fit the model: say so
        raise ValueError(f"fold(): the model cannot run on example_input of shape "
                         f"{tuple(example.shape)} ({type(e).__name__}: {e})") from None
    finally:
        for h in hooks:
            h.remove()
    return ranks


def _example(model: nn.Module, example_input) -> torch.Tensor | None:
    """The given example, else two zero samples of a bnlab model's spec input shape."""
    if example_input is not None:
        return example_input
    shape = getattr(getattr(model, "spec", None), "input_shape", None)
    p = next(iter(model.parameters()), None)
    if shape is None or p is None:
        return None
    return torch.zeros((2, *shape), dtype=p.dtype, device=p.device)


def _as_sequential(gm: torch.fx.GraphModule, original: nn.Sequential) -> nn.Sequential | None:
    """The folded graph as an nn.Sequential of the original's remaining top-level children, when the
    graph is exactly their chain (bnlab's models); None otherwise."""
    names = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    ops = [n.op for n in gm.graph.nodes]
    children = dict(original.named_children())
    if any(op not in ("placeholder", "call_module", "output") for op in ops) or any(t not in children for t in names):
        return None
    seq = nn.Sequential()
    for t in names:
        seq.add_module(t, gm.get_submodule(t))
    return seq


# ---- fallback: the order of layers inside nn.Sequential containers

def _neighbour(children, i: int, step: int):
    j = i + step
    while 0 <= j < len(children) and isinstance(children[j][1], _IDENTITY_AT_EVAL):
        j += step
    return children[j] if 0 <= j < len(children) else (None, None)


def _fold_sequential(seq: nn.Sequential, prefix: str, shared_ids: dict[int, int],
                     ranks: dict[int, int] | None) -> tuple[nn.Sequential, list[FoldEntry]]:
    children = list(seq.named_children())
    entries, drop = [], set()
    for i, (name, m) in enumerate(children):
        full = prefix + name
        if isinstance(m, _PER_SAMPLE_NORMS):
            entries.append(_per_sample_entry(full, m))
            continue
        if not isinstance(m, _BATCH_NORMS):
            continue
        sides = []
        for step in (-1, 1):
            n, mod = _neighbour(children, i, step)
            shared = ("is called more than once" if mod is not None and shared_ids.get(id(mod), 1) > 1
                      else "was already folded away" if n in drop else None)
            sides.append(_Side(None if n is None else prefix + n, mod, shared))
        entry = _apply(full, m, *(_check_linear_axes(m, side, ranks) for side in sides))
        entries.append(entry)
        if entry.folded_into is not None:
            drop.add(name)
    kept = nn.Sequential()
    for n, m in children:
        if n not in drop:
            kept.add_module(n, m)
    return kept, entries


def _fold_by_order(model: nn.Module, ranks: dict[int, int] | None) -> tuple[nn.Module, list[FoldEntry]]:
    shared_ids = _call_counts(model)
    entries = []
    if isinstance(model, nn.Sequential):
        folded, entries = _fold_sequential(model, "", shared_ids, ranks)
        return folded, entries
    # deepest containers first, so a folded inner Sequential is what its parent holds
    for name, m in sorted(model.named_modules(), key=lambda nm: -nm[0].count(".")):
        if isinstance(m, nn.Sequential) and name:
            folded, more = _fold_sequential(m, name + ".", shared_ids, ranks)
            _set_submodule(model, name, folded)
            entries += more
    seen = {e.bn for e in entries}
    for name, m in model.named_modules():  # norms outside any Sequential: no order to trust
        if name and name not in seen and isinstance(m, _BATCH_NORMS):
            entries.append(FoldEntry(name, None, "the model does not trace with torch.fx and this BN is not "
                                                 "inside an nn.Sequential, so what feeds it is unknown"))
        elif name and name not in seen and isinstance(m, _PER_SAMPLE_NORMS):
            entries.append(_per_sample_entry(name, m))
    return model, entries


def fold(model: nn.Module, example_input: torch.Tensor | None = None) -> tuple[nn.Module, FoldReport]:
    """A new model with every foldable BN folded away, and the report of what happened.

    ``example_input``: a batch the model takes (default: zeros of a bnlab model's spec shape). It tells
    the rank of each BN's input, which decides whether a BN next to a Linear normalises the Linear's
    features: (N, C) yes; a BatchNorm1d over (N, C, L) after a Linear on the last axis no. Without it,
    BNs next to Linear layers stay (the report says to pass one); conv neighbours need none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold() takes a torch nn.Module (got {type(model).__name__})")
    if any(m.training for m in model.modules() if isinstance(m, (*_BATCH_NORMS, *_PER_SAMPLE_NORMS))) or model.training:
        raise ValueError("fold() needs a model in eval mode: call model.eval() first (folding uses the "
                         "running statistics; in training mode BN normalises with batch statistics instead)")
    new = copy.deepcopy(model)
    entries = _materialise_weight_norms(new) if not isinstance(new, WeightNorm) else []
    ranks = _bn_ranks(new, _example(model, example_input))
    gm = _trace(new)
    if gm is None:
        folded, more = _fold_by_order(new, ranks)
        method = "sequential"
    else:
        more = _fold_graph(gm, ranks)
        folded = (_as_sequential(gm, new) if isinstance(new, nn.Sequential) else None) or gm
        method = "graph"
    folded.eval()
    return folded, FoldReport(entries + more, method)
