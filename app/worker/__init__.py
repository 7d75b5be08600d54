"""A worker process: one model variant loaded once, jobs taken from its Redis stream."""
