'''Generated text: every generated token's relevance, on the prompt and on the tokens generated before it, sums to
what is explained for it; the README's snippet runs as written.'''
import re
from pathlib import Path

import pytest
import torch
from captum.attr import TextTokenInput

from captum_mamba import LayerMambaLRP
from captum_mamba.llm import MambaLLMAttribution
from conftest import assert_snapshots_equal, make_mamba, relative_error, snapshot, word_tokenizer
from test_families import build

README = Path(__file__).resolve().parents[1] / 'README.md'


@pytest.mark.parametrize('name', ['Mamba', 'Mamba2', 'Bamba'])
@pytest.mark.parametrize('target_output', ['logit', 'log_prob'])
def test_every_generated_token_row_sums_to_its_explained_output(name, target_output):
    model = make_mamba(layers=2) if name == 'Mamba' else build(name)
    tokenizer = word_tokenizer()
    before = snapshot(model)
    explainer = MambaLLMAttribution(LayerMambaLRP(model, model.get_input_embeddings(), epsilon=1e-12), tokenizer,
                                    target_output=target_output)
    result = explainer.attribute(TextTokenInput('the plot was', tokenizer), target='good film but very')
    assert result.token_attr.shape == (4, 3) and result.generated_token_attr.shape == (4, 4)
    assert torch.equal(result.generated_token_attr.triu(), torch.zeros(4, 4, dtype=result.token_attr.dtype))
    assert result.generated_token_attr[1:].abs().sum(1).min() > 0  # earlier generated tokens do carry relevance
    # relative to the largest explained value: transformers returns Mamba2's logits in float32 (5e-8 to 2e-7 measured)
    assert relative_error(result.all_token_attr.sum(1), result.explained) <= 1e-6
    ids = torch.tensor([tokenizer.encode('the plot was good film but very')])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, 2:6].double()
    chosen = logits[torch.arange(4), ids[0, 3:]]
    expected = chosen if target_output == 'logit' else chosen - (logits.softmax(-1) * logits).sum(-1)
    assert relative_error(result.explained.double(), expected) <= 1e-6
    assert_snapshots_equal(snapshot(model), before)


def readme_llm_snippet() -> str:
    blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
    return next(block for block in blocks if 'MambaLLMAttribution(' in block)


def test_readme_llm_snippet_runs_as_written(tmp_path, capsys):
    # the snippet loads a checkpoint from the hub; here the same code loads a tiny model saved on disk
    model = make_mamba(layers=2, dtype=torch.float32)
    model.generation_config.pad_token_id = model.config.pad_token_id = 0
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    snippet = readme_llm_snippet()
    checkpoint = re.search(r"checkpoint = '([^']+)'", snippet).group(1)
    namespace = {}
    exec(snippet.replace(checkpoint, str(tmp_path)), namespace)
    result = namespace['result']
    assert len(result.output_tokens) == 4 and capsys.readouterr().out
    # default epsilon 1e-6 in float32
    assert torch.allclose(result.all_token_attr.sum(1), result.explained, atol=1e-5)
