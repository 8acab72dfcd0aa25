"""Option-file validation for ``basicsr train|test|infer``, run before any dataset or network is built.

BasicSR 1.4.2 takes most option mistakes silently or fails far from their cause: a misspelt
``network_g`` key is ignored (our archs only warn on stderr) and a 3.7M-parameter default network
trains instead of the intended one; ``scale: 3`` with ``network_g.upscale: 4`` dies inside the
loss with "The size of tensor a (32) must match ... (24)"; the authors' own option files crash
(``val1`` dataset keys, one-element list ``dataroot_gt``). Two hooks fix that:

* :func:`normalizing_yaml` (around BasicSR's ``parse_options``, which crashes on list dataroots
  while it reads the YAML): ``--force_yml`` entries applied, typed as YAML and key-checked
  (:func:`split_force_yml`, :func:`parse_force_yml`, :func:`apply_force_yml`; BasicSR keeps them as
  text and fails on a misspelt key with a traceback), one-element ``dataroot_gt`` / ``dataroot_lq``
  lists become the string, several folders are refused (see :func:`normalize_dataroots`);
* :func:`check_options` (on the parsed dict): dataset keys ``val<N>`` /
  ``test<N>`` renamed ``val_<N>`` / ``test_<N>`` (the form BasicSR's pipelines read), registered
  ``model_type`` / dataset ``type`` / ``network_*.type`` (with what to use instead of the HAT
  repository's own classes), every ``network_*`` key against the arch's constructor, and ``scale``
  against ``network_g.upscale`` (its default when absent), then the ``train`` keys and numbers, AMP,
  tiles and ``path.pretrain_network_g`` (see its docstring). ``basicsr infer`` calls
  :func:`check_network` on the network it builds.

Every problem raises :class:`OptionError` with one message naming the file, the option key and the
fix; the CLI prints it as ``basicsr <command>: error: ...`` and exits with status 2.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import os.path as osp
import re
import sys
from collections import OrderedDict
from typing import Any, Iterator, List, Mapping, MutableMapping, Optional, Sequence, Tuple

from mambacsr_arch.errors import ConfigError

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


class OptionError(ConfigError):
    """An option-file problem the user must fix; the CLI prints it as ``basicsr <cmd>: error: ...`` (exit 2)."""


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


_FLOAT_TEXT = re.compile(r'[-+]?(\d[\d_]*)?\.?\d*([eE][-+]?\d+)?')
ForcedEntry = Tuple[Tuple[str, ...], Any, str]


def split_force_yml(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(entries, the other arguments)``: every ``--force_yml`` of ``argv`` taken out, in order.

    BasicSR's ``parse_options`` applies ``--force_yml`` itself, but keeps values as text
    (``lr=2e-4`` is the string '2e-4'), fails with a traceback on a misspelt key and keeps only the
    last of several ``--force_yml`` flags. Ours are applied (typed, checked) while the YAML is read
    (:func:`normalizing_yaml`); BasicSR gets the arguments without them. Its own argparse rules hold:
    ``--force_yml a=1 b=2``, ``--force_yml=a=1``, abbreviations such as ``--force``.
    """
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--force_yml', nargs='+', action='extend', default=[])
    known, rest = parser.parse_known_args(list(argv))
    return known.force_yml, rest


def _yaml_value(text: str) -> Any:
    """A ``--force_yml`` value typed as in an option file: YAML (``2e-4`` too, read as YAML 1.2 reads it)."""
    import yaml

    text = text.strip()
    if text.lower() == 'none':  # BasicSR's --force_yml reads none/None as ~
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # e.g. filename_tmpl={}_x4: not YAML, a string (as BasicSR reads it)
    if isinstance(value, str) and value == text and _FLOAT_TEXT.fullmatch(text) and any(c.isdigit() for c in text):
        with contextlib.suppress(ValueError):  # PyYAML (YAML 1.1) reads 2e-4 as text; options want the number
            return float(text.replace('_', ''))
    return value


