"""The application shell: the `miren` command line (cli), the typed configuration (config) and
`miren serve`, which wires the store, the activator, the proxy and the admin API (serve)."""
