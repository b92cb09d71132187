"""Tasks: what a controller trains on and is judged by (hipp.tasks.base). Importing this package
registers the built-in ones: the embedded shapes + Fashion-MNIST task and a user's CSV."""
from .base import REQUIRED, TASKS, Batches, Task, get_task, register
from . import embedded, user_csv  # noqa: F401  (registration)

DEFAULT_TASK = embedded.EmbeddedTask.name

__all__ = ["DEFAULT_TASK", "REQUIRED", "TASKS", "Batches", "Task", "get_task", "register"]
