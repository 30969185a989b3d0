"""The control plane's HTTP face: the admin API (api), its OpenAPI document (openapi), the
errors it answers with (errors) and its bearer token (token)."""
