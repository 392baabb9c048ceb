"""The forward pass: a plan of batches, hooks that capture the sampled positions of every requested
layer, and sinks that receive each finished batch (memory, resume checkpoint)."""
