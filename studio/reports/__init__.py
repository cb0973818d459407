"""What a finished run yields: evaluation, run card, export."""
