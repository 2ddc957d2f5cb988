'''MambaComposite as a Zennit user meets it: context, attributors, restoration, bad input, traps.'''
import collections
import contextlib
import copy
import threading

import pytest
import torch
import zennit.composites
from transformers.models.mamba.modeling_mamba import MambaMixer, MambaRMSNorm
from zennit.attribution import Gradient
from zennit.rules import Epsilon, Gamma, ZPlus

from conftest import (
    assert_snapshots_equal, embed, explain, last_logits, make_mamba, relative_error, snapshot, target_relevance,
)
from zennit_mamba import ExplainedModel, LNRule, MambaComposite, UnsupportedModelError, ZennitRule


def assert_restored(model, before, embeddings, logits_before):
    assert_snapshots_equal(snapshot(model), before)
    assert before['hooks'] == before['instance_forwards'] == before['rule_settings'] == 0
    with torch.no_grad():
        assert torch.equal(last_logits(model, embeddings), logits_before)


@contextlib.contextmanager
def restored_afterwards(model):
    '''Check that whatever happens inside leaves ``model`` exactly as it was.'''
    embeddings = embed(model, 1, 5)
    with torch.no_grad():
        logits_before = last_logits(model, embeddings)
    before = snapshot(model)
    yield embeddings
    assert_restored(model, before, embeddings, logits_before)


class LastTokenClassifier(torch.nn.Module):
    '''Takes embeddings, returns the logits at the last position: what zennit's attributors expect.'''

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, embeddings):
        return last_logits(self.model, embeddings)


@pytest.mark.unmodified_forward
def test_forward_unchanged_inside_context_and_model_restored_after():
    model = make_mamba(layers=2, dtype=torch.float32, residual_in_fp32=True)
    embeddings = embed(model, 2, 23)
    with torch.no_grad():
        expected = model(inputs_embeds=embeddings, use_cache=False).logits
    before = snapshot(model)
    with MambaComposite().context(model) as modified:
        assert modified is model
        inside = modified(inputs_embeds=embeddings, use_cache=False).logits
        assert snapshot(model)['hooks'] > 0
    assert relative_error(inside, expected) <= 1e-6
    assert_restored(model, before, embeddings, last_logits(model, embeddings).detach())


@pytest.mark.unmodified_forward
def test_model_restored_after_exception_inside_context(model):
    with restored_afterwards(model) as embeddings, pytest.raises(KeyError, match='raised inside'):
        with MambaComposite().context(model) as modified:
            modified(inputs_embeds=embeddings)
            raise KeyError('raised inside')


@pytest.mark.unmodified_forward
def test_zennit_gradient_attributor_on_embedding_wrapper(model):
    classifier = LastTokenClassifier(model).eval()
    embeddings = embed(model, 2, 9)
    with torch.no_grad():
        logits = classifier(embeddings)
    targets = logits.argmax(-1)
    output_relevance = torch.zeros_like(logits)
    output_relevance[[0, 1], targets] = logits[[0, 1], targets]

    with Gradient(classifier, MambaComposite(epsilon=1e-12)) as attributor:
        output, relevance = attributor(embeddings, output_relevance)

    assert torch.allclose(output, logits)
    assert torch.allclose(relevance.sum((1, 2)), logits[[0, 1], targets], rtol=1e-6)
    expected, _, _ = explain(model, embeddings, targets)
    assert relative_error(relevance, expected) <= 1e-10


def test_composite_is_registered_with_zennit():
    assert zennit.composites.COMPOSITES['mamba_lrp'] is MambaComposite


