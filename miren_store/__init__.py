"""miren_store."""
