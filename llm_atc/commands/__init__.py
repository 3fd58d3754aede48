"""One module per CLI command; each exposes a Click command named after the module."""
