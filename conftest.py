"""Project-local pytest settings only: the plugin registers itself through the pytest11 entry point."""
