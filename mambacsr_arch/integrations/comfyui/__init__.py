"""ComfyUI custom-node folder: MambaCSR checkpoints in ComfyUI's stock upscale-model nodes.

ComfyUI loads upscale models ("Load Upscale Model", then "Upscale Image (using Model)") through
spandrel; this folder adds no node of its own, it registers MambaCSR in ``spandrel.MAIN_REGISTRY``
(:func:`mambacsr_arch.integrations.spandrel.install`) when ComfyUI imports its custom nodes. Link it
into ``ComfyUI/custom_nodes`` with mambacsr-arch installed in ComfyUI's Python (docs/spandrel.md)::

    ln -s "$(python -c 'import mambacsr_arch.integrations.comfyui as m, os; print(os.path.dirname(m.__file__))')" \\
        ComfyUI/custom_nodes/mambacsr

ComfyUI imports this file under the folder's name (e.g. ``mambacsr``), so every import here is absolute.
"""
from mambacsr_arch.integrations.spandrel import install

install(ignore_duplicates=True)  # ComfyUI may import the folder again (reloads, a second link): keep the first

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
