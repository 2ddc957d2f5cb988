'''The MambaLRP composite: canonizer plus rule map.'''
from fnmatch import fnmatchcase
from typing import Collection, List, Mapping, Optional, Tuple, Union

import torch
from zennit.canonizers import Canonizer
from zennit.composites import register_composite
from zennit.core import Composite, Hook
from zennit.layer import Sum
from zennit.rules import Gamma, Pass
from zennit.types import Activation, Convolution, Linear

from .canonizers import MambaCanonizer
from .layers import GateProduct, SelectiveScan, SiLU, Softplus
from .mamba2 import Mamba2Core
from .model_rules import ModelRules
from .rules import (
    MAMBA_LRP_RULES, DetachSelection, GradientTimesInput, HalfRule, LNRule, MixerRules, SiLUIdentity,
    is_canonized_mixer,
)
from .support import check_supported, is_hybrid, supported_norm_types

#: names of the projections inside a Mamba mixer, the targets of ``gamma=<float>``
PROJECTIONS = ('in_proj', 'conv1d', 'x_proj', 'dt_proj', 'out_proj')
#: FalconMamba's and Jamba's norms on the selection (dt, B, C) inside the mixer
SELECTION_NORMS = ('dt_layernorm', 'b_layernorm', 'c_layernorm')

GammaSpec = Union[None, float, Mapping[Union[str, type], float]]
LayerMap = List[Tuple[Tuple[type, ...], Hook]]


