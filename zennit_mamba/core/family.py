'''What a family file declares: the module classes of one model family, each with its treatment under MambaLRP.

A :py:class:`Family` names its mixers (and other modules MambaLRP computes with a canonized forward) and maps every
other module class of the family to a :py:class:`Treatment`: which MambaLRP rule acts on it and through which hook,
or that it needs none (a container, a linear layer). The table of :py:mod:`zennit_mamba.support` is built from the
family files; the composite looks a module's treatment up by its exact class, and a class of a family's library that
no family maps is refused rather than guessed.
'''
from typing import Callable, Collection, Mapping, NamedTuple, Optional, Tuple

import torch
from zennit.core import Hook

from zennit_mamba._optional import optional_class

#: a problem with one module of a class (a layout MambaLRP does not know), or None
Check = Callable[[torch.nn.Module], Optional[str]]


class Treatment(NamedTuple):
    '''How MambaLRP treats the modules of one class.

    Parameters
    ----------
    description : str
        What happens, for the README and for errors.
    rule : str, optional
        The MambaLRP rule that acts (``'silu'``, ``'norm'``, ``'gate'``, ``'attention'``), switched by
        ``MambaComposite(rules=...)``; None where no rule acts (LRP-0, or computed by a canonized forward).
    hook : callable, optional
        Makes the hook that attaches the rule to a module of the class.
    check : callable, optional
        A module's problem (a layout the hook does not know), or None.
    '''
    description: str
    rule: Optional[str] = None
    hook: Optional[Callable[[], Hook]] = None
    check: Optional[Check] = None

    def hook_for(self, rules: Collection[str]) -> Optional[Hook]:
        '''A fresh hook where the treatment's rule is among ``rules``, else None.'''
        return self.hook() if self.hook is not None and self.rule in rules else None

    def problem(self, module: torch.nn.Module) -> Optional[str]:
        return None if self.check is None else self.check(module)


class Canonized(NamedTuple):
    '''A module class whose forward MambaLRP replaces by a canonized one, ``forward(rules, module, ...)``.

    Parameters
    ----------
    forward : callable
        The canonized forward; it takes the upstream forward's parameters and ``added`` ones.
    added : tuple of str, optional
        Parameters the canonized forward takes beyond the upstream's (e.g. ``inputs_embeds``).
    mixer : bool, optional
        Whether the class is a mixer: its inside is computed by the canonized forward, not walked by the composite.
    uncalled : tuple of str, optional
        Children whose weights the upstream forward reads without calling them, which the canonized forward calls
        (so that rules and Captum's layer methods attach): a hook on one acts only under MambaLRP.
    selection : tuple of str, optional
        Children that compute the selection (``x_proj``, ``dt_proj``), which the SSM rule holds constant: no relevance
        passes them while it is on.
    check : callable, optional
        A module's problem (a setting the canonized forward does not reproduce), or None.
    projections : tuple of str, optional
        The attribute names of the mixer's linear and convolution layers beyond Mamba's (``in_proj``, ``conv1d``,
        ``x_proj``, ``dt_proj``, ``out_proj``), which ``MambaComposite(gamma=<float>)`` selects by name.
    '''
    forward: Callable
    added: Tuple[str, ...] = ()
    mixer: bool = True
    uncalled: Tuple[str, ...] = ()
    selection: Tuple[str, ...] = ()
    check: Optional[Check] = None
    projections: Tuple[str, ...] = ()


class Family(NamedTuple):
    '''One model family: its canonized classes and the treatment of every other class it has.

    Classes are named by their dotted path (``'transformers.models.bamba.modeling_bamba.BambaMixer'``) and imported
    when the table is built; a class the installed library lacks (mamba-ssm without CUDA, an older release) is left
    out.

    Parameters
    ----------
    name : str
        The family, as users know it.
    library : str
        Where its classes come from: ``'transformers'``, ``'mamba-ssm'``, ``'timm'`` or ``'mamba-lrp'``.
    canonized : mapping of str to Canonized
        The classes with canonized forwards, mixers first.
    layers : mapping of str to Treatment
        Every other class of the family, with its treatment.
    hybrid : bool, optional
        Whether attention, MLP or expert layers sit beside the mixers: in a hybrid, a layer of the user's own without a
        treatment is refused.
    beside : str, optional
        The layers beside the mixers, for the README's table (``'attention, gated MLPs, experts'``).
    library_modules : tuple of str, optional
        The Python modules that define the family's classes: a class from them that no entry maps is refused.
    renamed : tuple of (str, str), optional
        Classes an upstream release renamed, as (former path, new path), both named in ``layers`` or ``canonized``:
        the releases the pin allows have one or the other.
    '''
    name: str
    library: str
    canonized: Mapping[str, Canonized]
    layers: Mapping[str, Treatment]
    hybrid: bool = False
    beside: str = 'none'
    library_modules: Tuple[str, ...] = ()
    renamed: Tuple[Tuple[str, str], ...] = ()

    def mixers(self) -> Tuple[str, ...]:
        '''The dotted paths of the family's mixer classes.'''
        return tuple(path for path, entry in self.canonized.items() if entry.mixer)


def resolve(path: str) -> Optional[type]:
    '''The class at a dotted path, or None where the installed library lacks it.'''
    module, _, name = path.rpartition('.')
    return optional_class(module, name)


def in_module(module: str, classes: Mapping[str, object]) -> dict:
    '''``classes`` keyed by their dotted path in ``module``, for a family whose classes come from one module.

    Examples
    --------
    >>> in_module('transformers.models.mamba.modeling_mamba', {'MambaBlock': 0})
    {'transformers.models.mamba.modeling_mamba.MambaBlock': 0}
    '''
    return {f'{module}.{name}': value for name, value in classes.items()}
