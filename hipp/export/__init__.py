"""From a plan to a physically smaller model: slicing and the exported, hardened checkpoint."""
