"""miren_activator."""
