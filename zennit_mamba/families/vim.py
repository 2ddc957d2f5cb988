'''Vision Mamba (Vim; Zhu et al., ICML 2024) in plain PyTorch, with the parameter names and shapes of the official
checkpoints (hustvl/Vim, ``vim_t_midclstok_76p1acc.pth``, ``vim_s_midclstok_80p5acc.pth``, ...), so that

>>> model = vim_tiny()  # doctest: +SKIP
>>> model.load_state_dict(torch.load(path, map_location='cpu')['model'])  # doctest: +SKIP

gives the published network without hustvl's fork of mamba-ssm. The architecture: a patch embedding, a class token
in the middle of the patch sequence, an absolute position embedding, blocks of add -> RMSNorm -> bidirectional
("bimamba v2") mixer with the residual stream in float32 (or wider), a final RMSNorm and a linear head on the class
token. The mixer runs one Mamba-1 branch on the sequence and one, with its own convolution, selection, ``A`` and
``D``, on the reversed sequence; both share ``in_proj`` and ``out_proj``, and their gated outputs are summed and
halved (the checkpoints' "div2"). Scans run through :py:func:`~zennit_mamba.kernels.scan.selective_scan`: mamba-ssm's
CUDA kernel on a GPU where it is installed, PyTorch elsewhere.

The mixer's own forward is the canonical computation of :py:func:`bidirectional_mixer` with every rule off;
:py:class:`~zennit_mamba.MambaComposite` runs the same function with the MambaLRP rules on both directions, and the
RMSNorms take the LN-rule. Stochastic depth (training-time drop path) is not implemented.
'''
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from zennit_mamba.core.family import Canonized, Family, in_module
from zennit_mamba.core.layers import COMPOSITION, NORM
from zennit_mamba.core.ruleset import RuleSet
from zennit_mamba.mixers.io import run_mixer
from zennit_mamba.mixers.mamba1 import SelectiveParts, selective_branch

#: the plain computation: the mixer's own forward
_NO_RULES = RuleSet(())
#: parameter and module names of the forward and the backward branch (A_log, D, conv1d, x_proj, dt_proj)
_BRANCH_NAMES = (('A_log', 'D', 'conv1d', 'x_proj', 'dt_proj'), ('A_b_log', 'D_b', 'conv1d_b', 'x_proj_b', 'dt_proj_b'))


class RMSNorm(torch.nn.Module):
    '''``weight * h / sqrt(mean(h^2) + eps)``, computed in float32 or wider (mamba-ssm's RMSNorm: no bias).'''

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        wide = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32))
        normalised = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normalised).to(hidden_states.dtype)


