"""Training the controller on a frozen model: objectives, the Accelerate loop, resumable state."""
