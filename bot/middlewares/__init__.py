"""Cross-cutting concerns: API retries, access control, metrics."""
