'''An independent, slow MambaLRP reference: gradient x input on a Mamba forward written out by hand.

Every MambaLRP rule is a ``detach`` in this forward (see shared/method.md); the scan is a per-timestep loop. Nothing
here uses zennit or zennit_mamba. It reads the weights of a transformers ``MambaForCausalLM``,
``FalconMambaForCausalLM`` (Mamba-1 with normalised selection) or ``Mamba2ForCausalLM``, or of this package's
``Mamba3LMHeadModel``.
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


def _gate(y: torch.Tensor, gate: torch.Tensor, rules: Collection[str]) -> torch.Tensor:
    '''A mixer's output gate ``y * gate``: the half rule where ``'gate'`` is in ``rules``; with ``'held_gate'`` also
    there (``gate_relevance='value'``), the gate held instead, so that relevance flows through ``y`` only.'''
    if {'gate', 'held_gate'} <= set(rules):
        return y * gate.detach()
    gated = y * gate
    return 0.5 * gated + 0.5 * gated.detach() if 'gate' in rules else gated


def _sequential_scan(x, delta, A, B, C, D):
    '''x, delta: (batch, length, channels); B, C: (batch, length, state); A: (channels, state).'''
    state = torch.zeros(x.shape[0], x.shape[2], A.shape[1], dtype=x.dtype, device=x.device)
    outputs = []
    for t in range(x.shape[1]):
        decay = torch.exp(delta[:, t, :, None] * A)
        state = decay * state + (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        outputs.append((state * C[:, t, None, :]).sum(-1) + D * x[:, t])
    return torch.stack(outputs, dim=1)


def _causal_depthwise_conv(x: torch.Tensor, conv: torch.nn.Conv1d) -> torch.Tensor:
    # kernel: (channels, taps), tap k - 1 is the current position
    length, kernel = x.shape[1], conv.weight[:, 0, :]
    padded = F.pad(x, (0, 0, kernel.shape[1] - 1, 0))
    output = sum(padded[:, k:k + length] * kernel[:, k] for k in range(kernel.shape[1]))
    return output if conv.bias is None else output + conv.bias


def _mixer(mixer: torch.nn.Module, u: torch.Tensor, rules: Collection[str]) -> torch.Tensor:
    x, z = (u @ mixer.in_proj.weight.T).chunk(2, dim=-1)
    x = _silu(_causal_depthwise_conv(x, mixer.conv1d), 'silu' in rules)

    rank, state_size = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, C = torch.split(x @ mixer.x_proj.weight.T, [rank, state_size, state_size], dim=-1)
    if hasattr(mixer, 'dt_layernorm'):
        # FalconMamba: weightless RMS norms on the selection, which the SSM rule detaches anyway
        dt, B, C = (value * torch.rsqrt(value.pow(2).mean(-1, keepdim=True) + mixer.rms_eps) for value in (dt, B, C))
    delta = F.softplus(dt @ mixer.dt_proj.weight.T + mixer.dt_proj.bias)
    if 'ssm' in rules:
        delta, B, C = delta.detach(), B.detach(), C.detach()
    A = -torch.exp(mixer.A_log.float()).to(u.dtype)
    y = _sequential_scan(x, delta, A, B, C, mixer.D.float().to(u.dtype))

    gated = _gate(y, _silu(z, 'silu' in rules), rules)
    return gated @ mixer.out_proj.weight.T


def _mamba2_mixer(mixer: torch.nn.Module, u: torch.Tensor, rules: Collection[str]) -> torch.Tensor:
    '''Mamba-2: per-head scalar decay, grouped B and C, gated RMS norm norm(y * silu(z)); per-timestep loop.'''
    batch, length, _ = u.shape
    heads, head_dim, groups, state = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    inner = heads * head_dim
    z, xBC, dt = torch.split(u @ mixer.in_proj.weight.T, [inner, inner + 2 * groups * state, heads], dim=-1)
    xBC = _silu(_causal_depthwise_conv(xBC, mixer.conv1d), 'silu' in rules)
    x, B, C = torch.split(xBC, [inner, groups * state, groups * state], dim=-1)
    delta = F.softplus(dt + mixer.dt_bias)
    A = -torch.exp(mixer.A_log)
    if 'ssm' in rules:
        delta, A, B, C = delta.detach(), A.detach(), B.detach(), C.detach()
    x = x.reshape(batch, length, heads, head_dim)
    # head h reads group h // (heads / groups)
    B = B.reshape(batch, length, groups, state).repeat_interleave(heads // groups, dim=2)
    C = C.reshape(batch, length, groups, state).repeat_interleave(heads // groups, dim=2)
    hidden = torch.zeros(batch, heads, head_dim, state, dtype=u.dtype, device=u.device)
    outputs = []
    for t in range(length):
        decay = torch.exp(delta[:, t] * A)[:, :, None, None]
        hidden = decay * hidden + (delta[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        outputs.append((hidden * C[:, t, :, None, :]).sum(-1) + mixer.D[:, None] * x[:, t])
    y = torch.stack(outputs, dim=1).reshape(batch, length, inner)

    gated = _gate(y, _silu(z, 'silu' in rules), rules)
    grouped = gated.reshape(batch, length, groups, inner // groups)
    scale = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + mixer.norm.variance_epsilon)
    if 'norm' in rules:
        scale = scale.detach()
    normed = mixer.norm.weight * (grouped * scale).reshape(batch, length, inner)
    return normed @ mixer.out_proj.weight.T


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
        mixer = (_mixer if hasattr(block.mixer, 'x_proj') else _mamba3_mixer if hasattr(block.mixer, 'B_bias')
                 else _mamba2_mixer)
        hidden = hidden + mixer(block.mixer, _rms_norm(block.norm, hidden, 'norm' in rules), rules)
    hidden = _rms_norm(model.backbone.norm_f, hidden, 'norm' in rules)
    logits = hidden[:, -1] @ model.lm_head.weight.T
    explained = logits[torch.arange(len(targets)), targets]
    gradient, = torch.autograd.grad(explained.sum(), embeddings)
    return (embeddings * gradient).detach(), explained.detach()


def _vim_branch(x, z, conv, x_proj, dt_proj, A_log, D, rules):
    '''One direction of Vim's mixer on ``(batch, length, channels)`` halves of in_proj's output: conv, SiLU,
    selection, per-timestep scan, gate.'''
    x = _silu(_causal_depthwise_conv(x, conv), 'silu' in rules)
    state_size = A_log.shape[1]
    rank = x_proj.weight.shape[0] - 2 * state_size
    dt, B, C = torch.split(x @ x_proj.weight.T, [rank, state_size, state_size], dim=-1)
    delta = F.softplus(dt @ dt_proj.weight.T + dt_proj.bias)
    if 'ssm' in rules:
        delta, B, C = delta.detach(), B.detach(), C.detach()
    y = _sequential_scan(x, delta, -torch.exp(A_log).to(x.dtype), B, C, D.to(x.dtype))
    gated = _gate(y, _silu(z, 'silu' in rules), rules)
    return gated


def vim_reference_relevance(
    model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor, rules: Collection[str] = ALL_RULES,
) -> Tuple[torch.Tensor, torch.Tensor]:
    '''Relevance of a Vision Mamba's token sequence (``model.tokens(images)``) for the logits ``targets``: the
    bidirectional mixer written out, the backward branch on the reversed sequence with its own parameters.'''
    tokens = tokens.detach().clone().requires_grad_()
    residual = tokens
    for block in model.layers:
        mixer = block.mixer
        x, z = (_rms_norm(block.norm, residual, 'norm' in rules) @ mixer.in_proj.weight.T).chunk(2, dim=-1)
        forward = _vim_branch(x, z, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D, rules)
        backward = _vim_branch(x.flip(1), z.flip(1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b,
                               mixer.A_b_log, mixer.D_b, rules).flip(1)
        residual = residual + ((forward + backward) / 2) @ mixer.out_proj.weight.T
    hidden = _rms_norm(model.norm_f, residual, 'norm' in rules)
    logits = hidden[:, model.token_position] @ model.head.weight.T + model.head.bias
    explained = logits[torch.arange(len(targets)), targets]
    gradient, = torch.autograd.grad(explained.sum(), tokens)
    return (tokens * gradient).detach(), explained.detach()


def sequential_gated_delta_rule(query, key, value, g, beta, initial_state=None):
    '''The gated delta rule token by token, as its definition reads (an independent check of the chunked form):
    ``S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T q_t``, per batch row
    and head; ``query``, ``key`` ``(batch, heads, length, key_dim)``, ``value`` ``(batch, heads, length, value_dim)``,
    ``beta`` ``(batch, heads, length)``, ``g`` the same (one decay per head and step) or ``(batch, heads, length,
    key_dim)`` (Kimi Delta Attention's, per key channel). Returns the outputs and the last state.'''
    batch, heads, length, key_dim = key.shape
    state = (torch.zeros(batch, heads, key_dim, value.shape[-1], dtype=value.dtype)
             if initial_state is None else initial_state)
    identity = torch.eye(key_dim, dtype=value.dtype)
    outputs = []
    for t in range(length):
        k, q, v = key[:, :, t], query[:, :, t], value[:, :, t]
        b = beta[:, :, t, None, None]
        projection = identity - b * k[..., :, None] * k[..., None, :]
        decay = g[:, :, t, :, None].exp() if g.dim() == 4 else g[:, :, t, None, None].exp()
        state = projection @ (decay * state) + b * k[..., :, None] * v[..., None, :]
        outputs.append((state * q[..., :, None]).sum(-2))
    return torch.stack(outputs, 2), state


def _turn_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    '''(x[2i], x[2i+1]) turned by angles[i], one pair at a time.'''
    x = x.clone()
    for i in range(angles.shape[-1]):
        first, second = x[..., 2 * i].clone(), x[..., 2 * i + 1].clone()
        cos, sin = torch.cos(angles[..., i]), torch.sin(angles[..., i])
        x[..., 2 * i], x[..., 2 * i + 1] = first * cos - second * sin, first * sin + second * cos
    return x


def _mamba3_mixer(mixer: torch.nn.Module, u: torch.Tensor, rules: Collection[str]) -> torch.Tensor:
    '''mamba-ssm's Mamba3 (SISO) token by token, from its parameters: the trapezoidal recurrence
    h_t = a_t h_{t-1} + a_t dt_t (1 - s_t) x_{t-1} k_{t-1}^T + dt_t s_t x_t k_t^T, y_t = h_t q_t + D x_t, then the gate
    (or the gated norm). As checked against mamba-ssm 2.3.2's Triton kernels (run by Triton's interpreter, 2e-5).'''
    batch, length, _ = u.shape
    heads, headdim, state, groups = mixer.nheads, mixer.headdim, mixer.d_state, mixer.num_bc_heads
    inner, angle_count = mixer.d_inner, mixer.num_rope_angles
    z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(
        u @ mixer.in_proj.weight.T, [inner, inner, groups * state, groups * state, heads, heads, heads, angle_count],
        dim=-1)
    x, z = x.reshape(batch, length, heads, headdim), z.reshape(batch, length, heads, headdim)
    A = torch.clamp(-F.softplus(dd_A), max=-mixer.A_floor)
    dt = F.softplus(dd_dt + mixer.dt_bias)
    trap = torch.sigmoid(trap)

    def normalised(matrix, norm, bias):
        matrix = matrix.reshape(batch, length, groups, state)
        matrix = norm.weight * matrix / torch.sqrt(matrix.pow(2).mean(-1, keepdim=True) + norm.eps)
        return matrix[:, :, [head * groups // heads for head in range(heads)]] + bias[:, 0]

    k, q = normalised(B, mixer.B_norm, mixer.B_bias), normalised(C, mixer.C_norm, mixer.C_bias)
    theta = torch.zeros(batch, heads, angle_count, dtype=u.dtype)
    h = torch.zeros(batch, heads, headdim, state, dtype=u.dtype)
    x_before, k_before = torch.zeros_like(x[:, 0]), torch.zeros_like(k[:, 0])
    outputs = []
    for t in range(length):
        theta = theta + torch.pi * torch.tanh(angles[:, t, None, :]) * dt[:, t, :, None]
        selection = [torch.exp(A[:, t] * dt[:, t]), dt[:, t], trap[:, t], _turn_pairs(q[:, t], theta),
                     _turn_pairs(k[:, t], theta)]
        if 'ssm' in rules:
            selection = [value.detach() for value in selection]
        decay, step, share, query, key = selection
        h = (decay[..., None, None] * h
             + (decay * step * (1 - share))[..., None, None] * x_before[..., None] * k_before[..., None, :]
             + (step * share)[..., None, None] * x[:, t, ..., None] * key[..., None, :])
        outputs.append((h * query[..., None, :]).sum(-1) + mixer.D[:, None] * x[:, t])
        x_before, k_before = x[:, t], key
    y = torch.stack(outputs, dim=1)
    gate = _silu(z, 'silu' in rules)
    if mixer.is_outproj_norm:
        scale = torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + mixer.norm.eps)
        if 'norm' in rules:
            scale = scale.detach()
        y = mixer.norm.weight.reshape(heads, headdim) * y * scale
    gated = _gate(y, gate, rules)
    return gated.reshape(batch, length, inner) @ mixer.out_proj.weight.T



def sequential_lightning_attention(layer: torch.nn.Module, x: torch.Tensor, rules: Collection[str]) -> torch.Tensor:
    '''MiniMax's lightning attention token by token, from its parameters: ``[q, k, v] = silu(qkv_proj(x))``,
    ``S_t = lambda_h S_{t-1} + k_t v_t^T`` with ``lambda_h = exp(-slope_h)``, ``o_t = S_t^T q_t``, then ``out_proj(
    sigmoid(output_gate(x)) * w * rms(o))``; each rule applied by hand where it is in ``rules``: ``q`` and ``k``
    detached (``'ssm'``), the SiLU as ``x * (silu(x) / x)`` with the ratio detached (``'silu'``), the norm as
    ``o * (u / o)`` with the ratio detached (``'norm'``), the sigmoid gate detached (``'attention'``).'''
    batch, length, _ = x.shape
    heads, head_dim = layer.num_attention_heads, layer.head_dim
    projected = x @ layer.qkv_proj.weight.T
    ratio = F.silu(projected) / projected
    qkv = projected * (ratio.detach() if 'silu' in rules else ratio)
    query, key, value = qkv.reshape(batch, length, heads, 3 * head_dim).split(head_dim, dim=-1)
    if 'ssm' in rules:
        query, key = query.detach(), key.detach()
    decay = torch.exp(-layer.slope_rate.reshape(heads, 1, 1)).to(x.dtype)
    state = torch.zeros(batch, heads, head_dim, head_dim, dtype=x.dtype)
    outputs = []
    for t in range(length):
        state = decay * state + key[:, t, :, :, None] * value[:, t, :, None, :]
        outputs.append((state * query[:, t, :, :, None]).sum(-2))
    o = torch.stack(outputs, 1).reshape(batch, length, heads * head_dim)
    # in float32 whatever the dtype, as MiniMaxRMSNorm computes; under the LN-rule its ratio u / o held
    o32 = o.float()
    normalised = layer.norm.weight * (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + layer.norm.variance_epsilon)
                                      ).to(o.dtype)
    if 'norm' in rules:
        normalised = o * (normalised / o).detach()
    gate = torch.sigmoid(x @ layer.output_gate.weight.T)
    gate = gate.detach() if 'attention' in rules else gate
    return (gate * normalised) @ layer.out_proj.weight.T


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    '''GeLU in its tanh approximation (transformers' ``gelu_pytorch_tanh``), written out.'''
    return 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))


