"""[[keys]]: per-key rpm, tpm and max_in_flight, kept locally, by the supervisor of
--workers, or in Redis."""