@register_composite('mamba_lrp')
class MambaComposite(Composite):
    '''MambaLRP (Rezaei Jafari et al., NeurIPS 2024) as a Zennit composite.

    Inside its context, the gradient reaching the model input is the relevance, given the output relevance as the
    output gradient (e.g. the target logit at one position and zero elsewhere), as for every Zennit composite.

    Parameters
    ----------
    epsilon : float, optional
        Stabiliser of the divisions by outputs: at the called model's output in one pass, at every rule's output
        layer by layer (LRP-epsilon on projections, Gamma, residual sums, the selective scan).
    gamma : float or mapping, optional
        The generalised gamma rule on projections instead of LRP-0. A float applies it to all projections of the
        mixers (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``out_proj``). A mapping selects layers by
        module type, by attribute name (``'out_proj'``) or by a pattern on the qualified name
        (``'backbone.layers.0.*'``), each with its own gamma.
    rules : collection of str, optional
        The MambaLRP rules that are on, a subset of ``{'silu', 'ssm', 'gate', 'norm'}`` (all by default). A rule
        switched off is replaced by gradient x input through the unmodified operation: ``rules={'norm'}`` is the
        "LRP (LN-rule)" baseline, ``rules=()`` gradient x input (up to ``epsilon``), and dropping one rule gives
        the ablations of the paper.
    layer_map : list of (types, Hook), optional
        Rules for further module types, checked before all others (e.g. ``[(torch.nn.Linear, ZPlus())]``).
    canonizers : list of Canonizer, optional
        Further canonizers, applied after :py:class:`~zennit_mamba.canonizers.MambaCanonizer`.
    recompute : bool, optional
        Recompute each mixer in the backward pass instead of storing its activations, for long inputs
        (see :py:class:`~zennit_mamba.rules.MixerRules`). Needs LRP-0 on the mixers' projections.

    Notes
    -----
    Without ``gamma`` and ``layer_map``, the whole model is explained in one pass by
    :py:class:`~zennit_mamba.model_rules.ModelRules`: every rule is written as a detach in the forward and relevance
    is gradient x input of the called model, at the cost of one gradient, with no hook in the backward pass but at
    its ends. Tensors inside the model then carry gradients of that forward; the relevance of an inner tensor ``h`` is
    ``h * gradient`` (:py:meth:`explains_whole_model` tells which case applies; ``captum_mamba.LayerMambaLRP`` reads
    it). With ``gamma`` or ``layer_map`` (Mamba-only models), relevance flows layer by layer: a mixer whose
    projections all take LRP-0 is explained in one pass by :py:class:`~zennit_mamba.rules.MixerRules`, otherwise each
    of its operations carries its own rule (:py:class:`~zennit_mamba.rules.SiLUIdentity`,
    :py:class:`~zennit_mamba.rules.DetachSelection`, :py:class:`~zennit_mamba.rules.HalfRule`, Zennit's
    :py:class:`~zennit.rules.Gamma` or the ``layer_map`` rule on projections), and the residual sums and norms carry
    rules too. All give the same relevance at the input up to the stabilisers.

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
    ):
        rules = frozenset(rules)
        if not rules <= MAMBA_LRP_RULES:
            raise ValueError(
                f'Unknown MambaLRP rules {sorted(rules - MAMBA_LRP_RULES)}; choose from {sorted(MAMBA_LRP_RULES)}.'
            )
        if isinstance(gamma, (int, float)):
            gamma = {name: float(gamma) for name in PROJECTIONS}
        self.epsilon = epsilon
        self.gamma = dict(gamma or {})
        self.rules = rules
        self.layer_map = list(layer_map or [])
        self.recompute = recompute
        super().__init__(module_map=self.mapping, canonizers=[MambaCanonizer()] + list(canonizers or []))

    def register(self, module: torch.nn.Module) -> None:
        '''Canonize ``module`` and attach the rules; on any error, ``module`` is left as it was.'''
        self.remove()
        check_supported(module)
        try:
            super().register(module)
        except BaseException:
            self.remove()
            raise

    def explains_whole_model(self, model: torch.nn.Module) -> bool:
        '''Whether this composite explains ``model`` in one pass by :py:class:`~zennit_mamba.model_rules.ModelRules`
        (no ``gamma`` or ``layer_map``, and every hybrid), rather than with rules layer by layer.

        Relevance reaches the input either way. Inside the model, the gradient of a tensor ``h`` is its relevance
        layer by layer, but the gradient of the rule-modified forward in one pass, where the relevance is
        ``h * gradient``.

        Examples
        --------
        >>> from transformers import MambaConfig, MambaForCausalLM
        >>> model = MambaForCausalLM(MambaConfig(vocab_size=8, hidden_size=8))
        >>> MambaComposite().explains_whole_model(model), MambaComposite(gamma=0.25).explains_whole_model(model)
        (True, False)
        '''
        return not self._has_layer_rules() or is_hybrid(model)

    def _has_layer_rules(self) -> bool:
        return bool(self.gamma or self.layer_map)

    def mapping(self, ctx: dict, name: str, module: torch.nn.Module) -> Optional[Hook]:
        '''The rule for one module, or None to leave its gradient unmodified.'''
        if not name:
            ctx['whole_model'] = self.explains_whole_model(module)
            if ctx['whole_model'] and self._has_layer_rules():
                raise ValueError(
                    'gamma and layer_map apply to Mamba-only models; a hybrid model is explained in one pass '
                    '(ModelRules), where every projection takes LRP-0.'
                )
        if ctx.get('whole_model', False):
            return None if name else ModelRules(self.rules, self.epsilon, self.recompute)
        for types, hook in self.layer_map:
            if isinstance(module, types):
                return hook
        # modules come parent first: inside a mixer that takes MixerRules, nothing else carries a rule
        one_pass_mixers = ctx.setdefault('one_pass_mixers', [])
        if name.startswith(tuple(one_pass_mixers)):
            return None
        if is_canonized_mixer(module):
            return self._mixer_rule(one_pass_mixers, name, module)
        if isinstance(module, Mamba2Core):
            # the nonlinear middle of a Mamba-2 mixer whose projections carry rules of their own
            return MixerRules(self.rules, self.epsilon)
        gradient_x_input = GradientTimesInput(self.epsilon)
        if isinstance(module, SiLU):
            return SiLUIdentity() if 'silu' in self.rules else gradient_x_input
        if isinstance(module, GateProduct):
            return HalfRule() if 'gate' in self.rules else gradient_x_input
        if isinstance(module, SelectiveScan):
            return DetachSelection(self.epsilon) if 'ssm' in self.rules else gradient_x_input
        if isinstance(module, supported_norm_types()):
            return LNRule() if 'norm' in self.rules else gradient_x_input
        if isinstance(module, (Softplus, Sum)) or name.rsplit('.', 1)[-1] in SELECTION_NORMS:
            # the selection norms take relevance only where the SSM rule is off (an ablation): as gradient x input
            return gradient_x_input
        if isinstance(module, (Linear, Convolution)):
            # LRP-0 through the layer's own graph is zennit's Epsilon rule without recomputing the layer
            gamma = self._gamma_for(name, module)
            return gradient_x_input if gamma is None else Gamma(gamma=gamma, stabilizer=self.epsilon)
        if isinstance(module, Activation):
            return Pass()
        return None

    def _mixer_rule(self, one_pass_mixers: List[str], name: str, mixer: torch.nn.Module) -> Optional[Hook]:
        '''MixerRules for a canonized mixer whose inner modules need no rule of their own, else None.'''
        own_rules = [
            sub_name for sub_name, submodule in mixer.named_modules() if sub_name and (
                any(isinstance(submodule, types) for types, _ in self.layer_map)
                or self._gamma_for(f'{name}.{sub_name}' if name else sub_name, submodule) is not None
            )
        ]
        if not own_rules:
            one_pass_mixers.append(f'{name}.' if name else '')
            return MixerRules(self.rules, self.epsilon, self.recompute)
        if self.recompute:
            raise ValueError(
                f'recompute=True needs LRP-0 on the mixer projections, but {sorted(own_rules)} in mixer '
                f'\'{name}\' have rules of their own (gamma or layer_map).'
            )
        return None

    def _gamma_for(self, name: str, module: torch.nn.Module) -> Optional[float]:
        attribute = name.rsplit('.', 1)[-1]
        for key, value in self.gamma.items():
            if isinstance(key, type):
                if isinstance(module, key):
                    return value
            elif key == attribute or fnmatchcase(name, key):
                return value
        return None
