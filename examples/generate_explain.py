'''Explain a generated continuation token by token: MambaLLMAttribution (Captum's LLMGradientAttribution) with
LayerMambaLRP, each generated token's relevance on the prompt and on the tokens generated before it.

A word-level tokenizer and a small causal Mamba LM are trained locally on generated sentences such as
"bob has a green hat . the hat of bob is green .", so that the colour to generate is decided by one earlier word.
The script generates the continuation of a prompt and explains each generated token, as a logit (conserved by
MambaLRP) and as Captum's log-probability. The last prompt token always carries much relevance: under the half
rule, the gate of the last position, computed from that token, receives half of the gated output's relevance.

Run: ``python examples/generate_explain.py [--out DIR]``; writes ``generate_explain.html`` and ``.png`` to DIR.
'''
import argparse
import itertools
import os
import random
import time

import torch
from captum.attr import TextTokenInput
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import MambaConfig, MambaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from captum_mamba import LayerMambaLRP
from captum_mamba.llm import MambaLLMAttribution
from captum_mamba.visualization import save_text_heatmap, text_record

NAMES = 'alice bob carol dave erin frank grace heidi'.split()
COLOURS = 'red green blue black white yellow'.split()
THINGS = 'hat car bike lamp cup coat'.split()
TEMPLATE = '{name} has a {colour} {thing} . the {thing} of {name} is {colour} .'


def corpus():
    return [TEMPLATE.format(name=name, colour=colour, thing=thing)
            for name, colour, thing in itertools.product(NAMES, COLOURS, THINGS)]


def train_tokenizer(sentences) -> PreTrainedTokenizerFast:
    '''A word-level tokenizer trained on the sentences (no download).'''
    tokenizer = Tokenizer(models.WordLevel(unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=['<unk>']))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token='<unk>', eos_token='.')


def train_language_model(sentences, tokenizer, steps: int = 300) -> MambaForCausalLM:
    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=len(tokenizer), hidden_size=64, state_size=16, num_hidden_layers=2, use_conv_bias=False,
    )
    model = MambaForCausalLM(config)
    ids = tokenizer(sentences, return_tensors='pt')['input_ids']
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = ids[torch.randint(0, len(ids), (32,))]
        loss = model(batch, labels=batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'output'),
                        help='directory the heatmaps are written to (default: examples/output)')
    args = parser.parse_args()
    transformers_logging.set_verbosity_error()

    sentences = corpus()
    random.Random(0).shuffle(sentences)
    tokenizer = train_tokenizer(sentences)
    start = time.perf_counter()
    model = train_language_model(sentences, tokenizer)
    print(f'trained a {sum(p.numel() for p in model.parameters()):,}-parameter Mamba LM in '
          f'{time.perf_counter() - start:.0f} s')

    prompt = 'bob has a green hat . the hat of bob is'
    with torch.no_grad():
        generated = model.generate(**tokenizer(prompt, return_tensors='pt'), max_new_tokens=2, do_sample=False)
    continuation = tokenizer.decode(generated[0, -2:])
    print(f'prompt: "{prompt}" -> generated: "{continuation}"')

    layer_lrp = LayerMambaLRP(model, model.get_input_embeddings())
    explained = {
        'logit': MambaLLMAttribution(layer_lrp, tokenizer, target_output='logit'),
        'log-probability': MambaLLMAttribution(layer_lrp, tokenizer, target_output='log_prob'),
    }
    records = []
    for name, attribution in explained.items():
        result = attribution.attribute(TextTokenInput(prompt, tokenizer), target=continuation)
        print(f'\nrelevance of the prompt and the earlier generated tokens for each generated token ({name}):')
        tokens = result.input_tokens + result.output_tokens
        for step, (output_token, row) in enumerate(zip(result.output_tokens, result.all_token_attr)):
            context, relevance = tokens[:len(result.input_tokens) + step], row[:len(result.input_tokens) + step]
            listing = ' '.join(f'{token}:{value:+.2f}' for token, value in zip(context, relevance.tolist()))
            print(f'  {output_token!r:8s} explained {result.explained[step]:+.3f}, sum {row.sum():+.3f} | {listing}')
            records.append(text_record(
                context, relevance, result.explained[step].item(), output_token, 1.0, output_token, name,
                delta=(row.sum() - result.explained[step]).item(),
            ))

    os.makedirs(args.out, exist_ok=True)
    html_path, png_path = (os.path.join(args.out, f'generate_explain.{suffix}') for suffix in ('html', 'png'))
    save_text_heatmap(records, html_path, png_path)
    print(f'\nwrote {html_path} and {png_path}')


if __name__ == '__main__':
    main()
