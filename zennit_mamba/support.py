'''The supported Mamba families, in one table, and the check that refuses models MambaLRP cannot explain.

:data:`FAMILIES` is the only list of what is supported: the canonizers, the support check, its error message and the
README's support table (:func:`support_table`) are built from it.
'''
import functools
import re
from collections import Counter
from typing import Callable, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from zennit_mamba.core import layers
from zennit_mamba.families import efficientvim, mamba_ssm, vim
from zennit_mamba.mixers import mamba1, mamba2
from zennit_mamba._optional import optional_class as module_class
from zennit_mamba.core.instance import is_canonized
from zennit_mamba.core.offload import offloading_hooks
from zennit_mamba.core.walk import modules_parents_first


class Family(NamedTuple):
    '''One supported Mamba mixer class and how it is explained.'''
    name: str  #: the model family, as users know it
    library: str  #: 'transformers' or 'mamba-ssm'
    module: str  #: the Python module defining the mixer class
    mixer: str  #: the mixer class name
    forward: Callable  #: its canonized forward, ``forward(rules, mixer, ...)``
    hybrid: bool  #: whether attention or MLP layers sit beside the Mamba layers
    #: submodules whose weights the original forward reads without calling them, which the canonized forward calls
    #: (so that rules and Captum's layer methods can attach; :py:func:`~zennit_mamba.mixers.io.call_read_module`):
    #: a hook on one acts only under MambaLRP, so a pre-hook there is refused (it may change the module, as
    #: spectral_norm's does)
    uncalled: Tuple[str, ...] = ()

    def mixer_type(self) -> Optional[type]:
        '''The mixer class, or None where the installed library lacks it (mamba-ssm needs CUDA).'''
        return module_class(self.module, self.mixer)


def _transformers(name: str, package: str, mixer: str, forward: Callable, hybrid: bool = False) -> Family:
    uncalled = ('conv1d', 'dt_proj') if forward is mamba1.transformers_forward else ('conv1d',)
    return Family(name, 'transformers', f'transformers.models.{package}.modeling_{package}', mixer, forward, hybrid,
                  uncalled)


FAMILIES: Tuple[Family, ...] = (
    _transformers('Mamba', 'mamba', 'MambaMixer', mamba1.transformers_forward),
    _transformers('FalconMamba', 'falcon_mamba', 'FalconMambaMixer', mamba1.transformers_forward),
    _transformers('Mamba-2', 'mamba2', 'Mamba2Mixer', mamba2.transformers_forward),
    _transformers('Jamba', 'jamba', 'JambaMambaMixer', mamba1.transformers_forward, hybrid=True),
    _transformers('Bamba', 'bamba', 'BambaMixer', mamba2.transformers_forward, hybrid=True),
    _transformers('NemotronH', 'nemotron_h', 'NemotronHMamba2Mixer', mamba2.transformers_forward, hybrid=True),
    _transformers('GraniteMoeHybrid', 'granitemoehybrid', 'GraniteMoeHybridMambaLayer', mamba2.transformers_forward,
                  hybrid=True),
    _transformers('FalconH1', 'falcon_h1', 'FalconH1Mixer', mamba2.transformers_forward, hybrid=True),
    _transformers('Zamba2', 'zamba2', 'Zamba2MambaMixer', mamba2.transformers_forward, hybrid=True),
    Family('Mamba (mamba_simple)', 'mamba-ssm', 'mamba_ssm.modules.mamba_simple', 'Mamba', mamba1.mamba_ssm_forward,
           False, uncalled=('conv1d', 'dt_proj')),
    Family('Mamba-2', 'mamba-ssm', 'mamba_ssm.modules.mamba2', 'Mamba2', mamba2.mamba_ssm_forward, False,
           uncalled=('conv1d',)),
    Family('Vision Mamba (Vim)', 'mamba-lrp', 'zennit_mamba.families.vim', 'BidirectionalMamba', vim.canonized_forward, False),
    Family('EfficientViM', 'timm', 'timm.models.efficientvim', 'HSMSSD', efficientvim.hsmssd_forward, False),
)

#: mamba-ssm's blocks and backbone, canonized beside its mixers: (module, class, forward, parameters it adds)
MAMBA_SSM_STRUCTURE = (
    ('mamba_ssm.modules.block', 'Block', mamba_ssm.block_forward, ()),
    ('mamba_ssm.models.mixer_seq_simple', 'MixerModel', mamba_ssm.backbone_forward, ('inputs_embeds',)),
)