@pytest.mark.unmodified_forward
def test_default_cache_is_filled_and_continuing_from_it_is_refused(model):
    embeddings = embed(model, 1, 6)
    with torch.no_grad():
        plain = model(inputs_embeds=embeddings)
    with MambaComposite().context(model) as modified:
        with torch.no_grad():
            output = modified(inputs_embeds=embeddings)  # transformers uses a cache by default in eval mode
        assert torch.allclose(output.logits, plain.logits, rtol=1e-6)
        for layer in range(model.config.num_hidden_layers):
            assert torch.allclose(
                output.cache.get_recurrent_state(layer), plain.cache.get_recurrent_state(layer), rtol=1e-6,
            )
            assert torch.equal(output.cache.get_conv_state(layer), plain.cache.get_conv_state(layer))
        with pytest.raises(RuntimeError, match='explains whole sequences'):
            modified(inputs_embeds=embeddings[:, :1], cache=output.cache)
        # transformers still takes the old name (deprecated): the model-level decorator renames it for the layers
        with pytest.raises(RuntimeError, match='explains whole sequences'):
            modified(inputs_embeds=embeddings[:, :1], cache_params=output.cache)


class CountingEpsilon(Epsilon):
    '''Zennit's Epsilon, counting the relevance it computes.'''

    def __init__(self, counts, epsilon=1e-12):
        super().__init__(epsilon)
        self.counts, self.epsilon = counts, epsilon

    def backward(self, module, grad_input, grad_output):
        # by the weight: the rule computes on a shadow of the module that shares its parameters
        self.counts[id(module.weight)] = self.counts.get(id(module.weight), 0) + 1
        return super().backward(module, grad_input, grad_output)

    def copy(self):
        return CountingEpsilon(self.counts, self.epsilon)


def test_every_zennit_rule_on_the_relevance_path_fires_once_per_call(model):
    # in_proj and out_proj of each mixer and the head carry relevance; x_proj and dt_proj lie behind the SSM rule
    counts = {}
    embeddings = embed(model, 2, 6)
    expected, _, targets = explain(model, embeddings)
    composite = MambaComposite(epsilon=1e-12, layer_map=[(torch.nn.Linear, CountingEpsilon(counts))])
    relevance, _, _ = explain(model, embeddings, targets, composite=composite)
    fired = {name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and id(module.weight) in counts}
    layers = range(model.config.num_hidden_layers)
    assert fired == {f'backbone.layers.{i}.mixer.{p}' for i in layers for p in ('in_proj', 'out_proj')} | {'lm_head'}
    assert set(counts.values()) == {1}
    # Epsilon with a tiny stabiliser is LRP-0: the same relevance as the gradient of the one-pass forward
    assert relative_error(relevance, expected) <= 1e-10


def test_the_hooks_of_one_explanation(model):
    # the rule set acts inside the canonized mixers; hooks: the LN-rule on each norm, Gamma where asked, the ends
    composite = MambaComposite(gamma={'lm_head': 0.0})
    with composite.context(model):
        # by the rule each hook applies (the LN-rule attaches to a norm as NormRule, a subclass of it)
        kinds = (LNRule, ZennitRule, ExplainedModel)
        hooks = collections.Counter(next(kind for kind in kinds if isinstance(hook, kind))
                                    for hook in composite.hook_refs)
        forwards = snapshot(model)['instance_forwards']
    layers = model.config.num_hidden_layers
    assert hooks == {LNRule: layers + 1, ZennitRule: 1, ExplainedModel: 1}
    # the canonized mixers, and the norms, whose standard RMSNorm forward takes the LN-rule without a hook
    assert forwards == layers + layers + 1


def test_one_pass_relevance_flows_through_the_parts_the_user_calls(model):
    # the outermost call of any module converts relevance at its ends: backbone then head (as last_logits does),
    # the whole model, and one block called on its own all give relevance, not gradients
    embeddings = embed(model, 2, 9)
    parts, explained, targets = explain(model, embeddings)
    leaf = embeddings.detach().clone().requires_grad_()
    with MambaComposite(epsilon=1e-12).context(model) as modified:
        whole = target_relevance(modified(inputs_embeds=leaf, use_cache=False).logits[:, -1], leaf, targets)

        block = modified.backbone.layers[1]
        hidden = leaf.detach().clone().requires_grad_()
        output = block(hidden)
        block_relevance, = torch.autograd.grad(output, hidden, output)
    assert relative_error(whole, parts) <= 1e-10
    assert torch.allclose(block_relevance.sum((1, 2)), output.detach().sum((1, 2)), rtol=1e-10)


