'''The MambaLRP composite: the canonizer that binds the rule set into the Mamba mixers, and the map from module types
to rules, as in Zennit's own composites.'''
import difflib
import inspect
import threading
import weakref
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Collection, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from zennit.canonizers import Canonizer
from zennit.composites import register_composite
from zennit.core import Composite, Hook
from zennit.rules import Gamma
from zennit.types import Convolution, Linear

from zennit_mamba.canonizers import ForwardCanonizer, MambaCanonizer
from zennit_mamba.core.hooks import ExplainedModel, ZennitRule
from zennit_mamba.core.instance import InstanceAttributes
from zennit_mamba.core.layers import INSIDE_MIXER
from zennit_mamba.core.ruleset import RuleSet
from zennit_mamba.rules import MAMBA_LRP_RULES, Rule
from zennit_mamba.support import (
    PROJECTIONS, check_recompute, check_supported, mixer_types, table, treatment_of, walk_outside_mixers,
)


GammaSpec = Union[None, float, Mapping[Union[str, type], float]]
LayerMap = List[Tuple[Tuple[type, ...], Optional[Hook]]]
NamedModule = Tuple[str, torch.nn.Module]

#: the models a MambaComposite is registered on, and the lock that makes registering one check-and-claim
_REGISTERED: 'weakref.WeakKeyDictionary[torch.nn.Module, MambaComposite]' = weakref.WeakKeyDictionary()
_REGISTRATION = threading.Lock()


def _refuse_copy(*args, **kwargs):
    raise TypeError(
        'This model is registered with a MambaComposite: a deepcopy or pickle of it now would keep the composite\'s '
        'hooks and canonized forwards. Leave the composite\'s context (or call its remove()) first.'
    )


#: set on the model and its canonized modules while registered (copy and pickle look them up on the instance)
_COPY_GUARDS = {'__deepcopy__': _refuse_copy, '__reduce_ex__': _refuse_copy}


def _takes_token_ids_first(module: torch.nn.Module) -> bool:
    '''Whether ``module``'s forward takes token ids as its first argument (a language model's).'''
    try:
        first = next(iter(inspect.signature(module.forward).parameters), None)
    except (TypeError, ValueError):
        return False
    return first == 'input_ids'


def _refuse_embeddings_as_token_ids(module: torch.nn.Module, args: tuple) -> None:
    '''A forward pre-hook: float values passed where the model takes token ids (as Zennit's attributors pass their
    input), which its embedding layer would reject with an error about index types.'''
    if args and torch.is_tensor(args[0]) and torch.is_floating_point(args[0]):
        raise TypeError(
            f'{type(module).__name__} takes token ids first, but was called with a float tensor, as Zennit\'s '
            f'attributors and Captum\'s methods call a model with the explained input: pass embeddings by keyword, '
            f'model(inputs_embeds=embeddings), or wrap the model so that it takes them and returns the logits: '
            f'captum_mamba.ExplainedLogits(model) (e.g. zennit.attribution.Gradient(ExplainedLogits(model), '
            f'MambaComposite())).'
        )


