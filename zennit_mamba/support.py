'''The table of supported families, built from the family files, and the check that refuses models MambaLRP cannot
explain.

Each file of :py:mod:`zennit_mamba.families` declares one :py:class:`~zennit_mamba.core.family.Family`; the table
(:py:func:`table`) collects them, with the treatment of torch's and transformers' generic layers
(:data:`~zennit_mamba.core.layers.GENERIC`). The canonizer, the composite's rules, the support check, its error text
and the README's support table (:py:func:`support_table`) all read it: a family is added by adding its file.
'''
import functools
import importlib
import pkgutil
import re
from collections import Counter
from typing import Dict, FrozenSet, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from zennit_mamba import families
from zennit_mamba.core.family import Canonized, Family, Treatment, resolve
from zennit_mamba.core.instance import is_canonized, replaced_forward
from zennit_mamba.core.layers import ACTIVATION, GENERIC, INSIDE_MIXER
from zennit_mamba.core.offload import offloading_hooks
from zennit_mamba.core.walk import modules_parents_first


def _discover() -> Tuple[Family, ...]:
    '''The ``FAMILY`` of every file of :py:mod:`zennit_mamba.families`, by the file's name.'''
    found = []
    for module in sorted(pkgutil.iter_modules(families.__path__), key=lambda module: module.name):
        family = getattr(importlib.import_module(f'{families.__name__}.{module.name}'), 'FAMILY', None)
        if family is not None:
            found.append(family)
    return tuple(found)


#: the supported families, one per file of :py:mod:`zennit_mamba.families`
FAMILIES: Tuple[Family, ...] = _discover()

#: the attribute names of the mixers' linear and convolution layers, which ``MambaComposite(gamma=<float>)`` selects:
#: Mamba's (Vim's backward branch has its own convolution and selection projections) and those the family files
#: declare (:py:attr:`~zennit_mamba.core.family.Canonized.projections`)
PROJECTIONS: Tuple[str, ...] = tuple(dict.fromkeys(
    ('in_proj', 'conv1d', 'x_proj', 'dt_proj', 'out_proj', 'conv1d_b', 'x_proj_b', 'dt_proj_b')
    + tuple(name for family in FAMILIES for entry in family.canonized.values() for name in entry.projections)))


class Table(NamedTuple):
    '''The supported families' classes, resolved: what MambaLRP does with a module of each class.'''
    canonized: Dict[type, Canonized]  #: classes with a canonized forward
    mixers: Tuple[type, ...]  #: the mixer classes among them
    hybrid_mixers: Tuple[type, ...]  #: the mixers of hybrid families
    treatments: Dict[type, Treatment]  #: every other known class (the families' and the generic layers)
    library_modules: FrozenSet[str]  #: the modules whose every class a family file must name


@functools.lru_cache(maxsize=None)
def table() -> Table:
    '''The table, built once from :data:`FAMILIES` (classes the installed libraries lack are left out).'''
    canonized, treatments, mixers, hybrid_mixers = {}, dict(GENERIC), [], []
    for family in FAMILIES:
        for path, entry in family.canonized.items():
            kind = resolve(path)
            if kind is not None:
                canonized[kind] = entry
                if entry.mixer:
                    mixers.append(kind)
                    if family.hybrid:
                        hybrid_mixers.append(kind)
        for path, treatment in family.layers.items():
            kind = resolve(path)
            if kind is not None:
                treatments[kind] = treatment
    modules = frozenset(module for family in FAMILIES for module in family.library_modules)
    return Table(canonized, tuple(mixers), tuple(hybrid_mixers), treatments, modules)


def mixer_types(hybrid_only: bool = False) -> Tuple[type, ...]:
    '''The installed supported mixer classes (of the hybrid families only, if asked).'''
    return table().hybrid_mixers if hybrid_only else table().mixers


