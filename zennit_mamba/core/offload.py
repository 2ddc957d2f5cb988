'''Explaining inside accelerate's hooks (``dispatch_model``, ``cpu_offload``): where a hooked module's own forward
lives, and the weights a canonized forward reads without calling the module that holds them.

accelerate wraps a module's ``forward`` in a function that moves the inputs (and offloaded weights) in, calls
``module._old_forward`` and moves the weights out again. A canonized forward goes in ``_old_forward``, inside the
wrapper, and reads the weights of child modules it does not call (e.g. the gated RMSNorm of Mamba-2, computed with
the LN-rule from its weight) only while :func:`weights_in_place` holds them on the execution device.
'''
from contextlib import nullcontext
from typing import ContextManager, List, Tuple

import torch

from zennit_mamba.core.walk import modules_parents_first


def forward_slot(module: torch.nn.Module) -> str:
    '''Where the module's own forward lives: ``forward``, or ``_old_forward`` under an accelerate hook, whose
    wrapper calls it after moving inputs and weights in.

    Parameters
    ----------
    module : :py:obj:`torch.nn.Module`
        Any module.

    Returns
    -------
    str
        The name of the instance attribute to put a canonized forward in.

    Examples
    --------
    >>> forward_slot(torch.nn.Identity())
    'forward'
    '''
    hooked = '_hf_hook' in module.__dict__ and '_old_forward' in module.__dict__
    return '_old_forward' if hooked else 'forward'


def offloading_hooks(module: torch.nn.Module) -> List[object]:
    '''The accelerate hooks on ``module`` itself that move its weights in for each call and out again.

    Parameters
    ----------
    module : :py:obj:`torch.nn.Module`
        Any module.

    Returns
    -------
    list
        Those hooks (empty without accelerate, or where the weights stay on their device).
    '''
    hook = module.__dict__.get('_hf_hook')
    return [part for part in getattr(hook, 'hooks', (hook,)) if getattr(part, 'offload', False)]


class _Placed:
    '''Context of :func:`weights_in_place` where there are offloaded weights to place.'''

    def __init__(self, placed: List[Tuple[torch.nn.Module, object]]):
        self.placed = placed

    def __enter__(self) -> None:
        for child, hook in self.placed:
            hook.pre_forward(child)

    def __exit__(self, *exception) -> None:
        for child, hook in reversed(self.placed):
            hook.post_forward(child, None)


def weights_in_place(module: torch.nn.Module) -> ContextManager[None]:
    '''The offloaded weights of every module below ``module`` on their execution device while inside (a no-op
    without offloading hooks); moved out again on leaving, as their hooks do after a call.

    Parameters
    ----------
    module : :py:obj:`torch.nn.Module`
        A module whose computation reads the weights of children it does not call (a canonized mixer).

    Examples
    --------
    >>> with weights_in_place(torch.nn.Linear(2, 2)):  # no accelerate hook: nothing to place
    ...     pass
    '''
    placed = [(child, hook) for _, child in modules_parents_first(module) if child is not module
              for hook in offloading_hooks(child)]
    # every canonized mixer call asks: without offloading, the cheapest context there is
    return _Placed(placed) if placed else nullcontext()
