"""--workers N: the supervisor, each worker, and the channel between them."""
