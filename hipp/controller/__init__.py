"""The controller: a small hypernetwork from a preference to gate logits at every level of the prune space."""