class SiluHead(torch.nn.Module):
    '''The backbone, a functional SiLU and the head; with ``calls_itself``, the backbone runs in an inner call of this
    module itself. Explained part by part, the SiLU outside every module would take the gradient-x-input chain of the
    parts, not the gradient of one pass.'''

    def __init__(self, model, calls_itself):
        super().__init__()
        self.model, self.calls_itself = model, calls_itself

    def forward(self, embeddings, inner=False):
        if inner or not self.calls_itself:
            hidden = self.model.backbone(inputs_embeds=embeddings, use_cache=False).last_hidden_state
            if inner:
                return hidden
        else:
            hidden = self(embeddings, inner=True)
        return self.model.lm_head(torch.nn.functional.silu(hidden[:, -1]))


def test_a_module_called_within_itself_takes_the_relevance_at_its_outermost_output(model):
    # the inner call of the outermost module must not end the outermost call (the exit hook counts the depth), also
    # where another thread's earlier call left its exit hook on the module
    embeddings = embed(model, 2, 9)

    def relevance_through(modified):
        leaf = embeddings.detach().clone().requires_grad_()
        logits = modified(leaf)
        return target_relevance(logits, leaf, logits.argmax(-1))

    with MambaComposite(epsilon=1e-12).context(SiluHead(model, calls_itself=False)) as modified:
        expected = relevance_through(modified)
    with MambaComposite(epsilon=1e-12).context(SiluHead(model, calls_itself=True)) as modified:
        other_thread = threading.Thread(target=relevance_through, args=(modified,))
        other_thread.start()
        other_thread.join()
        relevance = relevance_through(modified)
    assert relative_error(relevance, expected) <= 1e-10


@pytest.mark.unmodified_forward
def test_transformers_forward_bypasses_the_modules_rules_would_attach_to(model):
    # the trap: transformers calls functional kernels, so hooks on conv1d and dt_proj never see a call
    seen = []
    mixer = model.backbone.layers[0].mixer
    handles = [getattr(mixer, name).register_forward_hook(lambda *args, name=name: seen.append(name))
               for name in ('conv1d', 'dt_proj')]
    try:
        with torch.no_grad():
            last_logits(model, embed(model, 1, 3))
        assert seen == []
        with MambaComposite().context(model) as modified, torch.no_grad():
            last_logits(modified, embed(model, 1, 3))
        assert seen == ['conv1d', 'dt_proj']
    finally:
        for handle in handles:
            handle.remove()


def test_a_module_without_its_rule_breaks_conservation(model):
    # layer_map's None leaves a module's gradient as it is: here the norms lose the LN-rule
    embeddings = embed(model, 2, 8)
    without = MambaComposite(epsilon=1e-12, layer_map=[(MambaRMSNorm, None)])
    relevance, explained, _ = explain(model, embeddings, composite=without)
    assert ((relevance.sum((1, 2)) - explained).abs() > 1e-3 * explained.abs()).any()


def test_no_mamba_module_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    with pytest.raises(UnsupportedModelError) as error:
        with MambaComposite().context(model):
            pass
    message = str(error.value)
    assert 'no supported Mamba mixer in Sequential' in message
    assert 'Linear' in message and 'ReLU' in message
    assert 'transformers MambaMixer' in message
    assert snapshot(model)['hooks'] == 0


class PatchedMambaMixer(MambaMixer):
    '''A subclass may compute something else than its base: it is not canonized, and it must be named.'''


def _patched_mamba():
    model = make_mamba(layers=2)
    model.backbone.layers[1].mixer.__class__ = PatchedMambaMixer
    return model


