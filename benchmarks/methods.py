'''The attribution methods compared by the faithfulness benchmark, each as ``(model, inputs, targets) -> scores``.

Scores are per position (token, patch): attributions summed over the feature dimension. A method that does not apply
to a model (the hidden-attention rollouts to one without Mamba-1 scans, the attention rule's ablation to one without
attention layers) returns None.
'''
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional

import torch
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency

from captum_mamba import MambaLRP
from zennit_mamba import MAMBA_LRP_RULES, MambaCanonizer, RuleSet
from zennit_mamba.support import treatment_of

Method = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]

#: methods whose attributions are meant to sum to the explained output (their conservation error is reported)
RELEVANCE_METHODS = {
    'InputXGradient', 'IntegratedGradients', 'LRP (LN-rule)', 'MambaLRP',
    'MambaLRP w/o SiLU rule', 'MambaLRP w/o SSM rule', 'MambaLRP w/o gate rule', 'MambaLRP w/o attention rule',
    'MambaLRP (delta: uniform q, k, v)', 'MambaLRP (gate: value)',
    'MambaLRP + gamma (in/out proj)', 'MambaLRP + gamma (conv1d)', 'MambaLRP + gamma (patch embedding)',
    'MambaLRP + gamma (all)',
}


def hidden_attention(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     C: torch.Tensor) -> torch.Tensor:
    '''Mamba's hidden attention (Ali, Zimerman and Wolf, 2024): ``y_t = sum_k alpha[t, k] x_k`` per channel.

    ``x, delta``: (batch, channels, length); ``B, C``: (batch, state, length); ``A``: (channels, state). Returns
    ``alpha`` of shape ``(batch, channels, length, length)``, zero above the diagonal.
    '''
    cumulative = delta.cumsum(-1)
    elapsed = cumulative[..., :, None] - cumulative[..., None, :]  # (batch, channels, t, k)
    causal = torch.ones(elapsed.shape[-2:], dtype=torch.bool, device=elapsed.device).tril()
    alpha = torch.zeros_like(elapsed)
    for n in range(B.shape[1]):
        decay = torch.exp(torch.where(causal, A[None, :, n, None, None] * elapsed, -torch.inf))
        alpha = alpha + C[:, None, n, :, None] * decay * (delta * B[:, None, n, :])[:, :, None, :]
    return alpha


class HiddenAttentionRules(RuleSet):
    '''No MambaLRP rule; each Mamba-1 scan is computed in its hidden-attention form, and its ``alpha`` recorded
    (with gradients, if asked).'''

    def __init__(self, gradient: bool):
        super().__init__(())
        self.gradient = gradient
        self.attentions: List[torch.Tensor] = []

    def scan(self, x, delta, A, B, C, D):
        alpha = hidden_attention(x.detach(), delta.detach(), A.detach(), B.detach(), C.detach())
        alpha.requires_grad_(self.gradient)
        self.attentions.append(alpha)
        y = torch.einsum('bctk,bck->bct', alpha, x) + D[None, :, None] * x
        # the last state, for a cache the model may fill
        return y, super().scan(x.detach(), delta, A, B, C, D)[1]


@contextmanager
def canonized(model: torch.nn.Module, rules: RuleSet) -> Iterator[None]:
    '''The model's Mamba mixers computed through this library's canonized forward with ``rules`` (none: the plain
    model, through the parallel scan), restored on leaving.'''
    instances = MambaCanonizer(rules).apply(model)
    try:
        yield
    finally:
        for instance in instances:
            instance.remove()


