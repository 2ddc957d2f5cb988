'''The examples run as the README says and produce what they promise.'''
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, out, *arguments):
    environment = dict(os.environ, PYTHONPATH=ROOT)
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'examples', name), '--out', str(out), *arguments],
        capture_output=True, text=True, env=environment, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@pytest.fixture(scope='module')
def classifier_weights(tmp_path_factory):
    '''One file for the sentiment examples' classifier: the first example trains it, the other loads it.'''
    return str(tmp_path_factory.mktemp('classifier') / 'sentiment_classifier.pt')


def test_quickstart(tmp_path, classifier_weights):
    output = run_example('quickstart.py', tmp_path, '--weights', classifier_weights)
    accuracy = float(re.search(r'test accuracy ([\d.]+)%', output).group(1))
    share = float(re.search(r'sentiment words: ([\d.]+)%', output).group(1))
    error = float(re.search(r'\|sum R - f\| / \|f\|: ([\d.e+-]+)', output).group(1))
    assert accuracy > 80 and share > 30 and error < 1e-3
    assert '\x1b[48;2;' in output and 'red: positive relevance' in output  # coloured terminal heatmap, legend
    assert 'Legend' in (tmp_path / 'quickstart.html').read_text()
    assert (tmp_path / 'quickstart.png').read_bytes()[:4] == b'\x89PNG'


def test_compare_methods(tmp_path, classifier_weights):
    output = run_example('compare_methods.py', tmp_path, '--weights', classifier_weights)
    rows = {line[:38].strip(): line[38:].split() for line in output.splitlines() if line[:38].strip()}
    lrp, ixg = rows['MambaLRP'], rows['InputXGradient']
    assert float(lrp[1]) < 1e-3 < float(ixg[1])  # conservation error
    assert "Captum's LRP" in output and 'fails' in output
    assert (tmp_path / 'compare_methods.png').exists()


def test_generate_explain(tmp_path):
    output = run_example('generate_explain.py', tmp_path)
    assert 'generated: "green ."' in output
    # every generated token's row, earlier generated tokens included, sums to what is explained for it
    rows = re.findall(r'explained ([+-][\d.]+), sum ([+-][\d.]+)', output)
    assert len(rows) == 4 and all(explained == total for explained, total in rows)
    assert re.search(r"'\.'.*\| .* green:[+-]", output)  # the second token's row names the first generated one
    assert (tmp_path / 'generate_explain.html').exists() and (tmp_path / 'generate_explain.png').exists()


def test_explain_image(tmp_path):
    environment = dict(os.environ, PYTHONPATH=ROOT)
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'examples', 'explain_image.py'), '--out', str(tmp_path), '--quick'],
        capture_output=True, text=True, env=environment, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    accuracy = float(re.search(r'test accuracy ([\d.]+)%', completed.stdout).group(1))
    assert accuracy > 70
    # the pixels' and the constants' shares of each explained logit add up to it
    shares = re.search(r'pixels \+ constants = logit\): (.*)', completed.stdout).group(1).split('; ')
    columns = [[float(value) for value in share.split(' ', 1)[1].split(', ')] for share in shares]
    assert {share.split(' ')[0] for share in shares} >= {'pixels', 'cls_token', 'pos_embed', 'bias'}
    assert all(abs(sum(column) - 1) <= 0.02 for column in zip(*columns)), shares
    for name in ('explain_image.png', 'explain_image_captum.png'):
        assert (tmp_path / name).read_bytes()[:4] == b'\x89PNG'


def test_walkthrough_notebook_runs_and_its_explanations_conserve(classifier_weights, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # the kernel inherits the environment: the package, and the classifier the other examples share
    monkeypatch.setenv('PYTHONPATH', ROOT)
    monkeypatch.setenv('MAMBA_LRP_CLASSIFIER', classifier_weights)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    notebook = nbformat.read(os.path.join(ROOT, 'examples', 'walkthrough.ipynb'), as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name='python3',
                   resources={'metadata': {'path': os.path.join(ROOT, 'examples')}}).execute()
    text = ''.join(output.get('text', '') for cell in notebook.cells for output in cell.get('outputs', []))
    assert float(re.search(r'\|sum R - f\| / \|f\|: ([\d.e+-]+)', text).group(1)) < 1e-5
    shares = {name: float(share) for name, share in re.findall(r'(\w+) +share on sentiment words +([\d.]+)%', text)}
    assert shares['MambaLRP'] > shares['InputXGradient']
    explained, total = re.search(r'-> "green", explained logit ([\d.-]+), sum of relevance ([\d.-]+)', text).groups()
    assert abs(float(explained) - float(total)) < 1e-2
    heatmaps = [output for cell in notebook.cells for output in cell.get('outputs', []) if 'data' in output]
    assert len(heatmaps) == 3 and all('text/html' in output['data'] for output in heatmaps)
