"""pdserve benchmarks, run as modules (`python -m benchmarks.X`); nothing imports them."""
