'''MambaLRP as an inseq method: generated text attributed to the prompt and the earlier generated tokens.'''
import pytest
import torch

inseq = pytest.importorskip('inseq')

from captum_mamba import inseq_method  # noqa: E402  (importing it registers 'mamba_lrp')
from captum_mamba import ExplainedLogits, MambaLRP  # noqa: E402
from conftest import assert_snapshots_equal, make_mamba, snapshot, word_tokenizer  # noqa: E402
from test_families import build  # noqa: E402


@pytest.mark.parametrize('name, options', [('Mamba', {}), ('Mamba2', {}), ('Bamba', {}),
                                           ('Mamba', {'gate_relevance': 'value'})], ids=['Mamba', 'Mamba2', 'Bamba',
                                                                                          'Mamba-held-gate'])
def test_inseq_mamba_lrp_rows_sum_to_each_generated_logit(name, options):
    model = make_mamba(layers=2) if name == 'Mamba' else build(name)
    before = snapshot(model)
    tokenizer = word_tokenizer()
    attribution_model = inseq.load_model(model, inseq_method.MambaLRPAttribution.method_name, tokenizer=tokenizer,
                                         epsilon=1e-12, **options)
    output = attribution_model.attribute('the plot was', 'the plot was good film but', attributed_fn='logit',
                                         step_scores=['logit'], show_progress=False)
    attribution = output.sequence_attributions[0]
    relevance = attribution.target_attributions.sum(-1)  # (prompt and generated tokens, steps)
    logits = attribution.step_scores['logit'].to(relevance.dtype)
    assert relevance.shape == (6, 3)
    # each step: the prompt and the tokens generated before it carry relevance, later positions none
    for step in range(3):
        assert torch.isfinite(relevance[:3 + step, step]).all() and relevance[3 + step:, step].isnan().all()
    assert torch.allclose(relevance.nansum(0), logits, rtol=1e-5, atol=1e-7)
    # the same relevance as MambaLRP on the prefix of each step
    wrapped = ExplainedLogits(model)
    ids = torch.tensor([tokenizer.encode('the plot was good film but')])
    for step in range(3):
        prefix = wrapped.embeddings(ids[:, :3 + step]).detach()
        expected = MambaLRP(wrapped, epsilon=1e-12, **options).attribute(
            prefix, target=int(ids[0, 3 + step])).sum(-1)[0]
        assert torch.allclose(relevance[:3 + step, step].double(), expected, rtol=1e-5, atol=1e-7)
    html = output.show(display=False, return_html=True)
    assert all(word in html for word in ('plot', 'good', 'film'))
    assert_snapshots_equal(snapshot(model), before)
