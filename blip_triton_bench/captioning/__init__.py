"""Captioning: greedy decoding through a served BLIP, caption load and its genai-perf metrics, and clients that
leave mid-caption."""
