"""A proxied request's path: its journey (journey.py), its tries and their attempts
(attempt.py, exchange.py, pair.py), and the routing and policies it meets (route.py,
policies.py)."""
