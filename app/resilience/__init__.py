"""Keeping a failing backend or an overload from taking the service down: circuit breakers."""
