"""Embedded default configuration (model catalogue, tiers). Overridden by app settings."""
