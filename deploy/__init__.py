"""pdserve deploy."""
