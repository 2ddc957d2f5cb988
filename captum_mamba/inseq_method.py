'''MambaLRP as an inseq attribution method: importing this module registers ``"mamba_lrp"``.

.. code-block:: python

    import inseq
    import captum_mamba.inseq_method

    model = inseq.load_model(hf_model, 'mamba_lrp', tokenizer=tokenizer)
    output = model.attribute('The plot was', attributed_fn='logit', generation_args={'max_new_tokens': 5})
    output.show()

inseq attributes each generated token to the prompt and to the tokens generated before it (its "target"
attributions for decoder-only models), so with ``attributed_fn='logit'`` every step's relevances sum to that token's
logit. Needs ``pip install "mamba-lrp[inseq]"``.
'''
from typing import Any, Collection, Optional

from inseq.attr.feat.gradient_attribution import GradientAttributionRegistry

from zennit_mamba.composite import MAMBA_LRP_RULES, GammaSpec, LayerMap

from .attribution import MambaLRP


class MambaLRPAttribution(GradientAttributionRegistry):
    '''MambaLRP (Rezaei Jafari et al., NeurIPS 2024) for inseq, on the input embeddings.

    Relevance enters at the wrapped transformers model's logits, as ``y * df/dy`` for inseq's attributed function
    ``f``: with ``attributed_fn='logit'`` that is the explained logit itself, and each step's relevances (source and
    earlier generated tokens together) sum to it; with inseq's default (probability) it is gradient x input through
    the softmax.

    Parameters
    ----------
    attribution_model : inseq.models.AttributionModel
        The model inseq wraps (``inseq.load_model(model, 'mamba_lrp', tokenizer=...)`` makes it).
    epsilon, gamma, rules, layer_map, recompute, delta_relevance, gate_relevance : optional
        Options of :py:class:`zennit_mamba.MambaComposite`, passed through ``inseq.load_model``.
    '''

    method_name = 'mamba_lrp'

    def __init__(
        self,
        attribution_model: Any,
        epsilon: float = 1e-6,
        gamma: GammaSpec = None,
        rules: Collection[str] = MAMBA_LRP_RULES,
        layer_map: Optional[LayerMap] = None,
        recompute: bool = False,
        delta_relevance: str = 'values',
        gate_relevance: str = 'half',
    ):
        super().__init__(attribution_model)
        # the rules act on the transformers model inside inseq's wrapper, whose forward returns the attributed score
        self.method = MambaLRP(attribution_model, model=attribution_model.model, epsilon=epsilon, gamma=gamma,
                               rules=rules, layer_map=layer_map, recompute=recompute, delta_relevance=delta_relevance,
                               gate_relevance=gate_relevance)
