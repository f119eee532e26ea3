"""Training: loss, optimizer, sharded train state, jitted step, loop, checkpoints."""
