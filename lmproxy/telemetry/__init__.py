"""What the router tells of itself: Prometheus metrics and the access log, W3C
trace context and OTLP spans, logging set-up."""
