'''What MambaLRP assumes of transformers, mamba-ssm and zennit fails loudly when upstream changes it.'''
import importlib.metadata

import pytest
import torch
from transformers.models.mamba.modeling_mamba import MambaMixer

from conftest import embed, explain, make_mamba, relative_error, snapshot
from test_families import build, embeddings_for

from zennit_mamba import FAMILIES, MambaCanonizer, MambaComposite, RuleSet, UpstreamChangedError
from zennit_mamba.core import upstream
from zennit_mamba.canonizers import ForwardCanonizer
from zennit_mamba.mixers.mamba1 import transformers_forward
from zennit_mamba.core.upstream import _hook_added_during_the_call_runs, check_hooks_added_during_a_call

TRANSFORMERS_VERSION = importlib.metadata.version('transformers')


def test_every_supported_transformers_class_exists():
    # a class that vanished would silently get no canonizer or treatment: its model would then be refused
    from zennit_mamba.core.family import resolve

    missing = [path for family in FAMILIES if family.library == 'transformers'
               for path in list(family.canonized) + list(family.layers) if resolve(path) is None
               and not any(path in pair and any(resolve(other) for other in pair) for pair in family.renamed)]
    assert missing == []
    for family in FAMILIES:
        for pair in family.renamed:
            assert set(pair) <= set(family.canonized) | set(family.layers), pair


@pytest.mark.parametrize('canonizer', MambaCanonizer().canonizers, ids=lambda canonizer: canonizer.module_type.__name__)
def test_every_canonized_forward_takes_exactly_the_upstream_parameters(canonizer):
    # the next rename upstream (as cache_params -> cache in transformers 5.24) fails here, not for a user
    canonizer.check_signature()


class SeqIdxMambaMixer(MambaMixer):
    '''An upstream forward with one parameter more than MambaLRP's canonized forward handles.'''

    def forward(self, hidden_states, cache=None, attention_mask=None, seq_idx=None, **kwargs):
        return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)


def test_a_forward_with_an_extra_parameter_is_refused_before_anything_changes():
    model = make_mamba(layers=2)
    for block in model.backbone.layers:
        block.mixer.__class__ = SeqIdxMambaMixer
    before = snapshot(model)
    canonizer = ForwardCanonizer(SeqIdxMambaMixer, transformers_forward, RuleSet())
    with pytest.raises(UpstreamChangedError) as error:
        canonizer.apply(model)
    message = str(error.value)
    assert 'SeqIdxMambaMixer.forward takes a parameter \'seq_idx\'' in message
    assert f'transformers {TRANSFORMERS_VERSION}' in message
    assert snapshot(model)['instance_forwards'] == before['instance_forwards'] == 0
    assert snapshot(model)['modules'] == before['modules']


def test_a_renamed_upstream_parameter_is_refused_by_the_composite(monkeypatch):
    # what transformers 5.23 -> 5.24 did, backwards: the cache argument under another name
    def renamed_forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        raise AssertionError('never called')

    model = make_mamba(layers=2)
    before = snapshot(model)
    monkeypatch.setattr(MambaMixer, 'forward', renamed_forward)
    with pytest.raises(UpstreamChangedError, match="takes a parameter 'cache_params'.*no longer takes the parameter "
                                                   "'cache'"):
        MambaComposite().register(model)
    after = snapshot(model)
    for key in ('modules', 'hooks', 'instance_forwards', 'rule_settings'):
        assert after[key] == before[key], key


