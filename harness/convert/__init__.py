"""Converting released checkpoints into segprune model folders (`segprune convert`)."""