class BidirectionalMamba(torch.nn.Module):
    '''Vim's "bimamba v2" mixer: a forward and a backward Mamba-1 branch sharing ``in_proj`` and ``out_proj``.

    Parameters
    ----------
    d_model : int
        Width of the residual stream.
    d_state, d_conv, expand : int, optional
        State size, convolution width and expansion of the inner width (Mamba-1's defaults).
    divide_out : bool, optional
        Halve the sum of the two branches (the official "div2" checkpoints).
    '''

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, divide_out: bool = True):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.divide_out = divide_out
        self.in_proj = torch.nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.out_proj = torch.nn.Linear(self.d_inner, d_model, bias=False)
        # the backward branch's names are the official checkpoints': A_b_log, D_b, conv1d_b, x_proj_b, dt_proj_b
        for a_log, d, conv, x_proj, dt_proj in _BRANCH_NAMES:
            self.register_parameter(a_log, torch.nn.Parameter(
                torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1)))
            self.register_parameter(d, torch.nn.Parameter(torch.ones(self.d_inner)))
            self.add_module(conv, torch.nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                                  padding=d_conv - 1))
            self.add_module(x_proj, torch.nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            self.add_module(dt_proj, torch.nn.Linear(self.dt_rank, self.d_inner))

    def branch(self, backward: bool) -> SelectiveParts:
        '''The parts of the forward or the backward branch.'''
        a_log, d, conv, x_proj, dt_proj = _BRANCH_NAMES[backward]
        return SelectiveParts(getattr(self, conv), getattr(self, x_proj), getattr(self, dt_proj), getattr(self, a_log),
                              getattr(self, d))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return bidirectional_mixer(_NO_RULES, self, hidden_states)


def bidirectional_mixer(rules: RuleSet, mixer: BidirectionalMamba, hidden_states: torch.Tensor) -> torch.Tensor:
    '''Vim's bidirectional mixer on ``(batch, length, d_model)`` normalised hidden states under ``rules``: both
    branches through :py:func:`~zennit_mamba.mixers.mamba1.selective_branch`, the backward one on the reversed
    sequence.'''
    dtype = hidden_states.dtype
    x, gate = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
    forward, _ = selective_branch(rules, x, gate, mixer.branch(False), mixer.dt_rank, mixer.d_state, dtype)
    backward, _ = selective_branch(rules, x.flip(-1), gate.flip(-1), mixer.branch(True), mixer.dt_rank,
                                   mixer.d_state, dtype)
    combined = forward + backward.flip(-1)
    if mixer.divide_out:
        combined = combined / 2
    return mixer.out_proj(combined.transpose(1, 2).to(dtype))


def canonized_forward(rules: RuleSet, self: BidirectionalMamba, hidden_states: torch.Tensor) -> torch.Tensor:
    '''Forward of a :py:class:`BidirectionalMamba` under :py:class:`~zennit_mamba.MambaComposite` (recomputed in
    the backward pass where the composite was made with ``recompute=True``).'''
    return run_mixer(rules, bidirectional_mixer, self, hidden_states)


class VimBlock(torch.nn.Module):
    '''Add -> RMSNorm -> mixer, returning the mixer output and the residual stream (float32 or wider).'''

    def __init__(self, dim: int, eps: float = 1e-5, **mixer_options):
        super().__init__()
        self.mixer = BidirectionalMamba(dim, **mixer_options)
        self.norm = RMSNorm(dim, eps)

    def forward(
        self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states if residual is None else residual + hidden_states
        residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        return self.mixer(self.norm(residual.to(self.norm.weight.dtype))), residual


class PatchEmbed(torch.nn.Module):
    '''Image ``(batch, channels, height, width)`` to patch tokens ``(batch, patches, dim)`` by a strided Conv2d.'''

    def __init__(self, img_size: int, patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.grid_size = ((img_size - patch_size) // stride + 1,) * 2
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = torch.nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(f'Images of size {tuple(images.shape[-2:])}; this model takes {self.img_size}.')
        return self.proj(images).flatten(2).transpose(1, 2)


class VisionMamba(torch.nn.Module):
    '''Vim with a middle class token, absolute position embedding and bidirectional mixers.

    Parameters
    ----------
    img_size, patch_size, stride, channels : int, optional
        Input resolution, patch size, patch stride and input channels.
    depth, embed_dim, d_state : int, optional
        Number of blocks, width and state size (Vim-Ti: 24 blocks of 192; Vim-S: 384; Vim-B: 768).
    num_classes : int, optional
        Classes of the linear head.
    norm_epsilon : float, optional
        Epsilon of the RMSNorms.
    divide_out : bool, optional
        Halve the sum of each mixer's two branches.
    drop_rate : float, optional
        Dropout of the token sequence in training.

    Examples
    --------
    >>> model = VisionMamba(img_size=16, patch_size=4, stride=4, depth=2, embed_dim=16, num_classes=3).eval()
    >>> model(torch.randn(2, 3, 16, 16)).shape
    torch.Size([2, 3])
    '''

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        stride: int = 16,
        depth: int = 24,
        embed_dim: int = 192,
        d_state: int = 16,
        channels: int = 3,
        num_classes: int = 1000,
        norm_epsilon: float = 1e-5,
        divide_out: bool = True,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, channels, embed_dim)
        patches = self.patch_embed.num_patches
        #: where the class token sits in the token sequence
        self.token_position = patches // 2
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, patches + 1, embed_dim))
        #: the token sequence passes this (dropout in training, as in the official model): the layer to read token
        #: relevance at, e.g. ``LayerMambaLRP(model, model.pos_drop)``
        self.pos_drop = torch.nn.Dropout(drop_rate)
        self.layers = torch.nn.ModuleList(
            VimBlock(embed_dim, norm_epsilon, d_state=d_state, divide_out=divide_out) for _ in range(depth))
        self.norm_f = RMSNorm(embed_dim, norm_epsilon)
        self.head = torch.nn.Linear(embed_dim, num_classes)
        torch.nn.init.trunc_normal_(self.pos_embed, std=0.02)
        torch.nn.init.trunc_normal_(self.cls_token, std=0.02)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        '''The token sequence entering the first block: patches, the class token in the middle, positions added.'''
        patches = self.patch_embed(images)
        position = self.token_position
        cls_token = self.cls_token.expand(len(patches), -1, -1)
        return self.pos_drop(torch.cat([patches[:, :position], cls_token, patches[:, position:]], dim=1)
                             + self.pos_embed)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        '''Logits from images ``(batch, channels, height, width)`` or from a token sequence ``(batch, tokens,
        dim)`` such as :py:meth:`tokens` returns, whose relevance MambaLRP then gives directly (one call of the
        model, so that relevance enters and leaves at its ends).'''
        hidden_states, residual = (inputs if inputs.dim() == 3 else self.tokens(inputs)), None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual)
        residual = residual + hidden_states
        hidden_states = self.norm_f(residual.to(self.norm_f.weight.dtype))
        return self.head(hidden_states[:, self.token_position])

    def patch_map(self, token_relevance: torch.Tensor) -> torch.Tensor:
        '''Token relevance ``(batch, tokens)`` (e.g. ``LayerMambaLRP(model, model.pos_drop)`` summed over the last
        dimension) as a ``(batch, height, width)`` map: each patch's relevance spread evenly over its pixels (summed
        where patches overlap), the class token left out. The map sums to the patches' relevance.'''
        patches = torch.cat([token_relevance[:, :self.token_position], token_relevance[:, self.token_position + 1:]],
                            dim=1)
        conv = self.patch_embed.proj
        size, stride = conv.kernel_size[0], conv.stride[0]
        per_pixel = patches.transpose(0, 1).reshape(-1, 1).expand(-1, size * size) / (size * size)
        columns = per_pixel.reshape(patches.shape[1], len(patches), size * size).permute(1, 2, 0)
        return F.fold(columns, self.patch_embed.img_size, size, stride=stride)[:, 0]


def _vim(embed_dim: int, options: dict) -> VisionMamba:
    # options (e.g. stride=8, num_classes) override the 224-pixel, 16-pixel-patch defaults
    return VisionMamba(**{'patch_size': 16, 'stride': 16, 'depth': 24, 'embed_dim': embed_dim, **options})


def vim_tiny(**options) -> VisionMamba:
    '''Vim-Ti (``vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``).'''
    return _vim(192, options)


def vim_small(**options) -> VisionMamba:
    '''Vim-S (``vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``).'''
    return _vim(384, options)


def vim_base(**options) -> VisionMamba:
    '''Vim-B (``vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2``).'''
    return _vim(768, options)


FAMILY = Family(
    name='Vision Mamba (Vim)', library='mamba-lrp', library_modules=(__name__,),
    canonized=in_module(__name__, {'BidirectionalMamba': Canonized(
        canonized_forward, selection=('x_proj', 'dt_proj', 'x_proj_b', 'dt_proj_b'))}),
    layers=in_module(__name__, {
        'VisionMamba': COMPOSITION, 'VimBlock': COMPOSITION, 'PatchEmbed': COMPOSITION, 'RMSNorm': NORM,
    }),
)
