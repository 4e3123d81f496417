"""Running the emitted step: data, checkpoints and the training script."""
