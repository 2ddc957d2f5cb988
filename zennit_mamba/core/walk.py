'''A walk over a model's modules that can leave out the inside of some of them, for what runs on every registration.'''
from typing import Callable, Iterator, Tuple

import torch


def modules_parents_first(
    model: torch.nn.Module, descend: Callable[[torch.nn.Module], bool] = lambda module: True,
) -> Iterator[Tuple[str, torch.nn.Module]]:
    '''The modules of ``model`` with their qualified names, parents first and each once, in the order of
    ``named_modules`` (a block shared between places, as in Zamba2, comes under its first name), without the modules
    inside those for which ``descend`` is false.

    Parameters
    ----------
    model : :py:obj:`torch.nn.Module`
        The model to walk.
    descend : callable, optional
        Whether to walk into a module's children (all by default); asked after the module is yielded, so it may read
        what the caller decided about it.

    Yields
    ------
    (str, :py:obj:`torch.nn.Module`)
        The qualified name (``''`` for ``model``) and the module.

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.ReLU())
    >>> [name for name, _ in modules_parents_first(model)]
    ['', '0', '0.0', '1']
    >>> [name for name, _ in modules_parents_first(model, lambda module: module is model)]
    ['', '0', '1']
    '''
    seen, pending = set(), [('', model)]
    while pending:
        name, module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if descend(module):
            # read from the submodule dictionary: named_children's nested generators cost more per module
            pending.extend((f'{name}.{child_name}' if name else child_name, child)
                           for child_name, child in reversed(module._modules.items()) if child is not None)
