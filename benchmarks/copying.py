'''Copying: which input token does each method credit for a copied token?

A small ``MambaForCausalLM`` is trained (here, on the CPU) to copy: ``[BOS] x_1 ... x_L [SEP] x_1 ... x_L``, the
``x_i`` drawn without replacement from ``--vocab`` letters (so the copied token occurs once in the source, and the
alignment is unambiguous), the loss on the copy half only. Each copied token ``x_i`` (predicted at position ``L + i``:
the current token is ``SEP`` or the copy of ``x_(i-1)``) is explained by each method, its logit as the output; the
visible positions ``0 .. L + i`` are scored (a position's relevance: the sum over its embedding). Per method, with 95 %
bootstrap intervals over the sequences (each sequence's mean over its ``L`` copied tokens):

* ``source AUC``: the chance that the copied token's source position scores above another visible position (ties
  count half), signed relevance; ``|R| AUC``: the same on |relevance|. 1 is a perfect alignment, 0.5 chance. This is
  this repository's definition (the ROC AUC of the source position against the rest of the context); LaTIM's copying
  AUC (Pitorro and Treviso, ACL 2025) could not be read here, so the two are not the same number (see the results);
* ``source top``: how often the source position has the largest signed relevance; ``source share``: its share of
  |relevance|;
* ``current share``: the current (last visible) token's share of |relevance|; ``current top``: how often it has the
  largest |relevance|.

The ``Occlusion`` row is a reference, not an explanation method of the comparison: ``e_j = f(x) - f(x with position
j's embedding set to zero)``, what each position alone does to the copied token's logit.

Run: ``OMP_NUM_THREADS=1 python benchmarks/copying.py --sequences 200 --out benchmarks/results`` (CPU: the model is
trained once and cached in ``--cache``); writes ``copying.md`` to ``--out``.
'''
import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from transformers import MambaConfig, MambaForCausalLM
from transformers.utils import logging as transformers_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from faithfulness import bootstrap_interval  # noqa: E402

from captum_mamba import ExplainedLogits, MambaLRP  # noqa: E402
from zennit_mamba import MAMBA_LRP_RULES  # noqa: E402

transformers_logging.set_verbosity_error()

BOS, SEP, FIRST_LETTER = 0, 1, 2