# Mamba-like mixers whose forward the canonizers do not know: explaining through them would be silently wrong
_MAMBA_LIKE = re.compile(r'.*(Mamba|SSM|Bamba|H1).*Mixer|Mamba\d*|.*MambaLayer|Mamba\d*Simple', re.IGNORECASE)


@functools.lru_cache(maxsize=None)
def mixer_types(hybrid_only: bool = False) -> Tuple[type, ...]:
    '''The installed supported mixer classes (of the hybrid families only, if asked).'''
    found = (family.mixer_type() for family in FAMILIES if family.hybrid or not hybrid_only)
    return tuple(dict.fromkeys(filter(None, found)))


@functools.lru_cache(maxsize=None)
def _is_mamba_like(class_name: str) -> bool:
    return _MAMBA_LIKE.fullmatch(class_name) is not None


def _base_mixer(module: torch.nn.Module) -> type:
    return next(mixer for mixer in mixer_types() if isinstance(module, mixer))


def walk_outside_mixers(model: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Module]]:
    '''The modules of ``model`` with their qualified names, parents first and each once (as ``named_modules``), the
    supported mixers (and their subclasses) included but not the modules inside them, which the canonized forwards
    compute.

    Examples
    --------
    >>> from transformers import MambaConfig, MambaModel
    >>> model = MambaModel(MambaConfig(vocab_size=10, hidden_size=8, state_size=4, num_hidden_layers=1))
    >>> [name for name, _ in walk_outside_mixers(model)]
    ['', 'embeddings', 'layers', 'layers.0', 'layers.0.norm', 'layers.0.mixer', 'norm_f']
    '''
    mixers = mixer_types()
    return modules_parents_first(model, lambda module: not isinstance(module, mixers))


def support_table() -> str:
    '''The README's table of supported families, built from :data:`FAMILIES`.

    Examples
    --------
    >>> print(support_table().splitlines()[2])
    | Mamba | transformers | `MambaMixer` | Mamba only |
    '''
    rows = ['| family | library | mixer | layers beside the Mamba layers |', '|---|---|---|---|']
    rows += [f'| {family.name} | {family.library} | `{family.mixer}` | '
             f'{"attention, MLPs, experts" if family.hybrid else "Mamba only"} |' for family in FAMILIES]
    return '\n'.join(rows)


@functools.lru_cache(maxsize=None)
def _uncalled_children() -> dict:
    return {family.mixer_type(): family.uncalled for family in FAMILIES if family.uncalled}


def _pre_hooked(module: Optional[torch.nn.Module]) -> bool:
    return module is not None and bool(module._forward_pre_hooks)


def _supported_listing() -> str:
    return ', '.join(f'{family.library} {family.mixer} ({family.name})' for family in FAMILIES)


class UnsupportedModelError(ValueError):
    '''The model holds no Mamba mixer MambaLRP supports, or a Mamba-like mixer it does not support.'''


def is_hybrid(model: torch.nn.Module) -> bool:
    '''Whether ``model`` holds the Mamba mixer of a hybrid (attention or MLP layers beside the Mamba layers).'''
    return _holds_hybrid_mixer(model.named_modules())


def _holds_hybrid_mixer(named_modules: Iterable[Tuple[str, torch.nn.Module]]) -> bool:
    types = mixer_types(hybrid_only=True)
    return any(type(module) in types for _, module in named_modules)


def _unsupported_mamba_ssm_parts(named_modules: List[Tuple[str, torch.nn.Module]]) -> List[str]:
    '''mamba-ssm blocks and backbones (among a model's ``named_modules``) whose forward the canonizers do not
    reproduce.'''
    block_type = module_class('mamba_ssm.modules.block', 'Block')
    if block_type is None:
        return []
    mixers = mixer_types()
    rms_norm = module_class('mamba_ssm.ops.triton.layer_norm', 'RMSNorm')
    backbone = module_class('mamba_ssm.models.mixer_seq_simple', 'MixerModel')
    mamba2_type = module_class('mamba_ssm.modules.mamba2', 'Mamba2')
    found = []
    for name, module in named_modules:
        if isinstance(module, block_type):
            if type(module.mixer) not in mixers:
                found.append(f'Block with mixer {type(module.mixer).__name__} at \'{name}\'')
            if module.mlp is not None:
                found.append(f'Block with an MLP at \'{name}\'')
            if not isinstance(module.norm, rms_norm):
                found.append(f'Block with {type(module.norm).__name__} at \'{name}\'')
        if isinstance(module, mamba2_type) and module.process_group is not None:
            found.append(f'tensor-parallel Mamba2 at \'{name}\'')
        if isinstance(module, backbone) and not isinstance(module.norm_f, rms_norm):
            found.append(f'MixerModel with {type(module.norm_f).__name__} at \'{name}\'')
    return found


