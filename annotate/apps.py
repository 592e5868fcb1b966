from django.apps import AppConfig


class AnnotateConfig(AppConfig):
    name = "annotate"
    verbose_name = "Labeling"

    def ready(self):
        from django.urls import register_converter

        from annotate import signals
        from annotate.converters import UnicodeSlugConverter

        signals.connect()
        register_converter(UnicodeSlugConverter, "unislug")
