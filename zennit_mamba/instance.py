'''Changes to module instances that are undone exactly: instance attributes, and the mark of a canonized forward.'''
import functools
import types
from typing import Callable, Dict

import torch

from .offload import forward_slot


class InstanceAttributes:
    '''Set instance attributes of a module; :py:meth:`remove` restores exactly what was there before.

    An instance attribute set by someone else (e.g. accelerate's hooks on ``forward``) comes back on removal. The
    attributes are plain ones (functions, as canonized forwards and copy guards): not parameters, buffers or
    submodules, which ``Module.__setattr__`` files elsewhere.

    Examples
    --------
    >>> module = torch.nn.Identity()
    >>> attributes = InstanceAttributes(module, {'forward': lambda x: 2 * x})
    >>> module(3)
    6
    >>> attributes.remove()
    >>> module(3), 'forward' in module.__dict__
    (3, False)
    '''

    _missing = object()

    def __init__(self, module: torch.nn.Module, attributes: Dict[str, object]):
        self.module = module
        self.originals = {key: module.__dict__.get(key, self._missing) for key in attributes}
        for key, value in attributes.items():
            # object's: Module.__setattr__ would only look for parameters, buffers and submodules of that name
            # (microseconds per attribute, on every registration)
            object.__setattr__(module, key, value)

    def remove(self) -> None:
        for key, original in self.originals.items():
            object.__delattr__(self.module, key)
            if original is not self._missing:
                object.__setattr__(self.module, key, original)
        self.originals = {}


class CanonizedForward(functools.partial):
    '''A canonized forward function with its rule set bound as the first argument: ``function(rules, module, ...)``.

    Its own type, so that a canonized module can be recognised (:py:func:`is_canonized`).
    '''


def bind_forward(module: torch.nn.Module, function: Callable, rules: object) -> InstanceAttributes:
    '''Make ``function(rules, module, ...)`` the forward of ``module`` (inside an accelerate hook where one wraps
    it, so that the hook still places inputs and weights); the result undoes it.'''
    canonized = types.MethodType(CanonizedForward(function, rules), module)
    return InstanceAttributes(module, {forward_slot(module): canonized})


def is_canonized(module: torch.nn.Module) -> bool:
    '''Whether ``module`` currently runs a canonized forward.'''
    return isinstance(getattr(module.__dict__.get(forward_slot(module)), '__func__', None), CanonizedForward)