def parse_force_yml(entries: Sequence[str]) -> List[ForcedEntry]:
    """``--force_yml`` entries (``train:optim_g:lr=2e-4``) -> ``[(('train', 'optim_g', 'lr'), 0.0002, entry)]``."""
    forced = []
    for entry in entries:
        keys, sep, value = entry.partition('=')
        path = tuple(k.strip() for k in keys.split(':'))
        if not sep or not all(path):
            raise OptionError(f"--force_yml '{entry}': expected <key>[:<key>...]=<value>, e.g. "
                              'train:optim_g:lr=2e-4 or path:experiments_root=runs/x.')
        forced.append((path, _yaml_value(value), entry))
    return forced


def apply_force_yml(opt: MutableMapping[str, Any], forced: Sequence[ForcedEntry], source: str) -> List[str]:
    """Set each forced value in the option dict ``opt`` (as read from the file); returns notes.

    Every key but the last must exist (a misspelt section is named with a did-you-mean). The last
    may be new, as in BasicSR, unless it looks like a misspelling of a key already there
    (``train:ema_decy`` next to ``ema_decay``); keys of ``train`` and ``network_*`` are checked
    afterwards by :func:`check_options` like the file's own.
    """
    notes = []
    for path, value, entry in forced:
        node: Any = opt
        for depth, key in enumerate(path):
            where = ':'.join(path[:depth + 1])
            if not isinstance(node, MutableMapping):
                raise OptionError(f"--force_yml '{entry}': {':'.join(path[:depth])} is "
                                  f'{type(node).__name__} {node!r} in {source}, not a section with keys.')
            existing = [str(k) for k in node]
            if depth < len(path) - 1:
                if key not in node:
                    raise OptionError(f"--force_yml '{entry}': {source} has no key {where}"
                                      f'{_closest(key, existing)}.')
                node = node[key]
                continue
            if key not in node:
                close = difflib.get_close_matches(key, existing, n=1, cutoff=0.8)
                if close:
                    raise OptionError(f"--force_yml '{entry}': {source} has no key {where} (did you mean "
                                      f"'{close[0]}'?); fix the key, or add it to the option file if it is new.")
                notes.append(f"--force_yml '{entry}' adds {where}, which {source} does not set.")
            node[key] = value
    return notes


@contextlib.contextmanager
def normalizing_yaml(notes: List[str], forced: Sequence[ForcedEntry] = (),
                     read: Optional[MutableMapping[str, Any]] = None) -> Iterator[None]:
    """Within the block, BasicSR's option-file YAML loader applies ``forced``, checks the structure and
    normalises dataroots.

    BasicSR's ``parse_options`` expands ``dataroot_*`` and fixes the experiment/result roots right
    after reading the YAML (a list dataroot crashes there), so the fixes must happen as the file is
    read: ``basicsr.utils.options.ordered_yaml`` (the loader factory both 1.4.2's ``parse_options``
    and master's ``yaml_load`` call) hands out a loader that post-processes the document. The
    ``--force_yml`` entries (:func:`parse_force_yml`) are applied there, to the file's own key names
    (e.g. ``datasets:val1:...`` of the authors' files), so BasicSR derives everything from the
    forced values. ``read['path']`` receives the document's ``path`` section as the user set it
    (BasicSR 1.4.2 then overwrites its roots). Notes are appended to ``notes``; problems raise
    :class:`OptionError`.
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
                if forced:
                    if not isinstance(data, MutableMapping):
                        _check_structure(data, self.mambacsr_source)
                    notes.extend(apply_force_yml(data, forced, self.mambacsr_source))
                _check_structure(data, self.mambacsr_source)
                seed = data.get('manual_seed')
                if seed is not None:  # BasicSR's parse_options seeds with it (seed + rank) before our checks
                    _int_at_least(seed, 0, f'{self.mambacsr_source}: manual_seed')
                notes.extend(normalize_dataroots(data, self.mambacsr_source))
                if read is not None:
                    read['path'] = dict(data['path'])
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
                  scale_label: str = 'scale', build: bool = False) -> List[str]:
    """Check one ``network_*`` section against its registered arch; returns notes, raises OptionError.

    Keys must be constructor parameters. MambaCSR and HAT take ``**kwargs`` (their official
    versions silently ignore unknown keys); for them the accepted set is exactly their named
    parameters, which cover every ``network_g`` key of the official option files. Foreign archs
    with ``**kwargs`` cannot be checked (noted). With ``scale``, the network's output factor
    (``upscale``, its constructor default when the key is absent; 1 when ``upsampler`` is ``''``)
    must equal it. ``source`` (e.g. "option file 'x.yml'") prefixes messages; ``scale_label`` names
    where ``scale`` came from. ``build``: also construct our archs once (on the CPU, a fraction of a
    second) so that values their constructors refuse stop here, not after the experiment folder exists.
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
    if build and ours and not required:  # values: what infer's build_and_load says, before any folder is made
        import torch

        kwargs = {k: v for k, v in network_opt.items() if k != 'type'}
        try:
            with torch.random.fork_rng(devices=[]):  # the seeded network built later gets the same weights
                cls(**kwargs)
        except (TypeError, ValueError, KeyError, ZeroDivisionError) as err:
            raise OptionError(f'{prefix}{key}: {arch} cannot be built with these values: {err}') from err
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
            raise OptionError(f'{prefix}{scale_label} is {scale!r} but {key} upscales x{factor!r}{origin}, so its '
                              f'output would not match the x{scale} data. Set {scale_label} and {key}.upscale to the '
                              'same factor.')
    return notes


