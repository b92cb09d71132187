"""Building the embedded teacher (not part of the installed library)."""
