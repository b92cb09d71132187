"""Recovery: distillation of an exported model from its base (`hipp recover`)."""
from .loop import recover
from .settings import RecoverConfig

__all__ = ["RecoverConfig", "recover"]
