"""Backends that run the GPU side of the engine outside this process (issue 15): Ray Serve."""
