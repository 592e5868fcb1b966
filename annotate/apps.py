from django.apps import AppConfig
from django.urls import register_converter

from annotate.converters import UnicodeSlugConverter


class AnnotateConfig(AppConfig):
    name = "annotate"
    verbose_name = "Labeling"

    def ready(self):
        from annotate import signals  # it imports the models: only once the app registry is ready

        signals.connect()
        register_converter(UnicodeSlugConverter, "unislug")
