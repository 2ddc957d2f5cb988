'''Which Mamba implementations MambaLRP supports, and the errors for models it cannot explain.'''
import re
from collections import Counter
from typing import Collection, List, Optional, Tuple

import torch

from ._optional import mamba_ssm_modules
from . import hybrid, transformers_mamba
from .canonizers import TRANSFORMERS_MODULES, canonized_modules, transformers_class

SUPPORTED_MIXERS = (
    'transformers MambaMixer, FalconMambaMixer and Mamba2Mixer (Mamba, FalconMamba and Mamba-2 models), the Mamba '
    'layers of the hybrids Jamba, Bamba, NemotronH, GraniteMoeHybrid, FalconH1 and Zamba2, and mamba-ssm Mamba '
    '(mamba_simple) and Mamba2 (in blocks without MLP or attention and with RMSNorm) where mamba-ssm is installed'
)
#: transformers model packages whose Mamba mixers sit between attention and MLP layers
HYBRID_PACKAGES = frozenset({'jamba', 'bamba', 'nemotron_h', 'granitemoehybrid', 'falcon_h1', 'zamba2'})

# Mamba-like mixers whose forward the canonizers do not know: explaining through them would be silently wrong
_MAMBA_LIKE = re.compile(r'.*(Mamba|SSM|Bamba|H1).*Mixer|Mamba\d*|.*MambaLayer|Mamba\d*Simple', re.IGNORECASE)


class UnsupportedModelError(ValueError):
    '''The model holds no Mamba mixer MambaLRP supports, or a Mamba-like mixer it does not support.'''


def _transformers_mixer_types(packages: Optional[Collection[str]] = None) -> Tuple[type, ...]:
    found = []
    for (package, name), (forward, _) in TRANSFORMERS_MODULES.items():
        if forward is not transformers_mamba.block_forward and (packages is None or package in packages):
            module_type = transformers_class(package, name)
            if module_type is not None:
                found.append(module_type)
    return tuple(found)


def _supported_mixer_types() -> Tuple[type, ...]:
    mamba_ssm = mamba_ssm_modules()
    return _transformers_mixer_types() + ((mamba_ssm.Mamba, mamba_ssm.Mamba2) if mamba_ssm is not None else ())


def is_hybrid(model: torch.nn.Module) -> bool:
    '''Whether ``model`` holds the Mamba mixer of a hybrid (attention or MLP layers beside the Mamba layers).'''
    hybrid_types = _transformers_mixer_types(HYBRID_PACKAGES)
    return any(type(module) in hybrid_types for module in model.modules())


def supported_norm_types() -> Tuple[type, ...]:
    '''RMSNorm classes of the Mamba-only models that the LN-rule applies to.'''
    norms = tuple(filter(None, (
        transformers_class('mamba', 'MambaRMSNorm'),
        transformers_class('falcon_mamba', 'FalconMambaRMSNorm'),
        transformers_class('mamba2', 'Mamba2RMSNorm'),
    )))
    mamba_ssm = mamba_ssm_modules()
    return norms + ((mamba_ssm.RMSNorm,) if mamba_ssm is not None else ())


def _unsupported_mamba_ssm_parts(model: torch.nn.Module) -> List[str]:
    '''mamba-ssm blocks and backbones whose forward the canonizers do not reproduce.'''
    modules = mamba_ssm_modules()
    if modules is None:
        return []
    found = []
    for name, module in model.named_modules():
        if isinstance(module, modules.Block):
            if type(module.mixer) not in (modules.Mamba, modules.Mamba2):
                found.append(f'Block with mixer {type(module.mixer).__name__} at \'{name}\'')
            if module.mlp is not None:
                found.append(f'Block with an MLP at \'{name}\'')
            if not isinstance(module.norm, modules.RMSNorm):
                found.append(f'Block with {type(module.norm).__name__} at \'{name}\'')
        if isinstance(module, modules.Mamba2) and module.process_group is not None:
            found.append(f'tensor-parallel Mamba2 at \'{name}\'')
        if isinstance(module, modules.MixerModel) and not isinstance(module.norm_f, modules.RMSNorm):
            found.append(f'MixerModel with {type(module.norm_f).__name__} at \'{name}\'')
    return found


def check_supported(model: torch.nn.Module) -> List[str]:
    '''Check that MambaLRP can explain ``model``; return the names of its supported mixers.

    Parameters
    ----------
    model : :py:obj:`torch.nn.Module`
        The model to explain.

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
    canonized = canonized_modules(model)
    if canonized:
        raise RuntimeError(
            f'A MambaLRP composite is already registered on this model (canonized module '
            f'\'{canonized[0][0]}\'); leave its context or call its remove() before registering another.'
        )
    supported_types = _supported_mixer_types()
    supported, unsupported = [], _unsupported_mamba_ssm_parts(model)
    if is_hybrid(model):
        unsupported += hybrid.unsupported_parts(model, supported_types)
    for name, module in model.named_modules():
        if type(module) in supported_types:
            supported.append(name)
        elif _MAMBA_LIKE.fullmatch(type(module).__name__):
            unsupported.append(f'{type(module).__name__} at \'{name}\'')
    if unsupported:
        raise UnsupportedModelError(
            f'MambaLRP does not support {", ".join(unsupported)}; relevance through it would be wrong. '
            f'Supported: {SUPPORTED_MIXERS}.'
        )
    if not supported:
        found = Counter(type(module).__name__ for module in model.modules())
        listing = ', '.join(f'{name} x{count}' if count > 1 else name for name, count in found.items())
        raise UnsupportedModelError(
            f'MambaLRP found no supported Mamba mixer in {type(model).__name__} (it contains: {listing}). '
            f'Supported: {SUPPORTED_MIXERS}.'
        )
    return supported
