"""MAR training: corpus streams, MAR routing for training, the loop, checkpoints, the default model card."""
