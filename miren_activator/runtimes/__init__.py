"""How a sandbox runs: the Runtime interface (base), a spawned command (process, confined by
isolation), already-running servers (upstream), and an in-memory runtime for tests (fake)."""
