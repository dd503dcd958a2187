"""Dev-only programs: local host, provider simulator, dev token issuer. Never imported by gateway_lib."""
