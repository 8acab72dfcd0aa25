"""Model classes; importing registers ``MambaCSRModel`` and ``HATModel`` in BasicSR's MODEL_REGISTRY.

Public helpers: :func:`restore_image` (padding/tiling/official protocol inference),
:func:`load_weights` (checkpoint loading with actionable errors), :func:`model_to_device`
(CPU/CUDA DDP), :func:`atomic_torch_save` (crash-safe writes).
"""
from .checkpoint_io import atomic_torch_save
from .csr_model import CSRModel, HATModel, MambaCSRModel
from .distributed import model_to_device
from .inference import restore_image
from .weights import load_weights

__all__ = ['CSRModel', 'HATModel', 'MambaCSRModel', 'atomic_torch_save', 'load_weights', 'model_to_device',
           'restore_image']
