"""enricher: enrich Kafka events with third-party HTTP APIs, within their limits and quotas."""

__version__ = "0.1.0"