#: ``train`` keys read by BasicSR 1.4.2's SRModel / BaseModel and train.py (``ema_decay`` ... ``warmup_iter``),
#: plus ours (``use_amp``): what MambaCSRModel / HATModel read.
SR_TRAIN_KEYS = ('ema_decay', 'optim_g', 'scheduler', 'total_iter', 'warmup_iter', 'pixel_opt', 'perceptual_opt',
                 'use_amp')
#: ``train`` keys read by BasicSR 1.4.2's other models (GAN, video, StyleGAN2): checked for its model types.
BASICSR_TRAIN_KEYS = SR_TRAIN_KEYS + (
    'optim_d', 'gan_opt', 'net_d_iters', 'net_d_init_iters', 'ldl_opt', 'feature_matching_opt', 'fix_flow',
    'lr_flow', 'flow_lr_mul', 'dcn_lr_mul', 'tsa_iter', 'r1_reg_weight', 'path_reg_weight', 'path_batch_shrink',
    'net_g_reg_every', 'net_d_reg_every', 'mixing_prob')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text_number_hint(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r'[-+]?\d+', value.strip()):
        return f' (YAML reads {value!r} as text: remove the quotes)'
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()) and any(c.isdigit() for c in value):
        return f" (YAML reads {value} as text: write it with a dot, e.g. {value.replace('e', '.0e', 1)}, or as " \
               f'!!float {value})'
    return ''


def _int_at_least(value: Any, minimum: int, where: str, fix: str = '') -> int:
    """``value`` as an int >= ``minimum`` (an integral float such as 5.0e5 is accepted), else OptionError."""
    if _is_number(value) and float(value).is_integer() and value >= minimum:
        return int(value)
    raise OptionError(f'{where} must be an integer >= {minimum}, got {value!r}{_text_number_hint(value)}'
                      + (f'; {fix}' if fix else '.'))


def _model_family(model_registry, model_type: Any) -> str:
    """'ours', 'basicsr' or 'other': whose code reads the options of ``model_type``."""
    module = getattr(_lookup(model_registry, model_type), '__module__', '') or ''
    return {'mambacsr_arch': 'ours', 'basicsr': 'basicsr'}.get(module.split('.')[0], 'other')


