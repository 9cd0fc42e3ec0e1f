"""Swapping a model's modules for fast ones that compute the same thing.

A fast module is a subclass of the reference module it replaces and takes over that module's
state as it is: the same parameters (the very tensors), buffers, children and hooks. So the
parameter names, the state dict and any optimizer built on the model stay valid, and
:func:`to_reference` can turn it back.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from detrkit.fast.backbone import plain_convolution
from detrkit.ops import Dropout, WinogradConv2d

Replacement = Callable[[nn.Module], nn.Module]


def adopt(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A module of class ``cls`` (a subclass or base class of ``module``'s) holding ``module``'s
    state: its parameters, buffers, children and hooks, shared, not copied."""
    if not (issubclass(cls, type(module)) or issubclass(type(module), cls)):
        raise TypeError(f"{cls.__name__} cannot take over a {type(module).__name__}")
    adopted = cls.__new__(cls)
    adopted.__dict__.update(module.__dict__)
    return adopted


def substitute(model: nn.Module, replacements: dict[type[nn.Module], Replacement]) -> nn.Module:
    """Replaces, in place and children first, every submodule whose exact type is a key of
    ``replacements`` by what its function returns. A module that appears several times (shared
    heads) is replaced by one module everywhere. Returns the model, or its replacement when the
    model's own type is in the table."""
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = visit(child)
        make = replacements.get(type(module))
        done[id(module)] = make(module) if make is not None else module
        return done[id(module)]

    return visit(model)


def to_reference(model: nn.Module) -> nn.Module:
    """``model`` with every fast module turned back into the reference module it replaced (same
    state), in place: what exports trace. Folded batch norms stay folded."""
    replacements: dict[type[nn.Module], Replacement] = {
        Dropout: lambda module: adopt(module, nn.Dropout),
        WinogradConv2d: plain_convolution,
    }
    for module in model.modules():
        reference = getattr(type(module), "reference_class", None)
        if reference is not None:
            replacements[type(module)] = lambda module: adopt(module, module.reference_class)
    return substitute(model, replacements)