def copy_sequences(count: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    '''``(count, 2 * length + 2)`` token ids ``[BOS] x_1 .. x_L [SEP] x_1 .. x_L``, the ``x_i`` distinct letters
    (ids ``2 .. vocab + 1``).'''
    source = torch.rand(count, vocab, generator=generator).argsort(-1)[:, :length] + FIRST_LETTER
    return torch.cat([torch.full((count, 1), BOS), source, torch.full((count, 1), SEP), source], dim=1)


def build_model(args: argparse.Namespace) -> MambaForCausalLM:
    # use_mambapy: training runs mambapy's parallel scan (inference and the explanations are unaffected)
    config = MambaConfig(vocab_size=args.vocab + FIRST_LETTER, hidden_size=args.hidden, state_size=args.state,
                         num_hidden_layers=args.layers, use_mambapy=True, tie_word_embeddings=False)
    return MambaForCausalLM(config)


def copy_logits(model: MambaForCausalLM, ids: torch.Tensor, length: int) -> torch.Tensor:
    '''Logits at the positions that predict the copy half, ``(batch, length, vocabulary)``.'''
    return model(ids, use_cache=False).logits[:, length + 1:2 * length + 1]


def copy_accuracy(model: MambaForCausalLM, ids: torch.Tensor, length: int) -> Dict[str, float]:
    with torch.no_grad():
        correct = copy_logits(model, ids, length).argmax(-1) == ids[:, length + 2:]
    return {'token': correct.double().mean().item(), 'sequence': correct.all(-1).double().mean().item()}


def train(args: argparse.Namespace) -> MambaForCausalLM:
    '''AdamW with a cosine schedule on freshly drawn sequences each step; cross-entropy on the copy half only.'''
    torch.manual_seed(args.seed)
    model = build_model(args)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
    generator = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    started = time.time()
    for step in range(args.steps):
        ids = copy_sequences(args.batch, args.length, args.vocab, generator)
        logits = copy_logits(model, ids, args.length)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, args.length + 2:].flatten())
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if (step + 1) % max(1, args.steps // 10) == 0:
            print(f'step {step + 1}/{args.steps}: loss {loss.item():.4f} ({time.time() - started:.0f} s)', flush=True)
    return model.eval()


def trained_model(args: argparse.Namespace) -> Tuple[MambaForCausalLM, float]:
    '''The copying model of these settings and its training time in seconds: trained once and cached in
    ``args.cache`` (the time beside it).'''
    name = (f'copying-v{args.vocab}-l{args.length}-h{args.hidden}-n{args.layers}-s{args.state}-{args.steps}'
            f'x{args.batch}-lr{args.lr}-seed{args.seed}')
    path = os.path.join(args.cache, name + '.pt')
    if os.path.exists(path):
        model = build_model(args)
        model.load_state_dict(torch.load(path))
        with open(os.path.join(args.cache, name + '.json')) as handle:
            return model.eval(), json.load(handle)['training_seconds']
    started = time.time()
    model = train(args)
    seconds = time.time() - started
    os.makedirs(args.cache, exist_ok=True)
    with open(os.path.join(args.cache, name + '.json'), 'w') as handle:
        json.dump({'training_seconds': seconds}, handle)
    torch.save(model.state_dict(), path + '.tmp')
    os.replace(path + '.tmp', path)
    return model, seconds


Method = Callable[[ExplainedLogits, torch.Tensor, torch.Tensor], torch.Tensor]


def methods(ig_steps: int) -> Dict[str, Method]:
    '''Name to ``(wrapped model, embeddings, targets) -> (batch, length)`` position scores.'''
    def mamba_lrp(rules, **options):
        return lambda wrapped, x, t: MambaLRP(wrapped, rules=rules, **options).attribute(x, target=t)

    return {
        'MambaLRP': mamba_lrp(MAMBA_LRP_RULES),
        # the mixers' output gates held: relevance through the scans' outputs only (gate_relevance='value')
        'MambaLRP (gate: value)': mamba_lrp(MAMBA_LRP_RULES, gate_relevance='value'),
        'MambaLRP w/o SSM rule': mamba_lrp(MAMBA_LRP_RULES - {'ssm'}),
        'LRP (LN-rule)': mamba_lrp({'norm'}),
        'IntegratedGradients': lambda wrapped, x, t: IntegratedGradients(wrapped).attribute(
            x, target=t, n_steps=ig_steps, internal_batch_size=len(x) * min(ig_steps, 25)),
        'InputXGradient': lambda wrapped, x, t: InputXGradient(wrapped).attribute(x, target=t),
        'Saliency': lambda wrapped, x, t: Saliency(wrapped).attribute(x, target=t, abs=True),
    }


def occlusion(wrapped: ExplainedLogits, embeddings: torch.Tensor, targets: torch.Tensor, visible: int) -> torch.Tensor:
    '''``f(x) - f(x with position j's embedding zeroed)`` for the ``visible`` first positions, ``(batch, visible)``.'''
    rows = torch.arange(len(targets))
    effects = torch.zeros(embeddings.shape[:2], dtype=torch.float64)
    with torch.no_grad():
        full = wrapped(embeddings)[rows, targets]
        for position in range(visible):
            removed = embeddings.clone()
            removed[:, position] = 0
            effects[:, position] = (full - wrapped(removed)[rows, targets]).double()
    return effects


def auc(scores: torch.Tensor, gold: int) -> torch.Tensor:
    '''Per row: the share of the other positions scored below ``gold`` (ties count half).'''
    others = torch.cat([scores[:, :gold], scores[:, gold + 1:]], dim=1)
    golden = scores[:, gold:gold + 1]
    return ((others < golden).double() + 0.5 * (others == golden).double()).mean(-1)


def position_measures(scores: torch.Tensor, gold: int) -> Dict[str, torch.Tensor]:
    '''The measures of one copied token, per sequence, from the visible positions' scores ``(batch, visible)``.'''
    magnitude = scores.abs()
    total = magnitude.sum(-1).clamp(min=1e-30)
    return {
        'auc': auc(scores, gold), 'abs_auc': auc(magnitude, gold),
        'source_top': (scores.argmax(-1) == gold).double(), 'source_share': magnitude[:, gold] / total,
        'current_share': magnitude[:, -1] / total,
        'current_top': (magnitude.argmax(-1) == scores.shape[1] - 1).double(),
    }


def measure(model: MambaForCausalLM, ids: torch.Tensor, length: int, ig_steps: int, batch: int) -> Dict[str, dict]:
    '''Per method, each measure's per-sequence means (over the copied tokens) and the conservation errors.'''
    chosen = methods(ig_steps)
    sums = {name: {} for name in list(chosen) + ['Occlusion (reference)']}
    conservation = {name: [] for name in chosen}
    embeddings_all = model.get_input_embeddings()(ids).detach()
    for copied in range(length):
        position = length + 1 + copied  # the current token: SEP, or the copy of x_copied
        gold = copied + 1  # the source position of the copied token
        wrapped = ExplainedLogits(model, position=position)
        for start in range(0, len(ids), batch):
            embeddings = embeddings_all[start:start + batch]
            targets = ids[start:start + batch, position + 1]
            results = {}
            for name, method in chosen.items():
                attributions = method(wrapped, embeddings, targets).detach()
                results[name] = attributions.sum(-1).double()
                if name.startswith('MambaLRP') or name == 'IntegratedGradients':
                    # LRP's relevance sums to the explained logit, IG's to the logit less the zero baseline's
                    with torch.no_grad():
                        rows = torch.arange(len(targets))
                        explained = wrapped(embeddings)[rows, targets].double()
                        if name == 'IntegratedGradients':
                            explained = explained - wrapped(torch.zeros_like(embeddings))[rows, targets].double()
                    conservation[name] += ((results[name].sum(-1) - explained).abs() / explained.abs()).tolist()
            results['Occlusion (reference)'] = occlusion(wrapped, embeddings, targets, position + 1)
            for name, scores in results.items():
                assert scores[:, position + 1:].abs().max() <= 1e-6 * scores.abs().max().clamp(min=1e-30), name
                for key, values in position_measures(scores[:, :position + 1], gold).items():
                    sums[name].setdefault(key, torch.zeros(len(ids), dtype=torch.float64))
                    sums[name][key][start:start + len(targets)] += values
        print(f'copied token {copied + 1}/{length} explained', flush=True)
    return {name: {'measures': {key: (values / length).tolist() for key, values in measures.items()},
                   'conservation': conservation.get(name, [])} for name, measures in sums.items()}


def interval_text(values: List[float], digits: int = 3, percent: bool = False) -> str:
    low, high = bootstrap_interval(values)
    if percent:
        return f'{100 * statistics.mean(values):.0f} % ({100 * low:.0f} to {100 * high:.0f})'
    return f'{statistics.mean(values):.{digits}f} ({low:.{digits}f} to {high:.{digits}f})'


PUBLISHED = '''## Published by LaTIM on their setup (not measured here)

LaTIM (Pitorro and Treviso, "LaTIM: Measuring Latent Token-to-Token Interactions in Mamba Models", ACL 2025, pages
24478-24493; arXiv 2502.15612; code github.com/deep-spin/latim) evaluates a copying task among others (the abstract:
"machine translation, copying, and retrieval-based generation"). Its copying section (task format, lengths,
vocabulary, and how its AUC is computed) could not be read from here: the paper's body and the repository are not in
the stored sources this study could search, so LaTIM's metric is **not** reproduced here and its numbers are not
comparable with the table above. The only copying figures found are second-hand: the aggregator wizwand.com lists a
"Copying task" AUC of 98 for LaTIM (paper page 68fa771c1e209131cea7110d) and 84 for the hidden attention of Ali et al.
(page 68fa72bb1e209131cea583bc). A reading note on the paper (GitHub zhaoyang97/Paper-Notes-en,
docs/ACL2025/others/latim_measuring_latent_token-to-token_interactions_in_mamba_models.md; unofficial and apparently
machine-written) reproduces a copying table with AUC / AP / R@K: Mamba-1: hidden attention 0.84 / 0.36 / 0.22,
MambaLRP 0.40 / 0.22 / 0.20, LaTIM (ALTI) 0.86 / 0.47 / 0.36; Mamba-2: hidden attention 0.79 / 0.49 / 0.39, LaTIM
(l2) 0.98 / 0.86 / 0.74. That is where the quoted 40 for MambaLRP comes from. It does not say how the AUC is
computed, whether MambaLRP there explains each layer or the whole model, or how their copying model was trained, so
these figures stay second-hand: the paper's own table and metric must be read before they are compared with the
table above.
'''


def report(results: Dict[str, dict], accuracy: Dict[str, float], args: argparse.Namespace, seconds: float,
           training_seconds: float) -> str:
    # the copied token x_(k+1) sees the positions 0 .. L + 1 + k
    chance_top = statistics.mean(1 / (args.length + 2 + copied) for copied in range(args.length))
    lines = ['# Copying: which input token is credited for a copied token', '', __doc__.split('\n\n')[1], '',
             __doc__.split('\n\n')[2], '', __doc__.split('\n\n')[3], '',
             '## Measured here', '',
             f'Model: `MambaForCausalLM`, {args.layers} layers, width {args.hidden}, state {args.state}, trained on '
             f'the CPU ({training_seconds / 60:.1f} minutes) for {args.steps} steps of {args.batch} sequences (L = '
             f'{args.length} letters of {args.vocab}, seed {args.seed}). Copy accuracy on the {args.sequences} test '
             f'sequences: {accuracy["token"]:.1%} of the tokens, {accuracy["sequence"]:.1%} of the sequences. '
             f'Explained: all {args.length} copied tokens of each of the {args.sequences} sequences (the copied '
             f'token\'s logit); chance AUC 0.5, chance source top about {chance_top:.0%}. Integrated '
             f'Gradients: {args.ig_steps} steps (Gauss-Legendre), zero baseline.', '',
             '| method | source AUC | \\|R\\| AUC | source top | source share | current share | current top |',
             '|---|---:|---:|---:|---:|---:|---:|']
    for name, result in results.items():
        values = result['measures']
        lines.append(
            f'| {name} | {interval_text(values["auc"])} | {interval_text(values["abs_auc"])} '
            f'| {interval_text(values["source_top"], percent=True)} | {interval_text(values["source_share"])} '
            f'| {interval_text(values["current_share"])} | {interval_text(values["current_top"], percent=True)} |')
    errors = {name: result['conservation'] for name, result in results.items() if result['conservation']}
    lines += ['', 'Completeness, |sum of relevance - explained| / |explained| (median, largest; explained: the logit '
              'for MambaLRP, the logit less the zero baseline\'s for IG): '
              + ', '.join(f'{name} {statistics.median(error):.1e}, {max(error):.1e}' for name, error in errors.items())
              + '.', '',
              f'Command: `OMP_NUM_THREADS=1 python benchmarks/copying.py --sequences {args.sequences} --length '
              f'{args.length} --vocab {args.vocab} --steps {args.steps} --ig-steps {args.ig_steps} --out '
              f'{os.path.relpath(args.out, ROOT)}` '
              f'({seconds / 60:.1f} minutes on a shared two-core CPU, one thread; training took '
              f'{training_seconds / 60:.1f} minutes of it, or of an earlier run whose model was cached).', '',
              PUBLISHED]
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sequences', type=int, default=200, help='test sequences explained (default 200)')
    parser.add_argument('--length', type=int, default=10, help='letters copied per sequence (default 10)')
    parser.add_argument('--vocab', type=int, default=24, help='letters to draw from (default 24)')
    parser.add_argument('--hidden', type=int, default=64)
    parser.add_argument('--layers', type=int, default=2)
    parser.add_argument('--state', type=int, default=16)
    parser.add_argument('--steps', type=int, default=1500, help='training steps (default 1500)')
    parser.add_argument('--batch', type=int, default=32, help='training batch (default 32)')
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--ig-steps', type=int, default=16, help="Integrated Gradients' steps (default 16)")
    parser.add_argument('--explain-batch', type=int, default=100, help='sequences explained per call (default 100)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'output'),
                        help='directory the table is written to (default: benchmarks/output)')
    parser.add_argument('--cache', default=os.path.join(ROOT, 'benchmarks', 'output'),
                        help='directory the trained model is cached in (default: benchmarks/output)')
    args = parser.parse_args()
    started = time.time()
    torch.set_grad_enabled(True)
    model, training_seconds = trained_model(args)
    # test sequences from their own generator, never the training stream's
    ids = copy_sequences(args.sequences, args.length, args.vocab, torch.Generator().manual_seed(10_000 + args.seed))
    accuracy = copy_accuracy(model, ids, args.length)
    print(f'copy accuracy: {accuracy["token"]:.4f} of tokens, {accuracy["sequence"]:.4f} of sequences', flush=True)
    results = measure(model, ids, args.length, args.ig_steps, args.explain_batch)
    text = report(results, accuracy, args, time.time() - started, training_seconds)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'copying.md'), 'w') as handle:
        handle.write(text)


if __name__ == '__main__':
    main()
