"""Option-file validation for ``basicsr train|test|infer``, run before any dataset or network is built.

BasicSR 1.4.2 takes most option mistakes silently or fails far from their cause: a misspelt
``network_g`` key is ignored (our archs only warn on stderr) and a 3.7M-parameter default network
trains instead of the intended one; ``scale: 3`` with ``network_g.upscale: 4`` dies inside the
loss with "The size of tensor a (32) must match ... (24)"; the authors' own option files crash
(``val1`` dataset keys, one-element list ``dataroot_gt``). Two hooks fix that:

* :func:`normalizing_yaml` (around BasicSR's ``parse_options``, which crashes on list dataroots
  while it reads the YAML): one-element ``dataroot_gt`` / ``dataroot_lq`` lists become the string,
  several folders are refused (see :func:`normalize_dataroots`);
* :func:`check_options` (on the parsed dict, after ``--force_yml``): dataset keys ``val<N>`` /
  ``test<N>`` renamed ``val_<N>`` / ``test_<N>`` (the form BasicSR's pipelines read), registered
  ``model_type`` / dataset ``type`` / ``network_*.type`` (with what to use instead of the HAT
  repository's own classes), every ``network_*`` key against the arch's constructor, and ``scale``
  against ``network_g.upscale`` (its default when absent). ``basicsr infer`` calls
  :func:`check_network` on the network it builds.

Every problem raises :class:`OptionError` with one message naming the file, the option key and the
fix; the CLI prints it as ``basicsr <command>: error: ...`` and exits with status 2.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import re
import sys
from collections import OrderedDict
from typing import Any, Iterator, List, Mapping, MutableMapping, Optional, Sequence

EXIT_CONFIG = 2
DATAROOT_KEYS = ('dataroot_gt', 'dataroot_lq')
_PHASE_KEY = re.compile(r'(train|val|test)(\d+|_.*)?')

#: Classes of the official HAT repository (XPixelGroup/HAT) this plugin does not ship: its
#: Real-ESRGAN-style real-world training and ImageNet pre-training. What to use instead.
HAT_ONLY = {
    'ImageNetPairedDataset': "the HAT repository's ImageNet pre-training dataset (bicubic LQ made on the fly) is "
                             'out of scope of mambacsr_arch: use type: PairedImageDataset with pre-made pairs '
                             '(basicsr prepare-csr writes them) or type: JPEGDegradedPairedDataset (GT folder only, '
                             'bicubic + JPEG on the fly)',
    'RealHATMSEModel': "the HAT repository's Real-ESRGAN-style real-world training (HAT_GAN_Real) is out of scope of "
                       'mambacsr_arch: use model_type: HATModel with PairedImageDataset or JPEGDegradedPairedDataset',
    'RealHATGANModel': "the HAT repository's Real-ESRGAN-style real-world GAN training (HAT_GAN_Real) is out of scope "
                       'of mambacsr_arch: use model_type: HATModel with PairedImageDataset or '
                       'JPEGDegradedPairedDataset',
}


class OptionError(ValueError):
    """An option-file problem the user must fix; the CLI prints it as ``basicsr <cmd>: error: ...`` (exit 2)."""


def report(command: str, err: OptionError) -> int:
    """Print ``err`` as ``basicsr <command>: error: ...`` on stderr; returns the exit status (2)."""
    print(f'basicsr {command}: error: {err}', file=sys.stderr, flush=True)
    return EXIT_CONFIG


def print_notes(command: str, notes: Sequence[str]) -> None:
    """Say what the checks changed (stderr: BasicSR's log file does not exist yet at this point)."""
    for note in notes:
        print(f'basicsr {command}: note: {note}', file=sys.stderr, flush=True)


def _closest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ''


# ----------------------------------------------------------------------------- before BasicSR parses


def normalize_dataroots(opt: Any, source: str) -> List[str]:
    """Make list-valued ``datasets.*.dataroot_gt`` / ``dataroot_lq`` strings, in place; returns notes.

    The official MambaCSR train files write one-element YAML lists (their BasicSR fork pairs
    the i-th GT and LQ folders); a one-element list is its folder. Several folders are refused:
    every dataset here reads one folder (or one LMDB) per key.
    """
    notes: List[str] = []
    datasets = opt.get('datasets') if isinstance(opt, Mapping) else None
    if not isinstance(datasets, Mapping):
        return notes
    for name, dataset in datasets.items():
        if not isinstance(dataset, MutableMapping):
            continue
        for key in DATAROOT_KEYS:
            value = dataset.get(key)
            if not isinstance(value, (list, tuple)):
                continue
            where = f'{source}: datasets.{name}.{key}'
            if len(value) == 1 and isinstance(value[0], str):
                dataset[key] = value[0]
                notes.append(f"datasets.{name}.{key}: the one-element list is read as '{value[0]}'.")
            elif not value or not all(isinstance(v, str) for v in value):
                raise OptionError(f'{where} must be a folder (or LMDB) path, got {value!r}.')
            else:
                raise OptionError(f'{where} lists {len(value)} folders ({", ".join(value)}); a dataset here reads '
                                  'one folder or LMDB. Merge them into one folder (or one LMDB: basicsr prepare-csr '
                                  '--lmdb), or give each its own val_<N> dataset when validating.')
    return notes


def _check_structure(opt: Any, source: str) -> None:
    """The sections BasicSR's parse_options indexes unconditionally, as mappings."""
    if not isinstance(opt, Mapping):
        raise OptionError(f'{source}: an option file must be a YAML mapping (name, model_type, datasets, network_g, '
                          f'path, ...), got {type(opt).__name__}.')
    for key in ('datasets', 'path'):
        if not isinstance(opt.get(key), Mapping):
            found = 'missing' if opt.get(key) is None else f'a {type(opt[key]).__name__}'
            raise OptionError(f'{source}: the {key} section is {found}; it must be a mapping'
                              + (' of dataset name -> options.' if key == 'datasets' else
                                 ' (e.g. pretrain_network_g: ~).'))
    for name, dataset in opt['datasets'].items():
        if not isinstance(dataset, Mapping):
            raise OptionError(f'{source}: datasets.{name} must be a mapping of dataset options (type, dataroot_gt, '
                              f'...), got {dataset!r}.')


@contextlib.contextmanager
def normalizing_yaml(notes: List[str]) -> Iterator[None]:
    """Within the block, BasicSR's option-file YAML loader checks the structure and normalises dataroots.

    BasicSR's ``parse_options`` expands ``dataroot_*`` right after reading the YAML (a list crashes
    there), so the fix must happen as the file is read: ``basicsr.utils.options.ordered_yaml`` (the
    loader factory both 1.4.2's ``parse_options`` and master's ``yaml_load`` call) hands out a loader
    that post-processes the document. ``--force_yml`` is applied by BasicSR afterwards, unchanged.
    Notes are appended to ``notes``; problems raise :class:`OptionError`.
    """
    import basicsr.utils.options as options

    original = options.ordered_yaml

    def ordered_yaml():
        loader, dumper = original()

        class NormalizingLoader(loader):
            def __init__(self, stream):
                self.mambacsr_source = f"option file '{getattr(stream, 'name', stream)}'"
                super().__init__(stream)

            def get_single_data(self):
                data = super().get_single_data()
                _check_structure(data, self.mambacsr_source)
                notes.extend(normalize_dataroots(data, self.mambacsr_source))
                return data

        return NormalizingLoader, dumper

    options.ordered_yaml = ordered_yaml
    try:
        yield
    finally:
        options.ordered_yaml = original


# ----------------------------------------------------------------------------- after BasicSR parses


def _registries():
    import basicsr.archs  # noqa: F401  (the imports fill the registries)
    import basicsr.data  # noqa: F401
    import basicsr.models  # noqa: F401
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

    return ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY


def _lookup(registry, name: Any) -> Optional[Any]:
    """What ``registry.get(name)`` returns (it also tries ``<name>_basicsr``), or None."""
    if not isinstance(name, str):
        return None
    return registry._obj_map.get(name, registry._obj_map.get(f'{name}_basicsr'))


def _check_type(registry, name: Any, where: str, what: str) -> Any:
    obj = _lookup(registry, name)
    if obj is not None:
        return obj
    if name in HAT_ONLY:
        raise OptionError(f"{where}: '{name}': {HAT_ONLY[name]}.")
    known = sorted(k for k in registry.keys() if '.' not in k)
    if name is None:
        raise OptionError(f'{where} is missing: set the registered {what} to use, one of: {", ".join(known)}.')
    raise OptionError(f"{where}: unknown {what} '{name}'{_closest(str(name), known)}; registered: "
                      f"{', '.join(known)}.")


def normalize_dataset_keys(opt: MutableMapping[str, Any], command: str, source: str) -> List[str]:
    """Rename ``val<N>`` / ``test<N>`` dataset keys to ``val_<N>`` / ``test_<N>`` and set their phase.

    BasicSR reads the phase from the key up to its first ``_`` and rejects ``val1``
    ("Wrong dataset phase: val1"); the authors' MambaCSR fork lists ``val1`` ... ``val5``
    explicitly. ``basicsr train`` takes one ``train`` set and any ``val*`` sets (as BasicSR's
    train pipeline); ``basicsr test`` takes any ``train*`` / ``val*`` / ``test*`` set.
    """
    notes: List[str] = []
    moves: List[str] = []
    datasets = opt['datasets']
    renamed: 'OrderedDict[str, Any]' = OrderedDict()
    for key, dataset in datasets.items():
        match = _PHASE_KEY.fullmatch(str(key))
        if not match:
            raise OptionError(f"{source}: dataset key datasets.{key} is not a phase BasicSR knows; name it train, "
                              'val, val_<name>, val<N> (validation) or test, test_<name>, test<N> (basicsr test).')
        phase, suffix = match.group(1), match.group(2) or ''
        if command == 'train' and phase == 'test':
            raise OptionError(f"{source}: datasets.{key}: basicsr train validates on val / val_<N> datasets; rename "
                              f"'{key}' to 'val{suffix}' (test* sets are for basicsr test).")
        if command == 'train' and phase == 'train' and suffix:
            raise OptionError(f"{source}: datasets.{key}: basicsr train reads exactly one training set, named "
                              "'train'.")
        new_key = f'{phase}_{suffix}' if suffix.isdigit() else key
        if new_key != key:
            if new_key in datasets:
                raise OptionError(f'{source}: datasets.{key} and datasets.{new_key} are the same set for BasicSR; '
                                  'rename one of them.')
            moves.append(f'{key} -> {new_key}')
        dataset['phase'] = phase
        renamed[new_key] = dataset
    if moves:
        notes.append(f"dataset keys renamed to BasicSR's <phase>_<N> form: {', '.join(moves)}.")
    if command == 'train' and 'train' not in renamed:
        raise OptionError(f'{source}: basicsr train needs a datasets.train section (the training set).')
    if not renamed:
        raise OptionError(f'{source}: the datasets section is empty; basicsr {command} needs at least one dataset.')
    opt['datasets'] = renamed
    return notes


def _signature(cls: Any):
    try:
        return inspect.signature(cls)
    except (TypeError, ValueError):  # builtins / C extensions: nothing to check against
        return None


def check_network(network_opt: Any, key: str = 'network_g', source: str = '', scale: Any = None,
                  scale_label: str = 'scale') -> List[str]:
    """Check one ``network_*`` section against its registered arch; returns notes, raises OptionError.

    Keys must be constructor parameters. MambaCSR and HAT take ``**kwargs`` (their official
    versions silently ignore unknown keys); for them the accepted set is exactly their named
    parameters, which cover every ``network_g`` key of the official option files. Foreign archs
    with ``**kwargs`` cannot be checked (noted). With ``scale``, the network's output factor
    (``upscale``, its constructor default when the key is absent; 1 when ``upsampler`` is ``''``)
    must equal it. ``source`` (e.g. "option file 'x.yml'") prefixes messages; ``scale_label`` names
    where ``scale`` came from.
    """
    arch_registry = _registries()[0]
    prefix = f'{source}: ' if source else ''
    if not isinstance(network_opt, Mapping):
        raise OptionError(f'{prefix}{key} must be a mapping with a type key (e.g. type: MambaCSR), got '
                          f'{network_opt!r}.')
    arch = network_opt.get('type')
    cls = _check_type(arch_registry, arch, f'{prefix}{key}.type', 'arch')
    signature = _signature(cls)
    if signature is None:
        return [f'{key}: cannot read the options of {arch} (no Python signature); its keys are not checked.']
    params = {name: p for name, p in signature.parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_kwargs = len(params) < len(signature.parameters)
    ours = getattr(cls, '__module__', '').split('.')[0] == 'mambacsr_arch'
    notes = []
    unknown = [k for k in network_opt if k != 'type' and k not in params]
    if unknown and takes_kwargs and not ours:
        notes.append(f'{key}: {arch} takes **kwargs, so {", ".join(map(str, unknown))} cannot be checked; make '
                     f'sure {arch} reads them.')
    elif unknown:
        named = ', '.join(f"'{k}'{_closest(str(k), list(params))}" for k in unknown)
        raise OptionError(f'{prefix}{key}: {arch} has no option {named}. Its options: {", ".join(params)}. Fix or '
                          'remove the key (an ignored key would build another network than the one asked for).')
    required = [name for name, p in params.items() if p.default is p.empty and name not in network_opt]
    if required:
        raise OptionError(f'{prefix}{key}: {arch} needs {", ".join(required)}; add '
                          f'{"them" if len(required) > 1 else "it"} to {key}.')
    if scale is not None and 'upscale' in params:
        upsampler = network_opt.get('upsampler', params['upsampler'].default if 'upsampler' in params else None)
        if upsampler == '':
            factor, origin = 1, " (upsampler '' does not upsample)"
        else:
            factor = network_opt.get('upscale', params['upscale'].default)
            origin = '' if 'upscale' in network_opt else f' ({arch} default; the key is not set)'
        if factor != scale:
            raise OptionError(f'{prefix}{scale_label} is {scale} but {key} upscales x{factor}{origin}, so its output '
                              f'would not match the x{scale} data. Set {scale_label} and {key}.upscale to the '
                              'same factor.')
    return notes


def check_options(opt: MutableMapping[str, Any], command: str, source: str) -> List[str]:
    """Validate (and normalise dataset keys of) a parsed option dict for ``basicsr <command>``; returns notes.

    ``command`` is ``'train'`` or ``'test'``; ``source`` names the option file in messages.
    """
    _, dataset_registry, model_registry = _registries()
    notes = normalize_dataset_keys(opt, command, source)
    _check_type(model_registry, opt.get('model_type'), f'{source}: model_type', 'model')
    for key, dataset in opt['datasets'].items():
        _check_type(dataset_registry, dataset.get('type'), f'{source}: datasets.{key}.type', 'dataset')
    if 'network_g' not in opt:
        raise OptionError(f'{source}: the network_g section is missing (e.g. network_g: {{type: MambaCSR, ...}}).')
    for key in [k for k in opt if str(k).startswith('network_')]:
        scale = opt.get('scale') if key == 'network_g' else None
        notes += check_network(opt[key], key, source, scale=scale)
    return notes
