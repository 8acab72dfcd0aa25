"""Packaging for mambacsr-arch, a BasicSR plugin for compressed image super-resolution.

Requirements are deliberately loose for users; the CI/dev stack is pinned in
``requirements/constraints-cpu.txt``.
"""
import os.path as osp

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def read_version() -> str:
    namespace = {}
    with open(osp.join(HERE, 'mambacsr_arch', 'version.py'), encoding='utf-8') as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def read_readme() -> str:
    with open(osp.join(HERE, 'README.md'), encoding='utf-8') as f:
        return f.read()


setup(
    name='mambacsr-arch',
    version=read_version(),
    description='MambaCSR and HAT for compressed image super-resolution, as a BasicSR plugin',
    long_description=read_readme(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(include=['mambacsr_arch', 'mambacsr_arch.*']),
    include_package_data=True,
    install_requires=[
        'basicsr>=1.4.2',
        'torch>=2.1',
        'opencv-python',
        'lmdb',
        'pyyaml',
        'numpy',
        'numba>=0.59',  # the CPU selective-scan kernel
        'scikit-image',  # embedded demo photos (also a basicsr dependency)
        'tqdm',
        'safetensors',  # .safetensors checkpoints, read wherever a .pth is accepted
    ],
    extras_require={
        # Built against the user's CUDA torch; only ever imported inside mambacsr_arch.ops. Only the selective
        # scan is used (SS2D has no causal conv1d), so causal-conv1d, a long CUDA build, is not needed.
        'cuda': ['mamba-ssm'],
        # `basicsr export`: ONNX export (torch's dynamo exporter needs onnxscript) and its onnxruntime check
        'export': ['onnx', 'onnxscript', 'onnxruntime'],
        # mambacsr_arch.integrations.spandrel: MambaCSR in spandrel hosts (ComfyUI, chaiNNer, InvokeAI)
        'spandrel': ['spandrel>=0.4.2'],
        'dev': ['pytest', 'pytest-timeout', 'ruff', 'onnx', 'onnxscript', 'onnxruntime', 'spandrel>=0.4.2'],
    },
    entry_points={
        'console_scripts': ['basicsr=mambacsr_arch.cli.main:main'],
        # lets other BasicSR front-ends that honour this group load our registrations
        'basicsr.plugins': ['mambacsr_arch=mambacsr_arch'],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Image Processing',
        'Framework :: Pytest',
    ],
)
