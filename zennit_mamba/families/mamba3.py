'''Mamba-3 (mamba-ssm 2.3's ``Mamba3``, SISO) in plain PyTorch, with mamba-ssm's parameter names and shapes, so that
a ``Mamba3`` mixer's weights load strictly and run, and are explained, on a CPU:

>>> mixer = Mamba3(d_model=16, d_state=16, headdim=8)
>>> mixer.load_state_dict(cuda_mamba3.state_dict())  # doctest: +SKIP
>>> mixer(torch.randn(2, 5, 16)).shape
torch.Size([2, 5, 16])

:py:class:`Mamba3LMHeadModel` stacks them as mamba-ssm's ``MambaLMHeadModel`` stacks Mamba-1 and Mamba-2 blocks (the
same parameter names: ``backbone.embedding``, ``backbone.layers.{i}.norm`` and ``.mixer``, ``backbone.norm_f``,
``lm_head``), which mamba-ssm 2.3.2 does not build for Mamba-3. The computation and its rules:
:py:mod:`zennit_mamba.mixers.mamba3`. MIMO (``is_mimo=True``) and mamba-ssm's inference cache are not implemented.
'''
import math
from typing import Callable, Optional, Tuple

import torch

from zennit_mamba.core.family import Family, in_module
from zennit_mamba.core.layers import COMPOSITION, INSIDE_MIXER
from zennit_mamba.core.ruleset import RuleSet
# mamba-ssm's RMSNorm between blocks, as Vim's (whose family file gives it the LN-rule)
from zennit_mamba.families.vim import RMSNorm
from zennit_mamba.mixers.mamba3 import MIXER, mamba3_mixer

#: the plain computation: the mixer's own forward
_NO_RULES = RuleSet(())


class MixerRMSNorm(torch.nn.Module):
    '''The RMS normalisations inside a Mamba-3 mixer (of ``B``, of ``C``, of each head's output) as mamba-ssm's gated
    RMSNorm computes them, ``w * rms(x)`` over groups of ``group_size`` channels, times ``silu(z)`` where given (the
    norm before the gate). The mixer computes them from ``weight`` and ``eps`` without calling the module.'''

    def __init__(self, dim: int, eps: float = 1e-5, group_size: Optional[int] = None):
        super().__init__()
        self.eps, self.group_size = eps, group_size or dim
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        grouped = x.unflatten(-1, (-1, self.group_size))
        normalised = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return self.weight * normalised * (1 if z is None else torch.nn.functional.silu(z))


