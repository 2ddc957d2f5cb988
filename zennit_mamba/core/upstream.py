'''What MambaLRP assumes of the code it replaces, checked before anything is replaced.

A canonized forward stands in for an upstream ``forward`` (transformers, mamba-ssm). If upstream renames, adds or
removes a parameter, a caller's argument could land in the canonized forward's ``**kwargs`` or nowhere, and the
explanation would silently describe another computation (transformers 5.24 renamed ``cache_params`` to ``cache``).
So registration compares the two signatures first and refuses with :py:class:`UpstreamChangedError`.
'''
import functools
import importlib.metadata
import inspect
from typing import Callable, Collection, Tuple

import torch

#: the upstream releases this version of MambaLRP was tested with (kept equal to pyproject.toml's bounds)
TESTED_VERSIONS = 'transformers >=5.24,<5.25; mamba-ssm 2.3.2; zennit 0.5.1 and 1.0.0'

Parameter = Tuple[str, str]


#: keyword arguments that hybrid models pass to every layer and that neither the Mamba path nor MambaLRP's attention
#: reads (transformers' own mixers hand them to kernels that ignore them): the only ones accepted and not used
LAYER_KEYWORDS = frozenset({
    'position_embeddings', 'position_ids', 'cache_position', 'output_attentions', 'output_router_logits', 'use_cache',
})


class UpstreamChangedError(TypeError):
    '''An upstream module's ``forward`` no longer takes the parameters MambaLRP's canonized forward handles.'''


def forward_parameters(function: Callable) -> Tuple[Parameter, ...]:
    '''``(name, kind)`` of each parameter of a forward function after ``self``; ``*args`` and ``**kwargs`` are named
    by their kind alone (``'*'``, ``'**'``), since their names carry no meaning.

    Decorators that keep ``__wrapped__`` (transformers' ``deprecate_kwarg``) are looked through, as Python does for
    calls.

    Examples
    --------
    >>> forward_parameters(lambda self, hidden_states, cache=None, **kwargs: None)
    (('hidden_states', 'positional or keyword'), ('cache', 'positional or keyword'), ('**', 'variadic keyword'))
    '''
    parameters = list(inspect.signature(function).parameters.values())[1:]
    described = []
    for parameter in parameters:
        kind = parameter.kind.description
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            described.append(('*', kind))
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            described.append(('**', kind))
        else:
            described.append((parameter.name, kind))
    return tuple(described)


def installed_versions(module_type: type) -> str:
    '''The installed version of the distribution that defines ``module_type`` or, for a class defined elsewhere,
    its nearest base class (and torch's version), for error messages.'''
    for cls in module_type.__mro__:
        package = cls.__module__.split('.')[0]
        distribution = {'mamba_ssm': 'mamba-ssm'}.get(package, package)
        try:
            return f'{distribution} {importlib.metadata.version(distribution)}, torch {torch.__version__}'
        except importlib.metadata.PackageNotFoundError:
            continue
    return f'torch {torch.__version__}'


