"""Prefect flows, the CLI, and the Polars/pyarrow code they call."""
