"""The HTTP layer: request pipeline, problem responses, the application."""