def check_forward_signature(
    module_type: type, canonized_forward: Callable, added: Collection[str] = (),
) -> None:
    '''Raise :py:class:`UpstreamChangedError` unless ``module_type.forward`` takes exactly the parameters of
    ``canonized_forward``, apart from the parameters in ``added`` that only the canonized forward takes.

    Names, order and kinds must agree; defaults may differ.

    Parameters
    ----------
    module_type : type
        The upstream module class whose forward is replaced.
    canonized_forward : callable
        The replacement, a function ``(module, ...)``.
    added : collection of str, optional
        Parameters the canonized forward adds on purpose (e.g. ``inputs_embeds`` of mamba-ssm's backbone).

    Examples
    --------
    >>> class Upstream(torch.nn.Module):
    ...     def forward(self, hidden_states, cache=None):
    ...         return hidden_states
    >>> check_forward_signature(Upstream, lambda self, hidden_states, cache=None: hidden_states)
    >>> check_forward_signature(Upstream, lambda self, hidden_states, cache_params=None: hidden_states)
    Traceback (most recent call last):
    ...
    zennit_mamba.core.upstream.UpstreamChangedError: ...Upstream.forward takes a parameter 'cache' that MambaLRP's...
    '''
    upstream = forward_parameters(module_type.forward)
    canonized = tuple(parameter for parameter in forward_parameters(canonized_forward) if parameter[0] not in added)
    if upstream == canonized:
        return
    upstream_names, canonized_names = [name for name, _ in upstream], [name for name, _ in canonized]
    new = [name for name in upstream_names if name not in canonized_names]
    gone = [name for name in canonized_names if name not in upstream_names]
    differences = [f'takes a parameter {name!r} that MambaLRP\'s canonized forward does not handle' for name in new]
    differences += [f'no longer takes the parameter {name!r}' for name in gone]
    if not differences:
        differences = ['orders or kinds its parameters differently']
    raise UpstreamChangedError(
        f'{module_type.__module__}.{module_type.__qualname__}.forward {"; it ".join(differences)}. '
        f'Upstream: ({_describe(upstream)}); MambaLRP: ({_describe(canonized)}). Installed: '
        f'{installed_versions(module_type)}. Explaining through it could drop an argument silently, so MambaLRP '
        f'refuses to register; install a tested release ({TESTED_VERSIONS}) or a mamba-lrp that supports this one.'
    )


def _describe(parameters: Tuple[Parameter, ...]) -> str:
    return ', '.join(name for name, _ in parameters)


class _Probe(torch.nn.Module):
    '''A module whose forward raises where asked, to see which forward hooks torch runs.'''

    def forward(self, raises: bool) -> None:
        if raises:
            raise LookupError('probe')


def _hook_added_during_the_call_runs(raises: bool) -> bool:
    ran = []

    def register_during_the_call(module, args):
        module.register_forward_hook(lambda *_: ran.append(True), always_call=True)

    probe = _Probe()
    probe.register_forward_pre_hook(register_during_the_call)
    try:
        probe(raises)
    except LookupError:
        pass
    return ran == [True]


@functools.lru_cache(maxsize=None)
def check_hooks_added_during_a_call() -> None:
    '''Raise :py:class:`UpstreamChangedError` unless torch runs a forward hook that a forward pre-hook of the same
    call registered, after the forward and also when the forward raises (once per process).

    :py:class:`~zennit_mamba.core.hooks.ExplainedModel` registers the hook where relevance enters that way, on the
    module of the outermost call only; a torch that read the hooks before the forward would leave the output unconverted
    and the explanation a plain gradient.
    '''
    if not (_hook_added_during_the_call_runs(raises=False) and _hook_added_during_the_call_runs(raises=True)):
        raise UpstreamChangedError(
            f'torch {torch.__version__} does not run a forward hook registered by a forward pre-hook of the same call '
            '(after the forward, or when it raises); MambaLRP registers the hook where relevance enters that way, '
            'so it refuses to register. Install a torch it was tested with (2.11, 2.14) or a mamba-lrp that supports '
            'this one.'
        )


def refuse_keywords(module: torch.nn.Module, kwargs: dict) -> None:
    '''Raise for keyword arguments that MambaLRP's forward of ``module`` would otherwise have to drop: all but
    :py:data:`LAYER_KEYWORDS` and those whose value is None (nothing to honour).

    Examples
    --------
    >>> refuse_keywords(torch.nn.Identity(), {'position_ids': torch.arange(3), 'sliding_window': None})
    >>> refuse_keywords(torch.nn.Identity(), {'seq_idx': torch.zeros(1, 3)})
    Traceback (most recent call last):
    ...
    TypeError: MambaLRP's forward of Identity got keyword arguments ['seq_idx'], which the original ...
    '''
    unknown = sorted(key for key, value in kwargs.items() if key not in LAYER_KEYWORDS and value is not None)
    if unknown:
        raise TypeError(
            f'MambaLRP\'s forward of {type(module).__name__} got keyword arguments {unknown}, which the original '
            f'forward passes to its kernels (e.g. packed-sequence indices, a sliding window). MambaLRP explains one '
            f'sequence per batch row and does not drop arguments silently: call the model without them (pad the '
            f'sequences into separate rows and pass attention_mask).'
        )
