from django.apps import AppConfig


class DemoConfig(AppConfig):
    """The demo wing as a Django app, for its management commands (seed_demo, simulate_labelers, ...)."""

    name = "demo"
    verbose_name = "Demo"
