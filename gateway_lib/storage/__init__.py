"""Table storage protocol and its Azure / in-memory implementations."""