@pytest.mark.parametrize('name, mixer_path', [('Mamba', 'backbone.layers.0.mixer'), ('Bamba', 'model.layers.0.mamba')])
def test_keywords_the_canonized_mixer_cannot_honour_are_refused(name, mixer_path):
    model = make_mamba(layers=2) if name == 'Mamba' else build(name)
    embeddings = embed(model, 1, 6) if name == 'Mamba' else embeddings_for(model, 1, 6)
    mixer = model.get_submodule(mixer_path)
    hidden = torch.randn(1, 6, embeddings.shape[-1], dtype=embeddings.dtype)
    with MambaComposite().context(model):
        with pytest.raises(TypeError, match=r"got keyword arguments \['seq_idx'\].*does not drop arguments"):
            mixer(hidden, seq_idx=torch.zeros(1, 6, dtype=torch.int32))
        # what hybrids pass to every layer and the Mamba path does not read is accepted
        assert torch.isfinite(mixer(hidden, position_ids=torch.arange(6)[None])).all()


@pytest.mark.unmodified_forward
def test_the_old_cache_name_is_honoured_or_refused_never_dropped(model):
    hidden = embed(model, 1, 5)
    with torch.no_grad():
        cache = model(inputs_embeds=hidden, use_cache=True).cache
    with MambaComposite().context(model):
        # transformers' own block renames cache_params (deprecated): the continuation is seen and refused
        with pytest.raises(RuntimeError, match='explains whole sequences'):
            model.backbone.layers[0](hidden, cache_params=cache)
        # the canonized mixer does not rename it: refused by name, not swallowed
        with pytest.raises(TypeError, match=r"\['cache_params'\]"):
            model.backbone.layers[0].mixer(hidden, cache_params=cache)


def test_attention_keywords_mamba_lrp_cannot_honour_are_refused():
    model = build('Bamba')
    attention = model.model.layers[1].self_attn
    hidden = embeddings_for(model, 1, 6)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(6)[None])
    with MambaComposite().context(model):
        with pytest.raises(TypeError, match=r"BambaAttention got keyword arguments \['sliding_window'\]"):
            attention(hidden, position_embeddings=position_embeddings, sliding_window=4)
        output, _ = attention(hidden, position_embeddings=position_embeddings, sliding_window=None)
        assert torch.isfinite(output).all()


def test_zennit_hooks_give_the_same_relevance_under_either_zennit_version(model):
    # run under zennit 0.5.1 and 1.0.0 by .ci/run; the hooks no longer use zennit's version-specific forward hooks
    embeddings = embed(model, 2, 7)
    expected, explained, targets = explain(model, embeddings)
    for composite in (MambaComposite(epsilon=1e-12, gamma=0.0), MambaComposite(epsilon=1e-12, gamma={'lm_head': 0.0})):
        relevance, _, _ = explain(model, embeddings, targets, composite=composite)
        assert relative_error(relevance, expected) <= 1e-10
        assert torch.allclose(relevance.sum((1, 2)), explained, rtol=1e-9)


@pytest.mark.parametrize('raises', [False, True], ids=['returns', 'raises'])
def test_torch_runs_a_forward_hook_registered_during_its_call(raises):
    # what ExplainedModel relies on for the hook where relevance enters, checked on the installed torch at
    # registration (a torch that read the hooks before the forward would be refused there)
    assert _hook_added_during_the_call_runs(raises)
    check_hooks_added_during_a_call()


def test_a_torch_without_hooks_added_during_a_call_is_refused_by_the_composite(monkeypatch):
    model = make_mamba(layers=2)
    before = snapshot(model)
    monkeypatch.setattr(upstream, '_hook_added_during_the_call_runs', lambda raises: not raises)
    check_hooks_added_during_a_call.cache_clear()
    try:
        with pytest.raises(UpstreamChangedError, match='does not run a forward hook registered by a forward pre-hook'):
            MambaComposite().register(model)
    finally:
        check_hooks_added_during_a_call.cache_clear()
    after = snapshot(model)
    for key in ('modules', 'hooks', 'instance_forwards', 'rule_settings'):
        assert after[key] == before[key], key


def test_the_readme_lists_exactly_the_supported_families():
    import os

    from zennit_mamba.support import support_table

    with open(os.path.join(os.path.dirname(__file__), '..', 'README.md'), encoding='utf-8') as file:
        assert support_table() in file.read()
