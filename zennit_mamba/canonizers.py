'''Canonizers that make a Mamba model's hidden operations explicit modules.

Each canonizer replaces the ``forward`` of matching module instances by one that routes every operation on the
relevance path through an explicit submodule (:py:mod:`zennit_mamba.layers`), so that rules can attach to it.
Forward values are unchanged. Removing the canonizer restores the instances exactly.
'''
import functools
import importlib
import types
from typing import Callable, Collection, Dict, List, Optional, Tuple, Type

import torch
from zennit.canonizers import Canonizer, CompositeCanonizer
from zennit.layer import Sum

from . import mamba_ssm_mamba, transformers_mamba
from ._optional import mamba_ssm_modules
from .layers import GateProduct, SelectiveScan, SiLU, Softplus
from .mamba2 import Mamba2Core, mamba_ssm_layout, transformers_layout
from .upstream import check_forward_signature

#: prefix of every attribute a canonizer adds, so that a canonized model can be recognised
ATTRIBUTE_PREFIX = 'lrp_'


class InstanceAttributes:
    '''Set instance attributes of a module; :py:meth:`remove` restores exactly what was there before.

    An instance attribute set by someone else (e.g. accelerate's hooks on ``forward``) comes back on removal.
    '''

    _missing = object()

    def __init__(self, module: torch.nn.Module, attributes: Dict[str, object]):
        self.module = module
        self.originals = {key: module.__dict__.get(key, self._missing) for key in attributes}
        for key, value in attributes.items():
            setattr(module, key, value)

    def remove(self) -> None:
        for key, original in self.originals.items():
            delattr(self.module, key)
            if original is not self._missing:
                setattr(self.module, key, original)
        self.originals = {}


class ForwardCanonizer(Canonizer):
    '''Replace the forward of module instances of one type and attach explicit submodules.

    Parameters
    ----------
    module_type : type
        Exact type of the modules to canonize (subclasses may compute something else, so they do not match).
    forward : callable
        Function ``(module, *args, **kwargs)`` bound to each module as its new ``forward``.
    submodules : callable
        Function ``(module) -> dict[str, torch.nn.Module]`` creating the explicit submodules for one module.
    added_parameters : collection of str, optional
        Parameters that ``forward`` takes beyond those of ``module_type.forward``, on purpose; every other parameter
        must match (:py:func:`~zennit_mamba.upstream.check_forward_signature`, run before any module is changed).
    '''

    def __init__(
        self,
        module_type: Type[torch.nn.Module],
        forward: Callable,
        submodules: Callable[[torch.nn.Module], Dict[str, torch.nn.Module]],
        added_parameters: Collection[str] = (),
    ):
        super().__init__()
        self.module_type = module_type
        self.forward = forward
        self.submodules = submodules
        self.added_parameters = tuple(added_parameters)
        self.attributes: Optional[InstanceAttributes] = None

    def check_signature(self) -> None:
        '''Raise :py:class:`~zennit_mamba.upstream.UpstreamChangedError` where the upstream forward takes other
        parameters than the canonized one.'''
        check_forward_signature(self.module_type, self.forward, self.added_parameters)

    def apply(self, root_module: torch.nn.Module) -> List['ForwardCanonizer']:
        return _canonize_by_type(root_module, [self])

    def register(self, module: torch.nn.Module) -> None:
        attributes = {'forward': types.MethodType(self.forward, module)}
        attributes.update({ATTRIBUTE_PREFIX + key: value for key, value in self.submodules(module).items()})
        self.attributes = InstanceAttributes(module, attributes)

    def remove(self) -> None:
        if self.attributes is not None:
            self.attributes.remove()
            self.attributes = None

    def copy(self) -> 'ForwardCanonizer':
        return self.__class__(self.module_type, self.forward, self.submodules, self.added_parameters)


def _canonize_by_type(root_module: torch.nn.Module, canonizers: List[ForwardCanonizer]) -> List[ForwardCanonizer]:
    '''In one walk over ``root_module``, register a copy of the canonizer of each module's exact type on it; on any
    error, remove those registered and re-raise. The signatures of the forwards to replace are checked first.'''
    by_type = {canonizer.module_type: canonizer for canonizer in canonizers}
    # collected first: registering adds submodules, which must not happen while modules() iterates
    targets = [(by_type[type(module)], module) for module in root_module.modules() if type(module) in by_type]
    for canonizer in {id(canonizer): canonizer for canonizer, _ in targets}.values():
        canonizer.check_signature()
    instances = []
    try:
        for canonizer, module in targets:
            instance = canonizer.copy()
            instance.register(module)
            instances.append(instance)
    except BaseException:
        for instance in instances:
            instance.remove()
        raise
    return instances


def _mixer_submodules(channels: int, state_size: int) -> Dict[str, torch.nn.Module]:
    return {
        'conv_act': SiLU(),
        'gate_act': SiLU(),
        'softplus': Softplus(),
        'scan': SelectiveScan(channels, state_size),
        'gate': GateProduct(),
    }


