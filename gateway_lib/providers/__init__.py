"""Provider adapters behind the protocol in ``base``."""