class Custom(MambaMixer):
    '''A subclass whose name does not look like a Mamba mixer's: refused for being a subclass.'''


def _custom_mamba():
    model = make_mamba(layers=2)
    model.backbone.layers[1].mixer.__class__ = Custom
    return model


class ForeignMambaMixer(torch.nn.Module):
    '''A Mamba mixer of another library, whose forward no canonizer knows: refused by its name.'''

    def forward(self, hidden_states, **kwargs):
        return hidden_states


def _foreign_mamba():
    model = make_mamba(layers=2)
    model.backbone.layers[1].mixer = ForeignMambaMixer()
    return model


@pytest.mark.parametrize('build, mixer', [(_patched_mamba, 'PatchedMambaMixer'), (_custom_mamba, 'Custom'),
                                          (_foreign_mamba, 'ForeignMambaMixer')],
                         ids=['subclass', 'subclass-named-otherwise', 'foreign'])
def test_unsupported_mixer_is_named_and_model_untouched(build, mixer):
    torch.manual_seed(0)
    model = build().eval()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=f'does not support {mixer} at'):
        MambaComposite().register(model)
    assert snapshot(model)['hooks'] == before['hooks'] == 0
    assert snapshot(model)['modules'] == before['modules']


def test_a_second_composite_on_the_same_model_is_refused(model):
    embeddings = embed(model, 1, 6)
    expected, _, targets = explain(model, embeddings)
    first = MambaComposite(epsilon=1e-12)
    with first.context(model):
        with pytest.raises(RuntimeError, match='already registered'):
            MambaComposite().register(model)
        hooks_inside = snapshot(model)['hooks']
    # the first context kept working, and both left nothing behind
    relevance, _, _ = explain(model, embeddings, targets, composite=first)
    assert relative_error(relevance, expected) <= 1e-12
    assert snapshot(model)['hooks'] == 0 and hooks_inside > 0


def test_registering_the_same_composite_twice_is_refused_and_keeps_its_hooks(model):
    # zennit's own composites re-register silently, which would take the rules from a model in use
    composite = MambaComposite()
    composite.register(model)
    hooks_once = snapshot(model)['hooks']
    with pytest.raises(RuntimeError, match='already registered on a model'):
        composite.register(model)
    assert snapshot(model)['hooks'] == hooks_once
    composite.remove()
    assert snapshot(model)['hooks'] == 0


@pytest.mark.unmodified_forward
@pytest.mark.parametrize('composite', [MambaComposite(), MambaComposite(gamma=0.25)], ids=['lrp-0', 'gamma'])
def test_only_the_forwards_and_hooks_change_inside_the_context(model, composite):
    with restored_afterwards(model), composite.context(model) as modified:
        # one canonized forward per mixer and per norm (two per layer and the final norm), no attribute that holds
        # rule state
        inside = snapshot(modified)
        assert inside['instance_forwards'] == 2 * model.config.num_hidden_layers + 1
        assert inside['rule_settings'] == 0


def test_recompute_with_zennit_rules_inside_the_mixer_equals_storing(model):
    # the recomputed mixer runs its projections' Gamma rules again in the backward pass, each call on its own
    embeddings = embed(model, 2, 9)
    stored, explained, targets = explain(model, embeddings, composite=MambaComposite(epsilon=1e-12, gamma=0.25))
    recomputed, _, _ = explain(model, embeddings, targets,
                               composite=MambaComposite(epsilon=1e-12, gamma=0.25, recompute=True))
    assert relative_error(recomputed, stored) <= 1e-12
    assert ((recomputed.sum((1, 2)) - explained).abs() <= 1e-9 * explained.abs()).all()


def test_unknown_rule_names_are_refused():
    with pytest.raises(ValueError, match=r"Unknown MambaLRP rules \['selu'\]"):
        MambaComposite(rules={'silu', 'selu'})


