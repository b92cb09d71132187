"""Tasks: what a controller trains on and is judged by (hipp.tasks.base). Importing this package
registers the built-in ones: the embedded shapes + Fashion-MNIST task, a user's CSV, and the
instruction samples a generative (LLaVA) model answers."""
from .base import REQUIRED, TASKS, Batches, Task, get_task, register
from . import embedded, instruct, user_csv  # noqa: F401  (registration)

DEFAULT_TASK = embedded.EmbeddedTask.name
GENERATIVE_TASK = instruct.InstructTask.name


def default_task(model_family: str) -> Task:
    """The embedded task a model of this family is measured on: instructions for a LLaVA, shapes +
    Fashion-MNIST for a contrastive model."""
    return get_task(GENERATIVE_TASK if model_family == "llava" else DEFAULT_TASK)


__all__ = ["DEFAULT_TASK", "GENERATIVE_TASK", "default_task", "REQUIRED", "TASKS", "Batches", "Task", "get_task", "register"]
