"""alignti common layer: cache schema, reader/writer, fingerprints, adapters and loss math."""

__version__ = "0.1.0"