def test_left_padding_gets_zero_relevance_and_leaves_the_rest_unchanged():
    model = make_mamba(layers=2)
    embeddings = embed(model, 2, 10)
    padded = torch.cat([torch.randn(2, 3, embeddings.shape[-1], dtype=embeddings.dtype), embeddings], dim=1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 10, dtype=torch.long)], dim=1)

    relevance, explained, targets = explain(model, embeddings)
    padded_relevance, padded_explained, _ = explain(model, padded, targets, attention_mask=mask)

    assert torch.equal(padded_relevance[:, :3], torch.zeros_like(padded_relevance[:, :3]))
    assert relative_error(padded_relevance[:, 3:], relevance) <= 1e-10
    assert torch.allclose(padded_explained, explained, rtol=1e-10)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_models_are_explained_in_their_dtype(dtype):
    model = make_mamba(layers=2, hidden=32, dtype=torch.float32)
    embeddings = embed(model, 2, 24)
    reference, _, targets = explain(model, embeddings, epsilon=1e-6)
    relevance, explained, _ = explain(model.to(dtype), embeddings.to(dtype), targets, epsilon=1e-6)

    assert relevance.dtype == dtype and torch.isfinite(relevance).all()
    relevance, explained = relevance.float(), explained.float()
    assert ((relevance.sum((1, 2)) - explained).abs() <= 2e-2 * explained.abs()).all()
    token_relevance, token_reference = relevance.sum(-1), reference.sum(-1)
    assert (torch.nn.functional.cosine_similarity(token_relevance, token_reference, dim=-1) > 0.99).all()


def test_gamma_on_projections_conserves_and_changes_relevance():
    model = make_mamba(layers=2)
    embeddings = embed(model, 2, 12)
    lrp0, explained, targets = explain(model, embeddings)
    relevance, _, _ = explain(model, embeddings, targets, composite=MambaComposite(epsilon=1e-12, gamma=0.25))
    assert ((relevance.sum((1, 2)) - explained).abs() <= 1e-6 * explained.abs()).all()
    assert relative_error(relevance, lrp0) > 1e-3


def test_gamma_selects_layers_by_name_pattern_and_type():
    composite = MambaComposite(gamma={'out_proj': 0.5, 'backbone.layers.1.*': 0.1, torch.nn.Conv1d: 0.3})
    linear, conv = torch.nn.Linear(2, 2), torch.nn.Conv1d(2, 2, 3)

    def gamma(name, module):
        rule = composite.mapping({}, name, module)
        if not (isinstance(rule, ZennitRule) and isinstance(rule.rule, Gamma)):
            return rule
        # Gamma's first weight modifier is w + gamma * max(w, 0)
        return round(rule.rule.param_modifiers[0].modifier(torch.ones(1), 'weight').item() - 1, 6)

    assert gamma('backbone.layers.0.mixer.out_proj', linear) == 0.5
    assert gamma('backbone.layers.0.mixer.in_proj', linear) is None  # LRP-0: the plain gradient
    assert gamma('backbone.layers.1.mixer.in_proj', linear) == 0.1
    assert gamma('backbone.layers.0.mixer.conv1d', conv) == 0.3
    assert gamma('lm_head', linear) is None


def test_zennit_rules_combine_through_layer_map(model):
    embeddings = embed(model, 2, 8)
    default, _, targets = explain(model, embeddings)
    composite = MambaComposite(epsilon=1e-12, layer_map=[(torch.nn.Conv1d, ZPlus())])
    relevance, _, _ = explain(model, embeddings, targets, composite=composite)
    assert torch.isfinite(relevance).all()
    assert relative_error(relevance, default) > 1e-3


def test_further_canonizers_are_applied_and_removed(model):
    from zennit.canonizers import Canonizer

    class Recording(Canonizer):
        '''Marks the model while applied, as a canonizer that changes modules would.'''
        def __init__(self):
            super().__init__()
            self.model = None

        def apply(self, root_module):
            instance = Recording()
            instance.register(root_module)
            return [instance]

        def register(self, module):
            self.model = module
            module.marked = True

        def remove(self):
            del self.model.marked

        def copy(self):
            return Recording()

    with MambaComposite(canonizers=[Recording()]).context(model):
        assert model.marked
    assert not hasattr(model, 'marked')