def _transformers_mixer_submodules(mixer: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    return _mixer_submodules(mixer.intermediate_size, mixer.ssm_state_size)


def _mamba2_submodules(mixer: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    return {'core': Mamba2Core(mixer, transformers_layout(mixer))}


def _mamba_ssm_mixer_submodules(mixer: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    return _mixer_submodules(mixer.d_inner, mixer.d_state)


def _mamba_ssm_mamba2_submodules(mixer: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    return {'core': Mamba2Core(mixer, mamba_ssm_layout(mixer))}


def _residual_submodules(module: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    return {'residual': Sum(dim=-1)}


_MIXER = (transformers_mamba.mixer_forward, _transformers_mixer_submodules)
_MAMBA2_MIXER = (transformers_mamba.mixer_forward, _mamba2_submodules)
_BLOCK = (transformers_mamba.block_forward, _residual_submodules)

#: (transformers model package, class name) -> (canonized forward, submodules)
TRANSFORMERS_MODULES = {
    ('mamba', 'MambaMixer'): _MIXER,
    ('mamba', 'MambaBlock'): _BLOCK,
    ('falcon_mamba', 'FalconMambaMixer'): _MIXER,
    ('falcon_mamba', 'FalconMambaBlock'): _BLOCK,
    ('jamba', 'JambaMambaMixer'): _MIXER,
    ('mamba2', 'Mamba2Mixer'): _MAMBA2_MIXER,
    ('mamba2', 'Mamba2Block'): _BLOCK,
    ('bamba', 'BambaMixer'): _MAMBA2_MIXER,
    ('nemotron_h', 'NemotronHMamba2Mixer'): _MAMBA2_MIXER,
    ('granitemoehybrid', 'GraniteMoeHybridMambaLayer'): _MAMBA2_MIXER,
    ('falcon_h1', 'FalconH1Mixer'): _MAMBA2_MIXER,
    ('zamba2', 'Zamba2MambaMixer'): _MAMBA2_MIXER,
}


@functools.lru_cache(maxsize=None)
def transformers_class(package: str, name: str) -> Optional[type]:
    '''``transformers.models.<package>.modeling_<package>.<name>``, or None where this transformers lacks it.'''
    try:
        module = importlib.import_module(f'transformers.models.{package}.modeling_{package}')
    except ImportError:
        return None
    return getattr(module, name, None)


def transformers_canonizers() -> List[ForwardCanonizer]:
    '''Canonizers for the Mamba modules of :py:mod:`transformers`.'''
    canonizers = []
    for (package, name), (forward, submodules) in TRANSFORMERS_MODULES.items():
        module_type = transformers_class(package, name)
        if module_type is not None:
            canonizers.append(ForwardCanonizer(module_type, forward, submodules))
    return canonizers


def mamba_ssm_canonizers() -> List[ForwardCanonizer]:
    '''Canonizers for mamba-ssm's modules; empty where mamba-ssm is not importable.'''
    modules = mamba_ssm_modules()
    if modules is None:
        return []
    return [
        ForwardCanonizer(modules.Mamba, mamba_ssm_mamba.mixer_forward, _mamba_ssm_mixer_submodules),
        ForwardCanonizer(modules.Mamba2, mamba_ssm_mamba.mamba2_forward, _mamba_ssm_mamba2_submodules),
        ForwardCanonizer(modules.Block, mamba_ssm_mamba.block_forward, _residual_submodules),
        ForwardCanonizer(modules.MixerModel, mamba_ssm_mamba.backbone_forward, _residual_submodules,
                         added_parameters=('inputs_embeds',)),
    ]


class MambaCanonizer(CompositeCanonizer):
    '''All canonizers for the supported Mamba implementations.

    Examples
    --------
    >>> from transformers import MambaConfig, MambaModel
    >>> model = MambaModel(MambaConfig(vocab_size=10, hidden_size=8, state_size=4, num_hidden_layers=1))
    >>> instances = MambaCanonizer().apply(model)
    >>> hasattr(model.layers[0].mixer, 'lrp_scan')
    True
    >>> for instance in instances:
    ...     instance.remove()
    >>> hasattr(model.layers[0].mixer, 'lrp_scan')
    False
    '''

    def __init__(self):
        super().__init__(transformers_canonizers() + mamba_ssm_canonizers())

    def apply(self, root_module: torch.nn.Module) -> List[ForwardCanonizer]:
        # one walk over the model for all module types (a model is canonized on every explanation)
        return _canonize_by_type(root_module, self.canonizers)

    def copy(self) -> 'MambaCanonizer':
        return MambaCanonizer()


def canonized_modules(root_module: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    '''Modules of ``root_module`` that currently carry submodules added by a MambaLRP canonizer.'''
    return [
        (name, module) for name, module in root_module.named_modules()
        if any(child.startswith(ATTRIBUTE_PREFIX) for child in module._modules)
    ]
