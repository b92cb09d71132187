"""The core, the same for every model family: the prune space and its costs, gates, plans, budget fitting, preferences."""