@register_composite('mamba_lrp')
class MambaComposite(Composite):
    '''MambaLRP (Rezaei Jafari et al., NeurIPS 2024) as a Zennit composite.

    Inside its context, the gradient reaching the model input is the relevance, given the output relevance as the
    output gradient (e.g. the target logit at one position and zero elsewhere), as for every Zennit composite.

    How it works: :py:class:`~zennit_mamba.canonizers.MambaCanonizer` replaces each Mamba mixer's forward by one
    that computes through a :py:class:`~zennit_mamba.core.ruleset.RuleSet` (SiLU identity, detached selection, half
    rule, LN-rule in the gated norm); the module map puts the same rules on the model's other modules (RMS norms,
    activations, and in hybrids attention, routers, gated MLPs and experts), Zennit rules from ``gamma`` and
    ``layer_map`` on the layers they select (:py:class:`~zennit_mamba.core.hooks.ZennitRule`), and
    :py:class:`~zennit_mamba.core.hooks.ExplainedModel` on the root, which turns relevance into gradient where the
    outermost call's output is and back at its input. The whole explanation is then one gradient.

    Parameters
    ----------
    epsilon : float, optional
        Stabiliser of the division by the explained output (and of ``gamma``'s Gamma rules).
    gamma : float or mapping, optional
        The generalised gamma rule on projections instead of LRP-0. A float applies it to all projections of the
        mixers (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``out_proj``, and Vim's ``conv1d_b``, ``x_proj_b``,
        ``dt_proj_b``, and those each family file declares: RecurrentGemma's ``linear_x``, ``linear_y``, ``conv_1d``,
        ``linear_out``; RWKV's ``key``, ``value``, ``receptance``, ``output``; xLSTM's ``v``,
        ``qkv_opreact``). A mapping selects
        linear and
        convolution layers by module type, by attribute name (``'out_proj'``) or by a pattern on the qualified name
        (``'backbone.layers.0.*'``), each with its own gamma. A key that selects no layer, keys that give one layer
        different values, and a key that selects a module holding layers it leaves unselected (a wrapper) are
        refused when registering. A layer whose weight is computed (parametrizations, weight norm) takes the rule on
        the weight it computes.
    rules : collection of str, optional
        The MambaLRP rules that are on, a subset of ``{'silu', 'ssm', 'gate', 'norm', 'attention'}`` (all by
        default). A rule switched off leaves its operation's gradient as it is: ``rules={'norm'}`` is the "LRP
        (LN-rule)" baseline, ``rules=()`` gradient x input, and dropping one rule gives the ablations of the paper.
    layer_map : list of (types, Hook), optional
        Rules for further module types, checked before all others: a Zennit rule (e.g.
        ``[(torch.nn.Linear, ZPlus())]``), a MambaLRP rule, or None for the plain gradient. An entry that selects no
        module is refused. A Zennit rule that gives zero inputs relevance (``Flat``, ``WSquare``, ``ZBox``) is exact
        on a layer that takes the explained input itself and refused inside the model.
    canonizers : list of Canonizer, optional
        Further canonizers, applied after :py:class:`~zennit_mamba.canonizers.MambaCanonizer`.
    recompute : bool, optional
        Recompute each mixer in the backward pass instead of storing its activations, for long inputs.
    delta_relevance : str, optional
        Where the delta-rule layers (Gated DeltaNet, Kimi Delta Attention) pass relevance: ``'values'`` (the default,
        MambaLRP's principle: queries, keys, decays and write strengths select and are held constant) or
        ``'uniform'`` (as AttnLRP treats attention: also through the queries and the written keys, the uniform rule
        on the read-out ``S^T q`` and the write ``k v^T``; computed token by token).
    gate_relevance : str, optional
        How a mixer's output gate ``y * act(z)`` passes relevance: ``'half'`` (the default, the paper's half rule) or
        ``'value'`` (the gate held constant, all relevance through ``y``; :py:class:`~zennit_mamba.rules.HeldGate`).
        Feed-forward products (SwiGLU) keep the half rule either way.

    Examples
    --------
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> model = MambaForCausalLM(MambaConfig(vocab_size=16, hidden_size=8, state_size=4, num_hidden_layers=1))
    >>> embeddings = model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach().requires_grad_()
    >>> with MambaComposite().context(model) as modified:
    ...     logits = modified(inputs_embeds=embeddings, use_cache=False).logits
    ...     target = logits[0, -1].argmax()
    ...     output_relevance = torch.zeros_like(logits)
    ...     output_relevance[0, -1, target] = logits[0, -1, target]
    ...     relevance, = torch.autograd.grad(logits, embeddings, output_relevance)
    >>> bool(torch.isclose(relevance.sum(), logits[0, -1, target], rtol=1e-3))
    True
    '''

    def __init__(
        self,
        epsilon: float = 1e-6,
        gamma: GammaSpec = None,
        rules: Collection[str] = MAMBA_LRP_RULES,
        layer_map: Optional[LayerMap] = None,
        canonizers: Optional[List[Canonizer]] = None,
        recompute: bool = False,
        delta_relevance: str = 'values',
        gate_relevance: str = 'half',
    ):
        self.rule_set = RuleSet(rules, recompute, delta_relevance, gate_relevance)
        if not 0 < epsilon < float('inf'):
            raise ValueError(f'epsilon must be positive and finite (it stabilises a division), got {epsilon!r}; use '
                             f'1e-12 for an almost exact LRP-0.')
        #: a float gamma applies to the projections of the mixers, whichever of them the model has
        self._gamma_everywhere = isinstance(gamma, (int, float)) and not isinstance(gamma, bool)
        if self._gamma_everywhere:
            gamma = {name: float(gamma) for name in PROJECTIONS}
        _check_gamma(gamma)
        _check_layer_map(layer_map)
        self.epsilon = epsilon
        self.gamma = dict(gamma or {})
        self.layer_map = list(layer_map or [])
        #: the explained model's ends of the current registration (None while not registered)
        self.ends: Optional[ExplainedModel] = None
        super().__init__(module_map=self.mapping, canonizers=[MambaCanonizer(self.rule_set)] + list(canonizers or []))

    def register(self, module: torch.nn.Module) -> None:
        '''Canonize ``module`` and attach the rules; on any error, ``module`` is left as it was.

        One composite explains one model at a time, and a model takes one composite at a time: registering this
        composite again before :py:meth:`remove`, or registering any composite on a model that has one, raises
        (also from another thread) instead of silently taking the rules away from the first registration.
        '''
        with _REGISTRATION:
            if self in _REGISTERED.values():
                raise RuntimeError(
                    'This MambaComposite is already registered on a model; leave its context (or call remove()) '
                    'before registering it again, or use one MambaComposite per model.'
                )
            if module in _REGISTERED:
                raise RuntimeError(
                    'A MambaLRP composite is already registered on this model (possibly in another thread); leave '
                    'its context or call its remove() before registering another.'
                )
            _REGISTERED[module] = self
        try:
            # one walk over the model for the support check, the canonizer, the rules and the explained model's ends
            # (registration is host time on every explanation): the modules inside the mixers are left out, which the
            # canonized forwards compute
            walk = list(walk_outside_mixers(module))
            check_supported(module, walk)
            if self.rule_set.recompute:
                check_recompute(module)
            walk = self._attach(module, walk)
            # last, so that its conversions wrap every other hook of the module called outermost
            ends = ExplainedModel(self.epsilon, opaque=mixer_types())
            ends.switch = self.rule_set.switch
            self.ends = ends
            self.hook_refs.add(ends)
            self.handles.append(ends.register(module, tracked=[child for _, child in walk]))
            # the canonized modules from the canonizers' instances (zennit keeps them among the handles), not from
            # another walk over the model
            canonized = [instance.attributes.module for instance in self.handles
                         if isinstance(instance, ForwardCanonizer) and instance.attributes is not None]
            # the root once, also where it is itself canonized (a bare mixer)
            self.handles.extend(InstanceAttributes(guarded, _COPY_GUARDS)
                                for guarded in [module] + [child for child in canonized if child is not module])
            if _takes_token_ids_first(module):
                self.handles.append(module.register_forward_pre_hook(_refuse_embeddings_as_token_ids))
        except BaseException:
            self.remove()
            raise

    def _attach(self, module: torch.nn.Module, walk: List[NamedModule]) -> List[NamedModule]:
        '''Zennit's ``Composite.register`` on the walk made once: the canonizers in turn, then a copy of the module
        map's hook on each module it maps; returns the walk, made again where a further canonizer may have changed
        the modules. The modules inside the mixers are mapped (walked again) only where a rule may select them:
        ``gamma``, ``layer_map`` or a module map other than :py:meth:`mapping`.'''
        for canonizer in self.canonizers:
            if isinstance(canonizer, MambaCanonizer):
                self.handles += canonizer.apply_to(walk)
            else:
                self.handles += canonizer.apply(module)
        if len(self.canonizers) > 1:
            walk = list(walk_outside_mixers(module))
        own_map = getattr(self.module_map, '__func__', None) is MambaComposite.mapping
        named_modules = walk if own_map and not (self.gamma or self.layer_map) else list(module.named_modules())
        ctx: dict = {}
        for name, child in named_modules:
            template = self.module_map(ctx, name, child)
            if template is not None:
                hook = template.copy()
                if hasattr(hook, 'switch'):
                    hook.switch = self.rule_set.switch  # the rules act where the registration's switch is on
                self.hook_refs.add(hook)
                self.handles.append(hook.register(child))
        if own_map:
            self._check_selections(ctx, named_modules)
        return walk

    def _check_selections(self, ctx: dict, named_modules: List[NamedModule]) -> None:
        '''Refuse a ``gamma`` key or ``layer_map`` entry that selected no layer, and a ``gamma`` key that selected a
        module which is not a layer but holds layers it left unselected (a wrapper, such as a LoRA adapter's): each
        would silently leave LRP-0 where the user asked for a rule.'''
        unused = [types for index, (types, _) in enumerate(self.layer_map) if index not in ctx.get('layer_map', ())]
        if unused:
            names = ', '.join('(' + ', '.join(kind.__name__ for kind in _as_tuple(types)) + ')' for types in unused)
            raise ValueError(
                f'layer_map entries {names} select no module of this model (or only modules an earlier entry '
                f'takes): their rules would act nowhere. Remove them, or name the types the model has.'
            )
        # the layers a rule acts on, and those of the selection, where no rule has anything to act on
        ruled = ctx.get('ruled', set()) | ctx.get('selection', set())
        for name, module, keys in ctx.get('gamma_on_non_layers', ()):
            left = [inner for inner, child in module.named_modules(prefix=name)
                    if isinstance(child, (Linear, Convolution)) and inner not in ruled]
            if left:
                raise ValueError(
                    f'gamma key {keys[0]!r} selects \'{name}\', a {type(module).__name__}, which is not a linear or '
                    f'convolution layer: its layers {left[:4]} would keep LRP-0 (a wrapper, such as a LoRA adapter\'s, '
                    f'hides the layer it wraps). Select its layers (e.g. \'{name}.*\'), or merge the wrapper into one '
                    f'layer first (peft: merge_and_unload()).'
                )
        selected, inert = ctx.get('gamma', {}), ctx.get('gamma_selection', {})
        if self._gamma_everywhere:
            missing = [] if selected else [f'the mixer projections {list(PROJECTIONS)}']
        else:
            # a key that selects only layers of the selection is inert beside others (a list of all projections),
            # and refused where no key selects anything else
            missing = [_describe_missing(key, ctx, named_modules) for key in self.gamma
                       if key not in selected and (key not in inert or not selected)]
        if missing:
            raise ValueError(
                f'gamma selects no linear or convolution layer for {"; ".join(missing)}: LRP-0 would stay where you '
                f'asked for the gamma rule. Keys are a layer\'s attribute name (\'out_proj\'), a pattern on its '
                f'qualified name (\'backbone.layers.0.*\') or a module type.'
            )

    def remove(self) -> None:
        '''Remove the hooks and canonized forwards of this composite; the model is left exactly as before.'''
        super().remove()
        self.ends = None
        with _REGISTRATION:
            for model in [model for model, composite in _REGISTERED.items() if composite is self]:
                del _REGISTERED[model]

    @contextmanager
    def inactive(self) -> Iterator['MambaComposite']:
        '''Zennit's switch for the registered rules: inside, the model computes its own forward and plain gradient, as
        if nothing were registered (the decision is made in the forward pass, where MambaLRP's rules act).'''
        switch = self.rule_set.switch
        previous, switch.active = switch.active, False
        try:
            with super().inactive():
                yield self
        finally:
            switch.active = previous

    def explains_whole_model(self, model: torch.nn.Module) -> bool:
        '''Always True: every model is explained in one pass, so inside it the relevance of a tensor ``h`` is
        ``h * gradient`` (kept for code that asked before ``gamma`` and ``layer_map`` joined the one pass).'''
        return True

    def mapping(self, ctx: dict, name: str, module: torch.nn.Module) -> Optional[Hook]:
        '''The hook for one module (modules come parent first), or None to leave its gradient unmodified: a rule of
        ``layer_map`` or ``gamma``, else the treatment the family files give the module's class
        (:py:func:`~zennit_mamba.support.treatment_of`).'''
        if not name:
            return None  # the root takes ExplainedModel, registered after every other hook (see register)
        for index, (types, hook) in enumerate(self.layer_map):
            if isinstance(module, types):
                _refuse_rule_on_computed(name, module)
                ctx.setdefault('layer_map', set()).add(index)
                ctx.setdefault('ruled', set()).add(name)
                for key in self._gamma_keys(name, module):
                    ctx.setdefault('gamma_shadowed', {}).setdefault(key, types)
                return hook if hook is None or isinstance(hook, Rule) else ZennitRule(hook)
        gamma = self._gamma_for(ctx, name, module) if self.gamma else None
        if gamma is not None:
            return ZennitRule(Gamma(gamma=gamma, stabilizer=self.epsilon))
        mixers = ctx.setdefault('mixers', ())
        if name.startswith(mixers):
            return None  # inside a mixer, the canonized forward computes the rules through the rule set
        entry = table().canonized.get(type(module))
        if entry is not None:
            if entry.mixer:
                ctx['mixers'] = mixers + (f'{name}.',)
                if 'ssm' in self.rule_set.names:
                    ctx.setdefault('selection', set()).update(f'{name}.{child}' for child in entry.selection)
            return None
        treatment = treatment_of(module)
        return None if treatment is None else treatment.hook_for(self.rule_set.names)

    def _gamma_keys(self, name: str, module: torch.nn.Module) -> List[Union[str, type]]:
        '''The ``gamma`` keys that select ``module`` (at ``name``).'''
        attribute = name.rsplit('.', 1)[-1]
        return [key for key in self.gamma
                if (isinstance(module, key) if isinstance(key, type) else key == attribute or fnmatchcase(name, key))]

    def _gamma_for(self, ctx: dict, name: str, module: torch.nn.Module) -> Optional[float]:
        '''The gamma of a linear or convolution layer, from the keys that select it (which must agree); the keys that
        select something are noted in ``ctx`` for :py:meth:`_check_selections`.'''
        keys = self._gamma_keys(name, module)
        if not keys:
            return None
        if name in ctx.get('selection', ()):
            # a layer of the selection, which the SSM rule holds constant: no relevance passes it
            for key in keys:
                ctx.setdefault('gamma_selection', {}).setdefault(key, []).append(name)
            return None
        if not isinstance(module, (Linear, Convolution)):
            ctx.setdefault('gamma_on_non_layers', []).append((name, module, keys))
            return None
        values = {self.gamma[key] for key in keys}
        if len(values) > 1:
            listing = ', '.join(f'{_key_name(key)}: {self.gamma[key]}' for key in keys)
            raise ValueError(
                f'gamma selects \'{name}\' with different values ({listing}): which one holds is not defined. Make '
                f'the keys select disjoint layers, or give them one value.'
            )
        for key in keys:
            ctx.setdefault('gamma', {}).setdefault(key, []).append(name)
        ctx.setdefault('ruled', set()).add(name)
        return values.pop()


