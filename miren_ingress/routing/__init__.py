"""Host resolution for the data plane: host syntax (hosts), the in-memory route table and its
resolution rules (routes), the table kept current from the store (table_sync), and the
EdgeRouter the proxy engine asks per request (router)."""
