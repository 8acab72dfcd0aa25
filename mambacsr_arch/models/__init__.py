"""Model classes; importing registers them in BasicSR's MODEL_REGISTRY."""