def check_supported(model: torch.nn.Module, walk: Optional[Sequence[Tuple[str, torch.nn.Module]]] = None) -> List[str]:
    '''Check that MambaLRP can explain ``model``; return the names of its supported mixers.

    Parameters
    ----------
    model : :py:obj:`torch.nn.Module`
        The model to explain.
    walk : sequence of (str, :py:obj:`torch.nn.Module`), optional
        ``model``'s modules as :py:func:`walk_outside_mixers` lists them, where the caller has made that walk
        already (:py:class:`~zennit_mamba.MambaComposite` walks a model once per registration); made here if None.

    Returns
    -------
    list[str]
        Qualified names of the supported mixers found.

    Raises
    ------
    UnsupportedModelError
        If the model holds a Mamba-like mixer that is not supported, or no supported mixer at all.
    RuntimeError
        If a MambaLRP canonizer is already applied to the model (another composite is registered).

    Examples
    --------
    >>> check_supported(torch.nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    zennit_mamba.support.UnsupportedModelError: MambaLRP found no supported Mamba mixer in Linear ...
    '''
    if hasattr(model, '_orig_mod'):
        raise UnsupportedModelError(
            'This model is compiled (torch.compile): its compiled graph would bypass the canonized forwards and '
            'hooks. Pass the original module, model._orig_mod, and compile nothing while explaining.'
        )
    if isinstance(model, torch.nn.DataParallel):
        raise UnsupportedModelError(
            'DataParallel copies the model to each device on every call, without the canonized forwards and hooks. '
            'Explain model.module on one device (split the batch yourself for several devices).'
        )
    # one walk over the model for every check (it runs on every explanation)
    named_modules = list(walk_outside_mixers(model)) if walk is None else walk
    canonized = [name for name, module in named_modules if is_canonized(module)]
    if canonized:
        raise RuntimeError(
            f'A MambaLRP composite is already registered on this model (canonized module \'{canonized[0]}\'); '
            f'leave its context or call its remove() before registering another.'
        )
    supported_types = mixer_types()
    supported, unsupported = [], _unsupported_mamba_ssm_parts(named_modules)
    if _holds_hybrid_mixer(named_modules):
        unsupported += layers.unsupported_parts(model, supported_types)
    uncalled = _uncalled_children()
    for name, module in named_modules:
        if type(module) in supported_types:
            supported.append(name)
            unsupported += [f'a forward pre-hook on {type(module).__name__}.{child} at \'{name}\' (the original '
                            f'forward reads its weights without calling it, so the hook does not act on the model, but '
                            f'would under MambaLRP, which calls it, and may change the module: remove it while '
                            f'explaining)'
                            for child in uncalled.get(type(module), ()) if _pre_hooked(getattr(module, child, None))]
        elif isinstance(module, supported_types):
            # a subclass may compute something else than the forward the canonizer replaces
            unsupported.append(f'{type(module).__name__} at \'{name}\' (a subclass of {_base_mixer(module).__name__})')
        elif _is_mamba_like(type(module).__name__):
            unsupported.append(f'{type(module).__name__} at \'{name}\'')
    if unsupported:
        raise UnsupportedModelError(
            f'MambaLRP does not support {", ".join(unsupported)}; relevance through it would be wrong. '
            f'Supported: {_supported_listing()}.'
        )
    if not supported:
        found = Counter(type(module).__name__ for module in model.modules())
        listing = ', '.join(f'{name} x{count}' if count > 1 else name for name, count in found.items())
        raise UnsupportedModelError(
            f'MambaLRP found no supported Mamba mixer in {type(model).__name__} (it contains: {listing}). '
            f'Supported: {_supported_listing()}.'
        )
    return supported


def check_recompute(model: torch.nn.Module) -> None:
    '''Refuse ``recompute=True`` on a model whose weights accelerate offloads: the backward pass would recompute
    the mixers after the hooks have moved their weights out again.

    Raises
    ------
    ValueError
        Naming the first offloaded module and the two ways out.
    '''
    offloaded = next((name for name, module in model.named_modules() if offloading_hooks(module)), None)
    if offloaded is not None:
        raise ValueError(
            f'recompute=True cannot be used on a model whose weights accelerate offloads (module \'{offloaded}\' '
            f'moves its weights in for each call only), since the backward pass recomputes the mixers without them. '
            f'Use MambaComposite(recompute=False), or dispatch the model onto devices that hold its weights.'
        )

