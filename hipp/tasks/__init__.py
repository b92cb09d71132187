"""Tasks: what a controller trains on and is judged by (hipp.tasks.base). Importing this package
registers the built-in ones: the embedded shapes + Fashion-MNIST task, a user's CSV, and the
instruction samples a generative (LLaVA) model answers."""
from .base import REQUIRED, TASKS, Batches, Task, get_task, register
from . import embedded, instruct, user_csv  # noqa: F401  (registration)

DEFAULT_TASK = embedded.EmbeddedTask.name

__all__ = ["DEFAULT_TASK", "REQUIRED", "TASKS", "Batches", "Task", "get_task", "register"]