class Mamba3(torch.nn.Module):
    '''mamba-ssm's ``Mamba3`` mixer (SISO), its arguments and parameters; the forward is
    :py:func:`~zennit_mamba.mixers.mamba3.mamba3_mixer` with every rule off.

    Parameters
    ----------
    d_model, d_state, expand, headdim, ngroups : int, optional
        Width, state size per head, expansion, channels per head, groups of ``B`` and ``C``.
    rope_fraction : float, optional
        The fraction of the state channels rotated (0.5 or 1.0).
    dt_min, dt_max, dt_init_floor, A_floor : float, optional
        The step sizes' initialisation and the decay's floor, as mamba-ssm's.
    is_outproj_norm : bool, optional
        A gated RMS normalisation of each head's output before ``out_proj``.
    chunk_size : int, optional
        Positions per chunk of the scan.
    '''

    def __init__(self, d_model: int, d_state: int = 128, expand: int = 2, headdim: int = 64, ngroups: int = 1,
                 rope_fraction: float = 0.5, dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 A_floor: float = 1e-4, is_outproj_norm: bool = False, is_mimo: bool = False, mimo_rank: int = 4,
                 chunk_size: int = 64, dropout: float = 0.0, layer_idx: Optional[int] = None, n_layer=None,
                 device=None, dtype=None, **kwargs):
        super().__init__()
        if is_mimo:
            raise NotImplementedError('the plain-PyTorch Mamba3 has the SISO form only (is_mimo=False)')
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f'rope_fraction must be 0.5 or 1.0, not {rope_fraction}')
        factory = {'device': device, 'dtype': dtype}
        self.d_model, self.d_state, self.expand, self.headdim = d_model, d_state, expand, headdim
        self.chunk_size, self.layer_idx = chunk_size, layer_idx
        self.A_floor, self.is_outproj_norm = A_floor, is_outproj_norm
        self.is_mimo, self.mimo_rank = False, 1
        self.d_inner = int(expand * d_model)
        if self.d_inner % headdim:
            raise ValueError(f'expand * d_model ({self.d_inner}) must be a multiple of headdim ({headdim})')
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f'ngroups ({ngroups}) must divide the number of heads ({self.nheads}): each group of B '
                             f'and C serves consecutive heads')
        self.num_bc_heads = ngroups
        rotated = int(d_state * rope_fraction)
        self.num_rope_angles = (rotated - rotated % 2) // 2
        projected = 2 * self.d_inner + 2 * d_state * ngroups + 3 * self.nheads + self.num_rope_angles
        self.in_proj = torch.nn.Linear(d_model, projected, bias=False, **factory)
        step = torch.exp(torch.rand(self.nheads, device=device) * (math.log(dt_max) - math.log(dt_min))
                         + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = torch.nn.Parameter(step + torch.log(-torch.expm1(-step)))  # softplus^-1
        self.B_bias = torch.nn.Parameter(torch.ones(self.nheads, 1, d_state, device=device))
        self.C_bias = torch.nn.Parameter(torch.ones(self.nheads, 1, d_state, device=device))
        self.B_norm = MixerRMSNorm(d_state).to(**factory)
        self.C_norm = MixerRMSNorm(d_state).to(**factory)
        self.D = torch.nn.Parameter(torch.ones(self.nheads, device=device))
        if is_outproj_norm:
            self.norm = MixerRMSNorm(self.d_inner, group_size=headdim).to(**factory)
        self.out_proj = torch.nn.Linear(self.d_inner, d_model, bias=False, **factory)

    def forward(self, u: torch.Tensor, seq_idx=None, cu_seqlens=None, inference_params=None) -> torch.Tensor:
        if seq_idx is not None or cu_seqlens is not None or inference_params is not None:
            raise NotImplementedError('the plain-PyTorch Mamba3 takes whole sequences: no seq_idx, cu_seqlens or '
                                      'inference cache')
        return mamba3_mixer(_NO_RULES, self, u)


class Mamba3Block(torch.nn.Module):
    '''mamba-ssm's ``Block`` without MLP: add -> RMSNorm -> mixer, returning the mixer output and the residual
    stream (float32 or wider).'''

    def __init__(self, d_model: int, eps: float = 1e-5, mixer_class: Callable[..., torch.nn.Module] = None,
                 **mixer_options):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.mixer = (mixer_class or Mamba3)(d_model, **mixer_options)

    def forward(self, hidden_states: torch.Tensor,
                residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states if residual is None else residual + hidden_states
        residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        return self.mixer(self.norm(residual.to(self.norm.weight.dtype))), residual


class Mamba3Backbone(torch.nn.Module):
    '''Embedding, Mamba-3 blocks and a final RMSNorm (mamba-ssm's ``MixerModel``); from token ids or embeddings.'''

    def __init__(self, d_model: int, n_layer: int, vocab_size: int, eps: float = 1e-5,
                 mixer_class: Callable[..., torch.nn.Module] = None, **mixer_options):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, d_model)
        self.layers = torch.nn.ModuleList(Mamba3Block(d_model, eps, mixer_class, layer_idx=index, **mixer_options)
                                          for index in range(n_layer))
        self.norm_f = RMSNorm(d_model, eps)

    def forward(self, input_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError('Pass exactly one of input_ids and inputs_embeds.')
        hidden_states = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual)
        residual = hidden_states if residual is None else residual + hidden_states
        return self.norm_f(residual.to(self.norm_f.weight.dtype))


class Mamba3LMHeadModel(torch.nn.Module):
    '''A causal language model of Mamba-3 blocks, laid out as mamba-ssm's ``MambaLMHeadModel`` (tied embeddings);
    ``model(input_ids)`` or ``model(inputs_embeds=...)`` gives the logits ``(batch, length, vocab_size)``. The mixers
    are the plain-PyTorch :py:class:`Mamba3`, or mamba-ssm's own with ``mixer_class=mamba_ssm.modules.mamba3.Mamba3``
    (its Triton kernels, on a GPU); both are explained alike (canonized), and their weights load into each other.

    Examples
    --------
    >>> model = Mamba3LMHeadModel(d_model=16, n_layer=2, vocab_size=20, d_state=16, headdim=8).eval()
    >>> model(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 20])
    '''

    def __init__(self, d_model: int, n_layer: int, vocab_size: int, eps: float = 1e-5,
                 mixer_class: Callable[..., torch.nn.Module] = None, **mixer_options):
        super().__init__()
        self.backbone = Mamba3Backbone(d_model, n_layer, vocab_size, eps, mixer_class, **mixer_options)
        self.lm_head = torch.nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.backbone.embedding.weight

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.backbone.embedding

    def forward(self, input_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError('Mamba3LMHeadModel takes no attention_mask (as mamba-ssm\'s MambaLMHeadModel): explain '
                             'sequences of different lengths in separate calls, without padding.')
        return self.lm_head(self.backbone(input_ids, inputs_embeds=inputs_embeds))


FAMILY = Family(
    name='Mamba-3', library='mamba-lrp', library_modules=(__name__,),
    canonized=in_module(__name__, {'Mamba3': MIXER}),
    layers=in_module(__name__, {
        'Mamba3LMHeadModel': COMPOSITION, 'Mamba3Backbone': COMPOSITION, 'Mamba3Block': COMPOSITION,
        'MixerRMSNorm': INSIDE_MIXER,
    }),
)