def _refuse_rule_on_computed(name: str, module: torch.nn.Module) -> None:
    '''Refuse a ``layer_map`` rule on a module whose computation MambaLRP replaces (a canonized mixer, block or
    backbone) or that a canonized mixer computes from its parameters without calling it (its gated norms): the rule
    would replace the MambaLRP rules inside it, or act nowhere.'''
    canonized = table().canonized.get(type(module)) is not None
    if canonized or treatment_of(module) is INSIDE_MIXER:
        what = ('MambaLRP computes it with its own forward and rules' if canonized
                else 'the canonized mixer computes it from its parameters without calling it')
        raise ValueError(
            f'layer_map selects \'{name}\' ({type(module).__name__}), which a Zennit rule cannot act on: {what}. '
            f'Select the layers inside it instead (e.g. in_proj, out_proj, conv1d: their types, or gamma keys).'
        )


def _check_gamma(gamma: Optional[Mapping]) -> None:
    '''Refuse a ``gamma`` that is not a mapping of attribute names, patterns or module types to finite numbers
    >= 0.'''
    if gamma is None:
        return
    if not isinstance(gamma, Mapping):
        raise TypeError(f'gamma must be a float or a mapping of names, patterns or module types to floats, not '
                        f'{type(gamma).__name__}.')
    for key, value in gamma.items():
        if not isinstance(key, (str, type)):
            raise TypeError(f'gamma keys are attribute names, patterns on qualified names or module types; got '
                            f'{key!r}.')
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f'gamma values are numbers; got {value!r} for {_key_name(key)}.')
        if not 0 <= value < float('inf'):
            raise ValueError(f'gamma must be >= 0 and finite (0 is LRP-0), got {value!r} for {_key_name(key)}.')