def sequential_recurrent_gemma_block(block: torch.nn.Module, u: torch.Tensor, position_ids: torch.Tensor,
                                     rules: Collection[str]) -> torch.Tensor:
    '''RecurrentGemma's recurrent block (Griffin's RG-LRU) token by token from its equations, with the MambaLRP rules
    as detaches: ``linear_out(h * gelu(linear_y(u)))``, ``x = conv(linear_x(u))``, per head ``i_t = sigmoid(x_t W_i +
    b_i)``, ``r_t = sigmoid(x_t W_r + b_r)``, ``a_t = exp(-8 r_t softplus(c))``, ``h_t = a_t h_{t-1} + sqrt(1 - a_t^2)
    i_t x_t``, and at a reset (``position_ids == 0``) ``h_t = i_t x_t``. The SSM rule detaches ``a``, the normaliser
    and ``i``; the identity rule holds ``gelu(y) / y``; the half rule halves the product's gradient.'''
    rg_lru = block.rg_lru
    heads, block_width = rg_lru.num_attention_heads, rg_lru.block_width
    y = u @ block.linear_y.weight.T + block.linear_y.bias
    gate = _gelu_tanh(y)
    if 'silu' in rules:
        gate = y * (gate / y).detach()
    x = _causal_depthwise_conv(u @ block.linear_x.weight.T + block.linear_x.bias, block.conv_1d)
    state = torch.zeros(u.shape[0], x.shape[2], dtype=u.dtype)
    softplus_c = torch.log1p(torch.exp(rg_lru.recurrent_param))
    states = []
    for t in range(u.shape[1]):
        x_t = x[:, t].reshape(-1, heads, block_width)
        input_gate = torch.sigmoid(torch.einsum('bhi,hij->bhj', x_t, rg_lru.input_gate_weight)
                                   + rg_lru.input_gate_bias).reshape(u.shape[0], -1)
        recurrent_gate = torch.sigmoid(torch.einsum('bhi,hij->bhj', x_t, rg_lru.recurrent_gate_weight)
                                       + rg_lru.recurrent_gate_bias).reshape(u.shape[0], -1)
        a = torch.exp(-8.0 * recurrent_gate * softplus_c)
        normaliser = torch.sqrt(1.0 - a ** 2)
        reset = (position_ids[:, t] == 0)[:, None]
        a = torch.where(reset, torch.zeros_like(a), a)
        normaliser = torch.where(reset, torch.ones_like(normaliser), normaliser)
        if 'ssm' in rules:
            a, normaliser, input_gate = a.detach(), normaliser.detach(), input_gate.detach()
        state = a * state + normaliser * input_gate * x[:, t]
        states.append(state)
    gated = _gate(torch.stack(states, 1), gate, rules)
    return gated @ block.linear_out.weight.T + block.linear_out.bias