def _rollout(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
             gradient: bool) -> Optional[torch.Tensor]:
    '''Attention rollout over the hidden attention of every layer; gradient-weighted (Chefer-style, Ali et al.'s
    MambaAttr) if asked; None for a model without Mamba-1 scans.'''
    # the hidden attention holds (examples, channels, length, length) per layer: long inputs a few at a time
    per_call = max(1, 2 ** 21 // inputs.shape[1] ** 2)
    if len(inputs) > per_call:
        parts = [_rollout(model, inputs[start:start + per_call], targets[start:start + per_call], gradient)
                 for start in range(0, len(inputs), per_call)]
        return None if parts[0] is None else torch.cat(parts)
    rules = HiddenAttentionRules(gradient)
    with canonized(model, rules), torch.set_grad_enabled(gradient):
        logits = model(inputs)
        if gradient and rules.attentions:
            explained = logits[torch.arange(len(targets)), targets]
            gradients = torch.autograd.grad(explained.sum(), rules.attentions)
    attentions = rules.attentions
    if not attentions:
        return None  # no Mamba-1 scan, whose hidden attention the rollout reads
    if gradient:
        attentions = [alpha * grad for alpha, grad in zip(attentions, gradients)]
    position = getattr(model, 'token_position', -1)
    if getattr(model, 'bidirectional', False):
        # Vim: each layer's backward branch scans the reversed sequence; in the sequence's order its attention is
        # flipped in both axes, and the branches' outputs are averaged
        attentions = [(forward + backward.flip(-1).flip(-2)) / 2
                      for forward, backward in zip(attentions[0::2], attentions[1::2])]

    length = attentions[0].shape[-1]
    identity = torch.eye(length, dtype=attentions[0].dtype, device=attentions[0].device)
    rollout = identity.expand(len(inputs), length, length)
    for alpha in attentions:
        if gradient:
            layer = identity + alpha.detach().clamp(min=0).mean(1)
        else:
            layer = alpha.detach().abs().mean(1)
            layer = 0.5 * layer / layer.sum(-1, keepdim=True).clamp(min=1e-12) + 0.5 * identity
        rollout = layer @ rollout
    scores = rollout[:, position]
    if length != inputs.shape[1]:  # a class token among the positions: score the inputs only
        scores = torch.cat([scores[:, :position], scores[:, position + 1:]], dim=1)
    return scores


def _per_position(attributions: torch.Tensor) -> torch.Tensor:
    return attributions.detach().flatten(2).sum(-1)


def methods(quick: bool, vision: bool = False) -> Dict[str, Method]:
    '''Name to method, in the order of the tables; for a Vision Mamba (``vision``) also the gamma composites of the
    paper's Vim ablation.'''
    ig_steps, noise_samples = (20, 5) if quick else (50, 10)

    def mamba_lrp(rules, gamma=None, **options):
        return lambda model, x, t: _per_position(MambaLRP(model, rules=rules, gamma=gamma, **options).attribute(
            x, target=t))

    def where_attention(method: Method) -> Method:
        return lambda model, x, t: method(model, x, t) if _has_attention(model) else None

    def where_delta_rule(method: Method) -> Method:
        return lambda model, x, t: method(model, x, t) if _has_delta_rule(model) else None

    chosen = {
        # seeded per chunk by the caller; drawn on the CPU, so the same on every device
        'Random': lambda model, x, t: torch.rand(x.shape[:2], dtype=x.dtype).to(x.device),
        'Saliency': lambda model, x, t: _per_position(Saliency(model).attribute(x, target=t)),
        'InputXGradient': lambda model, x, t: _per_position(InputXGradient(model).attribute(x, target=t)),
        # internal batches bound the memory of transformers' step-by-step backward on long inputs
        'IntegratedGradients': lambda model, x, t: _per_position(IntegratedGradients(model).attribute(
            x, target=t, n_steps=ig_steps, internal_batch_size=max(ig_steps, 2 ** 17 // x.shape[1]))),
        'SmoothGrad': lambda model, x, t: _per_position(NoiseTunnel(InputXGradient(model)).attribute(
            x, target=t, nt_type='smoothgrad', nt_samples=noise_samples, stdevs=0.1 * x.std().item(),
            nt_samples_batch_size=max(1, 2 ** 17 // (len(x) * x.shape[1])))),
        'AttnRoll': lambda model, x, t: _rollout(model, x, t, gradient=False),
        'MambaAttr': lambda model, x, t: _rollout(model, x, t, gradient=True),
        'LRP (LN-rule)': mamba_lrp({'norm'}),
        'MambaLRP': mamba_lrp(MAMBA_LRP_RULES),
        'MambaLRP w/o SiLU rule': mamba_lrp(MAMBA_LRP_RULES - {'silu'}),
        'MambaLRP w/o SSM rule': mamba_lrp(MAMBA_LRP_RULES - {'ssm'}),
        'MambaLRP w/o gate rule': mamba_lrp(MAMBA_LRP_RULES - {'gate'}),
        'MambaLRP w/o attention rule': where_attention(mamba_lrp(MAMBA_LRP_RULES - {'attention'})),
        # the delta-rule layers' second treatment: relevance through queries and keys too (AttnLRP's uniform rule)
        'MambaLRP (delta: uniform q, k, v)': where_delta_rule(mamba_lrp(MAMBA_LRP_RULES, delta_relevance='uniform')),
        # the gate's second treatment: the mixers' output gates held (HeldGate), relevance through their values only
        'MambaLRP (gate: value)': mamba_lrp(MAMBA_LRP_RULES, gate_relevance='value'),
    }
    if vision:
        chosen.update({name: mamba_lrp(MAMBA_LRP_RULES, gamma) for name, gamma in VIM_GAMMA_COMPOSITES.items()})
    return chosen


def _has_attention(model: torch.nn.Module) -> bool:
    '''Whether a layer of ``model`` takes the attention rule (attention, routing weights, held gates).'''
    return any(getattr(treatment_of(module), 'rule', None) == 'attention' for module in model.modules())


def _has_delta_rule(model: torch.nn.Module) -> bool:
    '''Whether ``model`` has delta-rule layers (Gated DeltaNet, Kimi Delta Attention).'''
    return any(type(module).__name__.endswith(('GatedDeltaNet', 'DeltaAttention')) for module in model.modules())


#: the gamma composites of the Vim ablation: which layer types take the gamma rule instead of LRP-0
VIM_GAMMA_COMPOSITES = {
    'MambaLRP + gamma (in/out proj)': {'in_proj': 0.25, 'out_proj': 0.25},
    'MambaLRP + gamma (conv1d)': {torch.nn.Conv1d: 0.25},
    'MambaLRP + gamma (patch embedding)': {torch.nn.Conv2d: 0.25},
    'MambaLRP + gamma (all)': 0.25,
}
