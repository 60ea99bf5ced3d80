"""pdserve common."""
