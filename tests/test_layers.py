"""The package's imports run downward only (DESIGN.md: "data flows top to bottom without coming back").

Every module of ``mambacsr_arch`` is read with :mod:`ast` (nothing is imported), mapped to its layer, and
each of its imports (module level or deferred inside a function) resolved to the module it names:

    root (mambacsr_arch/__init__, the train/test entry scripts)
    cli
    integrations
    models
    archs            data
    ops     dis
    base: fileio, _compat, errors, registry, _threads, version

A module may import its own layer and the layers below it, never a layer above or beside it (``ops``
and ``dis`` know nothing of each other, nor do ``archs`` and ``data``). The package root is imported
only by the front doors (``cli``, ``integrations``: ``import mambacsr_arch`` for its side effects, the
shims and registrations, as a host would); below them it would run the whole package from a lower
layer. Module-level imports must also form no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

PACKAGE = 'mambacsr_arch'
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

BASE = {'fileio', '_compat', 'errors', 'registry', '_threads', 'version'}
#: layer -> the layers it may import (itself included)
ALLOWED: Dict[str, Set[str]] = {
    'base': {'base'},
    'ops': {'base', 'ops'},
    'dis': {'base', 'dis'},
    'archs': {'base', 'ops', 'dis', 'archs'},
    'data': {'base', 'data'},
    'models': {'base', 'ops', 'dis', 'archs', 'data', 'models'},
    'integrations': {'base', 'ops', 'dis', 'archs', 'data', 'models', 'integrations'},
    'cli': {'base', 'ops', 'dis', 'archs', 'data', 'models', 'integrations', 'cli'},
    'root': {'base', 'ops', 'dis', 'archs', 'data', 'models', 'integrations', 'cli', 'root'},
}
TOP_LEVEL_SCRIPTS = {'train', 'test'}  # BasicSR-style entry scripts (python -m mambacsr_arch.train)
ROOT_IMPORTERS = {'cli', 'integrations', 'root'}  # the front doors, which may import the package for its effects


def _modules() -> Dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    found = {}
    for path in sorted(ROOT.rglob('*.py')):
        parts = (PACKAGE, ) + path.relative_to(ROOT).with_suffix('').parts
        if parts[-1] == '__init__':
            parts = parts[:-1]
        found['.'.join(parts)] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> str:
    parts = module.split('.')
    if len(parts) == 1 or parts[1] in TOP_LEVEL_SCRIPTS:
        return 'root'
    if parts[1] in BASE:
        return 'base'
    if parts[1] in ALLOWED:
        return parts[1]
    raise AssertionError(f'{module}: no layer; add it to tests/test_layers.py (BASE or ALLOWED)')


def _package_of(module: str) -> str:
    return module if MODULES[module].name == '__init__.py' else module.rsplit('.', 1)[0]


def imports_of(module: str) -> List[Tuple[str, int, bool]]:
    """(imported module of the package, line, at module level) for each import statement of ``module``.

    ``from X import name`` names the submodule X.name when there is one, else X itself (an attribute of X).
    """
    tree = ast.parse(MODULES[module].read_text(encoding='utf-8'))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports guarded by try/if at module level still run at import time
        if isinstance(node, (ast.Try, ast.If)):
            top_level.update(id(child) for child in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module).split('.')
                base = base[:len(base) - node.level + 1]
                source = '.'.join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ''
            targets = [f'{source}.{alias.name}' if f'{source}.{alias.name}' in MODULES else source
                       for alias in node.names]
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + '.'):
                while target not in MODULES:  # `import mambacsr_arch.ops.dispatch.x`: the deepest module named
                    target = target.rsplit('.', 1)[0]
                found.append((target, node.lineno, id(node) in top_level))
    return found


def _rel(module: str) -> str:
    return str(MODULES[module].relative_to(ROOT.parent))


def test_every_module_has_a_layer():
    assert len(MODULES) > 40
    for module in MODULES:
        layer_of(module)


def violations(module: str, imports: List[Tuple[str, int, bool]]) -> List[str]:
    """The imports of ``module`` that break the layering, one line each."""
    layer = layer_of(module)
    wrong = []
    for target, line, _ in imports:
        if target == PACKAGE:
            if layer not in ROOT_IMPORTERS:
                wrong.append(f'{_rel(module)}:{line} imports the package root {PACKAGE} (import the module that '
                             f'defines the name instead)')
        elif layer_of(target) not in ALLOWED[layer]:
            wrong.append(f'{_rel(module)}:{line} ({layer}) imports {target} ({layer_of(target)})')
    return wrong


def test_no_upward_or_sideways_import():
    wrong = [line for module in MODULES for line in violations(module, imports_of(module))]
    assert not wrong, '\n'.join(wrong)


def _cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_at_module_level():
    graph = {module: {t for t, _, top in imports_of(module) if top and t != module} for module in MODULES}
    cycle = _cycle(graph)
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


# ----------------------------------------------------------------------------- the checker itself
@pytest.mark.parametrize('graph, expected', [
    ({'a': {'b'}, 'b': {'c'}, 'c': set()}, None),
    ({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}, ['a', 'b', 'c', 'a']),
])
def test_cycle_finder(graph, expected):
    assert _cycle(graph) == expected


def test_resolution_of_relative_and_package_imports():
    """The walker sees what these tests rely on: a relative import of a submodule, one of an attribute."""
    ss2d = {t for t, _, _ in imports_of('mambacsr_arch.archs.mambacsr.ss2d')}
    assert {'mambacsr_arch.dis', 'mambacsr_arch.ops', 'mambacsr_arch.archs.layers',
            'mambacsr_arch.archs.mambacsr.fused'} <= ss2d
    cpu_scan = {t for t, _, _ in imports_of('mambacsr_arch.ops.cpu_scan')}
    assert 'mambacsr_arch._threads' in cpu_scan and PACKAGE not in cpu_scan
    assert layer_of('mambacsr_arch.ops.cpu_scan') == 'ops' and layer_of(PACKAGE) == 'root'


@pytest.mark.parametrize('module, target, ok', [
    ('mambacsr_arch.ops.cpu_scan', 'mambacsr_arch._threads', True),
    ('mambacsr_arch.ops.cpu_scan', PACKAGE, False),  # the import this file was written against
    ('mambacsr_arch.ops.dispatch', 'mambacsr_arch.archs.mambacsr.ss2d', False),
    ('mambacsr_arch.ops.dispatch', 'mambacsr_arch.dis', False),
    ('mambacsr_arch.dis', 'mambacsr_arch.ops', False),
    ('mambacsr_arch.archs.mambacsr.ss2d', 'mambacsr_arch.models.weights', False),
    ('mambacsr_arch.archs.mambacsr.ss2d', 'mambacsr_arch.cli.main', False),
    ('mambacsr_arch.models.weights', 'mambacsr_arch.archs.detect', True),
    ('mambacsr_arch.cli.evaluate', PACKAGE, True),
])
def test_violation_rule(module, target, ok):
    assert (violations(module, [(target, 1, True)]) == []) == ok