def treatment_of(module: torch.nn.Module) -> Optional[Treatment]:
    '''The treatment of ``module``'s exact class, or None where no family names it (a class of the user's own).'''
    return table().treatments.get(type(module))


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
    | Bamba | transformers | `BambaMixer` | attention, gated MLPs |
    '''
    rows = ['| family | library | mixer | layers beside the mixers |', '|---|---|---|---|']
    for family in FAMILIES:
        mixers = ', '.join(f'`{path.rpartition(".")[2]}`' for path in family.mixers())
        rows.append(f'| {family.name} | {family.library} | {mixers} | {family.beside} |')
    return '\n'.join(rows)


def _supported_listing() -> str:
    return ', '.join(f'{family.library} {", ".join(path.rpartition(".")[2] for path in family.mixers())} '
                     f'({family.name})' for family in FAMILIES)


class UnsupportedModelError(ValueError):
    '''The model holds no Mamba mixer MambaLRP supports, or a module it cannot explain.'''


def is_hybrid(model: torch.nn.Module) -> bool:
    '''Whether ``model`` holds the mixer of a hybrid family (attention or MLP layers beside the mixers).'''
    hybrid = mixer_types(hybrid_only=True)
    return any(type(module) in hybrid for module in model.modules())


# a class of the user's own that looks like a state-space mixer: explaining through it as a container would be
# silently wrong (the classes of the supported libraries are known by the table instead)
_MAMBA_LIKE = re.compile(r'.*(Mamba|SSM|Bamba|H1).*Mixer|Mamba\d*|.*MambaLayer|Mamba\d*Simple', re.IGNORECASE)


def check_supported(model: torch.nn.Module, walk: Optional[Sequence[Tuple[str, torch.nn.Module]]] = None) -> List[str]:
    '''Check that MambaLRP can explain ``model``; return the names of its supported mixers.

    Every module is looked up by its exact class in the table: a mixer (whose children the canonized forward must
    compute as the original does), a class a family names (whose treatment may find a layout it does not know), a
    class of a supported family's library that no family names (refused: a layer MambaLRP does not know), or a class
    of the user's own, which is taken as a composition of its children, except where it looks like a mixer, or, in a
    hybrid, where it is a layer without a treatment or an MLP of unknown gating.

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
        Listing every module MambaLRP cannot explain, or where there is no supported mixer at all.
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
    known = table()
    hybrid = any(type(module) in known.hybrid_mixers for _, module in named_modules)
    supported, unsupported = [], []
    for name, module in named_modules:
        kind = type(module)
        entry = known.canonized.get(kind)
        if entry is not None:
            if entry.mixer:
                supported.append(name)
                unsupported += _mixer_problems(name, module, entry)
            problem = None if entry.check is None else entry.check(module)
        elif isinstance(module, known.mixers):
            # a subclass may compute something else than the forward the canonizer replaces
            base = next(mixer for mixer in known.mixers if isinstance(module, mixer))
            problem = f'a subclass of {base.__name__}'
        elif kind in known.treatments:
            problem = known.treatments[kind].problem(module)
        elif kind.__module__ in known.library_modules:
            problem = 'a class of its library that MambaLRP\'s layer map does not know'
        elif _MAMBA_LIKE.fullmatch(kind.__name__):
            problem = 'a Mamba-like mixer MambaLRP does not know'
        elif hybrid:
            problem = _unknown_in_hybrid(module)
        else:
            problem = None
        if problem is not None:
            unsupported.append(f'{kind.__name__} at \'{name}\' ({problem})')
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


def _unknown_in_hybrid(module: torch.nn.Module) -> Optional[str]:
    '''In a hybrid, a class of the user's own: a layer without a treatment, or an MLP whose gating is unknown.'''
    children = [child for child in module._modules.values() if child is not None]
    if not children:
        return 'a layer without a MambaLRP treatment'
    if any(treatment_of(child) is ACTIVATION for child in children):
        return 'an MLP whose gating MambaLRP does not know'
    return None


def _mixer_problems(name: str, mixer: torch.nn.Module, entry: Canonized) -> List[str]:
    '''What a mixer's children would make the canonized forward compute otherwise than the original: a child the
    original reads without calling it (:py:attr:`~zennit_mamba.core.family.Canonized.uncalled`) that is not the
    plain layer or carries a pre-hook, and a module the canonized forward computes from its parameters that another
    forward or a hook would change.'''
    problems = []
    for child_name, child in mixer._modules.items():
        where = f'{type(child).__name__} at \'{name}.{child_name}\''
        if child_name in entry.uncalled:
            how = ('not the plain layer' if type(child) not in (torch.nn.Conv1d, torch.nn.Linear)
                   else replaced_forward(child) or ('a forward pre-hook' if child._forward_pre_hooks else None))
            if how is not None:
                problems.append(f'{where} ({how}: the original forward reads its weights without calling it, so this '
                                f'does not act on the model, but would under MambaLRP, which calls it; remove it while '
                                f'explaining)')
        elif treatment_of(child) is INSIDE_MIXER:
            problem = INSIDE_MIXER.problem(child)
            if problem is not None:
                problems.append(f'{where} ({problem})')
    return problems


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