def _check_train(opt: Mapping[str, Any], family: str, source: str) -> None:
    """The ``train`` section of ``basicsr train``: known keys, optimiser, iterations, AMP."""
    train = opt.get('train')
    if not isinstance(train, Mapping):
        raise OptionError(f'{source}: the train section is {"missing" if train is None else repr(train)}; basicsr '
                          'train needs it (optim_g, scheduler, total_iter, pixel_opt, ...).')
    known = SR_TRAIN_KEYS if family == 'ours' else BASICSR_TRAIN_KEYS if family == 'basicsr' else None
    if known is not None:
        unknown = [str(k) for k in train if k not in known and not str(k).startswith('optim_')]
        if unknown:
            named = ', '.join(f"'{k}'{_closest(k, known)}" for k in unknown)
            raise OptionError(f'{source}: train has no option {named} ({opt.get("model_type")} reads '
                              f'{", ".join(known)}); fix or remove it (BasicSR would ignore it).')
    for key, value in train.items():
        if str(key).startswith('optim_') and value is not None:
            if not isinstance(value, Mapping) or 'type' not in value:
                raise OptionError(f'{source}: train.{key} must be a mapping with a type (e.g. {{type: Adam, '
                                  f'lr: 2.0e-4}}), got {value!r}.')
            lr = value.get('lr')
            if lr is not None and not (_is_number(lr) and lr > 0):
                raise OptionError(f'{source}: train.{key}.lr must be a positive number, got {lr!r}'
                                  f'{_text_number_hint(lr)}.')
    if 'optim_g' not in train:
        raise OptionError(f'{source}: train.optim_g is missing (e.g. optim_g: {{type: Adam, lr: 2.0e-4}}).')
    if not isinstance(train.get('scheduler'), Mapping) or 'type' not in train['scheduler']:
        raise OptionError(f'{source}: train.scheduler must be a mapping with a type (e.g. {{type: MultiStepLR, '
                          f'milestones: [250000], gamma: 0.5}}), got {train.get("scheduler")!r}.')
    _int_at_least(train.get('total_iter'), 1, f'{source}: train.total_iter',
                  'the number of training iterations (0 would train nothing and save it as the latest model).')
    if train.get('warmup_iter') is not None:
        _int_at_least(train['warmup_iter'], -1, f'{source}: train.warmup_iter', '-1 means no warm-up.')
    if family == 'ours':
        from mambacsr_arch.models.inference import parse_train_amp

        device = 'cuda' if int(opt.get('num_gpu') or 0) > 0 else 'cpu'
        try:
            parse_train_amp(train.get('use_amp'), device)
        except ValueError as err:
            raise OptionError(f'{source}: {err}') from err


def _check_loaders(opt: MutableMapping[str, Any], command: str, source: str) -> List[str]:
    """Numbers BasicSR's dataloaders, logger and validation divide by or index with."""
    notes = []
    scale = opt.get('scale')
    train = opt['datasets'].get('train')
    if command == 'train' and isinstance(train, Mapping):
        where = f'{source}: datasets.train'
        _int_at_least(train.get('batch_size_per_gpu'), 1, f'{where}.batch_size_per_gpu')
        _int_at_least(train.get('num_worker_per_gpu', 0), 0, f'{where}.num_worker_per_gpu', '0 loads in the main '
                      'process.')
        gt_size = train.get('gt_size')
        if gt_size is not None:
            size = _int_at_least(gt_size, 1, f'{where}.gt_size')
            if isinstance(scale, int) and scale > 0 and size % scale:
                lower = size - size % scale
                raise OptionError(f'{where}.gt_size is {size}, not a multiple of scale {scale}: the LQ patch would '
                                  f'be {size / scale:g} px. Use {lower or scale} or {lower + scale}.')
    val = opt.get('val')
    if command == 'test' and not isinstance(val, Mapping):
        raise OptionError(f'{source}: basicsr test needs a val section (e.g. val: {{save_img: true, metrics: '
                          '{psnr: {type: calculate_psnr, crop_border: 4, test_y_channel: true}}}}).')
    if val is not None and not isinstance(val, Mapping):
        raise OptionError(f'{source}: val must be a mapping (val_freq, save_img, metrics, ...), got {val!r}.')
    if isinstance(val, MutableMapping):
        if 'save_img' not in val:
            val['save_img'] = False  # BasicSR indexes val.save_img
            notes.append('val.save_img is not set: images are not saved (val.save_img: true saves them).')
        if command == 'test' and val['save_img'] and 'suffix' not in val:
            val['suffix'] = None  # BasicSR's test indexes val.suffix; None (falsy) is its "<image>_<name>.png"
            notes.append(f"val.suffix is not set: images are saved as <image>_{opt.get('name')}.png "
                         '(val.suffix: x saves <image>_x.png).')
        if command == 'train' and any(phase.startswith('val') for phase in opt['datasets']):
            _int_at_least(val.get('val_freq'), 1, f'{source}: val.val_freq', 'validate every N iterations.')
        metrics = val.get('metrics')
        if metrics is not None and not (isinstance(metrics, Mapping) and all(
                isinstance(m, Mapping) and 'type' in m for m in metrics.values())):
            raise OptionError(f'{source}: val.metrics must map names to {{type: calculate_psnr, ...}}, got '
                              f'{metrics!r}.')
    if command == 'train':
        logger_opt = opt.get('logger')
        if not isinstance(logger_opt, Mapping):
            raise OptionError(f'{source}: the logger section is missing (e.g. logger: {{print_freq: 100, '
                              'save_checkpoint_freq: 5000, use_tb_logger: false}}).')
        for key in ('print_freq', 'save_checkpoint_freq'):
            _int_at_least(logger_opt.get(key), 1, f'{source}: logger.{key}')
    return notes


