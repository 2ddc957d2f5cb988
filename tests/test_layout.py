'''The package's layers: every module imports only modules of its own layer or lower ones, the rules nothing of the
package, a kernel no family; and every family file names every module class of its library module.'''
import ast
import importlib
import inspect
import os
import pkgutil

import pytest
import torch

import captum_mamba
import zennit_mamba
from zennit_mamba.core.family import resolve
from zennit_mamba.support import FAMILIES

#: the layers, lowest first, by the module path's prefix (the longest prefix that matches decides)
LAYERS = {
    'zennit_mamba.rules': 0, 'zennit_mamba._optional': 0,
    'zennit_mamba.kernels': 1,
    'zennit_mamba.core': 2,
    'zennit_mamba.mixers': 3,
    'zennit_mamba.families': 4,
    'zennit_mamba.support': 5, 'zennit_mamba.canonizers': 5, 'zennit_mamba.composite': 5, 'zennit_mamba': 5,
    'zennit_mamba.constants': 5,
    'zennit_mamba.heatmap': 6,
    'captum_mamba': 7,
}


def layer_of(module: str) -> int:
    prefix = max((key for key in LAYERS if module == key or module.startswith(key + '.')), key=len)
    return LAYERS[prefix]


def package_modules():
    for package in (zennit_mamba, captum_mamba):
        yield package.__name__, package.__file__
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):
            spec = importlib.util.find_spec(info.name)
            yield info.name, spec.origin


def imports_of(name: str, path: str):
    '''The modules of this project that ``name`` imports anywhere in its file (functions included).'''
    tree = ast.parse(open(path, encoding='utf-8').read())
    package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base.split('.')[0] not in ('zennit_mamba', 'captum_mamba'):
                continue
            # `from package import module` imports the module
            targets = [f'{base}.{alias.name}' if _is_module(f'{base}.{alias.name}') else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split('.')[0] in ('zennit_mamba', 'captum_mamba'):
                yield target


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


MODULES = sorted(package_modules())


@pytest.mark.parametrize('name, path', MODULES, ids=[name for name, _ in MODULES])
def test_a_module_imports_no_higher_layer(name, path):
    own = layer_of(name)
    higher = sorted({target for target in imports_of(name, path) if layer_of(target) > own})
    assert higher == [], f'{name} (layer {own}) imports {higher}'


def test_the_rules_import_nothing_of_the_package():
    path = importlib.util.find_spec('zennit_mamba.rules').origin
    assert sorted(set(imports_of('zennit_mamba.rules', path))) == []


def test_no_kernel_imports_a_family_or_a_mixer():
    for name, path in MODULES:
        if name.startswith('zennit_mamba.kernels'):
            assert not [target for target in imports_of(name, path)
                        if target.startswith(('zennit_mamba.families', 'zennit_mamba.mixers', 'zennit_mamba.core'))]


def test_the_layer_test_catches_an_upward_import(tmp_path):
    # the mutation this test guards against: a rule that imports the machinery
    path = tmp_path / 'rules.py'
    path.write_text('from zennit_mamba.core.instance import bind_forward\n')
    assert list(imports_of('zennit_mamba.rules', str(path))) == ['zennit_mamba.core.instance']
    assert layer_of('zennit_mamba.core.instance') > layer_of('zennit_mamba.rules')


@pytest.mark.parametrize('family', FAMILIES, ids=[family.name for family in FAMILIES])
def test_a_family_file_names_every_class_of_its_library_modules(family):
    named = set(family.canonized) | set(family.layers)
    missing = []
    for module_name in family.library_modules:
        try:
            module = importlib.import_module(module_name)
        except (ImportError, OSError, RuntimeError):
            pytest.skip(f'{module_name} cannot be imported here (mamba-ssm needs CUDA)')
        for _, kind in inspect.getmembers(module, inspect.isclass):
            if issubclass(kind, torch.nn.Module) and kind.__module__ == module_name:
                if f'{module_name}.{kind.__name__}' not in named:
                    missing.append(kind.__name__)
    assert missing == []
    renamed = {path: pair for pair in family.renamed for path in pair}
    assert all(resolve(path) is not None or any(resolve(other) for other in renamed.get(path, ()))
               for path in named if path.startswith(family.library_modules))


def test_every_module_file_of_the_package_is_in_a_layer():
    # a new top-level module must be placed in LAYERS (the prefix 'zennit_mamba' alone is the package's top)
    top_level = [name for name, _ in MODULES if name.count('.') == 1 and name.startswith('zennit_mamba.')]
    assert all(any(name == key or name.startswith(key + '.') for key in LAYERS if key != 'zennit_mamba')
               for name in top_level), top_level


def test_the_family_folder_holds_only_family_files():
    folder = os.path.dirname(importlib.util.find_spec('zennit_mamba.families').origin)
    files = sorted(name[:-3] for name in os.listdir(folder) if name.endswith('.py') and name != '__init__.py')
    with_family = sorted(name for name in files
                         if getattr(importlib.import_module(f'zennit_mamba.families.{name}'), 'FAMILY', None))
    assert files == with_family
