'''Changes to module instances that are undone exactly: instance attributes, and the mark of a canonized forward.'''
import functools
import os
import sys
import types
from typing import Callable, Dict, Optional

import torch

from zennit_mamba.core.offload import forward_slot
from zennit_mamba.core.switch import acts


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

    Its own type, so that a canonized module can be recognised (:py:func:`is_canonized`). Where the bound rules have
    a switch (:py:class:`~zennit_mamba.core.switch.RuleSwitch`) that is off, the forward it replaced
    (:py:attr:`original`, bound to the module) runs instead: the module computes as if nothing were registered.
    '''

    original: Optional[Callable] = None
    #: the bound rule set, kept apart from ``args``: a function that is itself a partial (a family's layout bound
    #: to a shared forward) is flattened into this one, its arguments first
    rules: object = None

    def __call__(self, module, *args, **kwargs):
        if self.original is not None and not acts(getattr(self.rules, 'switch', None)):
            return self.original(*args, **kwargs)
        return super().__call__(module, *args, **kwargs)


def bind_forward(module: torch.nn.Module, function: Callable, rules: object) -> InstanceAttributes:
    '''Make ``function(rules, module, ...)`` the forward of ``module`` (inside an accelerate hook where one wraps
    it, so that the hook still places inputs and weights); the result undoes it.'''
    slot = forward_slot(module)
    forward = CanonizedForward(function, rules)
    forward.rules = rules
    forward.original = module.__dict__.get(slot) or types.MethodType(type(module).forward, module)
    return InstanceAttributes(module, {slot: types.MethodType(forward, module)})


def is_canonized(module: torch.nn.Module) -> bool:
    '''Whether ``module`` currently runs a canonized forward.'''
    return isinstance(getattr(module.__dict__.get(forward_slot(module)), '__func__', None), CanonizedForward)


def instance_forward(module: torch.nn.Module) -> Optional[Callable]:
    '''The forward set on ``module`` itself in place of its class's, or None (also where accelerate's wrapper is
    set, which calls the class's forward kept in ``_old_forward``).'''
    own = module.__dict__.get(forward_slot(module))
    return None if own is None or getattr(own, '__func__', None) is type(module).forward else own


def replaced_forward(module: torch.nn.Module) -> Optional[str]:
    '''How the forward of ``module`` differs from the one its class defines, which a canonized forward stands in
    for, or None where it does not: a forward set on the instance (:py:func:`instance_forward`), or a function from
    elsewhere set on the class.

    Examples
    --------
    >>> mixer = torch.nn.Identity()
    >>> replaced_forward(mixer) is None
    True
    >>> mixer.forward = lambda x: 2 * x
    >>> replaced_forward(mixer)
    "forward set on the instance ('<lambda>')"
    '''
    own = instance_forward(module)
    if own is not None:
        return f'forward set on the instance ({getattr(own, "__qualname__", type(own).__name__)!r})'
    cls = type(module)
    # the class's forward and the functions it wraps (decorators such as transformers' deprecate_kwarg): each must
    # be code of the class's own library (or torch's, or kernels'), the innermost the forward a class of its hierarchy defines
    # (a functools.wraps copies names, not where the code is)
    chain = [cls.forward]
    while hasattr(chain[-1], '__wrapped__'):
        chain.append(chain[-1].__wrapped__)
    # kernels (a dependency of transformers from 5.25) wraps the forward of classes that call kernel functions
    # (use_kernelized_func): the wrapper routes those functions and calls the class's forward; its kernelize() sets
    # an instance forward instead, which is refused above
    libraries = tuple(_library_folder(name) for name in (cls.__module__, 'torch', 'kernels'))
    foreign = next((function for function in chain if not getattr(getattr(function, '__code__', None), 'co_filename',
                                                                   '').startswith(libraries)), None)
    innermost = chain[-1]
    defined = any(getattr(innermost, '__qualname__', None) == f'{owner.__qualname__}.forward'
                  and getattr(innermost, '__module__', None) == owner.__module__ for owner in cls.__mro__)
    if foreign is None and defined:
        return None
    function = foreign or innermost
    where = getattr(getattr(function, '__code__', None), 'co_filename', type(function).__name__)
    return f'forward replaced on the class by {getattr(function, "__qualname__", function)!r} from {where}'


def _library_folder(module_name: str) -> str:
    '''The folder of the top-level package that ``module_name`` belongs to (with a trailing separator); one that
    matches no file where that package is not imported (yet: nothing of it can then be in a forward).'''
    top = sys.modules.get(module_name.split('.')[0])
    path = getattr(top, '__file__', None)
    return _folder_of(path) if path else '\0'


@functools.lru_cache(maxsize=None)
def _folder_of(path: str) -> str:
    return os.path.join(os.path.dirname(path), '')


def called_plainly(module: torch.nn.Module) -> bool:
    '''Whether a call of ``module`` is its class's forward and nothing else: no hook of any kind on it (a Zennit rule,
    a Captum layer method's), no global module hooks, no forward set on the instance (accelerate's hooks set one), so
    that computing the forward's result another way is unobservable.

    Examples
    --------
    >>> linear = torch.nn.Linear(2, 2)
    >>> called_plainly(linear)
    True
    >>> handle = linear.register_forward_pre_hook(lambda module, args: None)
    >>> called_plainly(linear)
    False
    >>> handle.remove()
    '''
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    return not (any(hooks) or 'forward' in vars(module) or global_module_hooks())


def global_module_hooks() -> bool:
    '''Whether torch has hooks registered for every module's calls.'''
    module = torch.nn.modules.module
    return any((module._global_forward_hooks, module._global_forward_pre_hooks, module._global_backward_hooks,
                module._global_backward_pre_hooks))
