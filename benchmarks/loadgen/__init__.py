"""End-to-end load generator behind `pdserve bench`."""
