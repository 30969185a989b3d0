"""miren_ingress."""
