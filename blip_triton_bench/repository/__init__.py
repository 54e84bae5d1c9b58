"""The model repository: its variants parsed from config.pbtxt and staged with their artifacts, and the
repository a baseline store was recorded with."""
