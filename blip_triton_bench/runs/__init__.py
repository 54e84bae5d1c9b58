"""The runs a session makes: perf levels, A/B, the batching sweep, start-up, capacity at an SLO, and the
session record that ends them."""
