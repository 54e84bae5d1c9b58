"""blip-triton-bench: a performance regression suite for BLIP captioning served by Triton."""