def _check_devices(opt: Mapping[str, Any], source: str) -> None:
    import torch

    num_gpu = opt.get('num_gpu', 0)
    if _is_number(num_gpu) and num_gpu > 0 and not torch.cuda.is_available():
        raise OptionError(f'{source}: num_gpu is {num_gpu} but CUDA is not available; set num_gpu: auto (or 0) to '
                          'run on the CPU.')


def _check_inference(opt: Mapping[str, Any], source: str) -> None:
    """``val.tile`` / top-level ``tile`` / ``padding_size`` / ``val.use_amp``: the resolver ``infer`` uses."""
    from mambacsr_arch.models.inference import resolve_inference_settings

    try:
        resolve_inference_settings(opt, source=source)
    except ValueError as err:
        raise OptionError(str(err)) from err


def _has_states(path_opt: Mapping[str, Any]) -> bool:
    from mambacsr_arch.cli.runtime import list_states

    folder = path_opt.get('training_states')
    return bool(folder) and bool(list_states(folder))


def _check_pretrained(opt: Mapping[str, Any], family: str, source: str) -> None:
    """``path.pretrain_network_g``: readable (no pickled code), and of ``network_g.type`` when loaded strictly."""
    from mambacsr_arch.archs.state_dict_report import foreign_checkpoint
    from mambacsr_arch.models.weights import choose_param_key, open_checkpoint, select_weights

    path_opt = opt['path']
    load_path = path_opt.get('pretrain_network_g')
    if not load_path or path_opt.get('resume_state') or (opt.get('auto_resume') and _has_states(path_opt)):
        return  # a resume loads its own network file (BasicSR's check_resume); load_resume_state checks it
    where = f'{source}: path.pretrain_network_g'
    try:
        checkpoint = open_checkpoint(load_path)
        state, _ = select_weights(checkpoint, choose_param_key(None, path_opt, has_option_file=True))
    except (ConfigError, OSError, KeyError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise OptionError(f'{where}: {message}') from err
    arch = (opt.get('network_g') or {}).get('type')
    if path_opt.get('strict_load_g', True) and family == 'ours' and arch in ('MambaCSR', 'HAT'):
        foreign = foreign_checkpoint(arch, state.keys())
        if foreign:
            raise OptionError(f"{where}: '{load_path}': {foreign} (Or set path.strict_load_g: false to load what "
                              'fits.)')


def check_options(opt: MutableMapping[str, Any], command: str, source: str) -> List[str]:
    """Validate (and normalise) a parsed option dict for ``basicsr <command>``; returns notes.

    ``command`` is ``'train'`` or ``'test'``; ``source`` names the option file in messages. Checked
    here, before anything is built or written: dataset keys and types, model and arch types,
    ``network_*`` keys and ``scale``; for ``train`` the ``train`` keys (:data:`SR_TRAIN_KEYS`),
    ``optim_*.lr`` > 0, ``total_iter`` >= 1, ``train.use_amp`` (fp16 needs CUDA); loader numbers
    (``batch_size_per_gpu`` >= 1, ``num_worker_per_gpu`` >= 0, ``gt_size`` a multiple of ``scale``),
    ``val.val_freq`` / ``logger.*_freq`` >= 1; ``num_gpu`` against CUDA; the ``val.tile`` / ``tile`` /
    ``padding_size`` / ``val.use_amp`` settings (the resolver ``basicsr infer`` uses); and
    ``path.pretrain_network_g`` (readable, and of ``network_g.type`` when loaded strictly).
    ``val.save_img`` (absent: false) and, for test, ``val.suffix`` (absent: ~) are defaulted with a note.
    Also misspelt sections, text flags, ``num_gpu``, our networks built once (:func:`check_network`) and
    :func:`check_values`. The files named (datasets, resume state, test weights): :func:`check_sources`.
    """
    _, dataset_registry, model_registry = _registries()
    notes = normalize_dataset_keys(opt, command, source)
    _check_top_level(opt, source)
    _check_type(model_registry, opt.get('model_type'), f'{source}: model_type', 'model')
    family = _model_family(model_registry, opt.get('model_type'))
    for key, dataset in opt['datasets'].items():
        _check_type(dataset_registry, dataset.get('type'), f'{source}: datasets.{key}.type', 'dataset')
    if 'network_g' not in opt:
        raise OptionError(f'{source}: the network_g section is missing (e.g. network_g: {{type: MambaCSR, ...}}).')
    for key in [k for k in opt if str(k).startswith('network_')]:
        scale = opt.get('scale') if key == 'network_g' else None
        notes += check_network(opt[key], key, source, scale=scale, build=True)
    _check_devices(opt, source)
    if command == 'train':
        _check_train(opt, family, source)
    notes += _check_loaders(opt, command, source)
    check_values(opt, command, source, family)
    if family == 'ours':
        _check_inference(opt, source)
    _check_pretrained(opt, family, source)
    return notes


# ----------------------------------------------------------------------------- values BasicSR reads late

#: Top-level sections: a key that is none of these but close to one (``vall``, ``datsets``, ``loger``) is a typo
#: that BasicSR would ignore (a misspelt ``val`` silently turns validation off).
SECTIONS = ('name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'network_g', 'path', 'train', 'val',
            'logger', 'dist_params')
#: Options BasicSR tests for truth: ``maybe`` or ``'false'`` (text) would count as true.
_FLAGS = {'datasets.*': ('use_hflip', 'use_rot', 'use_shuffle'), 'path': ('strict_load_g',),
          'val': ('save_img', 'pbar'), 'logger': ('use_tb_logger',)}
_ADDED = ('is_train', 'dist', 'rank', 'world_size', 'auto_resume')  # set by BasicSR's parse_options
_SCHEDULERS = ('MultiStepLR', 'MultiStepRestartLR', 'CosineAnnealingRestartLR')  # BasicSR's setup_schedulers


def _number_list(value: Any, where: str, integer: bool, minimum: float) -> None:
    if not isinstance(value, (list, tuple)) or not all(
            _is_number(v) and v >= minimum and (not integer or float(v).is_integer()) for v in value):
        kind = 'integers' if integer else 'numbers'
        raise OptionError(f'{where} must be a list of {kind} >= {minimum:g}, got {value!r}.')


def _check_top_level(opt: Mapping[str, Any], source: str) -> None:
    """Misspelt sections, flags given as text, ``num_gpu`` (BasicSR's int() traceback)."""
    for key in opt:
        close = difflib.get_close_matches(str(key), SECTIONS, n=1, cutoff=0.75)
        if key not in SECTIONS + _ADDED and close and close[0] not in opt:
            raise OptionError(f"{source}: unknown top-level key '{key}' (did you mean '{close[0]}'?); BasicSR would "
                              'ignore it.')
    sections = [(f'datasets.{name}', part, _FLAGS['datasets.*']) for name, part in (opt.get('datasets') or {}).items()]
    sections += [(name, opt.get(name), keys) for name, keys in _FLAGS.items() if name != 'datasets.*']
    for where, part, keys in sections:
        for key in keys:
            value = part.get(key) if isinstance(part, Mapping) else None
            if value is not None and not isinstance(value, bool):
                raise OptionError(f'{source}: {where}.{key} must be true or false, got {value!r}.')
    num_gpu = opt.get('num_gpu', 'auto')
    if num_gpu != 'auto' and num_gpu is not None:
        _int_at_least(num_gpu, 0, f'{source}: num_gpu', "or 'auto' (every visible GPU, else the CPU).")
    if opt.get('is_train') and 'val' not in opt and any(str(k).startswith('val') for k in opt.get('datasets') or {}):
        raise OptionError(f'{source}: datasets has a validation set but there is no val section (val_freq, '
                          'metrics): add one, or remove the validation set.')


def _check_schedule(train: Mapping[str, Any], family: str, source: str) -> None:
    """``train``: optimiser and scheduler as BasicSR builds them, ``ema_decay``, the losses."""
    import torch
    import basicsr.losses  # noqa: F401  (the import fills the registry)
    from basicsr.utils.registry import LOSS_REGISTRY

    ema = train.get('ema_decay')
    if ema is not None and not (_is_number(ema) and 0 <= ema < 1):
        raise OptionError(f'{source}: train.ema_decay must be a number in [0, 1) (0: no EMA; 0.999 is usual), got '
                          f'{ema!r}.')
    if family == 'other':
        return
    from basicsr.models.base_model import BaseModel

    optim = dict(train['optim_g'])
    kind = optim.pop('type')
    try:  # BasicSR's own factory, on one throw-away parameter (1.4.2 takes Adam only; newer ones more)
        BaseModel.get_optimizer(None, kind, [torch.nn.Parameter(torch.zeros(1))], **optim)
    except (NotImplementedError, TypeError, ValueError, AttributeError, KeyError) as err:
        raise OptionError(f'{source}: train.optim_g ({kind}) cannot be built: {err}') from err
    scheduler = train['scheduler']
    where = f'{source}: train.scheduler'
    if scheduler['type'] not in _SCHEDULERS:
        raise OptionError(f"{where}.type: BasicSR has no scheduler '{scheduler['type']}'"
                          f"{_closest(str(scheduler['type']), _SCHEDULERS)}; choose one of {', '.join(_SCHEDULERS)}.")
    if scheduler['type'] == 'CosineAnnealingRestartLR':
        _number_list(scheduler.get('periods'), f'{where}.periods', True, 1)
        _number_list(scheduler.get('restart_weights', [1]), f'{where}.restart_weights', False, 0)
    else:
        _number_list(scheduler.get('milestones'), f'{where}.milestones', True, 0)
        _number_list(scheduler.get('restart_weights', [1]), f'{where}.restart_weights', False, 0)
        gamma = scheduler.get('gamma', 0.1)
        if not (_is_number(gamma) and gamma > 0):
            raise OptionError(f'{where}.gamma must be a positive number, got {gamma!r}{_text_number_hint(gamma)}.')
    losses = [key for key in ('pixel_opt', 'perceptual_opt') if train.get(key)]
    if family == 'ours' and not losses:
        raise OptionError(f'{source}: train has no loss: add pixel_opt (e.g. {{type: L1Loss, loss_weight: 1.0, '
                          'reduction: mean}}).')
    for key in losses:
        loss = dict(train[key]) if isinstance(train[key], Mapping) else {}
        cls = _check_type(LOSS_REGISTRY, loss.pop('type', None), f'{source}: train.{key}.type', 'loss')
        # the pixel loss's class itself (build_loss would start BasicSR's logger before its log file); a
        # perceptual loss is not built here: it would load its VGG weights now
        if key == 'pixel_opt':
            try:
                cls(**loss)
            except (TypeError, ValueError, KeyError) as err:
                raise OptionError(f'{source}: train.{key} cannot be built: {err}') from err


def _check_metrics(val: Any, source: str) -> None:
    import basicsr.metrics  # noqa: F401  (the import fills the registry)
    from basicsr.utils.registry import METRIC_REGISTRY as registry

    metrics = val.get('metrics') if isinstance(val, Mapping) else None
    for name, metric in (metrics or {}).items():
        where = f'{source}: val.metrics.{name}'
        _check_type(registry, metric.get('type'), f'{where}.type', 'metric')
        _int_at_least(metric.get('crop_border', 0), 0, f'{where}.crop_border', 'pixels cut from each side before '
                      'scoring (the scale, e.g. 4, as in the papers).')
        flag = metric.get('test_y_channel')
        if flag is not None and not isinstance(flag, bool):
            raise OptionError(f'{where}.test_y_channel must be true or false, got {flag!r}.')


def _check_dataset_sources(opt: Mapping[str, Any], command: str, source: str) -> None:
    """Folders and LMDBs of every dataset, and the JPEG qualities of ours, before BasicSR lists them."""
    from mambacsr_arch.data.jpeg_degraded_dataset import parse_quality_spec

    for phase, dataset in opt['datasets'].items():
        where = f'{source}: datasets.{phase}'
        if command == 'train' and str(phase) == 'train':
            _int_at_least(dataset.get('dataset_enlarge_ratio', 1), 1, f'{where}.dataset_enlarge_ratio',
                          'each epoch repeats the images that many times (1: once).')
        kind = dataset.get('type')
        needed = {'PairedImageDataset': DATAROOT_KEYS, 'JPEGDegradedPairedDataset': ('dataroot_gt',)}.get(kind, ())
        io_backend = dataset.get('io_backend')
        backend = io_backend.get('type', 'disk') if isinstance(io_backend, Mapping) else None
        for key in needed:
            root = dataset.get(key)
            if not root:
                typo = [str(k) for k in dataset if k not in needed and difflib.get_close_matches(str(k), [key], 1, 0.8)]
                hint = f" ('{typo[0]}' is misspelt)" if typo else ''
                raise OptionError(f'{where}.{key} is {"missing" if key not in dataset else repr(root)}{hint}: {kind} '
                                  'needs the folder (or .lmdb) of its images.')
            if not isinstance(root, str) or not osp.isdir(root):
                missing = ' (it does not exist)' if isinstance(root, str) and not osp.exists(root) else ''
                raise OptionError(f"{where}.{key}: '{root}' is not a folder{missing}.")
            if backend == 'lmdb' and not osp.isfile(osp.join(root, 'data.mdb')):
                raise OptionError(f"{where}.{key}: '{root}' is not an LMDB (no data.mdb) but io_backend is lmdb; "
                                  'use io_backend: {type: disk}, or make the LMDB with basicsr prepare-csr --lmdb.')
        if kind == 'JPEGDegradedPairedDataset':
            try:
                parse_quality_spec(dataset, f'datasets.{phase}')
            except ValueError as err:
                raise OptionError(f'{source}: {err}') from err


def check_values(opt: MutableMapping[str, Any], command: str, source: str, family: str) -> None:
    """What BasicSR reads only after it made the experiment folder (or never checks at all): the optimiser,
    scheduler and losses as BasicSR builds them, ``ema_decay``, metric types and crop borders."""
    if command == 'train':
        _check_schedule(opt['train'], family, source)
    _check_metrics(opt.get('val'), source)
    suffix = opt['val'].get('suffix') if isinstance(opt.get('val'), Mapping) else None
    if isinstance(suffix, str) and any(sep in suffix for sep in ('/', '\\')):
        raise OptionError(f'{source}: val.suffix {suffix!r} contains a path separator: it is added to each saved '
                          "image's name (<image>_<suffix>.png); the folder is path.visualization.")


def check_sources(opt: Mapping[str, Any], command: str, source: str) -> None:
    """The files an option file names exist (the CLI runs this after :func:`check_options`): every dataset's
    folders or LMDBs (and the JPEG qualities of ours), ``path.resume_state``, and for ``test`` the weights."""
    _check_dataset_sources(opt, command, source)
    path_opt = opt.get('path') or {}
    resume = path_opt.get('resume_state')
    if command == 'train' and resume and not osp.isfile(str(resume)):
        raise OptionError(f"{source}: path.resume_state: '{resume}' is not a file; give a .state file of "
                          "experiments/<name>/training_states, or remove it (auto_resume finds the newest).")
    if command == 'test' and not path_opt.get('pretrain_network_g'):
        raise OptionError(f'{source}: path.pretrain_network_g is not set: basicsr test would score an untrained, '
                          'randomly initialised network. Set it to the weights to test.')
