"""Who serves: the roster of services (health, slots, models), its membership and
the sources that fill it (config, admin API, InfiniLM registry, DNS, Kubernetes),
health checks, engine load scraping and the circuit breaker."""
