"""The worker side: model specs and runtimes, dynamic batching, step-level generation scheduling, loops."""
