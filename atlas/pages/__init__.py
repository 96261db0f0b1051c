"""HTML pages of `atlas serve` (Jinja2 templates in templates/) and the reads they share with the API."""
