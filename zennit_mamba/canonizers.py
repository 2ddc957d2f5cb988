'''The canonizer that binds the MambaLRP rules into the forwards of Mamba mixers.

Each class the family files canonize (:py:func:`~zennit_mamba.support.table`) gets a canonized forward that computes
what the original computes on the full-sequence path, through the mixer's own projections and the rule set bound to
it (:py:class:`~zennit_mamba.core.ruleset.RuleSet`). Forward values are unchanged; removing the canonizer restores each
instance exactly. Before any module changes, every upstream forward's signature is compared with the canonized one
(:py:func:`~zennit_mamba.core.upstream.check_forward_signature`).
'''
import functools
from typing import Callable, Collection, Iterable, List, Optional, Tuple, Type

import torch
from zennit.canonizers import Canonizer, CompositeCanonizer

from zennit_mamba.core.instance import CanonizedForward, InstanceAttributes, bind_forward, replaced_forward
from zennit_mamba.core.ruleset import RuleSet
from zennit_mamba.core.upstream import check_forward_signature
from zennit_mamba.support import UnsupportedModelError, table


class ForwardCanonizer(Canonizer):
    '''Replace the forward of module instances of one type by ``forward(rules, module, ...)``.

    Parameters
    ----------
    module_type : type
        Exact type of the modules to canonize (subclasses may compute something else, so they do not match).
    forward : callable
        The canonized forward, ``forward(rules, module, *args, **kwargs)``.
    rules : :py:class:`~zennit_mamba.core.ruleset.RuleSet`
        The rule set the forward closes over.
    added_parameters : collection of str, optional
        Parameters that ``forward`` takes beyond those of ``module_type.forward``, on purpose; every other parameter
        must match.
    '''

    def __init__(
        self,
        module_type: Type[torch.nn.Module],
        forward: Callable,
        rules: RuleSet,
        added_parameters: Collection[str] = (),
    ):
        super().__init__()
        self.module_type = module_type
        self.forward = forward
        self.rules = rules
        self.added_parameters = tuple(added_parameters)
        self.attributes: Optional[InstanceAttributes] = None

    def check_signature(self) -> None:
        '''Raise :py:class:`~zennit_mamba.core.upstream.UpstreamChangedError` where the upstream forward takes other
        parameters than the canonized one.'''
        _check_signature_once(self.module_type, self.module_type.forward, self.forward, self.added_parameters)

    def apply(self, root_module: torch.nn.Module) -> List['ForwardCanonizer']:
        return _canonize_by_type(root_module.named_modules(), [self])

    def register(self, module: torch.nn.Module) -> None:
        self.attributes = bind_forward(module, self.forward, self.rules)

    def remove(self) -> None:
        if self.attributes is not None:
            self.attributes.remove()
            self.attributes = None

    def copy(self) -> 'ForwardCanonizer':
        return self.__class__(self.module_type, self.forward, self.rules, self.added_parameters)


@functools.lru_cache(maxsize=None)
def _check_signature_once(module_type: type, upstream_forward: Callable, forward: Callable, added: tuple) -> None:
    ''':py:func:`check_forward_signature` once per upstream forward function (it runs on every registration, and
    ``inspect.signature`` is slow); a forward replaced on the class is a new key and is checked again, and a check
    that raises is not remembered.'''
    check_forward_signature(module_type, CanonizedForward(forward, None), added)


def _canonize_by_type(named_modules: Iterable[Tuple[str, torch.nn.Module]],
                      canonizers: List[ForwardCanonizer]) -> List[ForwardCanonizer]:
    '''Register a copy of the canonizer of each module's exact type on it; on any error, remove those registered and
    re-raise. The signatures of the forwards to replace are checked first, and a module whose forward is not its
    class's own (:py:func:`~zennit_mamba.core.instance.replaced_forward`) is refused: the canonized forward would drop
    it.'''
    by_type = {canonizer.module_type: canonizer for canonizer in canonizers}
    targets = [(by_type[type(module)], name, module) for name, module in named_modules if type(module) in by_type]
    for canonizer in {id(canonizer): canonizer for canonizer, _, _ in targets}.values():
        canonizer.check_signature()
    replaced = [(name, module, replaced_forward(module)) for _, name, module in targets]
    replaced = [f'{type(module).__name__} at \'{name}\' ({how})' for name, module, how in replaced if how is not None]
    if replaced:
        raise UnsupportedModelError(
            f'{", ".join(replaced)}: MambaLRP computes the forward the class defines, so the change would be dropped '
            f'and another model explained. Make the change in a forward hook (hooks run around the canonized '
            f'forward), or remove it while explaining.'
        )
    instances = []
    try:
        for canonizer, _, module in targets:
            instance = canonizer.copy()
            instance.register(module)
            instances.append(instance)
    except BaseException:
        for instance in instances:
            instance.remove()
        raise
    return instances


class MambaCanonizer(CompositeCanonizer):
    '''Canonized forwards for every supported Mamba mixer (and mamba-ssm's blocks), bound to one rule set.

    Parameters
    ----------
    rules : :py:class:`~zennit_mamba.core.ruleset.RuleSet`, optional
        The rules the canonized forwards compute with (all MambaLRP rules by default).

    Examples
    --------
    >>> from transformers import MambaConfig, MambaModel
    >>> model = MambaModel(MambaConfig(vocab_size=10, hidden_size=8, state_size=4, num_hidden_layers=1))
    >>> instances = MambaCanonizer().apply(model)
    >>> 'forward' in vars(model.layers[0].mixer)
    True
    >>> for instance in instances:
    ...     instance.remove()
    >>> 'forward' in vars(model.layers[0].mixer)
    False
    '''

    def __init__(self, rules: Optional[RuleSet] = None):
        self.rules = RuleSet() if rules is None else rules
        canonizers = [ForwardCanonizer(module_type, entry.forward, self.rules, entry.added)
                      for module_type, entry in table().canonized.items()]
        super().__init__(canonizers)

    def apply(self, root_module: torch.nn.Module) -> List[ForwardCanonizer]:
        # one walk over the model for all module types (a model is canonized on every explanation)
        return self.apply_to(root_module.named_modules())

    def apply_to(self, named_modules: Iterable[Tuple[str, torch.nn.Module]]) -> List[ForwardCanonizer]:
        ''':py:meth:`apply` on the modules of a walk already made (:py:class:`~zennit_mamba.MambaComposite` walks a
        model once per registration): the canonized forward on each module of a supported type among ``modules``.

        Parameters
        ----------
        named_modules : iterable of (str, :py:obj:`torch.nn.Module`)
            The modules to canonize where their exact type is a supported one, with their qualified names (for
            errors); a mixer's inside may be left out.

        Returns
        -------
        list of :py:class:`ForwardCanonizer`
            One registered instance per canonized module; each one's ``remove()`` restores its module.
        '''
        return _canonize_by_type(named_modules, self.canonizers)

    def copy(self) -> 'MambaCanonizer':
        return MambaCanonizer(self.rules)
