'''Mutation check: switch off each MambaLRP rule in turn by patching the rule itself, and show that on every family
whose path the rule is on, at least one test fails.

Each mutation replaces one rule's ``apply`` (the equation, used both by the canonized mixers and by the hooks on
standalone modules) with the plain operation, in a pytest subprocess started with ``MAMBA_LRP_MUTATION=<rule>``
(``conftest.py`` applies it). The failing tests are attributed to the families in their names; tests of the rules in
isolation (``test_rules.py``) are listed apart, since they name no family.

Run from the repository root: ``python tests/mutation_check.py`` (the transformers families, about two minutes on two
cores), or on a GPU with mamba-ssm ``--gpu`` (mamba-ssm's modules, through ``test_cuda.py``). Prints the table
(rule x family -> a catching test) and exits with 1 if a cell is uncaught.
'''
import argparse
import os
import re
import subprocess
import sys
from typing import Dict, List

#: the plain operation that replaces each rule's ``apply``
MUTANTS = {
    'silu': lambda x, y: y,
    'norm': lambda h, u: u,
    'gate': lambda product: product,
    'ssm': lambda *selection: selection,
    'attention': lambda constant: constant,
    # gate_relevance='value' (HeldGate): the output gate let through instead of held
    'held_gate': lambda gate: gate,
}

MAMBA_ONLY = ['Mamba', 'Mamba2', 'FalconMamba']
HYBRIDS = ['Jamba', 'Bamba', 'NemotronH', 'GraniteMoeHybrid', 'FalconH1', 'Zamba2', 'Zamba', 'Lfm2', 'Qwen3Next',
           'Qwen3_5', 'Qwen3_5Moe', 'OlmoHybrid', 'KimiLinear', 'MiniMax',
           'RecurrentGemma', 'Rwkv', 'xLSTM']
MAMBA_SSM = ['mamba-ssm Mamba', 'mamba-ssm Mamba2']
#: this package's plain-PyTorch models without attention
PLAIN = ['Mamba3']
TEST_FILES = ['tests/test_families.py', 'tests/test_conservation.py', 'tests/test_composite.py',
              'tests/test_captum.py', 'tests/test_rules.py', 'tests/test_mamba3.py']


def apply_mutation(rule: str) -> None:
    '''Replace ``rule``'s equation by the plain operation (called by conftest.py in the mutated test run).'''
    from zennit_mamba.rules import RULES, HeldGate, LNRule

    (HeldGate if rule == 'held_gate' else RULES[rule]).apply = staticmethod(MUTANTS[rule])
    if rule == 'norm':  # LayerNorm's LN-rule, with the centring kept (RWKV, EfficientViM)
        LNRule.apply_centred = staticmethod(lambda h, u, *arguments: u)


#: (rule, family) where the family has nothing the rule acts on: RWKV has no product of two input-dependent factors;
#: the held gate has no SiLU output gate to hold where the attention or selection rule holds it already
#: (test_families.GATE_ALREADY_HELD)
OFF_PATH = {('gate', 'Rwkv')} | {('held_gate', family) for family in ('KimiLinear', 'MiniMax', 'xLSTM', 'Rwkv', 'Lfm2')}


def families(rule: str, gpu: bool) -> List[str]:
    '''The families on whose path ``rule`` is on.'''
    if gpu:
        # the held gate's GPU path is the CPU's (the fused kernels step aside for it): checked by the CPU tests
        return [] if rule in ('attention', 'held_gate') else MAMBA_SSM
    named = HYBRIDS if rule == 'attention' else MAMBA_ONLY + HYBRIDS + PLAIN
    return [family for family in named if (rule, family) not in OFF_PATH]


def family_of(test: str) -> str:
    '''The family a test id names: a parameter (``[...-Bamba]``), mamba-ssm in ``test_cuda.py``, else Mamba
    (the transformers Mamba models of ``conftest.make_mamba``); ``'rules'`` for the tests of rules alone.'''
    if test.startswith('tests/test_rules.py'):
        return 'rules'
    if test.startswith('tests/test_cuda.py'):
        if 'mamba_ssm_mamba2' in test or 'ssd' in test:
            return 'mamba-ssm Mamba2'
        return 'mamba-ssm Mamba' if 'mamba_ssm' in test or 'kernel' in test else 'Mamba'
    tokens = set(re.split(r'[-\[\]]', test.split('::', 1)[-1]))
    named = next((name for name in MAMBA_ONLY + HYBRIDS + PLAIN if name in tokens), None)
    if named is None and test.startswith('tests/test_families.py'):
        return 'unnamed'  # a test of test_families.py whose family is not in its id: counted for none
    return named or 'Mamba'


def failures(rule: str, gpu: bool) -> List[str]:
    files = ['tests/test_cuda.py'] if gpu else TEST_FILES
    environment = dict(os.environ, MAMBA_LRP_MUTATION=rule, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '--tb=no', '-rf', '-q', *files],
        capture_output=True, text=True, env=environment,
    )
    return [line.split()[1] for line in result.stdout.splitlines() if line.startswith('FAILED ')]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--gpu', action='store_true', help='run test_cuda.py for the mamba-ssm families instead')
    parser.add_argument('--rules', nargs='+', choices=list(MUTANTS), default=list(MUTANTS),
                        help='only these mutations (default: all)')
    arguments = parser.parse_args()
    uncaught = 0
    print('| rule | family | caught by (failing tests) |')
    print('|---|---|---|')
    for rule in arguments.rules:
        failed = failures(rule, arguments.gpu)
        by_family: Dict[str, List[str]] = {}
        for test in failed:
            by_family.setdefault(family_of(test), []).append(test.split('::', 1)[-1])
        for family in families(rule, arguments.gpu) + ([] if arguments.gpu else ['rules']):
            tests = by_family.get(family, [])
            if not tests and family != 'rules':
                uncaught += 1
            shown = f'{tests[0]} (+{len(tests) - 1} more)' if tests else 'NOT CAUGHT'
            print(f'| {rule} | {family} | {shown} |')
    print(f'\n{uncaught} uncaught cells')
    return 1 if uncaught else 0


if __name__ == '__main__':
    sys.exit(main())
