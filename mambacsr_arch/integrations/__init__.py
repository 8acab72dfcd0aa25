"""Adapters that make this package's networks loadable where SR models are run.

* :mod:`mambacsr_arch.integrations.spandrel`: MambaCSR as a spandrel ``Architecture``;
  ``install()`` adds it to ``spandrel.MAIN_REGISTRY`` (ComfyUI, chaiNNer, InvokeAI load models
  through spandrel). Needs the ``[spandrel]`` extra: ``pip install 'mambacsr-arch[spandrel]'``.
* ``mambacsr_arch/integrations/comfyui/``: a ComfyUI custom-node folder that calls ``install()``,
  so the stock "Load Upscale Model" node takes MambaCSR checkpoints (docs/spandrel.md).

The adapters detect nothing themselves: detection and option reading are the architecture's own
``checkpoint.py`` (via :func:`mambacsr_arch.archs.detect.detect_arch`). Importing this package
does not import spandrel.
"""
