'''An independent, slow MambaLRP reference: gradient x input on a Mamba forward written out by hand.

Every MambaLRP rule is a ``detach`` in this forward (see shared/method.md); the scan is a per-timestep loop. Nothing
here uses zennit or zennit_mamba. It reads the weights of a transformers ``MambaForCausalLM``.
'''
from typing import Collection, Tuple

import torch
import torch.nn.functional as F

ALL_RULES = frozenset({'silu', 'ssm', 'gate', 'norm'})


def _silu(x: torch.Tensor, identity_rule: bool) -> torch.Tensor:
    sigmoid = torch.sigmoid(x)
    return x * (sigmoid.detach() if identity_rule else sigmoid)


def _rms_norm(norm: torch.nn.Module, h: torch.Tensor, ln_rule: bool) -> torch.Tensor:
    # forward values from the model's own module, which normalises in float32; the LN-rule holds the
    # per-element factor w * rsqrt(mean(h^2) + eps) = u / h constant
    u = norm(h)
    if ln_rule:
        return h * (u / h).detach()
    return u


def _sequential_scan(x, delta, A, B, C, D):
    '''x, delta: (batch, length, channels); B, C: (batch, length, state); A: (channels, state).'''
    state = torch.zeros(x.shape[0], x.shape[2], A.shape[1], dtype=x.dtype, device=x.device)
    outputs = []
    for t in range(x.shape[1]):
        decay = torch.exp(delta[:, t, :, None] * A)
        state = decay * state + (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        outputs.append((state * C[:, t, None, :]).sum(-1) + D * x[:, t])
    return torch.stack(outputs, dim=1)


def _mixer(mixer: torch.nn.Module, u: torch.Tensor, rules: Collection[str]) -> torch.Tensor:
    length = u.shape[1]
    x, z = (u @ mixer.in_proj.weight.T).chunk(2, dim=-1)
    kernel = mixer.conv1d.weight[:, 0, :]  # (channels, taps), tap k - 1 is the current position
    taps = kernel.shape[1]
    padded = F.pad(x, (0, 0, taps - 1, 0))
    conv = sum(padded[:, k:k + length] * kernel[:, k] for k in range(taps))
    if mixer.conv1d.bias is not None:
        conv = conv + mixer.conv1d.bias
    x = _silu(conv, 'silu' in rules)

    rank, state_size = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, C = torch.split(x @ mixer.x_proj.weight.T, [rank, state_size, state_size], dim=-1)
    delta = F.softplus(dt @ mixer.dt_proj.weight.T + mixer.dt_proj.bias)
    if 'ssm' in rules:
        delta, B, C = delta.detach(), B.detach(), C.detach()
    A = -torch.exp(mixer.A_log.float()).to(u.dtype)
    y = _sequential_scan(x, delta, A, B, C, mixer.D.float().to(u.dtype))

    gated = y * _silu(z, 'silu' in rules)
    if 'gate' in rules:
        gated = 0.5 * gated + 0.5 * gated.detach()
    return gated @ mixer.out_proj.weight.T


def reference_relevance(
    model: torch.nn.Module,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    rules: Collection[str] = ALL_RULES,
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''Relevance of ``embeddings`` for the logits ``targets`` (one per example) at the last position.

    Returns the relevance (shaped like ``embeddings``) and the explained logits.
    '''
    embeddings = embeddings.detach().clone().requires_grad_()
    hidden = embeddings
    for block in model.backbone.layers:
        hidden = hidden + _mixer(block.mixer, _rms_norm(block.norm, hidden, 'norm' in rules), rules)
    hidden = _rms_norm(model.backbone.norm_f, hidden, 'norm' in rules)
    logits = hidden[:, -1] @ model.lm_head.weight.T
    explained = logits[torch.arange(len(targets)), targets]
    gradient, = torch.autograd.grad(explained.sum(), embeddings)
    return (embeddings * gradient).detach(), explained.detach()
