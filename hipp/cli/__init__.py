"""The `hipp` command line."""
