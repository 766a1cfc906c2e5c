"""The backend side: the upstream connection and its per-service pool, the small
h11 client of probes, scrapes and discovery, and TLS contexts."""
