"""Model surgery shared by every int8 level: batch-norm folding, finding layers, ReLUs and the classifier.

Batch norms are folded into the preceding convolutions by torch's own
``torch.nn.utils.fusion.fuse_conv_bn_eval`` (:func:`fold_batchnorm`); the
conv -> ReLU pairs that ``int8_static`` fuses (:func:`fusable_relus`) and the
model's output layer (:func:`output_linear`) are found by ``torch.fx``
tracing; layers are replaced in place (:func:`set_submodule`), so the module
hierarchy, and the block names hooks use, is kept.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..prune import conv_bn_pairs

__all__ = ["fold_batchnorm", "fusable_relus", "mark_float_input", "output_linear", "quantizable_layers", "set_submodule"]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``model`` by ``module``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every ``nn.Conv2d`` and ``nn.Linear`` of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def mark_float_input(model: nn.Module) -> nn.Module:
    """Record that a quantized model takes float32 inputs (``compbias_input_dtype``); return it in eval mode."""
    model.compbias_input_dtype = torch.float32
    return model.eval()


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of ``model`` (eval mode) with every conv->BN pair folded into the conv.

    Each pair (:func:`compbias.jobs.prune.conv_bn_pairs`) is fused by
    ``torch.nn.utils.fusion.fuse_conv_bn_eval``:
    ``w' = w * gamma / sqrt(var + eps)`` per output channel and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta`` (``b = 0`` for a
    conv without bias).

    Returns
    -------
    model : torch.nn.Module
        The folded copy; each folded BN is replaced by ``nn.Identity``.
    pairs : list of (conv name, bn name)
    """
    model = copy.deepcopy(model).eval()
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        set_submodule(model, conv_name, fuse_conv_bn_eval(model.get_submodule(conv_name), model.get_submodule(bn_name)))
        set_submodule(model, bn_name, nn.Identity())
    return model, pairs


def fusable_relus(model: nn.Module) -> dict[str, str]:
    """``layer name -> ReLU name`` for conv/linear layers whose only consumer is a ReLU module called once.

    Found by ``torch.fx`` tracing; identities left by folded batch norms in
    between are skipped. A ReLU module called more than once (torchvision's
    BasicBlock reuses one) is never fused, since it is then replaced by an
    identity.
    """
    graph = torch.fx.Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    fused = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), (nn.Conv2d, nn.Linear)):
            continue
        cur = node
        while len(cur.users) == 1:
            (nxt,) = cur.users
            target = str(nxt.target) if nxt.op == "call_module" else None
            if target is None or calls[target] != 1:
                break
            if isinstance(modules[target], nn.Identity):
                cur = nxt
                continue
            if type(modules[target]) is nn.ReLU:
                fused[str(node.target)] = target
            break
    return fused


def output_linear(model: nn.Module) -> str | None:
    """Name of the ``nn.Linear`` whose output is the model's output (the classifier), or None.

    Found by ``torch.fx`` tracing: the module called last before the graph's
    output, skipping identities left by folded batch norms. None when the
    output comes from anything else (a function, a ReLU, a tuple, ...).

    Parameters
    ----------
    model : torch.nn.Module
        A float model (batch norms folded or not).

    Returns
    -------
    str or None
    """
    graph = torch.fx.Tracer().trace(model)
    modules = dict(model.named_modules())
    (out,) = [n for n in graph.nodes if n.op == "output"]
    node = out.args[0]
    while isinstance(node, torch.fx.Node) and node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Identity):
        node = node.args[0] if node.args else None
    if isinstance(node, torch.fx.Node) and node.op == "call_module" and type(modules.get(str(node.target))) is nn.Linear:
        return str(node.target)
    return None
