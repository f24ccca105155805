"""Training: state, optimizer, the train step, checkpoints, the stage loop and AOT compilation."""
