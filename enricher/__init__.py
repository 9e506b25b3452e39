"""enricher: enrich a Kafka event stream with third-party HTTP APIs, within their limits and quotas."""

__version__ = "0.1.0"
