"""Test support: real brokers and daemons as child processes, for the tests, benchmarks and demo."""
