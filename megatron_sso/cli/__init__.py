"""Command-line entry points (``megatron-sso`` / ``python -m megatron_sso``)."""
