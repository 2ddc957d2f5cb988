'''The relevance of a model's constants: the biases, class tokens and position embeddings that the explained output
is partly made of.

With the MambaLRP rules the explained output is, for the explained input, a sum of a linear function of the input
and terms that come from additive parameters: every ``y = W x + b`` passes ``b``'s share of ``y``'s relevance to
``b``, not to ``x`` (LRP-0). The relevance of such a parameter ``p`` for one example is ``sum(p * g)``, ``g`` the
explanation's gradient at ``p`` (the relevance of any tensor inside the explained model is the tensor times its
gradient), so that::

    sum(relevance of the inputs) + sum over p of relevance(p) = explained output

up to what the epsilon of a division keeps (``1e-6`` by default, a few parts in a million). A layer under a Zennit rule
(``gamma``, ``layer_map``) computes its bias's share by its rule: its bias is given the relevance the rule keeps, what
the layer received less what it passed to its input. Models initialised by
transformers have zero convolution biases; every trained checkpoint has non-zero ones, and Vim's class token and
position embeddings take a large share of its logits.
'''
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from zennit_mamba.core.hooks import ZennitRule

#: the names of parameters that are added to what a model computes: biases of linear layers, convolutions and
#: normalisations; class, distillation and register tokens and position embeddings (Vim's, timm's)
ADDITIVE_NAMES = ('bias', 'cls_token', 'dist_token', 'reg_token', 'pos_embed')


def additive_parameters(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    '''The parameters of ``model`` that add to what it computes (named ``bias`` or one of :py:data:`ADDITIVE_NAMES`),
    by name; a parameter shared by two modules is named once.

    Examples
    --------
    >>> list(additive_parameters(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1, bias=False))))
    ['0.bias']
    '''
    return {name: parameter for name, parameter in model.named_parameters()
            if name.rsplit('.', 1)[-1] in ADDITIVE_NAMES}


def _ruled_owners(model: torch.nn.Module, parameters: Mapping[str, torch.nn.Parameter]
                  ) -> Dict[str, List[Tuple[torch.nn.Module, ZennitRule]]]:
    '''Per name of ``parameters``, the modules holding it that carry a :py:class:`ZennitRule` (a ``gamma`` or
    ``layer_map`` rule), with the rule: a parameter two layers share (tied, or a shared block's) has two.'''
    names = {id(parameter): name for name, parameter in parameters.items()}
    owners: Dict[str, List[Tuple[torch.nn.Module, ZennitRule]]] = {}
    for module in model.modules():
        rules = [hook.__self__ for hook in module._forward_hooks.values()
                 if isinstance(getattr(hook, '__self__', None), ZennitRule)]
        for parameter in module._parameters.values():
            if rules and id(parameter) in names:
                owners.setdefault(names[id(parameter)], []).append((module, rules[0]))
    return owners


def check_constants_can_be_explained(model: torch.nn.Module, parameters: Mapping[str, torch.nn.Parameter]) -> None:
    '''Raise where the relevance of ``parameters`` cannot be read: a parameter that does not require a gradient (no
    backward pass reaches it, nor the rule of its layer), or one of a layer under a Zennit rule other than its bias.'''
    frozen = [name for name, parameter in parameters.items() if not parameter.requires_grad]
    if frozen:
        raise ValueError(
            f'The relevance of the constants is read in a backward pass that reaches them, but {frozen[0]} does not '
            f'require a gradient (frozen): call model.requires_grad_(True) before the forward pass, or pass the '
            f'parameters to explain (parameters=).'
        )
    other = [name for name in _ruled_owners(model, parameters) if name.rsplit('.', 1)[-1] != 'bias']
    if other:
        raise ValueError(
            f'{other[0]} is a parameter of a layer under a Zennit rule (gamma or layer_map) other than its bias: the '
            f'rule\'s share of the relevance is given to the bias. Leave it out of parameters=.'
        )


def constant_relevance(explained: torch.Tensor, model: torch.nn.Module,
                       parameters: Optional[Mapping[str, torch.nn.Parameter]] = None,
                       seed: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    '''The relevance of each of ``model``'s constants for each explained output, inside a MambaLRP explanation.

    Call it inside the composite's context after the forward pass, before taking the relevance of the inputs (it
    keeps the graph; after, take that with ``retain_graph=True``). One backward pass per example: a parameter's
    gradient is summed over the batch. Only ``model``'s parameters are constants here: a forward function's own
    (a head outside the model) are not.

    Parameters
    ----------
    explained : Tensor
        The explained output per example, shape ``(batch,)``, computed by the model the composite is registered on.
    model : :py:obj:`torch.nn.Module`
        That model.
    parameters : mapping of str to Parameter, optional
        The constants to explain, by name (default: :py:func:`additive_parameters`).
    seed : Tensor, optional
        The relevance the backward pass starts from, per example: by default ``explained`` (Zennit's way: relevance
        is the gradient when the backward pass starts from the output); 1 where the gradient of the explained output
        is the relevance, as in Captum's front ends.

    Returns
    -------
    dict of str to Tensor
        Per parameter name, its relevance per example ``(batch,)``; parameters the output does not depend on, or does
        only through what the rules hold constant, are left out.

    Examples
    --------
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> from zennit_mamba import MambaComposite
    >>> model = MambaForCausalLM(MambaConfig(vocab_size=16, hidden_size=8, state_size=4, num_hidden_layers=1))
    >>> _ = torch.nn.init.normal_(model.backbone.layers[0].mixer.conv1d.bias)
    >>> embeddings = model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach().requires_grad_()
    >>> with MambaComposite().context(model) as modified:
    ...     explained = modified(inputs_embeds=embeddings).logits[:, -1, 5]
    ...     constants = constant_relevance(explained, model)
    ...     relevance, = torch.autograd.grad(explained, embeddings, explained.detach())
    >>> total = relevance.sum() + sum(constants.values())
    >>> sorted(constants), bool(torch.allclose(total, explained, atol=1e-4))
    (['backbone.layers.0.mixer.conv1d.bias'], True)
    '''
    parameters = dict(additive_parameters(model) if parameters is None else parameters)
    if not parameters:
        return {}
    check_constants_can_be_explained(model, parameters)
    explained = explained.reshape(-1)
    seed = explained.detach() if seed is None else torch.as_tensor(seed, dtype=explained.dtype).expand_as(explained)
    # a layer under a Zennit rule: its rule computes the relevance it keeps (its bias's share); no gradient passes it
    owners = _ruled_owners(model, parameters)
    rules = {rule for pairs in owners.values() for _, rule in pairs}
    # every constant's gradient is taken: a ruled layer's bias too, which puts its rule's backward on the way
    names, tensors = list(parameters), list(parameters.values())
    relevance: Dict[str, list] = {name: [] for name in parameters}
    try:
        for index in range(len(explained)):
            for rule in rules:
                rule.kept = {}
            gradients = torch.autograd.grad(explained[index], tensors, seed[index], retain_graph=True,
                                            allow_unused=True)
            for name, tensor, gradient in zip(names, tensors, gradients):
                # the uses outside ruled layers (gradient x value), and what each ruled layer holding it keeps
                parts = [] if gradient is None else [(tensor.detach() * gradient).sum()]
                parts += [rule.kept[module] for module, rule in owners.get(name, ()) if module in rule.kept]
                if parts:
                    relevance[name].append(sum(parts))
    finally:
        for rule in rules:
            rule.kept = None
    return {name: torch.stack(values) for name, values in relevance.items() if values}