def test_a_subclass_mapping_reaches_the_modules_inside_the_mixers(model):
    # the registration skips a mixer's inside only where no rule can select it there; a subclass's own mapping may
    class ZPlusOnInProj(MambaComposite):
        def mapping(self, ctx, name, module):
            return ZennitRule(ZPlus()) if name.endswith('.in_proj') else super().mapping(ctx, name, module)

    embeddings = embed(model, 2, 8)
    default, _, targets = explain(model, embeddings)
    relevance, _, _ = explain(model, embeddings, targets, composite=ZPlusOnInProj(epsilon=1e-12))
    assert torch.isfinite(relevance).all()
    assert relative_error(relevance, default) > 1e-3


def test_a_forward_that_raises_inside_the_context_leaves_the_one_pass_rules_intact(model):
    embeddings = embed(model, 2, 6)
    expected, explained, targets = explain(model, embeddings)
    leaf = embeddings.detach().clone().requires_grad_()
    with MambaComposite(epsilon=1e-12).context(model) as modified:
        with pytest.raises(RuntimeError):
            # one channel short: raises inside the first block's norm, several calls deep
            modified.backbone(inputs_embeds=leaf[..., :-1], use_cache=False)
        relevance = target_relevance(last_logits(modified, leaf), leaf, targets)
    assert relative_error(relevance, expected) <= 1e-12


def test_one_pass_keeps_a_named_tuple_output(model):
    # mamba-ssm's language model returns a namedtuple; relevance enters at its first field, which stays named
    class NamedLogits(torch.nn.Module):
        Output = collections.namedtuple('Output', ['logits'])

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, embeddings):
            return self.Output(last_logits(self.model, embeddings))

    embeddings = embed(model, 2, 7)
    expected, explained, targets = explain(model, embeddings)
    leaf = embeddings.detach().clone().requires_grad_()
    with MambaComposite(epsilon=1e-12).context(NamedLogits()) as modified:
        relevance = target_relevance(modified(leaf).logits, leaf, targets)
    assert relative_error(relevance, expected) <= 1e-10


class Blocks(torch.nn.Module):
    '''Mamba blocks in a row, then the final norm and the head at the last position.'''

    def __init__(self, blocks, norm, head):
        super().__init__()
        self.blocks, self.norm, self.head = torch.nn.ModuleList(blocks), norm, head

    def forward(self, embeddings):
        hidden = embeddings
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden)[:, -1])


@pytest.mark.parametrize('options', [{}, {'gamma': 0.25}], ids=['lrp-0', 'gamma'])
def test_a_block_called_twice_is_explained_like_two_copies_of_it(options):
    # shared weights (Zamba2 shares blocks): every rule acts per call, so nothing of the first call is overwritten
    model = make_mamba(layers=1)
    block, norm, head = model.backbone.layers[0], model.backbone.norm_f, model.lm_head
    twice, copies = Blocks([block, block], norm, head), Blocks([block, copy.deepcopy(block)], norm, head)
    embeddings = embed(model, 2, 9)
    relevances = []
    for wrapper in (twice, copies):
        leaf = embeddings.detach().clone().requires_grad_()
        with MambaComposite(epsilon=1e-12, **options).context(wrapper) as modified:
            logits = modified(leaf)
            targets = logits.argmax(-1)
            relevances.append(target_relevance(logits, leaf, targets))
        explained = logits[torch.arange(2), targets].detach()
        assert ((relevances[-1].sum((1, 2)) - explained).abs() <= 1e-9 * explained.abs()).all()
    assert relative_error(relevances[0], relevances[1]) <= 1e-10