def sequential_mlstm_layer(layer: torch.nn.Module, x: torch.Tensor, rules: Collection[str]) -> torch.Tensor:
    '''xLSTM's mLSTM layer token by token, from its parameters and the equations of Beck et al. (2024): per head,
    ``m_t = max(log sigmoid(f~_t) + m_{t-1}, i~_t)``, ``f_t = exp(log sigmoid(f~_t) + m_{t-1} - m_t)``,
    ``i_t = exp(i~_t - m_t)``, ``C_t = f_t C_{t-1} + i_t k_t v_t^T``, ``n_t = f_t n_{t-1} + i_t k_t``,
    ``h_t = C_t^T q_t / (max(|n_t . q_t|, exp(-m_t)) + eps)`` with ``q`` scaled by ``1 / sqrt(d_qk)`` and the gate
    pre-activations soft-capped, ``cap * tanh(. / cap)``; then ``out_proj(sigmoid(o~) * w * layernorm(h))`` per head.
    Each rule applied by hand where it is in ``rules``: ``q``, ``k``, ``i~``, ``f~`` detached (``'ssm'``: ``m``,
    the gates and the denominator follow them), the norm as ``h * (u / h)`` with the ratio detached (``'norm'``), the
    sigmoid gate detached (``'attention'``). The stabiliser is the step-by-step one (transformers computes most
    positions chunkwise, whose stabiliser differs; the outputs differ through ``eps`` only).'''
    config = layer.config
    batch, length, _ = x.shape
    heads = config.num_heads

    def linear(module: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
        return inputs @ module.weight.T + (0.0 if module.bias is None else module.bias)

    def capped(values: torch.Tensor) -> torch.Tensor:
        return config.gate_soft_cap * torch.tanh(values / config.gate_soft_cap)

    if config.weight_mode == 'single':
        query, key, value, o_preact = (linear(module, x) for module in (layer.q, layer.k, layer.v, layer.ogate_preact))
        i_preact, f_preact = capped(linear(layer.igate_preact, x)), capped(linear(layer.fgate_preact, x))
    else:
        qkvo = linear(layer.qkv_opreact, x)
        query, key = qkvo[..., :layer.qk_dim], qkvo[..., layer.qk_dim:2 * layer.qk_dim]
        value, o_preact = qkvo[..., 2 * layer.qk_dim:2 * layer.qk_dim + layer.v_dim], qkvo[..., -layer.v_dim:]
        gates = capped(linear(layer.ifgate_preact, x))
        i_preact, f_preact = gates[..., :heads], gates[..., heads:]
    query, key, value = (tensor.reshape(batch, length, heads, -1) for tensor in (query, key, value))
    if 'ssm' in rules:
        query, key, i_preact, f_preact = query.detach(), key.detach(), i_preact.detach(), f_preact.detach()
    qk_dim, v_dim = query.shape[-1], value.shape[-1]
    memory = torch.zeros(batch, heads, qk_dim, v_dim, dtype=x.dtype)
    normaliser = torch.zeros(batch, heads, qk_dim, dtype=x.dtype)
    stabiliser = torch.zeros(batch, heads, dtype=x.dtype)
    outputs = []
    for t in range(length):
        log_forget = F.logsigmoid(f_preact[:, t])
        new_stabiliser = torch.maximum(log_forget + stabiliser, i_preact[:, t])
        forget = torch.exp(log_forget + stabiliser - new_stabiliser)
        write = torch.exp(i_preact[:, t] - new_stabiliser)
        written = key[:, t, :, :, None] * value[:, t, :, None]
        memory = forget[..., None, None] * memory + write[..., None, None] * written
        normaliser = forget[..., None] * normaliser + write[..., None] * key[:, t]
        stabiliser = new_stabiliser
        scaled = query[:, t] * qk_dim ** -0.5
        numerator = (scaled[..., None] * memory).sum(-2)
        denominator = torch.maximum((scaled * normaliser).sum(-1).abs(), torch.exp(-stabiliser)) + config.eps
        outputs.append(numerator / denominator[..., None])
    h = torch.stack(outputs, 1)  # (batch, length, heads, v head dim)
    # a LayerNorm per head, in float32 where the config forces it, as xLSTMMultiHeadLayerNorm computes
    norm = layer.multihead_norm
    centred = h.float() if norm.force_float32_reductions else h
    centred = centred - centred.mean(-1, keepdim=True)
    normalised = (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)
    normalised = normalised.reshape(batch, length, -1) * norm.weight + (0.0 if norm.bias is None else norm.bias)
    flat = h.reshape(batch, length, -1)
    if 'norm' in rules:
        normalised = flat * (normalised / flat).detach()
    gate = torch.sigmoid(o_preact)
    gate = gate.detach() if 'attention' in rules else gate
    return linear(layer.out_proj, gate * normalised)
