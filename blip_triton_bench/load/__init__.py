"""The load: level types and the async engine that drives them in windows, the blocking client, load from
several processes or a Ray cluster, shared-memory I/O, and the load generator's own ceiling."""