def _check_layer_map(layer_map: Optional[LayerMap]) -> None:
    '''Refuse a ``layer_map`` that is not a list of ``(types, rule)`` pairs: a type or tuple of types, and a Zennit
    hook or None.'''
    for entry in layer_map or ():
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise TypeError(f'layer_map holds (types, rule) pairs; got {entry!r}.')
        types, hook = entry
        if not all(isinstance(kind, type) for kind in _as_tuple(types)):
            raise TypeError(f'layer_map types must be a type or a tuple of types (as isinstance takes them); got '
                            f'{types!r}.')
        if hook is not None and not isinstance(hook, Hook):
            raise TypeError(f'layer_map rules are Zennit rules (e.g. zennit.rules.Epsilon()), MambaLRP rules or None; '
                            f'got {hook!r}.')


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _key_name(key: Union[str, type]) -> str:
    return key.__name__ if isinstance(key, type) else repr(key)


def _describe_missing(key: Union[str, type], ctx: dict, named_modules: List[NamedModule]) -> str:
    '''Why a ``gamma`` key selected no layer the rule acts on.'''
    if key in ctx.get('gamma_selection', {}):
        layers = ctx['gamma_selection'][key]
        return (f'{_key_name(key)} (it selects {layers[:3]}, layers of the selection, which the SSM rule holds '
                f'constant: no relevance passes them; with rules= without \'ssm\' it does)')
    if key in ctx.get('gamma_shadowed', {}):
        types = ', '.join(kind.__name__ for kind in _as_tuple(ctx['gamma_shadowed'][key]))
        return f'{_key_name(key)} (the layers it selects take the rule of layer_map\'s entry ({types}) first)'
    return _describe_key(key, named_modules)


def _describe_key(key: Union[str, type], named_modules: List[NamedModule]) -> str:
    '''A ``gamma`` key that selected no layer, with the nearest names of the model's layers.'''
    layers = [name for name, module in named_modules if isinstance(module, (Linear, Convolution))]
    if isinstance(key, type):
        return f'{key.__name__} (no such layer in this model)'
    candidates = sorted(set(layers) | {name.rsplit('.', 1)[-1] for name in layers})
    near = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    return f'{key!r}' + (f' (did you mean {", ".join(map(repr, near))}?)' if near else '')
