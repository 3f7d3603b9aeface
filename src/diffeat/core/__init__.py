"""The contracts and the machinery every method shares."""
